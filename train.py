"""Train the modality-aware model: python train.py [dataset=...] [model=...] [train.epochs=...]"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from pipeline.train import train
from runs.hydra_folders import remove_unused_sweep
from runs.folder import made_by_this_process, remove_empty_run_folder, resume_config
from runtime.errors import run_cli
from config.schema import register

register()  # the typed schemas the config files build on


@hydra.main(version_base="1.3", config_path="setting", config_name="config-train")
def main(cfg):
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    fresh = made_by_this_process(hydra_dir)  # before anything is written into it
    overrides = list(HydraConfig.get().overrides.task)
    try:
        if cfg.get("resume"):
            cfg = run_cli(resume_config, cfg.resume, overrides)
        return run_cli(train, cfg, Path(cfg.resume) if cfg.get("resume") else hydra_dir, overrides)
    finally:
        if fresh:  # Hydra's folder, when the run failed to start or continued in its own folder
            remove_empty_run_folder(hydra_dir)
            if HydraConfig.get().mode == RunMode.MULTIRUN and hydra_dir.parent.is_dir():
                remove_unused_sweep(hydra_dir.parent)


if __name__ == "__main__":
    main()
