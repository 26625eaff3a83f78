"""The open_clip dual encoder: architecture by name, weights by open_clip tag or local file."""
from pathlib import Path

import open_clip

from utils.runtime import UserError

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
        looks_like_path = "/" in str(pretrained) or path.suffix in (".pt", ".pth", ".bin", ".safetensors")
        what = "weight file" if looks_like_path else "pretrained tag"
        raise UserError(
            f"{what} {pretrained!r} for backbone {backbone!r} not found. Give model.pretrained "
            f"an existing local file or one of open_clip's tags for this backbone: {tags or 'none'} "
            f"(or model.pretrained=null for random initialisation).")
    return str(pretrained)


def create_backbone(backbone, pretrained=None, cache_dir=None):
    """Return (clip_model, train_transform, eval_transform, tokenizer)."""
    if backbone not in open_clip.list_models():
        raise UserError(f"unknown backbone {backbone!r}. Use an open_clip model name "
                        f"(e.g. ViT-B-32, ViT-B-16, ma-tiny) or add a JSON config to {CONFIG_DIR}.")
    source = _pretrained_source(backbone, pretrained)
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            backbone, pretrained=source, cache_dir=cache_dir)
    except RuntimeError as e:
        if source is None or Path(source).is_file():
            raise UserError(f"could not build {backbone} from {source or 'random init'}: {e}") from None
        raise UserError(
            f"could not get the {backbone!r} weights for tag {source!r}: this machine cannot "
            f"download them ({str(e).splitlines()[0][:200]}). On a machine with internet, run "
            f"`python -c \"import open_clip; open_clip.create_model('{backbone}', "
            f"pretrained='{source}')\"` to fill the cache (~/.cache/huggingface), or download the "
            f"checkpoint file and pass model.pretrained=/path/to/file.") from None
    return model, train_tf, eval_tf, open_clip.get_tokenizer(backbone)


def build_model(mcfg, cache_dir=None):
    """The modality-aware model from the `model` config: (model, train_tf, eval_tf, tokenizer)."""
    from model.modality import ModalityAwareCLIP

    clip, train_tf, eval_tf, tokenizer = create_backbone(mcfg.backbone, mcfg.get("pretrained"), cache_dir)
    embed_dim = clip.text_projection.shape[-1] if hasattr(clip, "text_projection") else None
    embed_dim = embed_dim or open_clip.get_model_config(mcfg.backbone)["embed_dim"]
    model = ModalityAwareCLIP(clip, embed_dim, int(mcfg.n_mode), float(mcfg.temperature))
    return model, train_tf, eval_tf, tokenizer


def loss_ratios(mcfg):
    return {name: float(mcfg.get(f"{name}_loss_ratio", 0) or 0)
            for name in ("clip", "sem", "rec", "disc", "orth")}
