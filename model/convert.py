"""A checkpoint of the authors' code (best.pth / last.pth) as a run folder of this project:
python -m model.convert src=<their .pth> out=<run folder> dataset=<name> [dataset.root.<name>=...]

Their file holds `model` (or `model_state_dict`) with HF CLIPModel names under `encoder.clip.`,
`encoder.mode_embedding.weight` and `encoder.discriminator.*`, beside a pickled optimiser and
scheduler object. It is read with a restricted unpickler (runtime/restricted_pickle.py): tensors and
plain containers only, nothing in the file is ever run."""

import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from data.index import make_splits
from model.backbone import build_model
from model.hf_clip import hf_to_open_clip, is_hf_clip
from model.weights import load_clip_state
from config.entry import prepare
from runtime.io import save_text, save_torch
from runtime.restricted_pickle import Dropped, is_torchscript, restricted_load
from runs.folder import RunFolder
from runtime.errors import UserError, run_cli
from runtime.logs import log, setup_logging
from config.schema import compose_config

PREFIX = "encoder.clip."
HEAD = {
    "modes.weight": "encoder.mode_embedding.weight",
    "disc.weight": "encoder.discriminator.weight",
    "disc.bias": "encoder.discriminator.bias",
}
AUTHORS_MAX_LENGTH = 30  # their model.max_length: prompts truncated at 30 tokens


def read_checkpoint(src):
    """The authors' state dict in `src`; UserError saying what the file holds otherwise."""
    if not src.is_file():
        raise UserError(
            f"src={src}: no such file. Give the path of the authors' best.pth or last.pth."
        )
    if is_torchscript(src):
        raise UserError(
            f"{src} is a TorchScript archive (OpenAI's CLIP release?), not a checkpoint of the "
            f"authors' code. Use it as model.pretrained=<file> for training instead."
        )
    try:
        ckpt = restricted_load(src)
    except Exception as e:  # zip, pickle and torch errors of a damaged or foreign file
        raise UserError(
            f"{src} is not a PyTorch checkpoint (it could not be read: "
            f"{str(e).splitlines()[0][:200] or type(e).__name__}). Give the authors' best.pth or "
            f"last.pth, complete (a truncated download fails like this)."
        ) from None
    state = ckpt.get("model", ckpt.get("model_state_dict")) if isinstance(ckpt, dict) else None
    if isinstance(state, dict) and any(k.startswith(PREFIX) for k in state):
        return state, ckpt
    raise UserError(
        f"{src} {describe(ckpt, state)}, not a checkpoint of the authors' code (a dict with "
        f"'model' holding encoder.clip.* HF CLIP weights and encoder.mode_embedding.weight)."
    )


def describe(ckpt, state):
    if isinstance(ckpt, Dropped) or isinstance(state, Dropped):
        return (
            f"holds a pickled object ({ckpt.origin if isinstance(ckpt, Dropped) else state.origin})"
        )
    if not isinstance(ckpt, dict):
        return f"holds a {type(ckpt).__name__}"
    if "config" in ckpt and isinstance(state, dict) and "modes.weight" in state:
        return "is already a checkpoint of this project (use its run folder as it is)"
    flat = ckpt.get("state_dict", ckpt) if isinstance(ckpt.get("state_dict", ckpt), dict) else {}
    if is_hf_clip(flat):
        return "holds a plain HF CLIPModel without mode vectors (use it as model.pretrained=<file>)"
    if any(k.removeprefix("module.").startswith("visual.") for k in flat):
        return "holds an open_clip CLIP checkpoint (use it as model.pretrained=<file>)"
    return f"holds a dict with keys {sorted(map(str, ckpt))[:6]}"


