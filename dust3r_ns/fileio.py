"""Atomic file and folder writes: every output of the package appears whole or not at all.

`atomic_file(path)` yields a temporary path in the destination folder; when the block ends without error the file
is flushed to disk and renamed over `path` (one `os.replace`), else removed. `atomic_dir(out, managed)` does the
same for a folder of outputs: the new folder is assembled beside `out` (the old folder's other files hard-linked
in) and exchanged with it in one step (`renameat2(RENAME_EXCHANGE)`; where the file system lacks it, two renames
whose interruption `recover_dir` undoes). Files and folders get the permissions the user's umask gives new files
(temporary files are created private), so a result written atomically looks like any other file.

Temporary files and folders are named `.<name>.<random>.tmp` (a replaced folder waiting for deletion:
`.<name>.<random>.old`) and hold an advisory lock (`flock`) while their writer lives; `clean_stale` removes the
ones whose writer was killed (unlocked and untouched for `STALE_AFTER_S`), and every atomic write calls it for
its own output name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

STALE_AFTER_S = 10.0
"""A temporary file/folder that nobody locks and that was not modified for this long belongs to a killed writer."""


class OutputError(ValueError):
    """An output location that cannot be written (one line: the path, the problem, the fix)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_permissions(root: str | os.PathLike) -> None:
    """Give a file, or a folder and everything below it, the modes the umask gives new files and folders."""
    mask = _umask()
    root = Path(root)
    if root.is_file():
        os.chmod(root, 0o666 & ~mask)
        return
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def _lock(path: Path) -> int:
    """Open `path` (file or folder) and take its exclusive advisory lock; the returned fd holds it until closed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _unlock(fd: Optional[int]) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _stale(path: Path, grace: bool = True) -> Optional[int]:
    """A lock fd on `path` if it is a dead writer's leftover (unlocked and, with `grace`, untouched for
    STALE_AFTER_S: a temporary is created a moment before its writer locks it), else None."""
    try:
        if grace and time.time() - path.lstat().st_mtime < STALE_AFTER_S:
            return None
        return _lock(path)
    except OSError:  # locked by a live writer, or gone
        return None


def _leftovers(parent: Path, name: str, suffix: str) -> list[Path]:
    prefix = f".{name}."
    try:
        return sorted(parent / e for e in os.listdir(parent) if e.startswith(prefix) and e.endswith(suffix))
    except OSError:
        return []


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of `path` left beside it; return what was removed.

    Temporaries `.<name>.*.tmp` go. A replaced folder `.<name>.*.old` goes when `path` exists; when `path` is
    missing (a writer was killed between the two renames of the fallback swap) the newest one is renamed back to
    `path` instead (`recover_dir`). Leftovers still locked by a live writer, and temporaries modified in the last
    `STALE_AFTER_S` seconds, are left alone.
    """
    path = Path(path)
    recover_dir(path)
    removed = []
    for leftover in _leftovers(path.parent, path.name, ".tmp") + _leftovers(path.parent, path.name, ".old"):
        fd = _stale(leftover, grace=leftover.suffix == ".tmp")
        if fd is None:
            continue
        try:
            _remove(leftover)
            removed.append(leftover)
        finally:
            _unlock(fd)
    return removed


def recover_dir(path: str | os.PathLike) -> Optional[Path]:
    """If folder `path` is missing but a killed swap left its previous version `.<name>.*.old`, put it back."""
    path = Path(path)
    if os.path.lexists(path):
        return None
    olds = _leftovers(path.parent, path.name, ".old")
    for old in sorted(olds, key=lambda o: o.lstat().st_mtime if o.exists() else 0.0, reverse=True):
        fd = _stale(old, grace=False)  # locked before it got its .old name: no creation race
        if fd is None:
            continue
        try:
            os.rename(old, path)
            return path
        except OSError:
            continue
        finally:
            _unlock(fd)
    return None


def writable_parent(path: str | os.PathLike, what: str = "file", error: type[Exception] = OutputError) -> Path:
    """Create the parent folder of `path` if needed and check that it is writable; return it."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create folder {parent} for the {what}: {e}; choose a writable output path") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"folder {parent} is not writable for the {what}; choose a writable output path")
    return parent


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, what: str = "file", error: type[Exception] = OutputError) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is synced and replaces `path` atomically.

    The temporary name starts with '.' and ends with '.tmp' (e.g. `.scene.npz.k3j2.tmp`), so an interrupted write
    never leaves a file that looks like a finished output. `what` names the output in errors.
    """
    path = Path(path)
    parent = writable_parent(path, what, error)
    if path.is_dir():
        raise error(f"{path} is a folder; the {what} needs a file path")
    clean_stale(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        raise error(f"cannot write the {what} in {parent}: {e}; choose a writable output path") from e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], what: str = "file",
                 error: type[Exception] = OutputError) -> Path:
    """`write(tmp)` fills a temporary file that then replaces `path` atomically (see `atomic_file`)."""
    with atomic_file(path, what, error) as tmp:
        write(tmp)
    return Path(path)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system cannot.

    Raises FileNotFoundError when one of them is missing."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_dir(new: str | os.PathLike, path: str | os.PathLike) -> Optional[Path]:
    """Put folder `new` at `path` in one step; return where the previous `path` now is (to delete), or None.

    `path` missing: one rename. `path` present: one exchange, or where unsupported, `path` -> `.<name>.*.old`
    (locked) then `new` -> `path`; a kill between the two leaves `.old` for `recover_dir`. A folder that another
    process puts at `path` meanwhile is replaced, not an error.
    """
    new, path = Path(new), Path(path)
    for _ in range(8):
        if not os.path.lexists(path):
            try:
                os.rename(new, path)
                return None
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue  # someone else created it meanwhile: replace theirs
        try:
            if _exchange(new, path):
                return new
        except FileNotFoundError:
            continue
        fd = _lock(path) if path.is_dir() else None
        try:
            old = path.parent / f".{path.name}.{os.urandom(6).hex()}.old"
            os.rename(path, old)  # still locked under its new name until `new` is in place
            try:
                os.rename(new, path)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                shutil.rmtree(old, ignore_errors=True)  # someone put a newer one at `path` meanwhile
                continue
        finally:
            _unlock(fd)
        return old
    raise OSError(errno.EBUSY, f"{path} keeps changing while being replaced", str(path))


