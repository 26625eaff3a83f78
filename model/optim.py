"""AdamW parameter groups and the warm-up schedule, as the authors' recipe sets them."""

import math

import torch


def param_groups(model, lr, clip_lr, weight_decay):
    """Two named AdamW groups: the CLIP backbone (its logit scale included) at clip_lr, the mode
    vectors and discriminator at lr; weight decay on every parameter, as the authors."""
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.")]
    head = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("clip.")]
    return [
        dict(params=backbone, lr=clip_lr, weight_decay=weight_decay, name="clip"),
        dict(params=head, lr=lr, weight_decay=weight_decay, name="head"),
    ]


def lr_lambda(warmup, total, schedule):
    """Linear warm-up over `warmup` steps, then constant (or linear decay to 0 at `total`)."""

    def f(step):
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        return 1.0

    return f


def warmup_steps(tcfg, total_steps):
    """train.warmup_steps when set, else int(warmup_ratio x all optimiser steps) as the authors."""
    if tcfg.warmup_steps is not None:
        return int(tcfg.warmup_steps)
    return int(total_steps * float(tcfg.warmup_ratio))


def build_optimizer(model, tcfg, batches_per_epoch):
    """(optimizer, scheduler, accumulation steps) of a run."""
    accum = int(tcfg.accum_steps)
    total = math.ceil(batches_per_epoch / accum) * int(tcfg.epochs)
    optimizer = torch.optim.AdamW(
        param_groups(model, float(tcfg.lr), float(tcfg.clip_lr), float(tcfg.weight_decay)),
        betas=(float(tcfg.beta1), float(tcfg.beta2)),
        eps=float(tcfg.eps),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup_steps(tcfg, total), total, tcfg.schedule)
    )
    return optimizer, scheduler, accum
