"""train(cfg, run_dir): the training loop of the modality-aware model."""
import itertools
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from data.check import check_structure
from data.index import make_splits
from data.cached import image_dataset
from data.loader import PromptTable, collate, model_input
from model.backbone import build_model, loss_ratios
from model.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from model.embed import embed_rows
from retrieval.metrics import retrieval_metrics, summarize
from utils.distributed import GatherFeatures, all_gather_cat, cleanup_distributed, init_distributed
from utils.io import save_text
from utils.runtime import UserError, amp_dtype, autocast, log, seed_everything, setup_logging


class ResumableSampler(torch.utils.data.Sampler):
    """A DistributedSampler (each rank its share of a seeded per-epoch permutation; one rank
    when not distributed) that can start part-way through an epoch, for exact resume."""

    def __init__(self, dataset, seed, rank=0, world=1):
        self.base = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                       seed=seed, drop_last=world > 1)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.base.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(iter(self.base), self.start, None)

    def __len__(self):
        return len(self.base) - self.start


def param_groups(model, lr, clip_lr, weight_decay):
    """AdamW groups: backbone at clip_lr, mode vectors + discriminator + scale at lr;
    no weight decay on gains, biases and the logit scale."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = name.startswith("clip.")
        decay = p.ndim >= 2 and "logit_scale" not in name
        key = ("backbone" if backbone else "head", decay)
        groups.setdefault(key, dict(params=[], lr=clip_lr if backbone else lr,
                                    weight_decay=weight_decay if decay else 0.0,
                                    name=f"{key[0]}{'' if decay else '_no_decay'}"))["params"].append(p)
    return list(groups.values())


def lr_lambda(warmup, total, schedule):
    def f(step):
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        return 1.0
    return f


def rng_state():
    return dict(python=list(random.getstate()[1]), python_pos=random.getstate()[2],
                numpy=torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                numpy_pos=int(np.random.get_state()[2]), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


class StopRequested:
    """SIGINT / SIGTERM set a flag; the loop saves last.pth at the next step and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def init_wandb(cfg, run_dir, run_id):
    """wandb as configured; never fails a run for lack of network or login (falls back)."""
    mode = cfg.logger.wandb.mode
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; logging to train.log only.")
        return None
    kwargs = dict(project=cfg.logger.wandb.project, name=cfg.logger.wandb.get("name"),
                  dir=str(run_dir), id=run_id, resume="allow",
                  config=OmegaConf.to_container(cfg, resolve=True))
    for try_mode in dict.fromkeys([mode, "offline"]):
        try:
            return wandb.init(mode=try_mode, settings=wandb.Settings(init_timeout=60), **kwargs)
        except Exception as e:  # no network, no API key, service start failure
            log.warning(f"wandb mode={try_mode} failed ({type(e).__name__}: {e}); "
                        f"{'trying offline' if try_mode != 'offline' else 'logging to train.log only'}.")
    return None


def validate(model, rows, transform, tokenizer, cfg, device, info):
    """mAP@all (default protocol) of sketch -> photo retrieval on the validation classes; each rank
    embeds its share of the images, the embeddings are gathered and every rank gets the score."""
    mine = rows[info.rank::info.world_size]
    emb = embed_rows(model, mine, transform, tokenizer, batch_size=cfg.train.batch_size,
                     num_workers=cfg.train.num_workers, device=device, precision=cfg.train.precision,
                     progress=False, with_converted=False, cache=cfg.dataset.get("cache", False))
    z = all_gather_cat(torch.from_numpy(emb["img"]).to(device)).cpu()
    meta = torch.tensor([[r["m1"], r["label"]] for _, r in mine], dtype=torch.long, device=device)
    meta = all_gather_cat(meta).cpu()
    q, g = meta[:, 0] == 1, meta[:, 0] == 0
    per_query, _ = retrieval_metrics(z[q], z[g], meta[q, 1], meta[g, 1],
                                     chunk_size=cfg.eval.chunk_size, device=device, progress=False)
    return summarize(per_query)["default/AP@all"]


@dataclass
class Progress:
    """The counters a checkpoint carries, so that a run resumes exactly where it stopped."""
    epoch: int = 0            # completed epochs
    step: int = 0             # optimiser steps
    batch_in_epoch: int = 0   # batches of the current epoch already trained
    best: float = -math.inf   # best validation mAP@all so far
    history: list = field(default_factory=list)
    wandb_id: str | None = None


