"""Collect eval_result.json files into one markdown and CSV table, with the paper's numbers beside
them: python -m metrics.table <run folders, result files or globs> [--csv table.csv]"""

import argparse
import csv
import glob
import io
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from runs.folder import InferOutput, RunFolder
from runtime.errors import UserError, run_cli

METRICS = ("mAP@all", "mAP@200", "p@100", "p@200")
# The paper's zero-shot numbers (Lyou et al., WACV 2024, ViT-B/32), in percent, on its splits.
PAPER = {
    ("sketchy", "sketchy_21"): {"mAP@200": 69.1, "p@200": 75.5},
    ("tuberlin", "tuberlin_30"): {"mAP@all": 70.5, "p@100": 77.7},
    ("quickdraw", "quickdraw_30"): {"mAP@all": 32.7, "p@200": 42.5},
}
# Fine-grained ZS-SBIR on Sketchy's 21 unseen classes (the paper's third table): Acc@1, Acc@5 in %.
PAPER_FG = {
    ("sketchy", "sketchy_21"): [
        ("MA-SBIR (Lyou et al., WACV 2024)", 29.96, 58.53),
        ("CLIP-AT (Sain et al., CVPR 2023)", 28.68, 62.34),
        ("SpLIP (ECCV 2024)", 33.45, 66.71),
    ]
}
FG_METRICS = ("acc@1", "acc@5", "acc@10")  # the class gallery of the fine_grained block
DEFAULT_SPLIT = {"sketchy": "sketchy_21", "tuberlin": "tuberlin_30", "quickdraw": "quickdraw_30"}
COLUMNS = [
    "run",
    "dataset",
    "split",
    "checkpoint",
    "chosen by",
    "protocol",
    "query",
    *METRICS,
    *(f"FG {m}" for m in FG_METRICS),
    "paper",
]


def result_files(patterns):
    """eval_result.json files of the given run folders, files or glob patterns, in order."""
    found = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)) or [pattern]:
            path = Path(path)
            if path.is_file() and path == InferOutput(path.parent).result:
                found.append(path)
            elif path.is_dir():
                found += RunFolder.results_under(path)
    return list(dict.fromkeys(found))


def run_of(result_path):
    return InferOutput(result_path.parent).run.path


def rows_of(path):
    try:
        out = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(
            f"{path} is not readable JSON ({e}); re-run evaluate.py for that run."
        ) from None
    if not isinstance(out, dict) or not all(m in out for m in METRICS):
        raise UserError(f"{path} is not an eval_result.json of evaluate.py (no {list(METRICS)}).")
    run, meta = run_of(path), out.get("inference") or {}
    dataset = meta.get("dataset") or path.parent.name.removesuffix("-gzs")
    config = OmegaConf.load(RunFolder(run).config) if RunFolder(run).config.is_file() else None
    split = (config.dataset.get("split") if config is not None else None) or DEFAULT_SPLIT.get(
        dataset, ""
    )
    kind = "GZS" if out.get("generalized") else "ZS"
    if out.get("zero_shot") is False:
        kind += " (classes seen in training!)"
    chosen = meta.get("selected_by") or "?"
    if out.get("checkpoint_chosen_on_test_data"):
        chosen += " (on test data)"
    checkpoint = f"{meta.get('mode', path.parent.parent.name)} (epoch {meta.get('epoch', '?')})"
    if chosen == "baseline":
        weights = config.model.get("pretrained") if config is not None else "?"
        checkpoint = "pretrained, no training" if weights else "random init, no training"
    fg = out.get("fine_grained") or {}
    paper = PAPER.get((dataset, split)) if kind == "ZS" else None
    paper_text = " / ".join(f"{k} {v}" for k, v in paper.items()) if paper else ""
    protocols = {"default": {m: out[m] for m in METRICS}}
    for name, values in (out.get("protocols") or {}).items():
        protocols[name] = {m: values.get(m, out[m]) for m in METRICS}
    rows = []
    for protocol, values in protocols.items():
        for q, query in enumerate(("original", "converted")):
            if all(values[m][q] is None for m in METRICS):
                continue  # a baseline's converted queries (converted_null_reason)
            on = protocol == "default" and fg  # fine-grained Acc@k have one protocol
            rows.append(
                dict(
                    run=str(run),
                    dataset=dataset,
                    split=f"{split} {kind}".strip(),
                    checkpoint=checkpoint,
                    **{"chosen by": chosen},
                    protocol=protocol,
                    query=query,
                    **{m: _pct(values[m][q]) for m in METRICS},
                    **{f"FG {m}": _pct(fg[m][q]) if on else "" for m in FG_METRICS},
                    paper=paper_text,
                )
            )
    return rows


def paper_fg_rows(rows):
    """The published fine-grained figures, below the results of a split that has them."""
    shown = {(r["dataset"], r["split"].split(" ")[0]) for r in rows if r["FG acc@1"]}
    out = []
    for (dataset, split), methods in PAPER_FG.items():
        if (dataset, split) not in shown:
            continue
        for name, acc1, acc5 in methods:
            blank = {c: "" for c in COLUMNS}
            out.append(
                dict(
                    blank,
                    run=f"paper: {name}",
                    dataset=dataset,
                    split=f"{split} ZS",
                    **{"FG acc@1": f"{acc1:.2f}", "FG acc@5": f"{acc5:.2f}"},
                )
            )
    return out


def _pct(x):
    return "" if x is None else f"{100 * x:.2f}"


def markdown(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "paths", nargs="+", help="run folders, eval_result.json files or glob patterns"
    )
    parser.add_argument(
        "--csv", default="results_table.csv", help="CSV file to write (default %(default)s)"
    )
    args = parser.parse_args(argv)
    if Path(args.csv).is_dir():
        raise UserError(
            f"--csv {args.csv} is a folder; give a file name, e.g. --csv "
            f"{Path(args.csv) / 'results.csv'}."
        )
    files = result_files(args.paths)
    if not files:
        print(
            f"error: no eval_result.json under {args.paths}; run evaluate.py path=<run> first.",
            file=sys.stderr,
        )
        return 1
    rows = [r for f in files for r in rows_of(f)]
    rows += paper_fg_rows(rows)
    print(
        "metrics in %; paper = the paper's zero-shot numbers on the same split; FG acc@k = "
        "fine-grained, each sketch's own photo among its class's photos\n"
    )
    print(markdown(rows))
    from runtime.io import save_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    save_text(buf.getvalue(), args.csv)
    print(f"\n{len(rows)} rows from {len(files)} result file(s); CSV: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
