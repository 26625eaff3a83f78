"""Cluster launches: SLURM's and submitit's process layout read as torchrun's, and Hydra's submitit
launcher (local executor) running a sweep of two 2-process CPU trainings of the tiny model."""

import os
import subprocess
import sys

import pytest
import torch

import runtime.distributed as ud
from data.demo import generate
from tests.conftest import REPO
from runtime.cluster import export_cluster_env, first_host

SLURM = dict(
    SLURM_PROCID="11",
    SLURM_NTASKS="16",
    SLURM_LOCALID="3",
    SLURM_JOB_ID="4242",
    SLURM_JOB_NODELIST="gpu[007-008],cpu1",
)


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node12", "node12"),
        ("gpu[007-008],cpu1", "gpu007"),
        ("a[3,5-9]", "a3"),
        ("n[1-2]-ib,m5", "n1-ib"),
        ("x1,x2", "x1"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_and_submitit_layouts_become_torchrun_variables():
    env = dict(SLURM)
    assert export_cluster_env(env) == "slurm"
    assert (
        env["RANK"],
        env["WORLD_SIZE"],
        env["LOCAL_RANK"],
        env["MASTER_ADDR"],
        env["MASTER_PORT"],
    ) == ("11", "16", "3", "gpu007", str(20000 + 4242))
    env = dict(
        SLURM,
        SUBMITIT_LOCAL_GLOBALID="1",
        SUBMITIT_LOCAL_NTASKS="2",
        SUBMITIT_LOCAL_LOCALID="1",
        SUBMITIT_LOCAL_JOB_ID="777",
    )
    assert export_cluster_env(env) == "submitit"  # a local job inside a SLURM allocation
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == (
        "1",
        "2",
        "127.0.0.1",
        "20777",
    )
    torchrun = dict(SLURM, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    assert (
        export_cluster_env(torchrun) is None and torchrun["WORLD_SIZE"] == "2"
    )  # torchrun inside SLURM wins
    one_task = dict(SLURM, SLURM_NTASKS="1")
    assert export_cluster_env(one_task) is None and "WORLD_SIZE" not in one_task


def test_init_distributed_joins_the_group_a_slurm_job_describes(monkeypatch):
    joined, before = [], os.environ.get("WORLD_SIZE")
    monkeypatch.setattr(ud.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        ud.dist,
        "init_process_group",
        lambda backend: joined.append(
            (backend, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
        ),
    )
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that what init_distributed exports is undone
        monkeypatch.delenv(key)
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    info = ud.init_distributed("cpu")
    assert (info.rank, info.local_rank, info.world_size) == (11, 3, 16)
    assert joined == [("gloo", "gpu007", "24242")]
    monkeypatch.undo()
    assert os.environ.get("WORLD_SIZE") == before  # later tests train in this process


@pytest.mark.slow
def test_submitit_local_sweep_of_two_process_trainings(tmp_path):
    """`-m seed=0,1` with 2 tasks a job: two jobs, each a 2-process gloo training."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    root = generate(tmp_path / "demo", n_photo=2, n_sketch=2)
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=10",
        "seed=0,1",
        "dataset=demo",
        "model=tiny",
        f"dataset.root={root}",
        "dataset.cls_ratio=1.0",
        "train.epochs=1",
        "train.batch_size=16",
        "train.num_workers=0",
        "device=cpu",
        "logger.wandb.mode=disabled",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text()[-1500:] for p in sweep.glob(".submitit/*/*.err"))
    assert proc.returncode == 0, proc.stderr[-2000:] + logs
    weights = []
    for job in ("0", "1"):
        log = (sweep / job / "train.log").read_text()
        assert "world size 2" in log and log.count("epoch 1 done") == 1
        ckpt = torch.load(sweep / job / "model" / "last.pth", weights_only=True)
        assert ckpt["epoch"] == 1 and ckpt["config"]["seed"] == int(job)
        weights.append(ckpt["model"]["modes.weight"])
    assert not torch.equal(*weights)  # two seeds, two different runs
