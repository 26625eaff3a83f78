"""The training pipeline: train(cfg, run_dir), the loop of the modality-aware model."""

import math
import os
import time
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.check import check_before_training
from data.index import make_splits
from data.cached import image_dataset
from data.loader import PromptTable, collate, ignore_stop_signals, model_input
from data.layouts import PHOTO
from data.pairs import NAMING_RULE
from data.sampler import ClassBatchSampler, ResumableSampler
from model.backbone import build_model, loss_ratios
from model.loss import ModalityAwareLoss
from model.checkpoint import (
    check_compatible,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from model.optim import build_optimizer
from pipeline.selection import Selection
from config.entry import prepare
from runtime.distributed import GatherFeatures, cleanup_distributed, init_distributed
from runtime.io import save_text
from runs.folder import RunFolder
from runtime.device import amp_dtype, autocast, seed_everything
from runtime.errors import UserError
from runtime.logs import init_wandb, log, setup_logging
from runtime.signals import StopRequested, exit_on_sigterm, sigterm_handler


@dataclass
class Progress:
    """The counters a checkpoint carries, so that a run resumes exactly where it stopped."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps
    batch_in_epoch: int = 0  # batches of the current epoch already trained
    best: float = -math.inf  # best selection score so far (higher is better)
    history: list = field(default_factory=list)
    wandb_id: str | None = None


class Trainer:
    """Everything one training run holds: data, model, optimiser, counters and run folder."""

    def __init__(self, cfg, run, info):
        self.cfg, self.run, self.info = cfg, run, info
        setup_logging(run.track(run.log) if info.is_main else None)
        self.device = info.device(cfg.device)
        amp_dtype(cfg.train.precision)  # a wrong name fails here, before any work
        resume = self.load_resume() if cfg.resume else None
        seed_everything(int(cfg.seed))
        self.splits = make_splits(cfg.dataset)
        check_before_training(self.splits, int(cfg.model.n_mode))
        self.selection = Selection(cfg, self.splits)
        self.select = self.selection.rule
        cfg.run = dict(
            train_classes=list(self.splits.train_classes),
            val_classes=list(self.splits.val_classes),
            select=self.select,
        )  # recorded in config.yaml and every checkpoint
        self.model, train_tf, self.eval_tf, self.tokenizer = build_model(cfg.model)
        self.model.to(self.device)
        self.ratios = loss_ratios(cfg.model)
        if sum(self.ratios.values()) <= 0:
            raise UserError(
                "every model.*_loss_ratio is 0; set at least one above 0 (e.g. "
                "model.clip_loss_ratio=1)."
            )
        self.build_loader(train_tf if cfg.dataset.augment else self.eval_tf)
        self.optimizer, self.scheduler, self.accum = build_optimizer(
            self.model, cfg.train, len(self.loader)
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.device.type == "cuda" and cfg.train.precision == "fp16"
        )
        self.wrap_model()
        self.progress, self.skipped = Progress(), 0
        if resume is not None:
            self.load_state(resume)
        if info.is_main:
            self.write_config()
        if info.is_main and cfg.logger.wandb.mode != "disabled":
            run.track(run.path / "wandb")
        self.wandb = init_wandb(cfg, run.path, self.progress.wandb_id) if info.is_main else None
        if self.wandb is not None:
            self.progress.wandb_id = self.wandb.id

    def load_resume(self):
        if not self.run.last.is_file():
            raise UserError(
                f"cannot resume {self.run.path}: it has no model/last.pth (the run stopped before "
                f"its first checkpoint). Start a new run in a new folder; this one is left as it "
                f"is."
            )
        ckpt = load_checkpoint(self.run.last)
        check_compatible(ckpt["config"], self.cfg, self.run.last)
        if ckpt.get("best_pending") and self.info.is_main:
            self.complete_best(ckpt)
        return ckpt

    def complete_best(self, last):
        """last.pth of an epoch that improved the selection is written before best.pth; a kill
        between the two left best.pth missing or older: written here from last.pth's weights."""
        best = self.run.best
        try:
            have = load_checkpoint(best) if best.is_file() else None
        except UserError:  # cut by the kill
            have = None
        if have is not None and have.get("step") == last["step"]:
            return
        self.save(best_state(last), best)
        log.info(
            f"best.pth of epoch {last['epoch']} was not written (the run was stopped just "
            f"before); written now from {self.run.last}"
        )

    def write_config(self):
        """config.yaml (and .hydra/ of a new run): the settings, with what the run trains on."""
        self.run.track(self.run.model_dir).mkdir(parents=True, exist_ok=True)
        save_text(OmegaConf.to_yaml(self.cfg), self.run.track(self.run.config))
        self.run.save_hydra_files(self.cfg)
        log.info(
            f"run folder {self.run.path}; {len(self.loader.dataset)} training images of "
            f"{len(self.splits.train_classes)} classes, {len(self.splits.val)} validation images "
            f"of "
            f"{len(self.splits.val_classes)} classes, best.pth by {self.select}, device "
            f"{self.device}, "
            f"world size {self.info.world_size}"
        )

    def build_loader(self, transform):
        cfg, info = self.cfg, self.info
        prompts = PromptTable(self.splits.train, self.tokenizer)
        self.tokens = prompts.tokens.to(self.device)
        self.dataset = image_dataset(
            self.splits.train,
            transform,
            prompts,
            cfg.dataset.cache,
            info.is_main,
            cfg.dataset.max_image_pixels,  # None: Pillow's limit
            seed=int(cfg.seed),
        )
        self.instance = self.fine_grained_instances()
        if self.instance is None:
            self.sampler = ResumableSampler(
                self.dataset,
                int(cfg.seed),
                info.rank,
                info.world_size,
                shuffle=bool(cfg.train.shuffle),
            )
        else:
            self.sampler = ClassBatchSampler(
                [r["cls"] for _, r in self.splits.train],
                self.instance.tolist(),
                int(cfg.train.batch_size),
                int(cfg.train.fg_classes_per_batch),
                int(cfg.seed),
                info.rank,
                info.world_size,
            )
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=int(cfg.train.batch_size),
            sampler=self.sampler,
            num_workers=min(int(cfg.train.num_workers), os.cpu_count() or 1),
            collate_fn=collate,
            worker_init_fn=ignore_stop_signals,
            drop_last=info.enabled,
            pin_memory=bool(cfg.train.pin_memory) and self.device.type == "cuda",
        )
        if len(self.loader) == 0:
            raise UserError(
                f"the training split has {len(self.dataset)} images, fewer than one batch per "
                f"rank; lower train.batch_size."
            )

    def fine_grained_instances(self):
        """Per training row, the id of the photo it shows or was drawn from (-1: none), when
        train.fg_ratio or train.fg_shuffle_ratio is above 0; else None (categorical training)."""
        t = self.cfg.train
        if float(t.fg_ratio) <= 0 and float(t.fg_shuffle_ratio) <= 0:
            return None
        rows = self.splits.train
        ids = {(root, r["img_path"]): k for k, (root, r) in enumerate(rows) if r["m1"] == PHOTO}
        instance = [
            ids.get((root, r["img_path"] if r["m1"] == PHOTO else r.get("photo") or ""), -1)
            for root, r in rows
        ]
        if not any(k >= 0 and r["m1"] != PHOTO for k, (_, r) in zip(instance, rows)):
            raise UserError(
                f"train.fg_ratio={t.fg_ratio} (fine-grained training) needs sketches paired with "
                f"their photos, but the training data of {list(self.cfg.dataset.train_idx)} has "
                f"none ({NAMING_RULE}). Use a paired dataset (sketchy, folder, demo) or "
                f"train.fg_ratio=0."
            )
        return torch.tensor(instance, dtype=torch.long)

    def wrap_model(self):
        """DDP (with the all-ranks feature gather of the contrastive loss) and torch.compile."""
        self.net, gather = self.model, None
        if self.info.enabled:
            if self.cfg.train.gather_with_grad:
                gather = GatherFeatures(self.info)
            r = self.ratios
            unused = (
                r["disc"] == 0
                or r["clip"] == 0
                or not any(r[k] > 0 for k in ("sem", "rec", "disc", "orth"))
            )
            self.net = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused,
            )
        if self.cfg.train.compile:
            self.net = torch.compile(self.net)
        t = self.cfg.train
        self.loss = ModalityAwareLoss(
            self.ratios,
            gather,
            t.fg_ratio,
            t.fg_margin,
            t.fg_shuffle_ratio,
            t.fg_categorical_ratio,
        )

    def checkpoint_state(self, batch_in_epoch):
        p = self.progress
        return dict(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=p.epoch,
            step=p.step,
            batch_in_epoch=batch_in_epoch,
            best=p.best,
            history=p.history,
            rng=rng_state(),
            wandb_id=p.wandb_id,
            selected_by=self.select,
            config=OmegaConf.to_container(self.cfg, resolve=True),
        )

    def load_state(self, ckpt):
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress(
            ckpt["epoch"],
            ckpt["step"],
            ckpt["batch_in_epoch"],
            ckpt["best"],
            list(ckpt["history"]),
            ckpt.get("wandb_id"),
        )
        set_rng_state(ckpt["rng"])
        p = self.progress
        log.info(
            f"resumed from {self.run.last}: epoch {p.epoch + 1}, after batch {p.batch_in_epoch} of "
            f"it, step {p.step}"
        )

    def fit(self):
        with StopRequested() as stop:
            while self.progress.epoch < int(self.cfg.train.epochs):
                self.train_epoch(stop)
                self.end_epoch()
        if self.wandb is not None:
            self.wandb.finish()
        if self.info.is_main:
            log.info(f"training finished: {self.run.model_dir}")
        cleanup_distributed()
        p = self.progress
        return dict(run_dir=str(self.run.path), best=p.best, history=p.history, select=self.select)

    def train_epoch(self, stop):
        cfg, p = self.cfg, self.progress
        self.model.train()
        first = p.batch_in_epoch
        self.dataset.epoch = p.epoch
        self.loss.fg_hard = p.epoch >= int(cfg.train.fg_hard_from_epoch)
        self.sampler.set_epoch(p.epoch, start=first * int(cfg.train.batch_size))
        self.running, self.epoch_start = math.nan, time.time()
        bar = tqdm(
            self.loader,
            desc=f"epoch {p.epoch + 1}/{cfg.train.epochs}",
            disable=not self.info.is_main,
            initial=first,
            total=first + len(self.loader),
            dynamic_ncols=True,
        )
        for i, batch in enumerate(bar, start=first):
            boundary = (i + 1) % self.accum == 0 or i + 1 == first + len(self.loader)
            losses = self.train_batch(batch, boundary)
            if losses is not None:
                bar.set_postfix(loss=f"{self.running:.4f}")
                if boundary:
                    self.log_step(losses, i + 1)
            if boundary and self.stop_agreed(stop):
                if self.info.is_main:
                    self.save(self.checkpoint_state(i + 1), self.run.last)
                    log.info(
                        f"signal {stop.signal} received: saved last.pth at epoch {p.epoch + 1}, "
                        f"step {p.step}; resume with `python train.py resume={self.run.path}`"
                    )
                raise SystemExit(128 + stop.signal)
        bar.close()

    def stop_agreed(self, stop):
        """Whether any rank got SIGINT / SIGTERM: asked at accumulation boundaries only (a stop
        inside a window would lose its gradients) and agreed by all ranks (one stopping alone
        would leave the others waiting in the next collective)."""
        flag = torch.tensor(float(stop.signal or 0), device=self.device)
        if self.info.enabled:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        agreed = int(
            flag.item()
        )  # a signal caught during the all-reduce counts at the next boundary
        if agreed and stop.signal is None:
            stop.signal = agreed
        return agreed != 0

    def train_batch(self, batch, boundary):
        """Forward, backward and (at an accumulation boundary) an optimiser step; None when the
        batch was skipped for a non-finite loss."""
        cfg, p = self.cfg, self.progress
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with autocast(self.device, cfg.train.precision):
            images = model_input(
                batch["image"], self.eval_tf
            )  # cached uint8 batches are normalised here
            fg = None
            if self.instance is not None:
                fg = dict(
                    instance=self.instance[batch["index"].cpu()].to(self.device),
                    labels=batch["label"],
                )
            total, losses = self.net(
                images, self.tokens, batch["prompt_id"], batch["m1"], batch["m2"], self.loss, fg
            )
        finite = torch.isfinite(total.detach()).float()
        if self.info.enabled:  # every rank skips or stops together, or DDP would hang
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            if cfg.train.on_nonfinite != "skip":
                raise UserError(
                    f"non-finite loss at epoch {p.epoch + 1}, step {p.step}: "
                    f"total={total.item()}, {terms}. The last good checkpoint is {self.run.last}. "
                    f"Lower train.lr / train.clip_lr, use train.precision=fp32, or set "
                    f"train.on_nonfinite=skip."
                )
            self.skipped += 1
            log.warning(
                f"non-finite loss at step {p.step} ({terms}); batch skipped ({self.skipped} so far)"
            )
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.scaler.scale(total / self.accum).backward()
        if boundary:
            if float(cfg.train.grad_clip) > 0:
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
            metrics.update({f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups})
            metrics["epoch"] = p.epoch
            log.info(
                f"epoch {p.epoch + 1} step {p.step} "
                + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            )
            if self.wandb is not None:
                self.wandb.log(metrics, step=p.step)
        if tcfg.save_every_steps and p.step % int(tcfg.save_every_steps) == 0:
            self.save(self.checkpoint_state(batch_in_epoch), self.run.last)

    def end_epoch(self):
        """Score, record, and write last.pth (and best.pth when the selection says so)."""
        p = self.progress
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        score, what = self.selection.score(
            p.epoch, self.model, self.eval_tf, self.tokenizer, self.ratios, self.device, self.info
        )
        seconds = time.time() - self.epoch_start
        p.history.append(
            dict(epoch=p.epoch, step=p.step, score=score, loss=self.running, seconds=seconds)
        )
        if self.info.is_main:
            improved = self.selection.improved(score, p.best)
            if improved and score is not None and self.select != "last":
                p.best = score
            log.info(
                f"epoch {p.epoch} done in {seconds:.1f}s: loss {self.running:.4f}"
                + (f", {what}" if what else "")
                + (f"; best.pth <- epoch {p.epoch} ({self.select})" if improved else "")
            )
            if self.wandb is not None and score is not None:
                self.wandb.log({"select/score": score}, step=p.step)
            ckpt = dict(self.checkpoint_state(0), best_pending=bool(improved))
            self.save(ckpt, self.run.last)  # a resume completes a best.pth a kill stopped
            if improved:  # weights for inference only
                self.save(best_state(ckpt), self.run.best)
        if self.info.enabled:
            torch.distributed.barrier()

    def save(self, state, path):
        try:
            save_checkpoint(state, path)
        except UserError as e:
            other = [p for p in (self.run.last, self.run.best) if p != path and p.is_file()]
            then = (
                f" Then continue with python train.py resume={self.run.path}."
                if self.run.last.is_file()
                else f" The run had no checkpoint yet; its train.log and config.yaml are kept in "
                f"{self.run.path}. Then start the run again in a new folder."
            )
            intact = f" {other[0]} is intact too." if other else ""
            raise type(e)(f"{e}{intact}{then}") from None


def best_state(ckpt):
    """What best.pth holds: weights for inference, and what they were selected by."""
    return {k: ckpt[k] for k in ("model", "config", "epoch", "step", "best", "selected_by")}


def train(cfg, run_dir, given=()):
    """Train the modality-aware model into `run_dir` (resuming when cfg.resume is set). `given`:
    the command-line overrides (an alias and its key given with different values is an error)."""
    cfg = prepare(cfg, "train", given)
    info = init_distributed(cfg.device)
    run = RunFolder(run_dir)
    if info.is_main:
        run.claim(resume=bool(cfg.resume))
    previous = sigterm_handler(exit_on_sigterm)  # until fit() takes SIGTERM over
    trainer = None
    try:
        trainer = Trainer(cfg, run, info)
        sigterm_handler(previous)
        return trainer.fit()
    except BaseException:
        worked = trainer is not None and trainer.progress.step > 0  # train.log holds real work
        if info.is_main and not run.has_checkpoint() and not worked:
            setup_logging(None)  # release train.log
            run.discard_failed_start()
        raise
    finally:
        sigterm_handler(previous)
        run.release()
