"""Train the modality-aware model: python train.py [dataset=...] [model=...] [train.epochs=...]"""
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from model.trainer import discard_unfinished_run, resume_config, train
from utils.runtime import UserError, run_cli


def start(cfg, run_dir):
    try:
        return train(cfg, run_dir)
    except UserError:
        discard_unfinished_run(run_dir)
        raise


@hydra.main(version_base="1.3", config_path="setting", config_name="config-train")
def main(cfg):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("resume"):
        cfg = resume_config(cfg.resume, HydraConfig.get().overrides.task)
        if run_dir.resolve() != Path(cfg.resume).resolve():
            discard_unfinished_run(run_dir)  # Hydra's new folder; the run continues in its own
        run_dir = Path(cfg.resume)
    return run_cli(start, cfg, run_dir)


if __name__ == "__main__":
    main()
