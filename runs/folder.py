"""RunFolder: every path of a training run, who owns it (a marker plus an exclusive lock), and
the clean-up of a failed start that removes only what this process wrote."""

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from runtime.errors import UserError
from runtime.locks import HELD  # the locks a forked loader worker drops

MARKER = ".ma-sbir-run"
STARTED = time.time()  # this process's start (the module is imported before Hydra makes folders)


def _holder_text(f):
    f.seek(0)
    try:
        h = json.loads(f.read() or "{}")
    except ValueError:
        return "another process"
    return (
        f"process {h.get('pid')} on {h.get('host')} (started {h.get('started')}: "
        f"{h.get('command')})"
    )


class InferOutput:
    """infer_output/<mode>/<dataset>[-gzs]/ of a run: what infer.py writes (embeddings, index.csv,
    infer_meta.json) and what evaluate.py writes beside them. The *_logits.pt names are the seed's;
    the files hold embeddings."""

    EMBEDDINGS = ("img", "txt", "converted")

    def __init__(self, path):
        self.path = Path(path)

    def __str__(self):
        return str(self.path)

    def __fspath__(self):
        return str(self.path)

    def __truediv__(self, name):
        return self.path / name

    def embeddings(self, kind):
        return self.path / f"{kind}_logits.pt"

    index = property(lambda self: self.path / "index.csv")
    meta = property(lambda self: self.path / "infer_meta.json")
    result = property(lambda self: self.path / "eval_result.json")
    report_html = property(lambda self: self.path / "report.html")
    report_grid = property(lambda self: self.path / "report_grid.png")
    report_images = property(lambda self: self.path / "report_images")
    results = property(
        lambda self: [self.result, self.report_html, self.report_grid, self.report_images]
    )
    run = property(lambda self: RunFolder(self.path.parent.parent.parent))


