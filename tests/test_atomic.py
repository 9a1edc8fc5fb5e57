"""blipfast.atomic: the real name holds the old file or the whole new one, never a part."""
import json
import os

import pytest
import torch

from blipfast.atomic import atomic_open, atomic_torch_save, atomic_write_json, atomic_write_text


def test_writes_replace_whole_files(tmp_path):
    p = str(tmp_path / "a.json")
    atomic_write_json(p, {"x": 1})
    atomic_write_json(p, {"x": 2}, indent=1)
    assert json.load(open(p)) == {"x": 2}
    atomic_write_text(str(tmp_path / "t.txt"), "hello")
    assert open(tmp_path / "t.txt").read() == "hello"
    atomic_torch_save({"w": torch.arange(3)}, str(tmp_path / "w.pt"))
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["w"], torch.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["a.json", "t.txt", "w.pt"]  # no temporary left behind


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = str(tmp_path / "a.txt")
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_open(p) as f:
            f.write("new, half written")
            raise RuntimeError("disk on fire")
    assert open(p).read() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_only_whole_file_modes():
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_open("x", "a"):
            pass
