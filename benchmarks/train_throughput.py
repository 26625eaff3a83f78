"""Training images/s and peak memory of the modality-aware model, eager vs torch.compile, with
the data loader's images/s beside it so the bottleneck is visible.

GPU: python -m benchmarks.train_throughput --backbone ViT-B-32 --batch-size 256 --precision bf16
--workers 8
CPU: python -m benchmarks.train_throughput --backbone ma-tiny --batch-size 64 --workers 2 --device
cpu

The model step uses synthetic images at the backbone's input size (all losses, AdamW step): float
images as decoded from files, and uint8 images as read from the prepared cache, normalised in the
step (data.loader.model_input). The loader runs on the demo dataset with the backbone's train
transform, from the files and from the prepared cache (built first, in .cache/bench-train-cache).
"""

import argparse
import time

import open_clip
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.loader import measure
from data.cache import cache_ops, pixel_ops
from data.cached import image_dataset
from data.demo import DEFAULT_ROOT, generate
from data.index import make_splits
from data.loader import PromptTable, SketchPhotoDataset, make_loader, model_input
from model.backbone import build_model, loss_ratios
from model.loss import ModalityAwareLoss
from model.optim import param_groups
from runtime.device import autocast, pick_device
from config.schema import compose_config


def step_rate(args, device, compiled, uint8=False, fused=False, loader=None, count=False):
    """Training images/s of the full step and the peak GPU memory. Synthetic float images (as
    decoded from files) or uint8 ones (as read from the cache, normalised in the step); with
    `loader`, its batches end to end. With `count`, instead the model FLOPs of one step per
    image."""
    mcfg = compose_config("config-train", ["model=tiny", f"model.backbone={args.backbone}"]).model
    torch.manual_seed(0)
    model, *_ = build_model(mcfg)
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, 1e-4, 5e-8, 0.1), fused=fused or None)
    net = torch.compile(model) if compiled else model
    size = open_clip.get_model_config(args.backbone)["vision_cfg"]["image_size"]
    b = args.batch_size
    images = torch.randn(b, 3, size, size, device=device)
    if uint8:
        images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=device)
    eval_tf = open_clip.image_transform(size, is_train=False)
    context = open_clip.get_model_config(args.backbone)["text_cfg"]["context_length"]
    tokens = torch.randint(1, 49000, (100, context), device=device)
    pid = torch.randint(0, 100, (b,), device=device)
    m1 = torch.randint(0, 2, (b,), device=device)
    m2 = torch.full((b,), 3, device=device)
    loss = ModalityAwareLoss(loss_ratios(mcfg))
    batches = forever(loader) if loader is not None else None

    def step():
        x = images if batches is None else next(batches)["image"].to(device, non_blocking=True)
        with autocast(device, args.precision):
            total, _ = net(
                model_input(x, eval_tf),
                tokens,
                pid[: x.shape[0]],
                m1[: x.shape[0]],
                m2[: x.shape[0]],
                loss,
            )
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return x.shape[0]

    if count:
        with FlopCounterMode(display=False) as counter:
            step()
        return counter.get_total_flops() / b
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    n = sum(step() for _ in range(args.steps))
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device.type == "cuda" else float("nan")
    return rate, peak


def forever(loader):
    while True:
        yield from loader


def report(label, rate, peak, base, args):
    achieved = rate * args.flops / 1e12
    util = (
        f", {achieved / args.peak_tflops:.1%} of {args.peak_tflops:g}" if args.peak_tflops else ""
    )
    print(
        f"{label:<44} {rate:9.1f} images/s ({rate / base:.2f}x eager), peak GPU memory "
        f"{_gb(peak)}, "
        f"model {achieved:.3f} TFLOP/s{util}",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backbone", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=0,
        help="the device's rated peak (e.g. 989 for an "
        "H200 in dense bf16), for the utilisation column",
    )
    args = ap.parse_args()
    device = pick_device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"{args.backbone}, batch {args.batch_size}, "
        f"{args.precision if device.type == 'cuda' else 'fp32'}, {name}"
    )
    args.flops = step_rate(args, device, compiled=False, count=True)
    print(
        f"model FLOPs per image (forward + backward, FlopCounterMode): {args.flops / 1e9:.3f} GFLOP"
    )
    eager, peak = step_rate(args, device, compiled=False)
    report("train step, eager", eager, peak, eager, args)
    report(
        "train step, eager, uint8 input normalised",
        *step_rate(args, device, False, uint8=True),
        eager,
        args,
    )
    if device.type == "cuda":
        report(
            "train step, eager, fused AdamW",
            *step_rate(args, device, False, fused=True),
            eager,
            args,
        )
    if not args.no_compile:
        report("train step, torch.compile", *step_rate(args, device, compiled=True), eager, args)
        if device.type == "cuda":
            report(
                "train step, compile + fused AdamW",
                *step_rate(args, device, True, fused=True),
                eager,
                args,
            )
    size = open_clip.get_model_config(args.backbone)["vision_cfg"]["image_size"]
    root = generate(DEFAULT_ROOT)
    splits = make_splits(
        OmegaConf.create(
            dict(train_idx=["demo"], test_idx=None, root=str(root), cls_ratio=1.0, csv={})
        ),
        need_test=False,
    )
    train_tf = open_clip.image_transform(size, is_train=True)
    prompts = PromptTable(splits.train, open_clip.get_tokenizer(args.backbone))
    dataset = SketchPhotoDataset(splits.train, train_tf, prompts)
    loader_rate = measure(dataset, args.batch_size, args.workers, epochs=2)
    print(
        f"data loader, {args.workers} workers:  {loader_rate:9.1f} images/s "
        f"({'loader' if loader_rate < eager else 'model'} is the bottleneck)"
    )
    cached = image_dataset(splits.train, train_tf, prompts, str(CACHE_BASE), progress=False)
    cache_rate = measure(cached, args.batch_size, args.workers, epochs=4)
    print(
        f"cache loader, {args.workers} workers: {cache_rate:9.1f} images/s, augmenting crop from "
        f"the "
        f"{cache_ops(pixel_ops(train_tf)).transforms[0].size} px cache "
        f"({cache_rate / loader_rate:.1f}x files; "
        f"{'loader' if cache_rate < eager else 'model'} is the bottleneck)"
    )
    loader = make_loader(cached, args.batch_size, args.workers, shuffle=True, drop_last=True)
    best = dict(compiled=not args.no_compile, fused=device.type == "cuda")
    report(
        f"end to end from the cache ({'compile' if best['compiled'] else 'eager'}"
        f"{', fused' if best['fused'] else ''})",
        *step_rate(args, device, uint8=True, loader=loader, **best),
        eager,
        args,
    )


CACHE_BASE = DEFAULT_ROOT.parent / "bench-train-cache"


def _gb(x):
    return "n/a (CPU)" if x != x else f"{x:.2f} GB"


if __name__ == "__main__":
    main()
