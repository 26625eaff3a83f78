"""infer(cfg): embeddings of a run's test split -> infer_output/<mode>/<dataset>/."""
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from data.datasets import COLUMNS, output_key
from data.index import make_splits
from model.backbone import build_model
from model.checkpoint import load_checkpoint
from model.embed import embed_rows
from utils.distributed import all_gather_cat, cleanup_distributed, init_distributed
from utils.io import save_csv, save_json, save_torch
from utils.runtime import UserError, log, setup_logging

INDEX_COLUMNS = COLUMNS + ["split"]


def run_config(run_dir):
    """The training config saved in a run folder."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if candidate.is_file():
            return OmegaConf.load(candidate)
    raise UserError(f"{run_dir} holds no config.yaml (or .hydra/config.yaml): is it a run folder "
                    f"written by train.py? Pass path=outputs/<date>/<time>.")


def test_dataset_config(train_cfg, cfg):
    """The run's dataset config, with the test dataset / root overrides of infer."""
    dcfg = OmegaConf.create(OmegaConf.to_container(train_cfg.dataset, resolve=True))
    over = cfg.get("dataset") or {}
    if over.get("test_idx") is not None:
        dcfg.test_idx = over.test_idx
    if over.get("root") is not None:
        dcfg.root = over.root
    return dcfg


def gather_shards(emb, n, info, device):
    """Reassemble the rows that rank r embedded (r, r + W, r + 2W, ...) in index order."""
    order = np.concatenate([np.arange(r, n, info.world_size) for r in range(info.world_size)])
    out = {}
    for key, part in emb.items():
        full = all_gather_cat(torch.from_numpy(part).to(device)).cpu().numpy()
        out[key] = np.empty_like(full)
        out[key][order] = full
    return out


def infer(cfg):
    setup_logging()
    run_dir = Path(cfg.path)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass path=<the folder train.py wrote>.")
    ckpt = load_checkpoint(run_dir / "model" / f"{cfg.mode}.pth")
    train_cfg = OmegaConf.create(ckpt["config"])
    dcfg = test_dataset_config(train_cfg, cfg)
    splits = make_splits(dcfg, need_train=False)
    rows = [dict(r, split="test") for _, r in splits.test]
    roots = [root for root, _ in splits.test]
    if cfg.dataset.get("generalized"):
        ix = splits.test_index
        seen_photos = [r for r in ix.rows_of(ix.seen) if r["m1"] == 0]
        rows += [dict(r, split="seen") for r in seen_photos]
        roots += [ix.root] * len(seen_photos)
    if not rows:
        raise UserError(f"the test split of {dcfg.test_idx} is empty; check the dataset root and split.")
    info = init_distributed(cfg.device)
    device = info.device(cfg.device)
    model, _, eval_tf, tokenizer = build_model(OmegaConf.create(dict(train_cfg.model, pretrained=None)))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{run_dir / 'model' / (cfg.mode + '.pth')} does not fit the model its config "
                        f"describes (model.backbone={train_cfg.model.backbone}, model.n_mode="
                        f"{train_cfg.model.n_mode}): {str(e).splitlines()[0]} The file was changed or "
                        f"comes from another run; use that run's folder.") from None
    model.to(device)
    log.info(f"embedding {len(rows)} images of {splits.test_index.name} ({splits.test_index.root}) "
             f"with {run_dir / 'model' / (cfg.mode + '.pth')} on {device}, {info.world_size} process(es)")
    pairs = list(zip(roots, rows))
    emb = embed_rows(model, pairs[info.rank::info.world_size], eval_tf, tokenizer, int(cfg.batch_size),
                     int(cfg.num_workers), device, cfg.precision, progress=info.is_main,
                     cache=dcfg.get("cache", False))
    if info.enabled:
        emb = gather_shards(emb, len(rows), info, device)
        cleanup_distributed()
        if not info.is_main:
            return None
    out = run_dir / "infer_output" / cfg.mode / output_key(dcfg.test_idx)
    save_torch(torch.from_numpy(emb["img"]), out / "img_logits.pt")
    save_torch(torch.from_numpy(emb["txt"]), out / "txt_logits.pt")
    save_torch(torch.from_numpy(emb["converted"]), out / "converted_logits.pt")
    save_csv(rows, INDEX_COLUMNS, out / "index.csv")
    save_json(dict(dataset=splits.test_index.name, root=str(splits.test_index.root), mode=cfg.mode,
                   checkpoint=str(run_dir / "model" / f"{cfg.mode}.pth"), epoch=ckpt.get("epoch"),
                   generalized=bool(cfg.dataset.get("generalized"))), out / "infer_meta.json")
    log.info(f"wrote {out}/{{img_logits,txt_logits,converted_logits}}.pt and index.csv")
    return out
