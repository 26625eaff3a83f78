"""The evaluation pipeline: evaluate(cfg), metrics of an infer_output folder -> eval_result.json
beside it."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from data.layouts import PHOTO, SKETCH, output_key
from data.index import check_zero_shot
from data.pairs import NAMING_RULE
from metrics.engine import per_class, retrieval_metrics, summarize
from metrics.fine_grained import fine_grained
from metrics.report import write_report
from pipeline.baseline import CONVERTED_NULL_REASON
from runtime.io import load_torch, save_json
from config.entry import prepare
from runs.folder import InferOutput, find_run, is_baseline
from runtime.device import pick_device
from runtime.errors import UserError
from runtime.logs import log, setup_logging

QUERY_KINDS = ("original", "converted")


def find_output_folder(cfg):
    """infer_output/<mode>/<dataset>[-gzs] of the run: from dataset.test_idx, the run's config, or
    the only dataset folder there."""
    run = find_run(cfg.path)
    generalized = bool(cfg.eval.generalized)
    base = run.infer_root(cfg.mode)
    test_idx = cfg.dataset.test_idx
    if test_idx is None and run.config.is_file():
        test_idx = OmegaConf.load(run.config).dataset.test_idx
    if test_idx is not None:
        folder = run.infer_output(cfg.mode, output_key(test_idx), generalized)
    else:
        found = (
            sorted(
                p for p in base.glob("*") if p.is_dir() and p.name.endswith("-gzs") == generalized
            )
            if base.is_dir()
            else []
        )
        folder = InferOutput(
            found[0] if len(found) == 1 else base / f"<dataset>{'-gzs' if generalized else ''}"
        )
        if len(found) > 1:
            raise UserError(
                f"{base} holds {len(found)} dataset folders {[p.name for p in found]}; "
                f"choose one with dataset.test_idx=<index or name>."
            )
    if not folder.path.is_dir() and not run.is_run() and not base.is_dir():
        raise UserError(
            f"{run.path} is not a run folder of train.py (no config.yaml, model/ or "
            f"infer_output/); "
            f"pass path=<the folder train.py wrote>, and run `python infer.py path=<run>` first."
        )
    if not folder.path.is_dir():
        extra = " dataset.generalized=true" if generalized else ""
        raise UserError(
            f"no inference output {folder}; run `python infer.py path={cfg.path} "
            f"mode={cfg.mode}{extra}` first."
        )
    return run, folder


def read_index(path):
    """index.csv rows with their columns and values checked: m1 0 or 1, integer m2 and label."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"img_path", "m1", "m2", "label"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(
                f"{path}: missing column(s) {sorted(missing)}; re-run infer.py for this run."
            )
        rows = list(reader)
    for i, r in enumerate(rows, start=2):
        try:
            r["m1"], r["m2"], r["label"] = int(r["m1"]), int(r["m2"]), int(r["label"])
        except (TypeError, ValueError):
            raise UserError(
                f"{path} line {i}: m1, m2 and label must be integers, got {r['m1']!r}, "
                f"{r['m2']!r}, {r['label']!r}. The file was edited or cut; re-run infer.py."
            ) from None
        if r["m1"] not in (PHOTO, SKETCH):
            raise UserError(
                f"{path} line {i}: m1={r['m1']} is no image mode (0 photo, 1 sketch); re-run "
                f"infer.py."
            )
    return rows


