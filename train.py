"""Train the modality-aware model: python train.py [dataset=...] [model=...] [train.epochs=...]"""
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from model.trainer import resume_config, train
from utils.runtime import run_cli


@hydra.main(version_base="1.3", config_path="setting", config_name="config-train")
def main(cfg):
    if cfg.get("resume"):
        cfg = resume_config(cfg.resume, HydraConfig.get().overrides.task)
        return run_cli(train, cfg, Path(cfg.resume))
    return run_cli(train, cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
