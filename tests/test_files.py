"""Writing outputs: all or nothing, never over an input, an existing file only with force."""

from __future__ import annotations

import os

import pytest

import espquant.files
from espquant.errors import OptionError, OutputError
from espquant.files import guard_outputs, same_file, write_files


def test_a_group_is_written_whole(tmp_path):
    written = write_files({tmp_path / "a.pickle": b"A", tmp_path / "a.json": b"J"})
    assert written == [tmp_path / "a.pickle", tmp_path / "a.json"]
    assert (tmp_path / "a.pickle").read_bytes() == b"A" and (tmp_path / "a.json").read_bytes() == b"J"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.pickle"]


def test_a_failed_temporary_write_changes_nothing(tmp_path, monkeypatch):
    (tmp_path / "a.pickle").write_bytes(b"old A")
    (tmp_path / "a.json").write_bytes(b"old J")
    real = espquant.files._write_temporary

    def disk_full_on_second(target, data):
        if target.name == "a.json":
            raise OutputError(f"{target}: writing failed (No space left on device); nothing was changed.")
        return real(target, data)

    monkeypatch.setattr(espquant.files, "_write_temporary", disk_full_on_second)
    with pytest.raises(OutputError, match="No space left"):
        write_files({tmp_path / "a.pickle": b"new A", tmp_path / "a.json": b"new J"})
    assert (tmp_path / "a.pickle").read_bytes() == b"old A" and (tmp_path / "a.json").read_bytes() == b"old J"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.pickle"]


def test_a_failed_rename_restores_the_files_already_replaced(tmp_path, monkeypatch):
    (tmp_path / "a.cpp").write_bytes(b"old cpp")
    real_replace = os.replace
    calls = []

    def failing_second(src, dst):
        calls.append(str(dst))
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(espquant.files.os, "replace", failing_second)
    with pytest.raises(OutputError, match="Input/output error"):
        write_files({tmp_path / "a.cpp": b"new cpp", tmp_path / "a.hpp": b"new hpp"})
    monkeypatch.setattr(espquant.files.os, "replace", real_replace)
    assert (tmp_path / "a.cpp").read_bytes() == b"old cpp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.cpp"]  # no new hpp, no temporaries, no backups


def test_a_file_size_limit_leaves_the_old_pair(tmp_path):
    """``ulimit -f``: the second file of the pair cannot be written; the first must not be replaced either."""
    import subprocess
    import sys
    import textwrap

    (tmp_path / "t.pickle").write_bytes(b"old pickle")
    (tmp_path / "t.json").write_bytes(b"old json")
    script = textwrap.dedent(
        f"""
        import resource
        from espquant.files import write_files
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        write_files({{{str(tmp_path / "t.pickle")!r}: b"p" * 100, {str(tmp_path / "t.json")!r}: b"j" * 5000}})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0 and "OutputError" in result.stderr and "File too large" in result.stderr
    assert (tmp_path / "t.pickle").read_bytes() == b"old pickle" and (tmp_path / "t.json").read_bytes() == b"old json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.pickle"]


def test_two_outputs_on_one_path_are_refused(tmp_path):
    with pytest.raises(OutputError, match="share one path"):
        write_files({tmp_path / "x": b"1", tmp_path / "sub" / ".." / "x": b"2"})
    assert not (tmp_path / "x").exists()


def test_guard_refuses_inputs_even_through_links(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    link = tmp_path / "link.onnx"
    os.link(model, link)
    sym = tmp_path / "sym.onnx"
    sym.symlink_to(model)
    for output in (model, link, sym, tmp_path / "sub" / ".." / "m.onnx"):
        with pytest.raises(OutputError, match="would replace the input"):
            guard_outputs([output], [model], force=True)
    assert same_file(link, model) and not same_file(tmp_path / "other", model)


def test_guard_needs_force_for_existing_outputs(tmp_path):
    existing = tmp_path / "t.json"
    existing.write_text("{}")
    with pytest.raises(OptionError, match=r"t\.json already exists; add --force"):
        guard_outputs([tmp_path / "t.pickle", existing], [None], force=False)
    guard_outputs([tmp_path / "t.pickle", existing], [None], force=True)
    with pytest.raises(OutputError, match="is a folder"):
        guard_outputs([tmp_path], [], force=True)
