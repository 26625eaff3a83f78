"""A killed run resumes at once: kill -9 with loader workers alive frees the run folder, SIGTERM to
the whole process group saves last.pth, a kill between last.pth and best.pth loses nothing, a
full disk (torch's own error form) is named as such and never removes the run's log."""

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import train as pipeline_train
from pipeline.train import train
from runs.folder import MARKER, resume_config
from runtime.io import DiskFullError, save_torch
from tests.conftest import REPO

SLOW_RUN = [
    "model=tiny",
    "dataset=demo",
    "train.batch_size=2",
    "train.num_workers=2",
    "device=cpu",
    "logger.wandb.mode=disabled",
    "eval.chunk_size=64",
    "train.warmup_steps=2",
]


def start(run, demo_root, *args):
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *SLOW_RUN,
        f"dataset.root={demo_root}",
        f"hydra.run.dir={run}",
        *args,
    ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_for(what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if what():
            return True
        time.sleep(0.01)
    raise AssertionError("timed out")


def lock_is_free(run):
    return flock_is_free(run / MARKER)


def flock_is_free(file):
    """No process holds an flock on `file` (this test takes it for an instant, then drops it)."""
    with open(file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def resume(run, *args):
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), f"resume={run}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def reap(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.communicate()


@pytest.mark.slow
def test_kill_9_with_loader_workers_alive_frees_the_run_folder_at_once(tmp_path, demo_root):
    run = tmp_path / "run"
    p = start(run, demo_root, "train.epochs=2", "train.save_every_steps=1")
    try:
        wait_for(lambda: (run / "model" / "last.pth").is_file() and len(children(p.pid)) >= 2)
        workers = children(p.pid)
        assert not lock_is_free(run)  # the live trainer holds it
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        killed = time.time()
        assert any(Path(f"/proc/{w}").exists() for w in workers)  # the workers outlive it a while
        wait_for(lambda: lock_is_free(run), timeout=0.5)
        assert time.time() - killed < 0.5
        r = resume(run)
    finally:
        reap(p)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(run / "model" / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and [h["epoch"] for h in ckpt["history"]] == [1, 2]


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_last_and_resumes(tmp_path, demo_root):
    """SLURM, scancel and timeout signal every process of the job: the loader workers ignore it,
    the trainer saves last.pth at its next step and exits 143. Every step is logged: the step
    saved is the last one logged (no step ran after the save), mid-epoch, and not before the
    last step logged when the signal was sent."""
    run = tmp_path / "run"
    p = start(run, demo_root, "train.epochs=2", "train.log_every=1")
    try:
        wait_for(lambda: len(children(p.pid)) >= 2 and _logged_steps(run))
        before = max(_logged_steps(run))
        os.killpg(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        reap(p)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    ckpt = torch.load(run / "model" / "last.pth", weights_only=True)
    assert "killed by signal" not in err
    assert f"saved last.pth at epoch 1, step {ckpt['step']};" in _log(run)
    assert ckpt["epoch"] == 0 and ckpt["batch_in_epoch"] > 0
    assert before <= ckpt["step"] == max(_logged_steps(run)), (before, ckpt["step"])
    r = resume(run)
    assert r.returncode == 0, r.stderr[-2000:]
    done = torch.load(run / "model" / "last.pth", weights_only=True)
    assert done["epoch"] == 2 and done["step"] > ckpt["step"]


def _logged_steps(run):
    """The step numbers of train.log's per-step lines ("epoch E step N loss/...")."""
    return [int(m) for m in re.findall(r"epoch \d+ step (\d+) ", _log(run))]


def _log(run):
    try:
        return (run / "train.log").read_text()
    except OSError:
        return ""


class Killed(BaseException):
    """Stands for a kill -9: nothing after it runs in the training loop."""


@pytest.mark.slow
def test_a_kill_between_last_and_best_loses_no_best(tmp_path, tiny_train_cfg, monkeypatch):
    run = tmp_path / "run"
    real = pipeline_train.save_checkpoint

    def killed_after_last(state, path):
        real(state, path)
        if path.name == "last.pth" and state["batch_in_epoch"] == 0:
            raise Killed()

    monkeypatch.setattr(pipeline_train, "save_checkpoint", killed_after_last)
    with pytest.raises(Killed):
        train(tiny_train_cfg("train.epochs=1"), run)
    monkeypatch.setattr(pipeline_train, "save_checkpoint", real)
    assert not (run / "model" / "best.pth").exists()
    last = torch.load(run / "model" / "last.pth", weights_only=True)
    assert last["epoch"] == 1 and last["best_pending"] is True
    train(resume_config(run, []), run)
    best = torch.load(run / "model" / "best.pth", weights_only=True)
    assert best["epoch"] == 1 and best["step"] == last["step"]
    for k, v in last["model"].items():
        assert torch.equal(best["model"][k], v), k
    assert "best.pth of epoch 1 was not written" in (run / "train.log").read_text()


@pytest.mark.slow
def test_a_finished_best_is_not_rewritten_on_resume(tmp_path, tiny_train_cfg):
    run = tmp_path / "run"
    train(tiny_train_cfg("train.epochs=1"), run)
    before = (run / "model" / "best.pth").stat().st_mtime_ns
    train(resume_config(run, []), run)
    assert (run / "model" / "best.pth").stat().st_mtime_ns == before


TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def test_torchs_own_form_of_a_full_disk_is_disk_full(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_torch({"w": torch.ones(2)}, path)
    for text in (TORCH_FULL, "PytorchStreamWriter failed writing file data/0: file write failed"):

        def full(obj, f, *a, **k):
            raise RuntimeError(text)

        monkeypatch.setattr(torch, "save", full)
        with pytest.raises(
            DiskFullError,
            match=r"no space left on the device \(torch: .*last.pth "
            r"is intact",
        ):
            save_torch({"w": torch.zeros(2)}, path)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="^other$"):  # any other failure: not a full disk
        save_torch({"w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["last.pth"]


@pytest.mark.slow
def test_a_full_disk_at_the_first_checkpoint_keeps_the_runs_log(
    tmp_path, tiny_train_cfg, monkeypatch
):
    run = tmp_path / "run"

    def full(obj, f, *a, **k):
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        DiskFullError,
        match=r"no space left.*no file was written.*train.log and "
        r"config.yaml are kept",
    ):
        train(tiny_train_cfg(), run)
    monkeypatch.undo()
    assert (run / "config.yaml").is_file() and "epoch 1 step" in (run / "train.log").read_text()
    assert not list((run / "model").glob("*.pth"))


def test_a_real_full_filesystem(tmp_path):
    """A small tmpfs filled up: torch's writer fails as it does there (not with ENOSPC)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not permitted'})")
    try:
        save_torch({"w": torch.ones(4)}, mnt / "last.pth")
        with pytest.raises(
            DiskFullError,
            match=r"no space left on the device .*last.pth is "
            r"intact",
        ):
            save_torch({"w": torch.zeros(1 << 18)}, mnt / "last.pth")
        assert os.listdir(mnt) == ["last.pth"]
        assert torch.equal(torch.load(mnt / "last.pth", weights_only=True)["w"], torch.ones(4))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