def converted_state(model, state, src, backbone):
    """Load the authors' weights into `model`; UserError for another architecture or mode count."""
    missing = [k for k in HEAD.values() if k not in state]
    if missing:
        raise UserError(
            f"{src} has HF CLIP weights but no {missing[0]}: not a checkpoint of the "
            f"modality-aware model of the authors' code."
        )
    n_file, n_cfg = state[HEAD["modes.weight"]].shape[0], model.modes.weight.shape[0]
    if n_file != n_cfg:
        raise UserError(
            f"{src} holds {n_file} mode vectors (encoder.mode_embedding.weight "
            f"{list(state[HEAD['modes.weight']].shape)}) but the config has model.n_mode={n_cfg}; "
            f"pass model.n_mode={n_file}."
        )
    try:
        clip_state = hf_to_open_clip(
            {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
        )
    except ValueError as e:
        raise UserError(f"{src}: {e}; the authors' backbone is an HF CLIPModel.") from None
    load_clip_state(model.clip, clip_state, f"{src}", backbone)
    head = {mine: state[theirs] for mine, theirs in HEAD.items()}
    shapes = [
        f"{theirs} {list(state[theirs].shape)}"
        for mine, theirs in HEAD.items()
        if state[theirs].shape != model.state_dict()[mine].shape
    ]
    if shapes:
        raise UserError(
            f"{src} holds {', '.join(shapes)}, which do not fit the embedding size of "
            f"model.backbone={backbone}; use the backbone the checkpoint was trained with."
        )
    model.load_state_dict(head, strict=False)


def run_config(overrides):
    """The training config with the user's overrides, describing the authors' model."""
    cfg = compose_config("config-train", overrides)
    cfg = prepare(cfg, "train", overrides)  # the authors' key names work here too
    with open_dict(cfg):
        cfg.model.pretrained = None  # the weights come from the checkpoint
        cfg.model.quick_gelu = True  # the authors' HF openai/clip-vit-base-patch32 uses quick_gelu
        if cfg.model.get("max_length") is None:
            cfg.model.max_length = AUTHORS_MAX_LENGTH
    return cfg


def seen_classes(dcfg):
    """The classes the authors trained on (every seen class, cls_ratio 1.0) when the dataset root is
    given, so that infer and evaluate can check the zero-shot split; else [] (not checked)."""
    try:
        return list(make_splits(dcfg, need_test=False).train_classes)
    except UserError as e:
        log.warning(
            f"training classes not recorded ({str(e).splitlines()[0][:160]}); infer.py and "
            f"evaluate.py will not check the zero-shot split of this run."
        )
        return []


def convert(src, out, overrides=()):
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"out={out} already exists and is not an empty folder; give a new run folder."
        )
    state, ckpt = read_checkpoint(src)
    cfg = run_config(overrides)
    model, *_ = build_model(cfg.model)
    converted_state(model, state, src, cfg.model.backbone)
    epoch = ckpt.get("epoch")
    mode = (
        "last" if src.stem == "last" else "best"
    )  # their last.pth stays last: not a chosen checkpoint
    cfg.train.select = (
        "last" if mode == "last" else "test_loss"
    )  # their best.pth: lowest test-split loss
    cfg.run = dict(train_classes=seen_classes(cfg.dataset), val_classes=[], select=cfg.train.select)
    created = not out.exists()
    try:
        save_torch(
            dict(
                model=model.state_dict(),
                config=OmegaConf.to_container(cfg, resolve=True),
                epoch=epoch if isinstance(epoch, int) else None,
                converted_from=str(src.resolve()),
            ),
            RunFolder(out).checkpoint(mode),
        )
        save_text(OmegaConf.to_yaml(cfg, resolve=True), RunFolder(out).config)
        RunFolder(out).marker.touch()
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    log.info(
        f"wrote {out}/model/{mode}.pth (epoch {epoch}) and config.yaml from {src}; next: "
        f"python infer.py path={out} mode={mode} && python evaluate.py path={out} mode={mode}"
    )
    return out


def main(argv):
    setup_logging()
    args = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("src", "out"))
    if set(args) != {"src", "out"}:
        raise UserError(
            "usage: python -m model.convert src=<the authors' best.pth or last.pth> out=<new run "
            "folder> dataset=<sketchy|tuberlin|quickdraw> [dataset.root.<name>=...] [overrides]"
        )
    return convert(
        args["src"], args["out"], [a for a in argv if a.split("=", 1)[0] not in ("src", "out")]
    )


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
