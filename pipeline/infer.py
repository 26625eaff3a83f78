"""The inference pipeline: infer(cfg), embeddings of a run's test split ->
infer_output/<mode>/<dataset>/."""

import shutil

import numpy as np
import torch
from omegaconf import OmegaConf

from data.layouts import COLUMNS, output_key
from data.index import check_zero_shot, make_splits
from model.backbone import build_model
from model.checkpoint import load_checkpoint
from model.embed import embed_rows
from runtime.distributed import all_gather_cat, cleanup_distributed, init_distributed
from runtime.io import save_csv, save_json, save_torch
from config.entry import prepare
from runs.folder import find_run
from runtime.errors import UserError
from runtime.logs import log, setup_logging
from config.schema import dataset_defaults

INDEX_COLUMNS = COLUMNS + ["photo", "split"]  # photo: a sketch's own photo (data/pairs.py)


def test_dataset_config(train_cfg, cfg):
    """The run's dataset config (keys newer than the run at their defaults), with the test
    dataset / root overrides of infer."""
    dcfg = dataset_defaults(OmegaConf.to_container(train_cfg.dataset, resolve=True))
    for key in ("test_idx", "root", "max_image_pixels"):
        if cfg.dataset[key] is not None:
            dcfg[key] = cfg.dataset[key]
    refuse_a_new_demo(dcfg)
    return dcfg


def refuse_a_new_demo(dcfg):
    """Training generates the demo dataset at a new dataset.root; infer must not: a mistyped root
    would embed a freshly generated demo and overwrite the run's infer output. The two demos of
    the repository's .cache (dataset.root unset, or `fine-grained`) are drawn the same every time,
    so they are made when missing, as in training."""
    from pathlib import Path

    from data.demo import FINE_GRAINED_NAME
    from data.layouts import resolve_name

    if resolve_name(dcfg["test_idx"]) != "demo":
        return
    root = dcfg["root"].get("demo") if OmegaConf.is_dict(dcfg["root"]) else dcfg["root"]
    named = str(root) == FINE_GRAINED_NAME  # the fine-grained demo: made as the default is
    if root and not named and not (Path(str(root)).expanduser() / "demo.json").is_file():
        raise UserError(
            f"dataset.root={root} holds no demo dataset (no demo.json); infer never "
            f"generates data. Pass the root the run trained on (its config.yaml, "
            f"dataset.root), or leave dataset.root out."
        )


def gather_shards(emb, n, info, device):
    """Reassemble the rows that rank r embedded (r, r + W, r + 2W, ...) in index order."""
    order = np.concatenate([np.arange(r, n, info.world_size) for r in range(info.world_size)])
    out = {}
    for key, part in emb.items():
        full = all_gather_cat(torch.from_numpy(part).to(device)).cpu().numpy()
        out[key] = np.empty_like(full)
        out[key][order] = full
    return out


def infer(cfg, given=()):
    cfg = prepare(cfg, "infer", given)
    setup_logging()
    run = find_run(cfg.path)
    ckpt = load_checkpoint(run.checkpoint(cfg.mode))
    train_cfg = OmegaConf.create(ckpt["config"])
    dcfg = test_dataset_config(train_cfg, cfg)
    splits = make_splits(dcfg, need_train=False)
    overlap = check_zero_shot(
        train_cfg, splits.test_index.unseen, cfg.allow_class_overlap, run.checkpoint(cfg.mode)
    )
    rows = [dict(r, split="test") for _, r in splits.test]
    roots = [root for root, _ in splits.test]
    generalized = bool(cfg.dataset.generalized)
    if generalized:
        ix = splits.test_index
        seen_photos = [r for r in ix.rows_of(ix.seen) if r["m1"] == 0]
        rows += [dict(r, split="seen") for r in seen_photos]
        roots += [ix.root] * len(seen_photos)
    if not rows:
        raise UserError(
            f"the test split of {dcfg.test_idx} is empty; check the dataset root and split."
        )
    info = init_distributed(cfg.device)
    device = info.device(cfg.device)
    model, _, eval_tf, tokenizer = build_model(
        OmegaConf.create(dict(train_cfg.model, pretrained=None))
    )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(
            f"{run.checkpoint(cfg.mode)} does not fit the model its config "
            f"describes (model.backbone={train_cfg.model.backbone}, model.n_mode="
            f"{train_cfg.model.n_mode}): {str(e).splitlines()[0]} The file was changed or "
            f"comes from another run; use that run's folder."
        ) from None
    model.to(device)
    log.info(
        f"embedding {len(rows)} images of {splits.test_index.name} ({splits.test_index.root}) "
        f"with {run.checkpoint(cfg.mode)} on {device}, {info.world_size} process(es)"
    )
    pairs = list(zip(roots, rows))
    emb = embed_rows(
        model,
        pairs[info.rank :: info.world_size],
        eval_tf,
        tokenizer,
        int(cfg.batch_size),
        int(cfg.num_workers),
        device,
        cfg.precision,
        progress=info.is_main,
        cache=dcfg.cache,
        max_pixels=dcfg.max_image_pixels,
    )
    if info.enabled:
        emb = gather_shards(emb, len(rows), info, device)
        cleanup_distributed()
        if not info.is_main:
            return None
    out = run.infer_output(cfg.mode, output_key(dcfg.test_idx), generalized)
    for path in out.results:  # evaluate.py's results of the embeddings about to be replaced
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
            log.info(f"removed {path}: it scored the previous embeddings; run evaluate.py again")
    for kind in out.EMBEDDINGS:
        save_torch(torch.from_numpy(emb[kind]), out.embeddings(kind))
    save_csv(rows, INDEX_COLUMNS, out.index)
    selected_by = (
        ckpt.get("selected_by")
        or (train_cfg.get("run") or {}).get("select")
        or train_cfg.get("train", {}).get("select")
    )
    save_json(
        dict(
            dataset=splits.test_index.name,
            root=str(splits.test_index.root),
            mode=cfg.mode,
            checkpoint=str(run.checkpoint(cfg.mode)),
            epoch=ckpt.get("epoch"),
            selected_by=selected_by,
            generalized=generalized,
            classes_seen_in_training=overlap,
        ),
        out.meta,
    )
    log.info(f"wrote the embeddings and {out.index.name} to {out}")
    return out
