"""Local weight files for model.pretrained: what they hold (open_clip state dict, HF CLIPModel, or
OpenAI's TorchScript release), the activation they were trained with, and loading them by name."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model.hf_clip import hf_quick_gelu, hf_to_open_clip, is_hf_clip
from runtime.restricted_pickle import is_torchscript
from runtime.errors import UserError

JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class LocalWeights:
    kind: str
    quick_gelu: bool | None  # None: the file does not say
    state: dict | None  # open_clip names; None: open_clip loads the file itself


def _read_state(path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"it holds a {type(ckpt).__name__}, not a state dict")
    ckpt = ckpt.get("state_dict", ckpt)
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def read_local_weights(path):
    path = Path(path)
    try:
        if is_torchscript(path):
            state = torch.jit.load(path, map_location="cpu").state_dict()
            return LocalWeights(
                "OpenAI TorchScript release",
                True,
                {k: v for k, v in state.items() if k not in JIT_EXTRAS},
            )
        state = _read_state(path)
    except Exception as e:  # torch, zipfile and safetensors each raise their own kinds
        raise UserError(
            f"could not read weight file {path}: {str(e).splitlines()[0][:300]}. Give "
            f"model.pretrained a PyTorch or safetensors checkpoint of a CLIP model."
        ) from None
    if not is_hf_clip(state):
        return LocalWeights("open_clip", None, None)
    config = path.parent / "config.json"
    try:
        quick_gelu = hf_quick_gelu(json.loads(config.read_text())) if config.is_file() else True
        return LocalWeights("HF CLIPModel", quick_gelu, hf_to_open_clip(state))
    except ValueError as e:
        raise UserError(
            f"weight file {path} ({config if config.is_file() else 'HF CLIP names'}): {e}."
        ) from None


def load_clip_state(clip, state, origin, backbone):
    """Load an open_clip-named state dict into `clip`; UserError naming what does not fit."""
    mine = clip.state_dict()
    transient = {name for name, _ in clip.named_buffers()} - set(
        mine
    )  # e.g. attn_mask, saved by TorchScript
    state = {k: v for k, v in state.items() if k not in transient}
    if "logit_scale" in state and "logit_scale" in mine:
        state = dict(state, logit_scale=state["logit_scale"].reshape(mine["logit_scale"].shape))
    if "logit_bias" in mine and "logit_bias" not in state:
        state = dict(state, logit_bias=mine["logit_bias"])
    missing = sorted(set(mine) - set(state))
    extra = sorted(set(state) - set(mine))
    shapes = [
        f"{k} is {list(state[k].shape)} there, {list(mine[k].shape)} in {backbone}"
        for k in mine
        if k in state and state[k].shape != mine[k].shape
    ]
    if missing or extra or shapes:
        what = "; ".join(
            filter(
                None,
                [
                    ", ".join(shapes[:3]),
                    missing and f"{len(missing)} weights missing (e.g. {missing[0]})",
                    extra and f"{len(extra)} unknown (e.g. {extra[0]})",
                ],
            )
        )
        raise UserError(
            f"{origin} holds a CLIP of another architecture than model.backbone={backbone}: "
            f"{what}. "
            f"Use the backbone the weights were trained as."
        )
    clip.load_state_dict(state)
