"""HF transformers CLIPModel weights (the authors' backbone, openai/clip-vit-base-patch32) in
open_clip's names: renamed, q/k/v stacked into in_proj, projections transposed."""

import re

import torch

HF_PREFIXES = ("text_model.", "vision_model.", "text_projection.", "visual_projection.")
RENAMED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "logit_scale": "logit_scale",
}
for _hf, _oc in (
    ("text_model.final_layer_norm", "ln_final"),
    ("vision_model.pre_layrnorm", "visual.ln_pre"),
    ("vision_model.post_layernorm", "visual.ln_post"),
):
    RENAMED.update({f"{_hf}.{kind}": f"{_oc}.{kind}" for kind in ("weight", "bias")})
TRANSPOSED = {
    "text_projection.weight": "text_projection",
    "visual_projection.weight": "visual.proj",
}
LAYER = re.compile(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def is_hf_clip(state):
    """True for a state dict with HF CLIPModel names (both towers)."""
    return any(k.startswith("text_model.") for k in state) and any(
        k.startswith("vision_model.") for k in state
    )


def hf_quick_gelu(config):
    """The activation an HF CLIPConfig (dict of its config.json) names: True for quick_gelu."""
    acts = {
        config.get(tower, {}).get("hidden_act", "quick_gelu")
        for tower in ("text_config", "vision_config")
    }
    if len(acts) != 1:
        raise ValueError(f"the text and vision towers use different activations {sorted(acts)}")
    return acts.pop() == "quick_gelu"


def hf_to_open_clip(state):
    """open_clip state dict of an HF CLIPModel state dict; ValueError naming any key it cannot
    place."""
    out, qkv = {}, {}
    for key, value in state.items():
        if key.endswith("position_ids"):  # a buffer older transformers saved; open_clip has none
            continue
        if key in RENAMED:
            out[RENAMED[key]] = value
        elif key in TRANSPOSED:
            out[TRANSPOSED[key]] = value.T.contiguous()
        elif (m := LAYER.fullmatch(key)) and (m[3] in LAYER_PARTS or m[3] in QKV):
            block = f"{'visual.' if m[1] == 'vision' else ''}transformer.resblocks.{m[2]}."
            if m[3] in QKV:
                qkv.setdefault(f"{block}attn.in_proj_{m[4]}", [None] * 3)[QKV[m[3]]] = value
            else:
                out[f"{block}{LAYER_PARTS[m[3]]}.{m[4]}"] = value
        else:
            raise ValueError(f"no open_clip name for the HF CLIP key {key!r}")
    for name, parts in qkv.items():
        if any(p is None for p in parts):
            raise ValueError(f"{name}: the file lacks one of the q/k/v projections")
        out[name] = torch.cat(parts)
    return out
