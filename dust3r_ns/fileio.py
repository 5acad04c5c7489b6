"""Atomic file and folder writes: every output of the package appears whole or not at all.

`atomic_file(path)` yields a temporary path in the destination folder; when the block ends without error the file
is flushed to disk and renamed over `path` (one `os.replace`), else removed. `atomic_dir(out, managed)` does the
same for a folder of outputs. Files and folders get the permissions the user's umask gives new files (temporary
files are created private), so a result written atomically looks like any other file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np


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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise error(f"cannot write the {what} in {parent}: {e}; choose a writable output path") from e
    os.close(fd)
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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], what: str = "file",
                 error: type[Exception] = OutputError) -> Path:
    """`write(tmp)` fills a temporary file that then replaces `path` atomically (see `atomic_file`)."""
    with atomic_file(path, what, error) as tmp:
        write(tmp)
    return Path(path)


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
               error: type[Exception] = OutputError) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out_dir`; on success its files are moved into `out_dir`.

    If `out_dir` does not exist, the temporary folder is renamed to it (one atomic step). Otherwise each file is
    moved with `os.replace` (atomic per file), and any file in `out_dir` whose name is in `managed_names` but was
    not produced this time is removed (stale outputs of an earlier export, e.g. a text model next to a binary one).
    Other files in `out_dir` are left alone.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise error(f"{out_dir} exists and is not a folder; the {what} needs a folder path")
    parent = writable_parent(out_dir, what, error)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise error(f"cannot write the {what} in {parent}: {e}; choose a writable output path") from e
    try:
        yield tmp
        default_permissions(tmp)
        if not out_dir.exists():
            os.rename(tmp, out_dir)
            return
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise error(f"folder {out_dir} is not writable for the {what}; choose a writable output path")
        produced = set()
        for f in sorted(tmp.iterdir()):
            os.replace(f, out_dir / f.name)
            produced.add(f.name)
        for name in managed_names:
            if name not in produced and (out_dir / name).is_file():
                (out_dir / name).unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
