"""Embeddings of a list of annotation rows: image embeddings, each distinct prompt's text
embedding once, and the converted vectors of both."""

import numpy as np
import torch
from tqdm import tqdm

from data.cached import image_dataset
from data.loader import PromptTable, make_loader, model_input
from runtime.device import autocast


@torch.no_grad()
def embed_rows(
    model,
    rows,
    transform,
    tokenizer,
    batch_size,
    num_workers,
    device,
    precision="bf16",
    progress=True,
    with_converted=True,
    cache=False,
    max_pixels=None,
):
    """Returns dict img [N,d], txt [N,d] and (optionally) converted [N,2,n_mode,d] as numpy.
    `cache`: the dataset.cache setting (data/cached.py); `max_pixels`: dataset.max_image_pixels
    (an image above it is refused from its header; None: Pillow's default)."""
    model.eval()
    prompts = PromptTable(rows, tokenizer)
    with autocast(device, precision):
        z_prompt = torch.cat(
            [
                model.encode_text(prompts.tokens[s : s + 1024].to(device))
                for s in range(0, len(prompts.texts), 1024)
            ]
        ).float()
    dataset = image_dataset(rows, transform, prompts, cache, progress, max_pixels)
    loader = make_loader(dataset, batch_size, num_workers, shuffle=False)
    img, txt, conv = [], [], []
    for batch in tqdm(loader, desc="embedding", disable=not progress, dynamic_ncols=True):
        with autocast(device, precision):
            z_img = model.encode_image(
                model_input(batch["image"].to(device, non_blocking=True), transform)
            ).float()
        z_txt = z_prompt[batch["prompt_id"].to(device)]
        img.append(z_img.cpu())
        txt.append(z_txt.cpu())
        if with_converted:
            image_mode, text_mode = batch["m1"].to(device), batch["m2"].to(device)
            conv.append(
                torch.stack(
                    [model.convert(z_img, image_mode), model.convert(z_txt, text_mode)], dim=1
                ).cpu()
            )
    out = dict(img=torch.cat(img).numpy(), txt=torch.cat(txt).numpy())
    if with_converted:
        out["converted"] = torch.cat(conv).numpy()
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