def load_outputs(folder):
    """The embeddings {img, txt, converted} and index.csv rows of an InferOutput, checked."""
    files = [folder.embeddings(k) for k in folder.EMBEDDINGS] + [folder.index]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{folder} lacks {missing}; re-run infer.py for this run and mode.")
    tensors = {k: load_torch(folder.embeddings(k)) for k in folder.EMBEDDINGS}
    rows = read_index(folder.index)
    img, txt, conv = (tensors[k] for k in folder.EMBEDDINGS)
    shapes_ok = (
        all(isinstance(t, torch.Tensor) for t in (img, txt, conv))
        and img.ndim == 2
        and txt.ndim == 2
        and txt.shape[1] == img.shape[1]
        and conv.ndim == 4
        and conv.shape[1] == 2
        and conv.shape[3] == img.shape[1]
        and conv.shape[2] > PHOTO
    )
    if not shapes_ok:
        show = {
            f: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            for f, t in tensors.items()
        }
        raise UserError(
            f"{folder}: the embeddings have shapes {show}; expected [N,d], [N,d] and "
            f"[N,2,n_mode,d]. The files come from different runs or were edited; re-run infer.py."
        )
    n = {f: t.shape[0] for f, t in tensors.items()}
    if len(set(n.values())) != 1 or len(rows) not in n.values():
        raise UserError(
            f"{folder}: index.csv has {len(rows)} rows but the logits have {n} rows; "
            f"the files come from different runs. Re-run infer.py."
        )
    for kind in ("img", "converted"):
        bad = (~torch.isfinite(tensors[kind].float().flatten(1)).all(1)).nonzero()[:, 0]
        if bad.numel():
            raise UserError(
                f"{folder.embeddings(kind)}: {bad.numel()} of {n[kind]} embeddings are NaN or "
                f"infinite (first: {rows[int(bad[0])]['img_path']}); the model that produced "
                f"them had diverged. Infer and evaluate the other checkpoint (mode=best or "
                f"mode=last), or retrain with a lower learning rate."
            )
    return tensors, rows


def is_baseline_output(run, folder):
    """Embeddings of a pretrained-CLIP baseline (infer.py baseline=true)?"""
    meta = json.loads(folder.meta.read_text()) if folder.meta.is_file() else {}
    if meta.get("selected_by") == "baseline":
        return True
    return run.config.is_file() and is_baseline(OmegaConf.load(run.config))


def provenance(run, folder, rows, q, allow):
    """What was scored: the inference's record, and whether the split is zero-shot for the run."""
    meta = json.loads(folder.meta.read_text()) if folder.meta.is_file() else {}
    classes = sorted({Path(rows[i]["img_path"]).parent.name for i in np.flatnonzero(q)})
    overlap = []
    if run.config.is_file():
        overlap = check_zero_shot(OmegaConf.load(run.config), classes, allow, folder)
    overlap = sorted(set(overlap) | set(meta.get("classes_seen_in_training") or []))
    return dict(
        inference=dict(folder=str(folder), **meta),
        zero_shot=not overlap,
        classes_seen_in_training=overlap,
        checkpoint_chosen_on_test_data=meta.get("selected_by") == "test_loss",
    )


