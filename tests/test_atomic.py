"""data/atomic.py: a file is replaced whole or not at all, and no temporary file is left behind either way."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from data.atomic import atomic_write, temp_path, write_bytes_atomic, write_json_atomic, write_text_atomic


def test_writes_the_content_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    atomic_write(path, lambda f: f.write(b"\x00first"))
    assert path.read_bytes() == b"\x00first"
    write_bytes_atomic(path, b"second")  # over an existing file
    assert path.read_bytes() == b"second"
    write_text_atomic(tmp_path / "a.txt", "größer\nline\r\n")
    assert (tmp_path / "a.txt").read_bytes() == "größer\nline\r\n".encode()  # UTF-8, newlines as given
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.txt"]


def test_the_temporary_file_is_hidden_beside_the_target(tmp_path: Path) -> None:
    seen = []
    atomic_write(tmp_path / "x.json", lambda f: seen.append(Path(f.name)))
    assert seen == [tmp_path / f".x.json.tmp-{os.getpid()}"] == [temp_path(tmp_path / "x.json")]


def test_a_failing_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, {"step": 1})

    def half_then_fail(f) -> None:
        f.write(b'{"step": ')
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]

    def interrupted(f) -> None:  # not an Exception: the temporary file goes all the same
        f.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.bin", interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # and no target was created


def test_json_is_sorted_and_indented_as_manifests_always_were(tmp_path: Path) -> None:
    obj = {"b": [1, {"z": None, "a": "ü"}], "a": 1.5}
    write_json_atomic(tmp_path / "m.json", obj)
    # the bytes json.dump(obj, f, indent=2, sort_keys=True) wrote to a UTF-8 text file before data/atomic.py
    assert (tmp_path / "m.json").read_bytes() == json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")
    write_json_atomic(tmp_path / "c.json", obj, indent=None)
    assert (tmp_path / "c.json").read_text() == '{"a": 1.5, "b": [1, {"a": "\\u00fc", "z": null}]}'
