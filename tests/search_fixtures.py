"""Shared helpers of the search and app tests: a tiny run folder, a small photo gallery, configs."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import torch
from omegaconf import OmegaConf

from model.backbone import build_model
from pipeline.train import train
from tests.conftest import REPO, compose_cfg
from runtime.io import save_torch


def random_run(run, seed=0):
    """A run folder with a randomly initialised tiny model saved as model/best.pth."""
    cfg = compose_cfg("config-train", ["dataset=demo", "model=tiny"])
    torch.manual_seed(seed)
    model = build_model(cfg.model)[0]
    save_torch(
        dict(model=model.state_dict(), config=OmegaConf.to_container(cfg, resolve=True), epoch=0),
        run / "model" / "best.pth",
    )
    return run


def trained_run(run, demo_root):
    """A run folder with a tiny model trained for one epoch (its embeddings spread out, unlike
    random ones)."""
    cfg = compose_cfg(
        "config-train",
        [
            "dataset=demo",
            "model=tiny",
            f"dataset.root={demo_root}",
            "train.epochs=1",
            "train.batch_size=32",
            "train.num_workers=0",
            "train.warmup_steps=2",
            "device=cpu",
            "logger.wandb.mode=disabled",
            "eval.chunk_size=64",
        ],
    )
    train(cfg, run)
    return run


def make_gallery(folder, demo_root, classes=("kite", "sun", "star", "apple"), n=6):
    """A folder of demo photos in sub-folders (n per class) to search in."""
    for cls in classes:
        for src in sorted((demo_root / "photo" / cls).iterdir())[:n]:
            (folder / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, folder / cls / src.name)
    return folder


def search_cfg(run, gallery, *overrides, name="config-search"):
    return compose_cfg(
        name,
        [
            f"path={run}",
            f"gallery={gallery}",
            "device=cpu",
            "num_workers=0",
            "precision=fp32",
            *overrides,
        ],
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(run, gallery, *overrides, timeout=120):
    """app.py on a free port over `gallery`, on the CPU: (process, url, its "serving ..." line)
    once the page answers. The caller stops the process."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "app.py",
            f"path={run}",
            f"gallery={gallery}",
            "device=cpu",
            "num_workers=0",
            "precision=fp32",
            f"port={port}",
            *overrides,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    url, lines, deadline = f"http://127.0.0.1:{port}/", [], time.monotonic() + timeout

    def give_up(why):
        proc.kill()
        raise AssertionError(f"app.py {why}: " + "".join(lines))

    while not lines or "serving" not in lines[-1]:
        lines.append(proc.stdout.readline())
        if (not lines[-1] and proc.poll() is not None) or time.monotonic() > deadline:
            give_up("did not come up")
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url, lines[-1]
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                give_up("does not answer")
            time.sleep(0.3)