class Trainer:
    """Everything one training run holds: data, model, optimiser, counters and run folder."""

    def __init__(self, cfg, run_dir):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.info = info = init_distributed(cfg.device)
        setup_logging(self.run_dir / "train.log" if info.is_main else None)
        self.device = info.device(cfg.device)
        amp_dtype(cfg.train.precision)  # a wrong name fails here, before any work
        resume = load_checkpoint(self.last_path) if cfg.get("resume") else None
        if resume is not None:
            check_compatible(resume["config"], cfg, self.last_path)
        seed_everything(int(cfg.seed))
        self.splits = make_splits(cfg.dataset)
        check_before_training(self.splits)
        self.model, train_tf, self.eval_tf, self.tokenizer = build_model(cfg.model)
        self.model.to(self.device)
        self.ratios = loss_ratios(cfg.model)
        if sum(self.ratios.values()) <= 0:
            raise UserError("every model.*_loss_ratio is 0; set at least one above 0 (e.g. model.clip_loss_ratio=1).")
        self.build_loader(train_tf if cfg.dataset.get("augment", True) else self.eval_tf)
        self.build_optimizer()
        self.wrap_model()
        self.progress, self.skipped = Progress(), 0
        if resume is not None:
            self.load_state(resume)
        if info.is_main:
            (self.run_dir / "model").mkdir(parents=True, exist_ok=True)
            save_text(OmegaConf.to_yaml(cfg, resolve=True), self.run_dir / "config.yaml")
            log.info(f"run folder {self.run_dir}; {len(self.loader.dataset)} training images of "
                     f"{len(self.splits.train_classes)} classes, {len(self.splits.val)} validation images of "
                     f"{len(self.splits.val_classes)} classes, device {self.device}, world size {info.world_size}")
        self.wandb = init_wandb(cfg, self.run_dir, self.progress.wandb_id) if info.is_main else None
        if self.wandb is not None:
            self.progress.wandb_id = self.wandb.id

    @property
    def last_path(self):
        return self.run_dir / "model" / "last.pth"

    def build_loader(self, transform):
        cfg, info = self.cfg, self.info
        prompts = PromptTable(self.splits.train, self.tokenizer)
        self.tokens = prompts.tokens.to(self.device)
        dataset = image_dataset(self.splits.train, transform, prompts, cfg.dataset.get("cache", False),
                                progress=info.is_main)
        self.sampler = ResumableSampler(dataset, int(cfg.seed), info.rank, info.world_size)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=int(cfg.train.batch_size), sampler=self.sampler,
            num_workers=min(int(cfg.train.num_workers), os.cpu_count() or 1), collate_fn=collate,
            drop_last=info.enabled, pin_memory=self.device.type == "cuda")
        if len(self.loader) == 0:
            raise UserError(f"the training split has {len(dataset)} images, fewer than one batch per "
                            f"rank; lower train.batch_size.")

    def build_optimizer(self):
        tcfg = self.cfg.train
        self.accum = max(1, int(tcfg.accum_steps))
        total_steps = math.ceil(len(self.loader) / self.accum) * int(tcfg.epochs)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, float(tcfg.lr), float(tcfg.clip_lr), float(tcfg.weight_decay)),
            betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(int(tcfg.warmup_steps), total_steps, tcfg.schedule))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and tcfg.precision == "fp16")

    def wrap_model(self):
        """DDP (with the all-ranks feature gather of the contrastive loss) and torch.compile."""
        self.net, self.gather = self.model, None
        if self.info.enabled:
            if self.cfg.train.get("gather_with_grad", True):
                self.gather = GatherFeatures(self.info)
            r = self.ratios
            unused = r["disc"] == 0 or r["clip"] == 0 or not any(r[k] > 0 for k in ("sem", "rec", "disc", "orth"))
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused)
        if self.cfg.train.get("compile", False):
            self.net = torch.compile(self.net)

    def state(self, batch_in_epoch):
        p = self.progress
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                    epoch=p.epoch, step=p.step, batch_in_epoch=batch_in_epoch, best=p.best,
                    history=p.history, rng=rng_state(), wandb_id=p.wandb_id,
                    config=OmegaConf.to_container(self.cfg, resolve=True))

    def load_state(self, ckpt):
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress(ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"], ckpt["best"],
                                 list(ckpt["history"]), ckpt.get("wandb_id"))
        set_rng_state(ckpt["rng"])
        log.info(f"resumed from {self.last_path} at epoch {self.progress.epoch}, step {self.progress.step}")

    def fit(self):
        with StopRequested() as stop:
            while self.progress.epoch < int(self.cfg.train.epochs):
                self.train_epoch(stop)
                self.end_epoch()
        if self.wandb is not None:
            self.wandb.finish()
        if self.info.is_main:
            log.info(f"training finished: {self.run_dir / 'model'}")
        cleanup_distributed()
        p = self.progress
        return dict(run_dir=str(self.run_dir), best=p.best, history=p.history)

    def train_epoch(self, stop):
        cfg, p = self.cfg, self.progress
        self.model.train()
        first = p.batch_in_epoch
        self.sampler.set_epoch(p.epoch, start=first * int(cfg.train.batch_size))
        self.running, self.epoch_start = math.nan, time.time()
        bar = tqdm(self.loader, desc=f"epoch {p.epoch + 1}/{cfg.train.epochs}", disable=not self.info.is_main,
                   initial=first, total=first + len(self.loader), dynamic_ncols=True)
        for i, batch in enumerate(bar, start=first):
            boundary = (i + 1) % self.accum == 0 or i + 1 == first + len(self.loader)
            losses = self.train_batch(batch, boundary)
            if losses is not None:
                bar.set_postfix(loss=f"{self.running:.4f}")
                if boundary:
                    self.log_step(losses, i + 1)
            if stop.signal is not None:
                if self.info.is_main:
                    save_checkpoint(self.state(i + 1), self.last_path)
                    log.info(f"signal {stop.signal} received: saved last.pth at epoch {p.epoch + 1}, "
                             f"step {p.step}; resume with `python train.py resume={self.run_dir}`")
                raise SystemExit(128 + stop.signal)
        bar.close()

    def train_batch(self, batch, boundary):
        """Forward, backward and (at an accumulation boundary) an optimiser step; None when the
        batch was skipped for a non-finite loss."""
        cfg, p = self.cfg, self.progress
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with autocast(self.device, cfg.train.precision):
            images = model_input(batch["image"], self.eval_tf)  # cached uint8 batches are normalised here
            total, losses = self.net(images, self.tokens, batch["prompt_id"], batch["m1"],
                                     batch["m2"], self.ratios, self.gather)
        finite = torch.isfinite(total.detach()).float()
        if self.info.enabled:  # every rank skips or stops together, or DDP would hang
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            if cfg.train.on_nonfinite != "skip":
                raise UserError(
                    f"non-finite loss at epoch {p.epoch + 1}, step {p.step}: total={total.item()}, {terms}. "
                    f"The last good checkpoint is {self.last_path}. Lower train.lr / train.clip_lr, use "
                    f"train.precision=fp32, or set train.on_nonfinite=skip.")
            self.skipped += 1
            log.warning(f"non-finite loss at step {p.step} ({terms}); batch skipped ({self.skipped} so far)")
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.scaler.scale(total / self.accum).backward()
        if boundary:
            if float(cfg.train.get("grad_clip", 0) or 0) > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(cfg.train.grad_clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            p.step += 1
        value = total.item()
        self.running = value if math.isnan(self.running) else 0.9 * self.running + 0.1 * value
        return dict(losses, total=total)

    def log_step(self, losses, batch_in_epoch):
        p, tcfg = self.progress, self.cfg.train
        if not self.info.is_main:
            return
        if p.step % int(tcfg.log_every) == 0:
            metrics = {f"loss/{k}": v.item() for k, v in losses.items()}
            lrs = self.scheduler.get_last_lr()
            metrics.update({"lr": lrs[-1], "lr/clip": lrs[0], "epoch": p.epoch})
            log.info(f"epoch {p.epoch + 1} step {p.step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            if self.wandb is not None:
                self.wandb.log(metrics, step=p.step)
        save_every = int(tcfg.get("save_every_steps", 0) or 0)
        if save_every and p.step % save_every == 0:
            save_checkpoint(self.state(batch_in_epoch), self.last_path)

    def end_epoch(self):
        """Validate, record, and write last.pth (and best.pth when validation improved)."""
        p = self.progress
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        score = None
        if self.splits.val:
            score = validate(self.model, self.splits.val, self.eval_tf, self.tokenizer, self.cfg, self.device, self.info)
        seconds = time.time() - self.epoch_start
        p.history.append(dict(epoch=p.epoch, step=p.step, val_map=score, loss=self.running, seconds=seconds))
        if self.info.is_main:
            improved = score is None or score > p.best
            if improved and score is not None:
                p.best = score
            log.info(f"epoch {p.epoch} done in {seconds:.1f}s: loss {self.running:.4f}"
                     + (f", validation mAP@all {score:.4f} (best {p.best:.4f})" if score is not None else ""))
            if self.wandb is not None and score is not None:
                self.wandb.log({"val/mAP@all": score}, step=p.step)
            ckpt = self.state(0)
            save_checkpoint(ckpt, self.last_path)
            if improved:  # weights for inference only
                save_checkpoint({k: ckpt[k] for k in ("model", "config", "epoch", "step", "best")},
                                self.run_dir / "model" / "best.pth")
        if self.info.enabled:
            torch.distributed.barrier()


def check_before_training(splits):
    """The cheap part of data.check; its errors stop the run before it starts."""
    report = check_structure(splits)
    for w in report.warnings[:20]:
        log.warning(w)
    if report.errors:
        raise UserError("the dataset check found problems:\n  " + "\n  ".join(report.errors)
                        + "\nFix them (python -m data.check lists everything) and start again.")


def train(cfg, run_dir):
    """Train the modality-aware model into `run_dir` (resuming when cfg.resume is set)."""
    return Trainer(cfg, run_dir).fit()


def resume_config(run_dir, overrides=()):
    """The config saved in `run_dir`, with command-line overrides (other than resume=) applied."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"cannot resume: {saved} does not exist. Pass resume=<a run folder written by train.py>.")
    cfg = OmegaConf.load(saved)
    extra = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith("resume")]
    if extra:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in extra]))
    cfg.resume = str(run_dir)
    return cfg


def discard_unfinished_run(run_dir):
    """Remove a run folder that holds no checkpoint (a run that failed before its first save,
    or Hydra's fresh folder of a resumed run): a failed start leaves no partial output."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and not any((run_dir / "model").glob("*.pth")):
        setup_logging(None)  # release train.log
        shutil.rmtree(run_dir, ignore_errors=True)
