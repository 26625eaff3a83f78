"""Hydra's run and sweep folders: the FolderGuard callback that runs before Hydra writes any, and
the clean-up of a sweep folder whose first job failed to start."""

import sys
from pathlib import Path

from runs.folder import RunFolder, remove_empty_run_folder

FRESH_SWEEPS = (
    set()
)  # sweep folders FolderGuard saw absent before Hydra made them (in this process)


def remove_unused_sweep(folder):
    """A sweep folder that this process's sweep made and that holds only Hydra's multirun.yaml (its
    first job failed to start): removed, with Hydra's date folder above it when left empty."""
    folder = Path(folder)
    if folder.resolve() in FRESH_SWEEPS and [p.name for p in folder.iterdir()] == ["multirun.yaml"]:
        (folder / "multirun.yaml").unlink()
        remove_empty_run_folder(folder)


class FolderGuard:
    """Hydra callback (setting/config-train.yaml, hydra.callbacks): runs before Hydra makes or
    writes a folder, so that a run or sweep folder named on the command line never lands on a
    file, and a sweep never writes its multirun.yaml into a folder of the user's."""

    def on_run_start(self, config, **kwargs):
        folder = Path(str(config.hydra.run.dir))
        if folder.exists() and not folder.is_dir():
            _refuse(f"hydra.run.dir={folder} is a file; choose a folder for the run.")

    def on_multirun_start(self, config, **kwargs):
        folder = Path(str(config.hydra.sweep.dir))
        if folder.exists() and not folder.is_dir():
            _refuse(f"hydra.sweep.dir={folder} is a file; choose a folder for the sweep.")
        if not folder.exists():
            FRESH_SWEEPS.add(folder.resolve())
        entries = list(folder.iterdir()) if folder.is_dir() else []
        runs = [p for p in entries if RunFolder(p).is_run()]
        ours = (
            {"multirun.yaml", ".submitit"} if runs else set()
        )  # Hydra's own files beside our runs
        foreign = [p.name for p in entries if p.name not in ours and p not in runs]
        if foreign:
            _refuse(
                f"hydra.sweep.dir={folder} holds {sorted(foreign)[:5]}, which no sweep of this "
                f"project "
                f"wrote; a sweep never writes into such a folder. Choose a new or empty folder."
            )

    def __getattr__(self, name):  # Hydra's other callback hooks: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def _refuse(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)
