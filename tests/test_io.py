"""Atomic writes, safe checkpoint loading, device choice."""

import os
import pickle

import pytest
import torch

from runtime.io import UnsafeCheckpointError, load_torch, save_json, save_torch
from runtime.device import autocast, pick_device
from runtime.errors import UserError


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "model" / "last.pth"
    save_torch({"w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_torch({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_torch(path)["w"], torch.ones(3))
    assert os.listdir(path.parent) == ["last.pth"]  # no temporary file left behind


def test_failed_json_write_leaves_previous_file(tmp_path):
    path = tmp_path / "eval_result.json"
    save_json({"a": 1}, path)
    with pytest.raises(TypeError):
        save_json({"a": object()}, path)
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert os.listdir(tmp_path) == ["eval_result.json"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_torch(path)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_written_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_json({"a": 1}, tmp_path / "r.json")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_pick_device_explains_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu" and pick_device("cpu").type == "cpu"
    with pytest.raises(
        UserError, match=r"device 'cuda' asked for, but PyTorch sees no CUDA GPU.*device=auto"
    ):
        pick_device("cuda")
    with pytest.raises(UserError, match=r"unknown device 'gpu'.*auto, cpu, cuda"):
        pick_device("gpu")


def test_unknown_precision_is_a_clear_error_on_any_device():
    with autocast(torch.device("cpu"), "bf16"):
        pass
    with pytest.raises(UserError, match=r"unknown precision 'bf32'.*'bf16', 'fp16', 'fp32'"):
        autocast(torch.device("cpu"), "bf32")
