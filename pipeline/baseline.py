"""The pretrained-CLIP baseline: baseline(cfg), a run folder whose model is the backbone with no
training (`python infer.py baseline=true dataset=<name> [model=<name>] [path=<folder>]`), inferred
into like any run, so that evaluate.py, search.py and app.py take it as path=.

Its mode vectors are the untrained initial ones, so converted queries mean nothing there:
evaluate.py writes their results as null with the reason (CONVERTED_NULL_REASON) and search.py /
app.py search with the original embeddings."""

import os
from pathlib import Path

from omegaconf import OmegaConf

from config.entry import prepare
from config.schema import InferConfig
from data.index import make_splits
from data.layouts import output_key, resolve_name
from model.backbone import build_model
from model.checkpoint import load_checkpoint, save_checkpoint
from runs.folder import RunFolder, is_baseline
from runtime.device import seed_everything
from runtime.errors import UserError
from runtime.io import save_text
from runtime.logs import log, setup_logging

SELECTED_BY = "baseline"  # best.pth's selected_by, and what marks a baseline checkpoint
CONVERTED_NULL_REASON = (
    "a pretrained-CLIP baseline (infer.py baseline=true) has untrained mode vectors, so it has no "
    "converted queries; train a run for them"
)
# the settings a baseline folder is made for; another value needs another folder
IDENTITY = ("model.backbone", "model.pretrained", "model.n_mode", "dataset.test_idx")


def default_folder(cfg):
    name = resolve_name(cfg.dataset.test_idx)
    return Path("outputs") / "baseline" / f"{cfg.model.backbone}-{name}"


def _existing_baseline(run, cfg, root):
    """A folder that holds a run already: reused when it is a baseline of the same model and
    dataset, refused otherwise (a trained run is never touched)."""
    ckpt = load_checkpoint(run.best)
    saved = OmegaConf.create(ckpt["config"])
    if not is_baseline(saved):
        raise UserError(
            f"{run.path} holds a trained run (model/best.pth was selected by "
            f"{ckpt.get('selected_by')!r}, not the baseline); a baseline never writes into it. "
            f"Evaluate it as it is (python evaluate.py path={run.path}), or pass a new "
            f"path=<folder> for the baseline."
        )
    differ = [
        f"{k}={OmegaConf.select(saved, k)} there, {OmegaConf.select(cfg, k)} asked"
        for k in IDENTITY
        if OmegaConf.select(saved, k) != OmegaConf.select(cfg, k)
    ]
    made_on = OmegaConf.select(saved, "run.root")
    if made_on is not None and made_on != root:
        differ.append(f"the dataset root {made_on} there, {root} asked")
    if differ:
        raise UserError(
            f"{run.path} holds the baseline of another setting ({'; '.join(differ)}); it is left "
            f"as it is. Pass path=<a new folder> for this one."
        )
    log.info(f"{run.path} holds this baseline already; inferring with its model/best.pth")


def make_baseline(cfg, run, root):
    """Write config.yaml and model/best.pth of a new baseline run into the claimed folder."""
    seed_everything(int(cfg.seed))  # the untrained mode vectors and discriminator are drawn here
    model, *_ = build_model(cfg.model)  # the pretrained weights (or their one-line error)
    record = OmegaConf.to_container(cfg, resolve=True)
    record["run"] = dict(train_classes=[], select=SELECTED_BY, root=root)
    save_text(OmegaConf.to_yaml(record), run.track(run.config))
    run.track(run.model_dir).mkdir(exist_ok=True)
    save_checkpoint(
        dict(model=model.state_dict(), config=record, epoch=None, selected_by=SELECTED_BY),
        run.track(run.best),
    )
    weights = cfg.model.pretrained or "random init: model.pretrained is null"
    log.info(f"baseline {cfg.model.backbone} ({weights}) written to {run.best}")


def infer_config(cfg, folder):
    """infer.py's config for the baseline's folder, with the embedding settings given here."""
    icfg = OmegaConf.structured(InferConfig)
    icfg.path = str(folder)  # set, not parsed: a folder name may hold any character
    icfg.device = cfg.device
    icfg.batch_size = cfg.batch_size
    icfg.num_workers = cfg.train.num_workers
    icfg.precision = cfg.precision
    icfg.dataset.generalized = bool(cfg.dataset.generalized)
    return icfg


def _check_folder(run, cfg, root):
    """What the folder holds decides: None (a new baseline), "reuse" (this baseline, complete), or
    "complete" (a baseline start that was killed before its best.pth); anything else is refused
    untouched."""
    folder = run.path
    if folder.exists() and not folder.is_dir():
        raise UserError(f"path={folder} is a file; pass path=<a new folder> for the baseline.")
    if not run.is_run():
        if run.foreign_entries():
            shown = ", ".join(run.foreign_entries()[:5])
            raise UserError(
                f"{folder} is not empty ({shown}) and is not a run folder; a baseline never writes "
                f"into a folder it did not make. Pass path=<a new or empty folder>."
            )
        return None
    if run.best.is_file():
        _existing_baseline(run, cfg, root)  # read only: another run's folder is refused untouched
        return "reuse"
    saved = None
    if run.config.is_file():
        try:
            saved = OmegaConf.load(run.config)
        except Exception:  # a config.yaml cut by the kill
            saved = OmegaConf.create({"baseline": True})
    if saved is not None and not is_baseline(saved):
        raise UserError(
            f"{folder} is a run of train.py without model/best.pth (not a baseline); a baseline "
            f"never writes into another run. Pass path=<a new folder>."
        )
    return "complete"


def baseline(cfg, given=()):
    from pipeline.infer import infer

    cfg = prepare(cfg, "baseline", given)
    setup_logging()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "infer.py baseline=true makes its run folder in one process: run it without torchrun "
            "once, then `torchrun ... infer.py path=<that folder>` embeds on several GPUs."
        )
    # a dataset that is not there fails before any weights are read
    root = str(make_splits(cfg.dataset, need_train=False).test_index.root.resolve())
    folder = Path(str(cfg.path)).expanduser() if cfg.path else default_folder(cfg)
    run = RunFolder(folder)
    state = _check_folder(run, cfg, root)
    run.claim(resume=state is not None)  # a live holder: "in use by process <pid>"
    if state != "reuse":
        if state == "complete":
            log.info(f"{folder}: completing a baseline start that was stopped before its best.pth")
        try:
            make_baseline(cfg, run, root)
        except BaseException:
            run.discard_failed_start()  # removes only what this call created
            raise
    try:
        icfg = infer_config(cfg, folder)
        out = run.infer_output("best", output_key(cfg.dataset.test_idx), icfg.dataset.generalized)
        if state == "reuse" and out.meta.is_file():
            log.info(
                f"{out} holds this baseline's embeddings already (kept, with their evaluation); "
                f"`python infer.py path={folder}` embeds again. Next: python evaluate.py "
                f"path={folder}"
            )
            return out
        return infer(icfg)
    finally:
        run.release()
