"""The open_clip dual encoder: architecture by name, weights by open_clip tag or local file
(open_clip,
HF CLIPModel or OpenAI TorchScript), built with the activation its weights were trained with."""

from pathlib import Path

import open_clip
import torch.nn.functional as F
from omegaconf import open_dict
from open_clip.transformer import QuickGELU

from model.weights import load_clip_state, read_local_weights
from runtime.errors import UserError
from runtime.logs import log

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)


def _pretrained_source(backbone, pretrained):
    """'' / None: random init; an existing file: local weights; else an open_clip tag."""
    if not pretrained:
        return None
    path = Path(str(pretrained)).expanduser()
    if path.is_file():
        return str(path)
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    if str(pretrained) not in tags:
        looks_like_path = "/" in str(pretrained) or path.suffix in (
            ".pt",
            ".pth",
            ".bin",
            ".safetensors",
        )
        what = "weight file" if looks_like_path else "pretrained tag"
        raise UserError(
            f"{what} {pretrained!r} for backbone {backbone!r} not found. Give model.pretrained "
            f"an existing local file or one of open_clip's tags for this backbone: "
            f"{tags or 'none'} "
            f"(or model.pretrained=null for random initialisation)."
        )
    return str(pretrained)


def resolve_quick_gelu(backbone, wanted=None, weights_say=None, weights_name="the weights"):
    """Whether to build with QuickGELU: what model.quick_gelu, the architecture config and the
    weights say (each may be silent: None). Two that disagree are an error; all silent: GELU."""
    said = [
        (bool(v), who)
        for v, who in (
            (wanted, "model.quick_gelu"),
            (
                open_clip.get_model_config(backbone).get("quick_gelu"),
                f"the {backbone} architecture config",
            ),
            (weights_say, weights_name),
        )
        if v is not None
    ]
    if len({v for v, _ in said}) > 1:
        raise UserError(
            "QuickGELU mismatch: "
            + "; ".join(f"{who} says quick_gelu={v}" for v, who in said)
            + ". Weights "
            "only work with the activation they were trained with: drop model.quick_gelu, or pick "
            "the "
            "backbone name (with or without -quickgelu) that matches the weights."
        )
    return said[0][0] if said else False


def uses_quick_gelu(clip):
    return any(isinstance(m, QuickGELU) for m in clip.modules())


def create_backbone(backbone, pretrained=None, cache_dir=None, quick_gelu=None, load_weights=True):
    """Return (clip_model, train_transform, eval_transform, tokenizer). load_weights=False builds
    the
    architecture the weights need (activation included) with random weights, downloading nothing."""
    if backbone not in open_clip.list_models():
        raise UserError(
            f"unknown backbone {backbone!r}. Use an open_clip model name "
            f"(e.g. ViT-B-32, ViT-B-16, ma-tiny) or add a JSON config to {CONFIG_DIR}."
        )
    source = _pretrained_source(backbone, pretrained)
    local = (
        read_local_weights(source) if source and Path(source).is_file() and load_weights else None
    )
    if local is not None:
        weights_say, origin = local.quick_gelu, f"weight file {source} ({local.kind})"
    elif source and not Path(source).is_file():
        weights_say = open_clip.get_pretrained_cfg(backbone, source).get("quick_gelu", False)
        origin = f"open_clip's pretrained tag {source!r}"
    else:
        weights_say, origin = None, None
    act = resolve_quick_gelu(backbone, quick_gelu, weights_say, origin)
    by_open_clip = source if load_weights and (local is None or local.state is None) else None
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            backbone, pretrained=by_open_clip, cache_dir=cache_dir, force_quick_gelu=act
        )
    except RuntimeError as e:
        if by_open_clip is None or Path(by_open_clip).is_file():
            raise UserError(
                f"could not build {backbone} from {by_open_clip or 'random init'}: {e}"
            ) from None
        raise UserError(
            f"could not get the {backbone!r} weights for tag {source!r}: this machine cannot "
            f"download them ({str(e).splitlines()[0][:200]}). On a machine with internet, run "
            f"`python -c \"import open_clip; open_clip.create_model('{backbone}', "
            f"pretrained='{source}')\"` to fill the cache (~/.cache/huggingface), or download the "
            f"checkpoint file and pass model.pretrained=/path/to/file."
        ) from None
    if local is not None and local.state is not None:
        load_clip_state(model, local.state, origin, backbone)
    if act:
        log.info(
            f"{backbone}: QuickGELU activation "
            f"({origin or 'architecture config / model.quick_gelu'})"
        )
    return model, train_tf, eval_tf, open_clip.get_tokenizer(backbone)


class TruncatingTokenizer:
    """open_clip's tokenizer cut at max_length tokens with end-of-text kept last (as HF's tokenizer
    truncates), zero-padded back to the model's context length (its positional embeddings' length;
    the causal mask keeps the padding out of the pooled end-of-text token)."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.context_length = tokenizer.context_length

    def __call__(self, texts):
        tokens = self.tokenizer(texts, context_length=self.max_length)
        return F.pad(tokens, (0, self.context_length - self.max_length))


def build_model(mcfg, cache_dir=None, load_weights=True):
    """The modality-aware model from the `model` config: (model, train_tf, eval_tf, tokenizer).
    Records the activation it resolved in mcfg.quick_gelu, so a run's saved config rebuilds it."""
    from model.modality import ModalityAwareCLIP

    clip, train_tf, eval_tf, tokenizer = create_backbone(
        mcfg.backbone, mcfg.get("pretrained"), cache_dir, mcfg.get("quick_gelu"), load_weights
    )
    with open_dict(mcfg):
        mcfg.quick_gelu = uses_quick_gelu(clip)
    max_length = mcfg.get("max_length")
    if max_length is not None:
        if not 2 <= int(max_length) <= tokenizer.context_length:
            raise UserError(
                f"model.max_length={max_length}: give a number of tokens from 2 to "
                f"{tokenizer.context_length} (the context length of {mcfg.backbone}), or null."
            )
        tokenizer = TruncatingTokenizer(tokenizer, int(max_length))
    embed_dim = clip.text_projection.shape[-1] if hasattr(clip, "text_projection") else None
    embed_dim = embed_dim or open_clip.get_model_config(mcfg.backbone)["embed_dim"]
    model = ModalityAwareCLIP(clip, embed_dim, int(mcfg.n_mode), float(mcfg.temperature))
    return model, train_tf, eval_tf, tokenizer


def loss_ratios(mcfg):
    return {
        name: float(mcfg.get(f"{name}_loss_ratio", 0) or 0)
        for name in ("clip", "sem", "rec", "disc", "orth")
    }
