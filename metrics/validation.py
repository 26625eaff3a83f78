"""Scores that select best.pth during training: sketch -> photo mAP@all on held-out seen classes
(val_map), or the authors' weighted loss on a labelled split (test_loss)."""

import torch

from data.loader import PromptTable, SketchPhotoDataset, make_loader
from model.embed import embed_rows
from model.loss import ModalityAwareLoss
from metrics.engine import retrieval_metrics, summarize
from runtime.distributed import all_gather_cat


def validation_map(model, rows, transform, tokenizer, cfg, device, info):
    """mAP@all (default protocol) on the validation classes; each rank embeds its share of the
    images, the embeddings are gathered and every rank gets the score."""
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
    meta = torch.tensor([[r["m1"], r["label"]] for _, r in mine], dtype=torch.long, device=device)
    meta = all_gather_cat(meta).cpu()
    q, g = meta[:, 0] == 1, meta[:, 0] == 0
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