def _link_tree(src: Path, dst: Path) -> None:
    """Recreate `src` at `dst` with hard links to its files (copies where links are impossible)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for e in sorted(src.iterdir()):
            _link_tree(e, dst / e.name)
        shutil.copymode(src, dst)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _merge_old(old: Path, new: Path, managed: set[str], rel: str = "") -> None:
    """Carry the entries of `old` that this write neither produced nor manages into `new` (hard links)."""
    for e in sorted(old.iterdir()):
        r = f"{rel}{e.name}"
        target = new / e.name
        if r in managed:
            continue  # produced (replaces the old one wholly) or stale
        if os.path.lexists(target):
            if target.is_dir() and not target.is_symlink() and e.is_dir() and not e.is_symlink():
                _merge_old(e, target, managed, r + "/")
            continue  # produced: the new file replaces the old one
        _link_tree(e, target)


def _sync_tree(root: Path) -> None:
    """fsync every file and folder below `root` (write errors of a full disk surface here, not later)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                _fsync(Path(p))
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], what: str = "file",
              error: type[Exception] = OutputError) -> Path:
    """Write `arrays` as one uncompressed `.npz` (what `np.load` reads; no pickled objects) atomically
    (`atomic_write`). The zip archive is closed on every path: a failed write (a full disk) raises one error, where
    `np.savez` leaves its archive open and its finaliser later prints a second traceback."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, value in arrays.items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asanyarray(value), allow_pickle=False)

    return atomic_write(path, write, what, error)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, managed_names: Sequence[str] = (), what: str = "folder",
               error: type[Exception] = OutputError, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out_dir`; on success it becomes `out_dir` in one step.

    The temporary folder gets the umask's permissions and is synced to disk; then, if `out_dir` exists and
    `replace` is False, the old folder's entries that were not produced this time are hard-linked into it (a
    produced file replaces the old one; a produced folder is merged with the old one entry by entry, unless its
    relative path is in `managed_names`, then it replaces the old folder wholly). Entries listed in
    `managed_names` (relative paths such as "cameras.txt" or "sparse/0") that were not produced are dropped
    (stale outputs of an earlier write). `replace=True` drops everything old. Finally `swap_dir` puts the folder
    in place, so readers see the old folder or the new one, never a mix; an error or a kill before that leaves
    `out_dir` untouched (what a kill leaves beside it, `clean_stale` removes later).
    """
    out_dir = Path(out_dir)
    parent = writable_parent(out_dir, what, error)
    clean_stale(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise error(f"{out_dir} exists and is not a folder; the {what} needs a folder path")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
        fd = _lock(tmp)
    except OSError as e:
        raise error(f"cannot write the {what} in {parent}: {e}; choose a writable output path") from e
    old: Optional[Path] = None
    try:
        yield tmp
        default_permissions(tmp)
        _sync_tree(tmp)
        if out_dir.is_dir() and not os.access(out_dir, os.W_OK | os.X_OK):
            raise error(f"folder {out_dir} is not writable for the {what}; choose a writable output path")
        if out_dir.is_dir() and not replace:
            _merge_old(out_dir, tmp, set(managed_names))
            shutil.copymode(out_dir, tmp)
        old = swap_dir(tmp, out_dir)
    finally:
        _unlock(fd)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_npz(path: str | os.PathLike, arrays: dict, kind: str, version: int, what: str,
             error: type[Exception] = OutputError) -> Path:
    """Write `arrays` as one versioned `.npz` (`format_kind`, `format_version` added) atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise error(f"{path}: {what} files must end in .npz")
    tagged = {"format_kind": np.array(kind), "format_version": np.array(version), **arrays}
    return write_npz(path, tagged, what, error)


@contextlib.contextmanager
def open_npz(path: str | os.PathLike, kind: str, version: int, what: str, fix: str,
             error: type[Exception] = OutputError) -> Iterator:
    """Open a `.npz` written by `save_npz` with `kind` and a version up to `version`; every problem (missing,
    unreadable, another kind, newer version, a missing array while reading) raises `error` naming the file, the
    problem and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what} file; {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format_kind" not in z.files or str(z["format_kind"]) != kind:
                raise error(f"{path}: not a dust3r_ns {what} file (format_kind is not {kind}); {fix}")
            found = int(z["format_version"])
            if found > version:
                raise error(f"{path}: {what} format version {found} unsupported (this build reads up to {version}); "
                            "upgrade dust3r_ns")
            yield z
    except error:
        raise
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as e:
        raise error(f"{path}: not a readable {what} file, truncated or corrupt ({type(e).__name__}: "
                    f"{str(e)[:80]}); {fix}") from None
