"""Checkpoints (train/checkpoint.py): atomic writes, a checksum verified on load, every unreadable file one
clear error naming its path, no temporary file left behind, a full disk reported as such."""

import errno
import os
import pathlib
import re

import pytest
import torch

from pnnh_kernels.train.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)


def _state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((64,), value)}, "config": {"model": "resnet8"}, "epoch": 1}


def test_a_checkpoint_round_trips(tmp_path):
    path = str(tmp_path / "ck.pt")
    save_checkpoint(_state(), path, kind="resume")
    state = load_checkpoint(path, kind="resume")
    assert torch.equal(state["model"]["w"], torch.ones(64)) and state["epoch"] == 1


def test_the_file_loads_with_weights_only_and_names_its_format(tmp_path):
    path = str(tmp_path / "ck.pt")
    save_checkpoint(_state(), path, kind="weights")
    record = torch.load(path, weights_only=True)  # no pickled code anywhere in the file
    assert record["format"] == FORMAT and record["kind"] == "weights"


def _payload_span(path: str) -> tuple[int, int]:
    """Where the serialized state lies inside the file (found by its unique bytes)."""
    data = pathlib.Path(path).read_bytes()
    marker = torch.full((64,), 1.0).numpy().tobytes()
    start = data.find(marker)
    assert start > 0
    return start, start + len(marker)


@pytest.mark.parametrize("flips", [1, 16])
def test_flipped_bytes_in_the_tensor_data_are_caught(tmp_path, flips):
    path = str(tmp_path / "last.pt")
    save_checkpoint(_state(), path, kind="resume")
    start, _end = _payload_span(path)
    data = bytearray(pathlib.Path(path).read_bytes())
    for i in range(flips):
        data[start + 3 * i] ^= 0x5A
    pathlib.Path(path).write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=re.escape(f"{path} is corrupted: its contents do not match their checksum")
    ):
        load_checkpoint(path)


def test_a_hundred_flipped_bits_anywhere_give_a_checkpoint_error(tmp_path):
    path = str(tmp_path / "last.pt")
    save_checkpoint(_state(), path, kind="resume")
    data = bytearray(pathlib.Path(path).read_bytes())
    g = torch.Generator().manual_seed(0)
    for pos in torch.randint(0, len(data), (100,), generator=g).tolist():
        data[pos] ^= 1 << (pos % 8)
    pathlib.Path(path).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(path)):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "is empty: not a pnnh-train checkpoint"),
        (b"epoch,loss\n1,0.5\n", "corrupted or not a pnnh-train checkpoint"),
        (torch.ones(3), "not a pnnh-train checkpoint"),
        ({"model": {}, "epoch": 1}, "not a pnnh-train checkpoint"),  # the old format, or anyone's dict
    ],
    ids=["empty", "text", "bare_tensor", "dict_without_format"],
)
def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path, content, match):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(str(path))
    assert str(path) in str(info.value)


def test_a_weights_checkpoint_is_refused_for_resuming(tmp_path):
    path = str(tmp_path / "best.pt")
    save_checkpoint(_state(), path, kind="weights")
    with pytest.raises(CheckpointError, match=r"holds model weights only .* resume from the run's last\.pt"):
        load_checkpoint(path, kind="resume")
    assert load_checkpoint(path)["epoch"] == 1  # any checkpoint serves its weights


def test_a_missing_file_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "nope.pt"))


def test_a_crash_mid_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    save_checkpoint(_state(1.0), path, kind="resume")

    def power_cut(src, dst):
        raise KeyboardInterrupt("power cut before the rename")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2.0), path, kind="resume")
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(64))
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_a_full_disk_is_an_oserror_naming_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    save_checkpoint(_state(1.0), path, kind="resume")
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError) as info:
        save_checkpoint(_state(2.0), path, kind="resume")
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == path
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(64))
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".tmp-abc.pt").write_bytes(b"half a checkpoint")
    (tmp_path / "last.pt").write_bytes(b"kept")
    removed = remove_stale_temporaries(str(tmp_path))
    assert [os.path.basename(p) for p in removed] == [".tmp-abc.pt"]
    assert os.listdir(tmp_path) == ["last.pt"]
