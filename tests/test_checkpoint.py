"""Checkpoints: atomic, checksummed, versioned; a corrupt newest one falls back to the previous good one."""
from __future__ import annotations

import json

import pytest
import torch

from mpqc.checkpoint import RunDirectory, load_checkpoint, save_checkpoint
from mpqc.errors import CheckpointError


def test_round_trip_and_previous_kept(tmp_path):
    path = tmp_path / "search.pt"
    assert load_checkpoint(path) is None
    save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)
    save_checkpoint({"step": 2, "w": torch.arange(4.0) * 2}, path)
    assert load_checkpoint(path)["step"] == 2
    assert (tmp_path / "search.prev.pt").exists()
    assert not list(tmp_path.glob("*.tmp")), "no temporary files left behind"


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    path = tmp_path / "search.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        # Damage the payload inside a valid envelope: the checksum must catch it.
        envelope = torch.load(path, weights_only=True)
        payload = bytearray(envelope["payload"])
        payload[len(payload) // 2] ^= 0xFF
        envelope["payload"] = bytes(payload)
        torch.save(envelope, path)
    else:
        path.write_bytes(b"not a checkpoint at all")
    assert load_checkpoint(path)["step"] == 1


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "search.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    path.write_bytes(b"x")
    (tmp_path / "search.prev.pt").write_bytes(b"y")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_loading_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    path = tmp_path / "search.pt"
    torch.save({"format": "mpqc-checkpoint/1", "sha256": "", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_run_directory_refuses_another_run_and_an_unknown_directory(tmp_path):
    RunDirectory(tmp_path / "run", {"budget": "avg-bits=3"})
    with pytest.raises(CheckpointError, match="--resume"):
        RunDirectory(tmp_path / "run", {"budget": "avg-bits=3"})
    RunDirectory(tmp_path / "run", {"budget": "avg-bits=3"}, resume=True)
    with pytest.raises(CheckpointError, match="differs in: budget"):
        RunDirectory(tmp_path / "run", {"budget": "avg-bits=4"}, resume=True)
    RunDirectory(tmp_path / "run", {"budget": "avg-bits=4"}, force=True)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["identity"] == {"budget": "avg-bits=4"}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds no mpqc run to resume"):
        RunDirectory(tmp_path / "other", {}, resume=True)
