"""Speed of the metric engine.

python -m benchmarks.metrics seed      # (a) vs the seed-style reference, 2,000 x 10,000, dim 512
python -m benchmarks.metrics quickdraw # (b) QuickDraw-Ext scale, 92,291 x 54,151, dim 512
  [--device cpu|cuda] [--chunk-size 512] [--classes 30] [--clustered NOISE] [--repeat N]

One chunk is ranked first, not timed (CUDA start-up; on a CPU, loading numba and the compiled
ranking kernel). Beside the engine, the command times the engine's own float32 similarity
products alone (the same chunks of queries in label order, on the same device) and prints
engine / products: how close ranking gets to the matrix product it cannot avoid. With --repeat N
(default 3 for seed, 1 for
quickdraw) both run N times, alternately, and the median ratio is printed too.

Embeddings are random unit vectors with random labels of `--classes` classes (or, with
`--clustered`, noisy copies of class centres, for a ranking like a trained model's). The seed-style
reference builds the full similarity matrix, argsorts it, and walks each query in Python with the
VOC-style precision envelope, as the seed's evaluation did.
"""

import argparse
import os
import resource
import time

import numpy as np
import torch

from metrics.engine import retrieval_metrics, summarize


def seed_style(q, g, ql, gl, cut=200, ks=(100, 200)):
    sims = q @ g.T
    order = np.argsort(-sims, axis=1, kind="stable")
    ap_all, ap_cut, prec = [], [], {k: [] for k in ks}

    def voc_ap(rec, pre):
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], pre, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = max(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])

    for i in range(len(q)):
        rel = (gl[order[i]] == ql[i]).astype(np.float64)
        n_pos = rel.sum()
        if n_pos == 0:
            continue
        tp = np.cumsum(rel)
        pre = tp / np.arange(1, len(rel) + 1)
        ap_all.append(voc_ap(tp / n_pos, pre))
        ap_cut.append(voc_ap(tp[:cut] / min(cut, n_pos), pre[:cut]))
        for k in ks:
            m = int(min(k, n_pos))
            prec[k].append(rel[:m].sum() / m)
    return {
        "default/AP@all": np.mean(ap_all),
        f"default/AP@{cut}": np.mean(ap_cut),
        **{f"default/P@{k}": np.mean(v) for k, v in prec.items()},
    }


def random_embeddings(n, d, n_cls, seed, clustered=0.0):
    """Unit vectors with random labels; with `clustered` > 0, each is its class centre (shared by
    queries and gallery) plus that much Gaussian noise, like a trained model's embeddings."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    labels = rng.integers(0, n_cls, size=n)
    if clustered > 0:
        centres = np.random.default_rng(12345).standard_normal((n_cls, d), dtype=np.float32)
        x = centres[labels] + clustered * x
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def product_seconds(q, ql, g, chunk_size, device):
    """Seconds for the similarity products alone, chunk by chunk as the engine computes them."""
    queries, gallery = torch.as_tensor(q), torch.as_tensor(g).to(device)
    by_label = torch.argsort(torch.as_tensor(ql), stable=True)
    t0 = time.perf_counter()
    for s in range(0, len(q), chunk_size):
        queries[by_label[s : s + chunk_size]].to(device) @ gallery.T
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("what", choices=["seed", "quickdraw"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--classes", type=int, default=30)
    ap.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs of engine and products, alternately (default 3 for seed, 1 for quickdraw)",
    )
    ap.add_argument(
        "--clustered",
        type=float,
        default=0.0,
        help="noise around class centres (0: plain random vectors); 3 gives mAP@all ~0.55, 4 ~0.2",
    )
    args = ap.parse_args()
    nq, ng = (2000, 10000) if args.what == "seed" else (92291, 54151)
    q, ql = random_embeddings(nq, 512, args.classes, 0, args.clustered)
    g, gl = random_embeddings(ng, 512, args.classes, 1, args.clustered)
    print(
        f"{nq} queries x {ng} photos, dim 512, device {args.device}, "
        f"{torch.get_num_threads()} threads on {os.cpu_count()} CPUs, chunk {args.chunk_size}"
        + (f", clustered {args.clustered}" if args.clustered else "")
    )
    # not timed: CUDA's start-up and first kernels, or on a CPU importing numba and loading the
    # compiled ranking kernel (once per process; compiling it, on the very first run, ~1 s)
    t0 = time.perf_counter()
    retrieval_metrics(
        q[: args.chunk_size],
        g,
        ql[: args.chunk_size],
        gl,
        chunk_size=args.chunk_size,
        device=args.device,
        progress=False,
    )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(
        f"warm-up on one chunk (not counted): {time.perf_counter() - t0:.2f} s"
        + (f", {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else "")
    )
    ratios = []
    for _ in range(args.repeat or (3 if args.what == "seed" else 1)):
        t0 = time.perf_counter()
        per_query, _ = retrieval_metrics(
            q, g, ql, gl, chunk_size=args.chunk_size, device=args.device
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        engine_s = time.perf_counter() - t0
        product_s = product_seconds(q, ql, g, args.chunk_size, args.device)
        ratios.append(engine_s / product_s)
        print(
            f"engine: {engine_s:.2f} s, similarity products alone: {product_s:.2f} s, "
            f"engine / products = {ratios[-1]:.2f}"
        )
    if len(ratios) > 1:
        print(f"median engine / products over {len(ratios)} runs: {float(np.median(ratios)):.2f}")
    ours = summarize(per_query)
    print(
        f"peak RSS {peak_rss_gb():.2f} GB"
        + (
            f", peak GPU {torch.cuda.max_memory_allocated() / 1024**3:.2f} GB"
            if args.device.startswith("cuda")
            else ""
        )
    )
    print("  " + "  ".join(f"{k.split('/')[1]}={v:.6f}" for k, v in ours.items()))
    if args.what == "seed":
        t0 = time.perf_counter()
        ref = seed_style(q, g, ql, gl)
        ref_s = time.perf_counter() - t0
        print(f"seed-style reference: {ref_s:.2f} s")
        print("  " + "  ".join(f"{k.split('/')[1]}={v:.6f}" for k, v in ref.items()))
        worst = max(abs(ours[k] - ref[k]) for k in ref)
        print(f"speed-up {ref_s / engine_s:.1f}x, largest metric difference {worst:.2e}")


if __name__ == "__main__":
    main()
