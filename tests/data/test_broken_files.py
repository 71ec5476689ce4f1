"""Data files that are broken as files are named with their line (issue 16 item 9)."""

from __future__ import annotations

import json

import pytest

from llmlab.data.sources import diagnose_files, load_named_dataset


def _load(tmp_path, path, fmt="messages"):
    recipe = {"seed": 0, "output_dir": str(tmp_path / "run"),
              "datasets": {"mine": {"path": str(path), "format": fmt}}}
    return load_named_dataset(recipe, "mine")


def _rows(n):
    return [json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                     {"role": "assistant", "content": f"hello {i}"}]}) for i in range(n)]


def test_malformed_json_line_is_named(tmp_path):
    rows = _rows(30)
    rows[16] = rows[16][:-5]  # a truncated object on line 17
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=rf"datasets\.mine\.path: {path}:17: not valid JSON"):
        _load(tmp_path, path)


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=rf"datasets\.mine\.path: {path}: the file is empty"):
        _load(tmp_path, path)


def test_non_utf8_bytes_are_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("In the beginning\n\nGod created the heaven\n\nand the caf".encode() + b"\xe9 earth\n")
    with pytest.raises(ValueError, match=rf"{path}:5: byte 0xe9 at column 12 is not valid UTF-8"):
        _load(tmp_path, path, fmt="text")


def test_diagnose_json_documents_and_json_lines(tmp_path):
    doc = tmp_path / "doc.json"
    doc.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    assert diagnose_files([str(doc)], "json").startswith(f"{doc}:4: not valid JSON")
    lines = tmp_path / "lines.json"  # a .json file holding JSON lines is fine
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert diagnose_files([str(lines)], "json") is None
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps([{"text": "a"}]))
    assert diagnose_files([str(ok)], "json") is None
