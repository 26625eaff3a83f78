"""Search benchmarks: gallery indexing throughput (images/s, against the bare model forward pass on
the same images) and single-query latency over random normalised vectors for faiss flat, faiss HNSW
(with recall@10 against exact) and torch matmul + topk, with memory.

python -m benchmarks.search indexing [--backbone ma-tiny --images 1000]
python -m benchmarks.search latency [--sizes 10000 100000 1000000 --hnsw-max 100000 --ef-search 128
512]
"""

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from data.demo import DEFAULT_ROOT, generate
from model.backbone import build_model
from gallery.ann import build_ann
from gallery.index import update_index
from runtime.io import save_torch
from config.schema import compose_config


def indexing(args):
    photos = generate(DEFAULT_ROOT) / "photo"
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Path(tmp) / "gallery"
        files = sorted(photos.rglob("*.jpg"))[: args.images]
        for f in files:
            (gallery / f.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(f, gallery / f.parent.name / f.name)
        mcfg = compose_config(
            "config-train", ["model=tiny", f"model.backbone={args.backbone}"]
        ).model
        model, _, transform, _ = build_model(mcfg)
        model.eval()
        ckpt = Path(tmp) / "best.pth"
        save_torch(dict(model=model.state_dict(), config={}, epoch=0), ckpt)
        index_s, forward_s = [], []
        size = transform.transforms[0].size
        side = size if isinstance(size, int) else size[0]
        x = torch.randn(args.batch_size, 3, side, side)
        for r in range(args.repeat):  # alternate the two, keep the best of each (a shared machine)
            start = time.perf_counter()
            g = update_index(
                model,
                transform,
                torch.device("cpu"),
                Path(tmp) / f"index{r}",
                gallery,
                ckpt,
                args.batch_size,
                args.workers,
                "fp32",
                progress=False,
            )
            index_s.append(time.perf_counter() - start)
            with torch.no_grad():
                model.encode_image(x)  # warm-up
                start = time.perf_counter()
                for _ in range(0, len(files), args.batch_size):
                    model.encode_image(x)
            forward_s.append(time.perf_counter() - start)
        index_s, forward_s = min(index_s), min(forward_s)
    n, n_forward = len(g.paths), -(-len(files) // args.batch_size) * args.batch_size
    print(
        f"indexing {args.backbone} (random init), {n} demo photos, batch {args.batch_size}, "
        f"{args.workers} loader workers, {torch.get_num_threads()} threads, best of {args.repeat}:"
    )
    print(
        f"  update_index (decode + preprocess + embed + save): {index_s:.2f} s = {n / index_s:.1f} "
        f"images/s"
    )
    print(
        f"  bare encode_image on ready tensors (baseline):     {forward_s:.2f} s = "
        f"{n_forward / forward_s:.1f} images/s"
    )
    print(f"  ratio indexing / bare forward: {(n / index_s) / (n_forward / forward_s):.2f}")


def _percentiles(fn, queries):
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - start)
    return np.percentile(times, 50) * 1e3, np.percentile(times, 95) * 1e3


def latency(args):
    rng = np.random.default_rng(0)
    d, k = args.dim, 10
    print(
        f"single-query latency, k={k}, d={d}, {args.queries} random queries, "
        f"{torch.get_num_threads()} threads "
        f"(graph build: {args.build_threads or args.threads}); load average {os.getloadavg()}"
    )
    print(
        "| vectors | method | build s | p50 ms | p95 ms | recall@10 | memory MiB | p50 vs torch |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        db = rng.standard_normal((n, d), dtype=np.float32)
        db /= np.linalg.norm(db, axis=1, keepdims=True)
        queries = rng.standard_normal((args.queries, d), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        t_db = torch.from_numpy(db)
        torch_p50, torch_p95 = _percentiles(
            lambda q: torch.topk(t_db @ torch.from_numpy(q), k), queries
        )
        exact = [set(torch.topk(t_db @ torch.from_numpy(q), k).indices.tolist()) for q in queries]
        rows = [("torch matmul+topk", 0.0, torch_p50, torch_p95, 1.0, db.nbytes)]
        kinds = ["flat"] + (["hnsw"] if n <= args.hnsw_max else [])
        for kind in kinds:
            faiss.omp_set_num_threads(args.build_threads or args.threads)
            start = time.perf_counter()
            index = build_ann(db, kind, args.hnsw_m, args.ef_construction, args.ef_search[0])
            build_s = time.perf_counter() - start
            faiss.omp_set_num_threads(args.threads)
            memory = faiss.serialize_index(index).nbytes
            for ef in args.ef_search if kind == "hnsw" else [None]:
                if ef is not None:
                    index.hnsw.efSearch = ef
                p50, p95 = _percentiles(lambda q, index=index: index.search(q[None], k), queries)
                found = [set(index.search(q[None], k)[1][0].tolist()) for q in queries]
                recall = np.mean([len(f & e) / k for f, e in zip(found, exact)])
                name = (
                    "faiss IndexFlatIP"
                    if kind == "flat"
                    else f"faiss HNSW M={args.hnsw_m} efC={args.ef_construction} efS={ef}"
                )
                rows.append((name, build_s, p50, p95, recall, memory))
            del index
        for name, build_s, p50, p95, recall, memory in rows:
            print(
                f"| {n:,} | {name} | {build_s:.1f} | {p50:.3f} | {p95:.3f} | {recall:.3f} | "
                f"{memory / 2**20:.0f} | {torch_p50 / p50:.2f}x |",
                flush=True,
            )
        if n > args.hnsw_max:
            print(
                f"| {n:,} | faiss HNSW | not measured (over --hnsw-max {args.hnsw_max:,}) | | | | "
                f"| |"
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak resident memory {peak:,.0f} MiB; load average {os.getloadavg()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["indexing", "latency"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backbone", default="ma-tiny")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--hnsw-max", type=int, default=1_000_000)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument(
        "--ef-search", type=int, nargs="+", default=[128], help="one row per value, one graph"
    )
    ap.add_argument(
        "--build-threads",
        type=int,
        default=None,
        help="threads for the HNSW build (default --threads)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    indexing(args) if args.part == "indexing" else latency(args)


if __name__ == "__main__":
    main()
