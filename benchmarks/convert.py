"""Time of converting a ViT-B/32-sized checkpoint of the authors' code, against torch.load of the
same
file with the plain unpickler (what their infer.py does) as the baseline.

python -m benchmarks.convert [--repeats 3] [--work /tmp/convert-bench]

Writes random HF CLIPModel weights of the default CLIPConfig (openai/clip-vit-base-patch32's shapes,
151M parameters) in their format: epoch, model (encoder.clip.* names, 4 mode vectors,
discriminator), an AdamW state after one step, and the LambdaLR scheduler object of
transformers.get_constant_schedule_with_warmup. Then times, each `--repeats` times:
the plain torch.load(weights_only=False); this project's restricted loader; and the whole command
`python -m model.convert src=... out=... dataset=sketchy` in a fresh process, and that process's
start-up alone (imports). Last, checks that the converted run's embeddings equal HF's own.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import CLIPConfig, CLIPModel, get_constant_schedule_with_warmup

from model.backbone import build_model
from model.checkpoint import load_checkpoint
from runs.folder import RunFolder
from runtime.restricted_pickle import restricted_load

REPO = Path(__file__).resolve().parent.parent


def write_checkpoint(path):
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig())
    state = {f"encoder.clip.{k}": v for k, v in clip.state_dict().items()}
    state.update(
        {
            "encoder.mode_embedding.weight": torch.randn(4, 512),
            "encoder.discriminator.weight": torch.randn(4, 512),
            "encoder.discriminator.bias": torch.zeros(4),
        }
    )
    params = [
        torch.nn.Parameter(v) for v in state.values() if v.is_floating_point()
    ]  # the model's own, as theirs
    optim = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.1)
    for p in params:
        p.grad = torch.zeros_like(p)
    optim.step()
    sched = get_constant_schedule_with_warmup(optim, 100)
    torch.save(dict(epoch=99, model=state, optimizer=optim.state_dict(), lr_sched=sched), path)
    return clip.eval()


@torch.no_grad()
def largest_difference(clip, run):
    """Max |difference| of the converted run's normalised embeddings and HF's own features."""
    ckpt = load_checkpoint(RunFolder(run).best)
    model, _, _, tokenizer = build_model(OmegaConf.create(ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    pixels = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer(
        [
            "a photo of a bat.",
            "a photo of a windmill.",
            "a photo of a teddy bear.",
            "a photo of a cow.",
        ]
    )
    hf_img = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    hf_txt = F.normalize(clip.get_text_features(input_ids=tokens).pooler_output, dim=-1)
    return max(
        (model.encode_image(pixels) - hf_img).abs().max().item(),
        (model.encode_text(tokens) - hf_txt).abs().max().item(),
    )


def timed(contenders, repeats):
    """Seconds of each contender, run in turns (so that drifting load on the machine hits all)."""
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return list(times.items())


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/convert-bench")
    args = ap.parse_args()
    work = Path(args.work)
    marker = work / ".made-by-benchmarks-convert"  # the folder is this benchmark's to overwrite
    if work.exists() and (not work.is_dir() or any(work.iterdir())) and not marker.is_file():
        raise SystemExit(
            f"error: --work {work} holds files this benchmark did not write; give a new folder."
        )
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text("")
    src, out = work / "best.pth", work / "run"
    clip = write_checkpoint(src)
    n = sum(p.numel() for p in clip.parameters())
    print(
        f"{src}: {src.stat().st_size / 2**20:.0f} MiB, CLIP {n / 1e6:.1f}M parameters; torch "
        f"threads "
        f"{torch.get_num_threads()}"
    )
    torch.load(src, map_location="cpu", weights_only=False)  # page cache warm for every contender

    def convert():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "model.convert", f"src={src}", f"out={out}", "dataset=sketchy"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )

    rows = timed(
        {
            "torch.load(weights_only=False) (baseline)": lambda: torch.load(
                src, map_location="cpu", weights_only=False
            ),
            "restricted loader (runtime/restricted_pickle.py)": lambda: restricted_load(src),
            "python -m model.convert (whole command)": convert,
            "of which start-up: python -c 'import model.convert'": lambda: subprocess.run(
                [sys.executable, "-c", "import model.convert"], cwd=REPO, check=True
            ),
        },
        args.repeats,
    )
    base = statistics.median(rows[0][1])
    print("| | seconds (each run) | median | vs baseline |\n| --- | --- | --- | --- |")
    for name, times in rows:
        med = statistics.median(times)
        print(
            f"| {name} | {', '.join(f'{t:.2f}' for t in times)} | {med:.2f} | {med / base:.2f}x |"
        )
    print(
        f"converted run vs HF's get_image_features / get_text_features (normalised, fp32): "
        f"largest difference {largest_difference(clip, out):.1e}"
    )


if __name__ == "__main__":
    main()
