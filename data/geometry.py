"""A backbone's input geometry (image size, normalisation, resize mode and interpolation) read from
open_clip's model and pretrained configs, without building the model or reading any weights: the
train and eval transforms open_clip.create_model_and_transforms would return for it. The image
cache needs only these, and is often built on offline compute nodes."""

from dataclasses import asdict
from pathlib import Path

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

from runtime.errors import UserError

# The project's own architecture configs (ma-tiny); model/backbone.py registers the same folder.
MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "model" / "model_configs"
_registered = False


def _register():
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIGS)
        _registered = True


def preprocess_config(backbone, pretrained=None):
    """open_clip's PreprocessCfg for `backbone` with `pretrained` (an open_clip tag, a local file
    or None), as create_model_and_transforms resolves it: the defaults, the tag's mean / std /
    interpolation / resize mode when it is a tag, and the architecture's image size."""
    _register()
    model_cfg = open_clip.get_model_config(backbone)
    if model_cfg is None:
        raise UserError(
            f"unknown backbone {backbone!r}. Use an open_clip model name "
            f"(e.g. ViT-B-32, ViT-B-16, ma-tiny) or add a JSON config to {MODEL_CONFIGS}."
        )
    cfg = asdict(PreprocessCfg())
    if pretrained and not Path(str(pretrained)).expanduser().is_file():
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(backbone, str(pretrained)))
    size = model_cfg.get("vision_cfg", {}).get("image_size", cfg["size"])
    cfg["size"] = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return PreprocessCfg(**cfg)


def transforms(backbone, pretrained=None):
    """(train_transform, eval_transform) of the backbone, as open_clip builds them."""
    cfg = preprocess_config(backbone, pretrained)
    return image_transform_v2(cfg, is_train=True), image_transform_v2(cfg, is_train=False)
