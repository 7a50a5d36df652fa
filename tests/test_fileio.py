"""Atomic writes: the file appears whole with a normal file's permissions, or not at all."""

from __future__ import annotations

import os

import pytest

from edgeseg.errors import EdgesegError
from edgeseg.fileio import atomic_path, write_atomic


def test_write_replaces_whole_with_normal_permissions(tmp_path):
    path = write_atomic(tmp_path / "a.json", "new")
    assert path.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    assert os.listdir(tmp_path) == ["a.json"]


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "curves.png"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path  # writers that go by the extension work
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["curves.png"]


def test_missing_folder_is_made_and_a_blocked_one_is_one_edgeseg_error(tmp_path):
    assert write_atomic(tmp_path / "missing" / "x.json", "data").read_text() == "data"
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(EdgesegError, match="cannot create the folder of .*file/x.json.*a file of that name"):
        write_atomic(tmp_path / "file" / "x.json", "data")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(EdgesegError, match="cannot write .*folder.json"):
        write_atomic(tmp_path / "folder.json", "data")
    assert (tmp_path / "file").read_text() == "in the way" and not list((tmp_path / "folder.json").iterdir())
