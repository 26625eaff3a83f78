"""The restricted loader builds tensors and containers and never calls anything else in the file."""

import builtins
import os
import pickle

import pytest
import torch

from runtime.restricted_pickle import Dropped, restricted_load


class Payload:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_objects_are_dropped_and_never_called(tmp_path):
    marker = tmp_path / "ran"
    payloads = [
        Payload(os.system, f"touch {marker}"),
        Payload(builtins.exec, f"open({str(marker)!r}, 'w')"),
        Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
        torch.optim.lr_scheduler.StepLR(
            torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), 1
        ),
    ]
    weights = {
        "w": torch.arange(6.0).reshape(2, 3),
        "p": torch.nn.Parameter(torch.ones(2)),
        "half": torch.ones(2).half(),
    }
    torch.save(
        dict(model=weights, things=payloads, epoch=3, size=torch.Size([2, 3])),
        tmp_path / "ckpt.pth",
    )
    loaded = restricted_load(tmp_path / "ckpt.pth")
    assert not marker.exists()
    assert all(isinstance(x, Dropped) for x in loaded["things"])
    assert [x.origin.split(".")[-1] for x in loaded["things"]] == [
        "system",
        "exec",
        "eval",
        "StepLR",
    ]
    assert loaded["epoch"] == 3 and loaded["size"] == torch.Size([2, 3])
    assert (
        torch.equal(loaded["model"]["w"], weights["w"])
        and loaded["model"]["half"].dtype == torch.float16
    )
    assert type(loaded["model"]["p"]) is torch.Tensor


def test_garbage_is_an_unpickling_error_not_a_crash(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"\x80\x02garbage")
    with pytest.raises(Exception) as err:
        restricted_load(tmp_path / "x.pth")
    assert isinstance(
        err.value, (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError)
    )
