"""Retrieval metrics of a run's embeddings: python evaluate.py path=<run> [mode=best|last]"""

import hydra
from hydra.core.hydra_config import HydraConfig

from pipeline.evaluate import evaluate
from runtime.errors import run_cli
from config.schema import register

register()  # the typed schemas the config files build on


@hydra.main(version_base="1.3", config_path="setting", config_name="config-eval")
def main(cfg):
    run_cli(evaluate, cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
