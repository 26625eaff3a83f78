"""Export embeddings of a run's test split: python infer.py path=<run> [mode=best|last]"""

import hydra
from hydra.core.hydra_config import HydraConfig

from pipeline.infer import infer
from runtime.errors import run_cli
from config.schema import register

register()  # the typed schemas the config files build on


@hydra.main(version_base="1.3", config_path="setting", config_name="config-infer")
def main(cfg):
    run_cli(infer, cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