def evaluate(cfg, given=()):
    cfg = prepare(cfg, "eval", given)
    setup_logging()
    run, folder = find_output_folder(cfg)
    tensors, rows = load_outputs(folder)
    ecfg = cfg.eval
    m1 = np.array([r["m1"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    split = np.array([r.get("split") or "test" for r in rows])
    q = (m1 != PHOTO) & (split == "test")
    g = (m1 == PHOTO) & ((split == "test") | (bool(ecfg.generalized) & (split == "seen")))
    if ecfg.generalized and not (split == "seen").any():
        raise UserError(
            f"eval.generalized=true needs seen-class photos in {folder}; run "
            f"`python infer.py path={cfg.path} mode={cfg.mode} dataset.generalized=true`."
        )
    if not q.any() or not g.any():
        raise UserError(
            f"{folder} has {q.sum()} sketch queries and {g.sum()} photos; both must be > 0."
        )
    record = provenance(run, folder, rows, q, bool(cfg.allow_class_overlap))
    img = tensors["img"].float()
    baseline = is_baseline_output(run, folder)
    queries = {"original": img[q]}
    if not baseline:  # a baseline's mode vectors are untrained: no converted queries
        queries["converted"] = tensors["converted"][q][:, 0, PHOTO].float()
    device = pick_device(ecfg.device)
    protocols = list(dict.fromkeys(["default"] + list(ecfg.protocols)))
    results, tops = {}, {}
    for kind in queries:
        per_query, tops[kind] = retrieval_metrics(
            queries[kind],
            img[g],
            labels[q],
            labels[g],
            chunk_size=int(ecfg.chunk_size),
            device=device,
            protocols=protocols,
            topk=int(ecfg.topk),
            desc=f"{kind} queries",
        )
        results[kind] = (summarize(per_query), per_query)

    def pair(key):
        return [results[k][0][key] if k in results else None for k in QUERY_KINDS]

    out = {
        "mAP@all": pair("default/AP@all"),
        "mAP@200": pair("default/AP@200"),
        "p@100": pair("default/P@100"),
        "p@200": pair("default/P@200"),
    }
    alt = {
        "hits_over_k": {"p@100": "P@100", "p@200": "P@200"},
        "noninterp": {"mAP@all": "AP@all", "mAP@200": "AP@200"},
    }
    out["protocols"] = {
        p: {k: pair(f"{p}/{v}") for k, v in alt[p].items()} for p in protocols if p in alt
    }
    g_lab, q_lab = labels[g], labels[q]
    photos_per_label = dict(zip(*np.unique(g_lab, return_counts=True)))
    out["chance_mAP"] = float(np.mean([photos_per_label.get(lab, 0) for lab in q_lab]) / g.sum())
    out["n_queries"], out["n_gallery"] = int(q.sum()), int(g.sum())
    out["generalized"] = bool(ecfg.generalized)
    name_of = {int(r["label"]): Path(r["img_path"]).parent.name for r in rows}
    ap = {k: per_class(results[k][1]["default/AP@all"], q_lab) for k in queries}
    out["per_class_AP"] = {
        name_of[lab]: [ap[k][lab] if k in ap else None for k in QUERY_KINDS]
        for lab in sorted(ap["original"])
    }
    paths = np.array([r["img_path"] for r in rows])
    q_paths, g_paths = paths[q], paths[g]
    out["top10_retrieved"] = {
        qp: {k: g_paths[tops[k][i]].tolist() if k in tops else None for k in QUERY_KINDS}
        for i, qp in enumerate(q_paths)
    }
    fg = fine_grained_result(rows, m1, split, queries, img, ecfg, device, folder)
    if fg is not None:
        out["fine_grained"] = fg
    if baseline:
        out["converted_null_reason"] = CONVERTED_NULL_REASON
    out.update(record)
    undefined = [
        k
        for k in ("mAP@all", "mAP@200", "p@100", "p@200")
        if not all(math.isfinite(v) for v in out[k] if v is not None)
    ]
    if undefined:
        raise UserError(
            f"{folder}: {undefined} are undefined: no sketch query has a relevant photo in the "
            f"gallery (labels of sketches and photos never match). Check index.csv's labels; "
            f"nothing was written."
        )
    save_json(_nan_to_none(out), folder.result)
    print(format_table(out, folder.result))
    rcfg = ecfg.report
    if rcfg.enabled:
        report = make_report(folder, _nan_to_none(out), rows, rcfg)
        if report:
            print(f"visual report: {report}")
    return out


def fine_grained_result(rows, m1, split, queries, img, ecfg, device, folder):
    """The "fine_grained" block of eval_result.json (metrics/fine_grained.py) when index.csv pairs
    test sketches with the photos they were drawn from; None when it has no pairs (and
    eval.fine_grained is not true) or eval.fine_grained=false."""
    if ecfg.fine_grained is False:
        return None
    test = split == "test"
    sketch_rows = np.flatnonzero((m1 != PHOTO) & test)
    own = [rows[i].get("photo") or "" for i in sketch_rows]
    if not any(own):
        if ecfg.fine_grained:
            raise UserError(
                f"eval.fine_grained=true, but {folder.index} pairs no test sketch with a photo "
                f"({NAMING_RULE}; index.csv written before pairs existed has no photo column: "
                f"re-run infer.py). Leave eval.fine_grained unset to skip it."
            )
        return None
    paths = [r["img_path"] for r in rows]
    photo_rows = np.flatnonzero((m1 == PHOTO) & test)
    where = {paths[i]: i for i in photo_rows}
    kept = [(i, where[p]) for i, p in zip(sketch_rows, own) if p in where]
    unmatched = sorted(
        rows[i]["img_path"] for i, p in zip(sketch_rows, own) if p and p not in where
    )
    # the gallery: every photo some test sketch was drawn from (Sketchy's basic set), once
    gallery_rows = sorted({j for _, j in kept})
    g_pos = {j: k for k, j in enumerate(gallery_rows)}
    q_of = {i: k for k, i in enumerate(sketch_rows)}  # row -> position among the queries
    pick = np.array([q_of[i] for i, _ in kept])
    classes = np.array([Path(p).parent.name for p in paths])
    result = fine_grained(
        {k: v[pick] for k, v in queries.items()},
        img[gallery_rows],
        [g_pos[j] for _, j in kept],
        classes[[i for i, _ in kept]],
        classes[gallery_rows],
        chunk_size=int(ecfg.chunk_size),
        device=device,
    )
    summary = result["summary"]
    summary["skipped_sketches"] = len(unmatched)
    if unmatched:
        log.warning(
            f"fine-grained: {len(unmatched)} sketch(es) name a photo that is not in the test "
            f"split (e.g. {unmatched[0]}); left out"
        )
    ranks = result["ranks"]["class"]
    summary["own_photo_rank"] = {
        paths[i]: [int(ranks[k][n]) if k in queries else None for k in QUERY_KINDS]
        for n, (i, _) in enumerate(kept)
    }
    for block in [summary, summary["unseen"], *summary["per_class"].values()]:
        for key in ("acc@1", "acc@5", "acc@10"):  # [original, converted], null when not asked
            block[key] = dict(zip(queries, block[key]))
            block[key] = [block[key].get(k) for k in QUERY_KINDS]
    return summary


def make_report(folder, result, rows, rcfg):
    """report.html when the images can be found (eval.report.image_root, else the dataset root
    that infer.py recorded); otherwise a warning, since the metrics do not need the images."""
    root = rcfg.image_root
    if root is None and folder.meta.is_file():
        root = json.loads(folder.meta.read_text()).get("root")
    missing = [
        r["img_path"]
        for r in rows[:50]
        if root is None or not (Path(root) / r["img_path"]).is_file()
    ]
    if missing:
        log.warning(
            f"no visual report: images such as {missing[0]} are not under {root}; pass "
            f"eval.report.image_root=<dataset root> (or eval.report.enabled=false)."
        )
        return None
    return write_report(
        folder,
        result,
        rows,
        root,
        n_queries=int(rcfg.n_queries),
        grid_queries=int(rcfg.grid_queries),
        seed=int(rcfg.seed),
        grid_kind=rcfg.grid_kind,
    )


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _num(v, width=10):
    return f"{'n/a':>{width}}" if v is None else f"{v:>{width}.4f}"


def format_table(out, path):
    lines = [f"{'metric':<10} {'original':>10} {'converted':>10}"]
    for key in ("mAP@all", "mAP@200", "p@100", "p@200"):
        lines.append(f"{key:<10} {_num(out[key][0])} {_num(out[key][1])}")
    for proto, vals in out.get("protocols", {}).items():
        for key, v in vals.items():
            lines.append(f"{key + ' (' + proto + ')':<10} {_num(v[0])} {_num(v[1])}")
    if out.get("converted_null_reason"):
        lines.append(f"converted: n/a, {out['converted_null_reason']}")
    lines.append(
        f"chance mAP (mean fraction of relevant photos per query): {out['chance_mAP']:.4f}"
    )
    fg = out.get("fine_grained")
    if fg:
        for block in (fg, fg["unseen"]):
            accs = "  ".join(
                f"{k} {_num(block[k][0], 0)} / {_num(block[k][1], 0)}"
                for k in ("acc@1", "acc@5", "acc@10")
            )
            lines.append(
                f"fine-grained, {block['gallery']} gallery (original / converted): {accs}; "
                f"chance acc@1 {block['chance_acc@1']:.4f}"
            )
        lines.append(f"fine-grained: {fg['n_queries']} sketches paired with their photo")
    lines.append(f"{out['n_queries']} sketch queries, {out['n_gallery']} photos; results in {path}")
    return "\n".join(lines)
