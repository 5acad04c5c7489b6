"""dust3r_ns.fileio: atomic file/folder writes, permissions from the umask, errors of the caller's class."""

from __future__ import annotations

import os
import stat

import pytest

from dust3r_ns import fileio


class MyError(ValueError):
    pass


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_atomic_file_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    with fileio.atomic_file(p) as tmp:
        assert tmp.parent == p.parent and tmp.name.startswith(".a.txt.") and tmp.name.endswith(".tmp")
        tmp.write_text("one")
        assert not p.exists()
    assert p.read_text() == "one"
    fileio.atomic_write(p, lambda t: t.write_text("two"))
    assert p.read_text() == "two"
    assert sorted(f.name for f in p.parent.iterdir()) == ["a.txt"]
    assert _mode(p) == 0o666 & ~_umask()


def test_atomic_file_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_file(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.txt"]


def test_errors_use_the_given_class(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(MyError, match="is a folder"):
        with fileio.atomic_file(tmp_path / "d", "thing", error=MyError):
            pass
    (tmp_path / "f").write_text("x")
    with pytest.raises(MyError, match="cannot create folder"):
        fileio.writable_parent(tmp_path / "f" / "x" / "y", error=MyError)
    with pytest.raises(fileio.OutputError, match="not a folder"):
        with fileio.atomic_dir(tmp_path / "f"):
            pass


def test_atomic_dir_new_and_existing(tmp_path):
    out = tmp_path / "out"
    with fileio.atomic_dir(out, ("a", "b")) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("2")
    assert sorted(f.name for f in out.iterdir()) == ["a", "b"]
    assert _mode(out) == 0o777 & ~_umask() and _mode(out / "a") == 0o666 & ~_umask()
    (out / "keep").write_text("user file")
    with fileio.atomic_dir(out, ("a", "b")) as tmp:
        (tmp / "a").write_text("3")
    assert sorted(f.name for f in out.iterdir()) == ["a", "keep"]  # stale managed file removed, others kept
    assert (out / "a").read_text() == "3"
    assert [f.name for f in tmp_path.iterdir()] == ["out"]
