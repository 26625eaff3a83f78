"""DDP on CPU with gloo and 2 processes: same first-step loss and gradients as one process on the
same global batch, and a full torchrun training run that writes one checkpoint."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.backbone import build_model, loss_ratios
from model.loss import ModalityAwareLoss
from tests.conftest import REPO, tiny_model_cfg
from runtime.errors import UserError

MCFG = dict(backbone="ma-tiny-vit", orth_loss_ratio=0.01)  # overrides of model=tiny
GLOBAL_BATCH = 8


def batch():
    g = torch.Generator().manual_seed(123)
    return dict(
        image=torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g),
        tokens=torch.randint(1, 400, (3, 16), generator=g),
        prompt_id=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
        m1=torch.tensor([0, 1, 0, 1, 1, 0, 1, 0]),
        m2=torch.full((GLOBAL_BATCH,), 3),
    )


def model():
    torch.manual_seed(0)
    return build_model(tiny_model_cfg(**MCFG))[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, world, port, out):
    from torch.nn.parallel import DistributedDataParallel
    from runtime.distributed import GatherFeatures, init_distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    info = init_distributed("cpu")  # gloo, also on a machine with GPUs
    net = model()
    ddp = DistributedDataParallel(net)
    b = batch()
    mine = slice(rank, None, world)  # DistributedSampler's interleaved share of the batch
    total, _ = ddp(
        b["image"][mine],
        b["tokens"],
        b["prompt_id"][mine],
        b["m1"][mine],
        b["m2"][mine],
        ModalityAwareLoss(loss_ratios(tiny_model_cfg(**MCFG)), GatherFeatures(info)),
    )
    total.backward()
    losses = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(losses, total.detach().reshape(1))
    if rank == 0:
        torch.save(
            dict(
                loss=torch.cat(losses).mean(),
                grads={n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
            ),
            out,
        )
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_first_step_equals_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(ddp_worker, args=(2, free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    net = model()
    b = batch()
    total, _ = net(
        b["image"],
        b["tokens"],
        b["prompt_id"],
        b["m1"],
        b["m2"],
        ModalityAwareLoss(loss_ratios(tiny_model_cfg(**MCFG))),
    )
    total.backward()
    torch.testing.assert_close(ddp["loss"], total.detach(), atol=1e-5, rtol=0)
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert set(grads) == set(ddp["grads"])
    for n, g in grads.items():
        torch.testing.assert_close(
            ddp["grads"][n], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}"
        )


@pytest.mark.slow
def test_torchrun_training_writes_one_checkpoint(tmp_path, demo_root):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
        "dataset=demo",
        "model=tiny",
        f"dataset.root={demo_root}",
        "train.epochs=1",
        "train.batch_size=16",
        "train.num_workers=0",
        "device=cpu",
        "logger.wandb.mode=disabled",
        f"hydra.run.dir={run}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "model").iterdir()) == ["best.pth", "last.pth"]
    ckpt = torch.load(run / "model" / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 1
    log = (run / "train.log").read_text()
    assert "world size 2" in log and log.count("epoch 1 done") == 1


@pytest.mark.slow
def test_torchrun_sharded_inference_equals_one_process(tmp_path, demo_root):
    from pipeline.infer import infer
    from pipeline.train import train
    from tests.conftest import compose_cfg

    run = tmp_path / "run"
    train(
        compose_cfg(
            "config-train",
            [
                "dataset=demo",
                "model=tiny",
                f"dataset.root={demo_root}",
                "train.epochs=1",
                "train.batch_size=32",
                "train.num_workers=0",
                "device=cpu",
                "logger.wandb.mode=disabled",
            ],
        ),
        run,
    )
    single = infer(
        compose_cfg("config-infer", [f"path={run}", "device=cpu", "num_workers=0", "mode=last"])
    )
    expect = {
        f: torch.load(single / f, weights_only=True)
        for f in ("img_logits.pt", "converted_logits.pt")
    }
    index = (single / "index.csv").read_text()
    for f in ("img_logits.pt", "txt_logits.pt", "converted_logits.pt", "index.csv"):
        (single / f).unlink()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "infer.py",
        f"path={run}",
        "device=cpu",
        "num_workers=0",
        "mode=last",
        "batch_size=7",
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (single / "index.csv").read_text() == index
    for f, t in expect.items():
        torch.testing.assert_close(torch.load(single / f, weights_only=True), t, atol=1e-5, rtol=0)


def test_backend_follows_the_device_setting(monkeypatch):
    """device=cpu runs gloo even where GPUs are visible; CUDA runs NCCL, one process per GPU, and
    more processes than GPUs is a clear error naming the fix."""
    import runtime.distributed as ud

    chosen = []
    monkeypatch.setattr(ud.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(ud.dist, "init_process_group", lambda backend: chosen.append(backend))
    monkeypatch.setattr(ud.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ud.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(ud.torch.cuda, "set_device", lambda i: chosen.append(f"set_device {i}"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = ud.init_distributed("cpu")
    assert chosen == ["gloo"] and (info.rank, info.local_rank, info.world_size) == (1, 1, 2)
    for device in ("auto", "cuda"):
        with pytest.raises(UserError, match=r"only 1 GPU\(s\).*--nproc_per_node=1.*device=cpu"):
            ud.init_distributed(device)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    chosen.clear()
    ud.init_distributed("auto")
    assert chosen == ["set_device 0", "nccl"]
    monkeypatch.setattr(ud.torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="sees no CUDA GPU"):
        ud.init_distributed("cuda")


def rank_pid(parent, rank):
    """The pid of torchrun's worker process with the given RANK."""
    for pid in subprocess.run(
        ["pgrep", "-P", str(parent)], capture_output=True, text=True
    ).stdout.split():
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_and_resumes_exactly(tmp_path, demo_root):
    """SIGTERM reaches rank 1 only: both ranks agree at the next step, rank 0 saves, both exit
    128+15 (none waits forever in a collective), and the resumed run equals an uninterrupted one."""
    import signal
    import time

    args = [
        "train.py",
        "dataset=demo",
        "model=tiny",
        f"dataset.root={demo_root}",
        "train.epochs=3",
        "train.batch_size=16",
        "train.num_workers=0",
        "train.log_every=1",
        "device=cpu",
        "logger.wandb.mode=disabled",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = subprocess.run(
        torchrun + args + [f"hydra.run.dir={straight}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(
        torchrun + args + [f"hydra.run.dir={stopped}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and "epoch 1 step 2 " not in (
        (stopped / "train.log").read_text() if (stopped / "train.log").is_file() else ""
    ):
        time.sleep(0.05)
    os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "exitcode  : 143" in err, err[-3000:]
    ckpt = torch.load(stopped / "model" / "last.pth", weights_only=True)
    assert (
        ckpt["epoch"] == 0
        and ckpt["batch_in_epoch"] > 0
        and "signal 15 received" in (stopped / "train.log").read_text()
    )
    resumed = subprocess.run(
        torchrun + ["train.py", f"resume={stopped}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (
        torch.load(r / "model" / "last.pth", weights_only=True)["model"]
        for r in (straight, stopped)
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
