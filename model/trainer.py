"""train(cfg, run_dir): the training loop of the modality-aware model."""
import itertools
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from data.check import check_structure
from data.index import make_splits
from data.loader import PromptTable, SketchPhotoDataset, collate
from model.backbone import build_model, loss_ratios
from model.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from model.embed import embed_rows
from retrieval.metrics import retrieval_metrics, summarize
from utils.distributed import GatherFeatures, all_gather_cat, cleanup_distributed, init_distributed
from utils.io import save_text
from utils.runtime import UserError, autocast, log, pick_device, seed_everything, setup_logging


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
                     progress=False, with_converted=False)
    z = all_gather_cat(torch.from_numpy(emb["img"]).to(device)).cpu()
    meta = torch.tensor([[r["m1"], r["label"]] for _, r in mine], dtype=torch.long, device=device)
    meta = all_gather_cat(meta).cpu()
    q, g = meta[:, 0] == 1, meta[:, 0] == 0
    per_query, _ = retrieval_metrics(z[q], z[g], meta[q, 1], meta[g, 1],
                                     chunk_size=cfg.eval.chunk_size, device=device, progress=False)
    return summarize(per_query)["default/AP@all"]


def train(cfg, run_dir):
    run_dir = Path(run_dir)
    info = init_distributed()
    setup_logging(run_dir / "train.log" if info.is_main else None)
    device = pick_device(cfg.device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    resume = load_checkpoint(run_dir / "model" / "last.pth") if cfg.get("resume") else None
    if resume is not None:
        check_compatible(resume["config"], cfg, run_dir / "model" / "last.pth")
    seed_everything(int(cfg.seed))

    splits = make_splits(cfg.dataset)
    report = check_structure(splits)
    for w in report.warnings[:20]:
        log.warning(w)
    if report.errors:
        raise UserError("the dataset check found problems:\n  " + "\n  ".join(report.errors)
                        + "\nFix them (python -m data.check lists everything) and start again.")
    model, train_tf, eval_tf, tokenizer = build_model(cfg.model)
    model.to(device)
    ratios = loss_ratios(cfg.model)
    if sum(ratios.values()) <= 0:
        raise UserError("every model.*_loss_ratio is 0; set at least one above 0 (e.g. model.clip_loss_ratio=1).")
    transform = train_tf if cfg.dataset.get("augment", True) else eval_tf
    prompts = PromptTable(splits.train, tokenizer)
    tokens = prompts.tokens.to(device)
    dataset = SketchPhotoDataset(splits.train, transform, prompts)
    per_rank_batch = int(cfg.train.batch_size)
    sampler = ResumableSampler(dataset, int(cfg.seed), info.rank, info.world_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_rank_batch, sampler=sampler, num_workers=min(int(cfg.train.num_workers), os.cpu_count() or 1),
        collate_fn=collate, drop_last=info.enabled, pin_memory=device.type == "cuda",
        persistent_workers=False)
    if len(loader) == 0:
        raise UserError(f"the training split has {len(dataset)} images, fewer than one batch per "
                        f"rank; lower train.batch_size.")
    accum = max(1, int(cfg.train.accum_steps))
    steps_per_epoch = math.ceil(len(loader) / accum)
    total_steps = steps_per_epoch * int(cfg.train.epochs)
    optimizer = torch.optim.AdamW(param_groups(model, float(cfg.train.lr), float(cfg.train.clip_lr),
                                               float(cfg.train.weight_decay)), betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(int(cfg.train.warmup_steps), total_steps, cfg.train.schedule))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.train.precision == "fp16")
    gather = None
    net = model
    if info.enabled:
        gather = GatherFeatures(info) if cfg.train.get("gather_with_grad", True) else None
        unused = ratios["disc"] == 0 or ratios["clip"] == 0 or not any(
            ratios[k] > 0 for k in ("sem", "rec", "disc", "orth"))
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=unused)
    if cfg.train.get("compile", False):
        net = torch.compile(net)

    epoch, step, batch_in_epoch, best, run_id = 0, 0, 0, -math.inf, None
    history = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        epoch, step, batch_in_epoch = resume["epoch"], resume["step"], resume["batch_in_epoch"]
        best, run_id, history = resume["best"], resume.get("wandb_id"), list(resume["history"])
        set_rng_state(resume["rng"])
        log.info(f"resumed from {run_dir / 'model' / 'last.pth'} at epoch {epoch}, step {step}")
    if info.is_main:
        (run_dir / "model").mkdir(parents=True, exist_ok=True)
        save_text(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "config.yaml")
        log.info(f"run folder {run_dir}; {len(dataset)} training images of {len(splits.train_classes)} "
                 f"classes, {len(splits.val)} validation images of {len(splits.val_classes)} classes, "
                 f"device {device}, world size {info.world_size}")
    wb = init_wandb(cfg, run_dir, run_id) if info.is_main else None
    run_id = wb.id if wb is not None else run_id

    def state(completed_epoch, batch_pos):
        return dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                    epoch=completed_epoch, step=step, batch_in_epoch=batch_pos, best=best,
                    history=history, rng=rng_state(), wandb_id=run_id,
                    config=OmegaConf.to_container(cfg, resolve=True))

    save_every = int(cfg.train.get("save_every_steps", 0) or 0)
    skipped_nonfinite = 0
    with StopRequested() as stop:
        while epoch < int(cfg.train.epochs):
            model.train()
            sampler.set_epoch(epoch, start=batch_in_epoch * per_rank_batch)
            running, t0 = math.nan, time.time()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not info.is_main,
                       initial=batch_in_epoch, total=batch_in_epoch + len(loader), dynamic_ncols=True)
            for i, batch in enumerate(bar, start=batch_in_epoch):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast(device, cfg.train.precision):
                    total, losses = net(batch["image"], tokens, batch["prompt_id"], batch["m1"],
                                        batch["m2"], ratios, gather)
                finite = torch.isfinite(total.detach()).float()
                if info.enabled:  # every rank skips or stops together, or DDP would hang
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if not finite.item():
                    terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                    if cfg.train.on_nonfinite == "skip":
                        skipped_nonfinite += 1
                        log.warning(f"non-finite loss at step {step} ({terms}); batch skipped "
                                    f"({skipped_nonfinite} so far)")
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    raise UserError(
                        f"non-finite loss at epoch {epoch + 1}, step {step}: total={total.item()}, {terms}. "
                        f"The last good checkpoint is {run_dir / 'model' / 'last.pth'}. Lower train.lr / "
                        f"train.clip_lr, use train.precision=fp32, or set train.on_nonfinite=skip.")
                scaler.scale(total / accum).backward()
                if (i + 1) % accum == 0 or i + 1 == batch_in_epoch + len(loader):
                    if float(cfg.train.get("grad_clip", 0) or 0) > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.train.grad_clip))
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    step += 1
                value = total.item()
                running = value if math.isnan(running) else 0.9 * running + 0.1 * value
                bar.set_postfix(loss=f"{running:.4f}")
                if info.is_main and step % int(cfg.train.log_every) == 0 and (i + 1) % accum == 0:
                    metrics = {f"loss/{k}": v.item() for k, v in losses.items()}
                    metrics.update({"loss/total": value, "lr": scheduler.get_last_lr()[-1],
                                    "lr/clip": scheduler.get_last_lr()[0], "epoch": epoch})
                    log.info(f"epoch {epoch + 1} step {step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                    if wb is not None:
                        wb.log(metrics, step=step)
                if info.is_main and save_every and step % save_every == 0 and (i + 1) % accum == 0:
                    save_checkpoint(state(epoch, i + 1), run_dir / "model" / "last.pth")
                if stop.signal is not None:
                    if info.is_main:
                        save_checkpoint(state(epoch, i + 1), run_dir / "model" / "last.pth")
                        log.info(f"signal {stop.signal} received: saved last.pth at epoch {epoch + 1}, "
                                 f"step {step}; resume with `python train.py resume={run_dir}`")
                    raise SystemExit(128 + stop.signal)
            bar.close()
            epoch, batch_in_epoch = epoch + 1, 0
            score = None
            if splits.val:
                score = validate(model, splits.val, eval_tf, tokenizer, cfg, device, info)
            history.append(dict(epoch=epoch, step=step, val_map=score, loss=running,
                                seconds=time.time() - t0))
            if info.is_main:
                improved = score is None or score > best
                if improved and score is not None:
                    best = score
                log.info(f"epoch {epoch} done in {time.time() - t0:.1f}s: loss {running:.4f}"
                         + (f", validation mAP@all {score:.4f} (best {best:.4f})" if score is not None else ""))
                if wb is not None and score is not None:
                    wb.log({"val/mAP@all": score}, step=step)
                ckpt = state(epoch, 0)
                save_checkpoint(ckpt, run_dir / "model" / "last.pth")
                if improved:
                    save_checkpoint({k: ckpt[k] for k in ("model", "config", "epoch", "step", "best")},
                                    run_dir / "model" / "best.pth")  # weights for inference only
            if info.enabled:
                torch.distributed.barrier()
    if wb is not None:
        wb.finish()
    if info.is_main:
        log.info(f"training finished: {run_dir / 'model'}")
    cleanup_distributed()
    return dict(run_dir=str(run_dir), best=best, history=history)


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