class RunFolder:
    """A run folder: `outputs/<date>/<time>/` with config.yaml, train.log, model/{best,last}.pth,
    infer_output/<mode>/<dataset>/ (InferOutput). Writing into it needs `claim()`; reading does
    not."""

    def __init__(self, path):
        self.path = Path(path)
        self.created = []  # files and folders this process made, in creation order
        self.made_here = False
        self._lock = None

    config = property(lambda self: self.path / "config.yaml")
    log = property(lambda self: self.path / "train.log")
    model_dir = property(lambda self: self.path / "model")
    last = property(lambda self: self.path / "model" / "last.pth")
    best = property(lambda self: self.path / "model" / "best.pth")
    marker = property(lambda self: self.path / MARKER)

    def checkpoint(self, mode):
        return self.model_dir / f"{mode}.pth"

    def infer_root(self, mode):
        return self.path / "infer_output" / mode

    def infer_output(self, mode, key, generalized=False):
        return InferOutput(self.infer_root(mode) / (f"{key}-gzs" if generalized else str(key)))

    @staticmethod
    def results_under(folder):
        """eval_result.json of every run at or below `folder`."""
        pattern = "infer_output/*/*/eval_result.json"
        return sorted(set(Path(folder).glob(pattern)) | set(Path(folder).glob(f"**/{pattern}")))

    index_dir = property(lambda self: self.path / "index")  # search galleries (gallery/index.py)

    def is_run(self):
        """A folder of this project: the marker, or (runs of earlier versions) config.yaml +
        model/."""
        return self.marker.is_file() or (self.config.is_file() and self.model_dir.is_dir())

    def has_checkpoint(self):
        return any(self.model_dir.glob("*.pth")) if self.model_dir.is_dir() else False

    def foreign_entries(self):
        """What the folder holds that no run of this project wrote."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != MARKER)

    def claim(self, resume=False):
        """Make this process the folder's only writer. A new run needs a new or empty folder
        (a fresh Hydra folder); resume needs a run folder of this project."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(
                f"run folder {self.path} is a file; choose a folder (hydra.run.dir=...)."
            )
        if self.marker.is_symlink() or (self.marker.exists() and not self.marker.is_file()):
            raise UserError(
                f"{self.marker} is not a plain file (a link or a folder): this folder was not made "
                f"by train.py, and nothing in it is touched. Choose another folder."
            )
        if not resume and not self.is_run() and self.foreign_entries():
            shown = ", ".join(self.foreign_entries()[:5])
            raise UserError(
                f"{self.path} is not empty ({shown}, ...) and is not a ma-sbir run folder; a new "
                f"run "
                f"never writes into a folder it did not create. Choose a new or empty folder "
                f"(hydra.run.dir=outputs/<name>), or resume a run with resume=<run folder>."
            )
        if resume and not self.is_run():
            raise UserError(
                f"cannot resume {self.path}: it is not a run folder of train.py (no "
                f"{self.config.name} and model/). Pass resume=<a folder train.py wrote>."
            )
        self.made_here = made_by_this_process(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.marker.exists():
            self.created.append(self.marker)
        f = open(self.marker, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(f)
            f.close()
            raise UserError(
                f"run folder {self.path} is in use by {holder}. One trainer writes a run "
                f"folder at a time: wait for it, stop it, or choose another folder."
            ) from None
        self._lock = f
        HELD.add(f.fileno())
        if not resume and (self.has_checkpoint() or self.config.is_file()):
            self.release()
            raise UserError(
                f"{self.path} already holds a run "
                f"({'model/*.pth' if self.has_checkpoint() else 'config.yaml'}). "
                f"Continue it with resume={self.path} (when it has model/last.pth), or choose a "
                f"new folder for a new run; nothing in it was changed."
            )
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps(
                dict(
                    pid=os.getpid(),
                    host=socket.gethostname(),
                    started=time.strftime("%Y-%m-%d %H:%M:%S"),
                    command=" ".join(sys.argv),
                )
            )
        )
        f.flush()
        return self

    def track(self, path):
        """Note a file or folder this process is about to create (when it does not exist yet)."""
        path = Path(path)
        if not path.exists():
            self.created.append(path)
        return path

    def save_hydra_files(self, cfg):
        """.hydra/{config,hydra,overrides}.yaml as Hydra writes them, once the folder is this
        run's."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from runtime.io import save_text

        folder = self.path / ".hydra"
        if not HydraConfig.initialized() or folder.exists():
            return
        self.track(folder)
        hydra_cfg = HydraConfig.get()
        save_text(OmegaConf.to_yaml(cfg), folder / self.config.name)
        save_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})), folder / "hydra.yaml")
        save_text(OmegaConf.to_yaml(hydra_cfg.overrides.task), folder / "overrides.yaml")

    def release(self):
        if self._lock is not None:
            HELD.discard(self._lock.fileno())
            self._lock.close()  # closing drops the flock
            self._lock = None

    def discard_failed_start(self):
        """After a failed start: remove what this process created and nothing else."""
        self.release()
        for p in reversed(self.created):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists() or p.is_symlink():
                p.unlink()
        self.created = []
        if self.made_here:
            remove_empty_run_folder(self.path)


def is_baseline(cfg):
    """True for the config of a pretrained-CLIP baseline (infer.py baseline=true): config.yaml or
    a checkpoint's config."""
    return bool(OmegaConf.select(OmegaConf.create(cfg), "baseline", default=False))


def made_by_this_process(folder):
    """True when the folder does not exist yet, or is empty and was made after this process
    started (Hydra makes the run folder just before calling train.py's main)."""
    folder = Path(folder)
    if not folder.is_dir():
        return True
    return not any(folder.iterdir()) and folder.stat().st_ctime >= STARTED - 1.0


def remove_if_empty(folder):
    """rmdir a folder when it is empty; never anything else."""
    try:
        Path(folder).rmdir()
        return True
    except OSError:
        return False


def remove_empty_run_folder(folder):
    """Remove an empty run folder this process made, and Hydra's date folder above it
    (outputs/<date>/) when that is left empty too."""
    folder = Path(folder)
    if remove_if_empty(folder) and folder.parent.parent.name in ("outputs", "multirun"):
        remove_if_empty(folder.parent)


def find_run(path):
    """A run folder as given, or relative to outputs/ as the authors' infer.py takes it
    (path=2024-05-10/22-31-19)."""
    given = Path(str(path)).expanduser()
    for candidate in (given, Path("outputs") / given):
        if candidate.is_dir():
            return RunFolder(candidate)
    raise UserError(
        f"run folder {given} does not exist (nor outputs/{given}); pass path=<the folder "
        f"train.py wrote>, e.g. path=outputs/2026-11-25/12-00-00 or path=2026-11-25/12-00-00."
    )


GROUPS = ("dataset", "model", "experiment", "hydra/launcher")


def current_defaults():
    """This version's defaults (config/schema.py), untyped and without the authors' aliases, under
    the config of a run started by an older version that lacks some keys. model.max_length and
    model.quick_gelu stay null there: the behaviour of runs from before those keys (77 tokens, the
    activation the weights name)."""
    from config.entry import rules
    from config.schema import TrainConfig

    typed = OmegaConf.structured(TrainConfig)
    base = OmegaConf.create()
    for key in rules(TrainConfig):
        if key != "dataset.root" and not OmegaConf.is_missing(typed, key):
            OmegaConf.update(base, key, OmegaConf.select(typed, key), force_add=True)
    base.model.max_length = base.model.quick_gelu = None
    return base


def resume_config(run_dir, overrides=()):
    """The config saved in `run_dir`, with command-line overrides (other than resume=) applied."""
    run = RunFolder(run_dir)
    if not run.path.is_dir():
        raise UserError(
            f"cannot resume {run.path}: no such folder. "
            f"Pass resume=<a run folder written by train.py>."
        )
    if not run.config.is_file():
        raise UserError(
            f"cannot resume: {run.config} does not exist. "
            f"Pass resume=<a run folder written by train.py>."
        )
    try:
        saved = OmegaConf.load(run.config)
    except Exception as e:  # a config.yaml cut or edited by hand
        raise UserError(
            f"cannot resume: {run.config} does not parse ({str(e).splitlines()[0]}). Restore it "
            f"from .hydra/config.yaml in the same folder, or start a new run."
        ) from None
    if is_baseline(saved):
        raise UserError(
            f"cannot resume {run.path}: it is a pretrained-CLIP baseline (infer.py baseline=true), "
            f"not a training run. Train a new run (python train.py ...); evaluate.py and search.py "
            f"take the baseline as it is."
        )
    cfg = OmegaConf.merge(current_defaults(), saved)  # keys newer than the run
    groups = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in GROUPS]
    if groups:
        from runtime.logs import log

        log.warning(
            f"resume keeps the run's own settings: {groups} ignored (config groups cannot change "
            f"on resume; single keys such as train.epochs=... can)."
        )
    extra = [
        o
        for o in overrides
        if not o.split("=", 1)[0].lstrip("+~").startswith("resume") and o not in groups
    ]
    if extra:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in extra]))
    cfg.resume = str(run.path)
    return cfg
