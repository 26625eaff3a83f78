"""Scores that select best.pth during training: sketch -> photo mAP@all on held-out seen classes
(val_map), fine-grained Acc@1 on their sketch-photo pairs (val_fg), or the authors' weighted
loss on a labelled split (test_loss)."""

import math

import numpy as np
import torch

from data.layouts import PHOTO, SKETCH
from data.pairs import paired_rows
from data.loader import PromptTable, SketchPhotoDataset, make_loader
from model.embed import embed_rows
from model.loss import ModalityAwareLoss
from metrics.engine import retrieval_metrics, summarize
from metrics.fine_grained import own_photo_ranks
from runtime.distributed import all_gather_cat


def validation_embeddings(model, rows, transform, tokenizer, cfg, device, info):
    """(image embeddings, the rows in their order): each rank embeds its share of `rows`, every
    rank gets them all, in the order all_gather_cat concatenates the ranks' strided shares."""
    mine = rows[info.rank :: info.world_size]
    emb = embed_rows(
        model,
        mine,
        transform,
        tokenizer,
        batch_size=cfg.train.batch_size,
        num_workers=cfg.train.num_workers,
        device=device,
        precision=cfg.train.precision,
        progress=False,
        with_converted=False,
        cache=cfg.dataset.cache,
        max_pixels=cfg.dataset.max_image_pixels,
    )
    z = all_gather_cat(torch.from_numpy(emb["img"]).to(device)).cpu()
    return z, gathered_order(rows, info.world_size)


def gathered_order(rows, world):
    """The rows in the order all_gather_cat concatenates the ranks' strided shares."""
    return [r for rank in range(world) for r in rows[rank::world]]


def validation_map(z, rows, cfg, device):
    """mAP@all (default protocol) of the sketch -> photo retrieval among `rows` (validation
    classes), embedded as z."""
    meta = torch.tensor([[r["m1"], r["label"]] for _, r in rows], dtype=torch.long)
    q, g = meta[:, 0] == SKETCH, meta[:, 0] == PHOTO
    per_query, _ = retrieval_metrics(
        z[q],
        z[g],
        meta[q, 1],
        meta[g, 1],
        chunk_size=cfg.eval.chunk_size,
        device=device,
        progress=False,
    )
    return summarize(per_query)["default/AP@all"]


def validation_fine_grained(z, rows, cfg, device):
    """Fine-grained Acc@1 among `rows` embedded as z, class gallery: each paired sketch's own
    photo among the photos of its class that some sketch there was drawn from; NaN without
    pairs."""
    queries, own = paired_rows(rows)
    if not queries:
        return math.nan
    gallery = sorted(set(own))
    at = {j: k for k, j in enumerate(gallery)}
    classes = np.array([r["label"] for _, r in rows])
    ranks = own_photo_ranks(
        z[queries],
        z[gallery],
        [at[j] for j in own],
        classes[queries],
        classes[gallery],
        chunk_size=int(cfg.eval.chunk_size),
        device=device,
    )
    return float((ranks <= 1).mean())


@torch.no_grad()
def split_loss(model, rows, transform, tokenizer, ratios, cfg, device):
    """The weighted training loss over `rows` in eval mode and fp32, batch by batch in their
    order, averaged over batches: the authors' `predict`, which picks their best.pth."""
    model.eval()
    prompts = PromptTable(rows, tokenizer)
    tokens = prompts.tokens.to(device)
    loss = ModalityAwareLoss(ratios)
    loader = make_loader(
        SketchPhotoDataset(rows, transform, prompts, cfg.dataset.max_image_pixels),
        int(cfg.train.batch_size),
        int(cfg.train.num_workers),
        shuffle=False,
    )
    totals = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        total, _ = model(batch["image"], tokens, batch["prompt_id"], batch["m1"], batch["m2"], loss)
        totals.append(total.item())
    model.train()
    return sum(totals) / len(totals)
