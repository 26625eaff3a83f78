"""Export embeddings of a run's test split: python infer.py path=<run> [mode=best|last]
The pretrained-CLIP baseline as a run folder, inferred into:
python infer.py baseline=true dataset=<name> [model=<name>] [path=<new folder>]"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from config.schema import register
from pipeline.baseline import baseline
from pipeline.infer import infer
from runtime.errors import run_cli

register()  # the typed schemas the config files build on
FALSE = ("false", "False", "0", "no")


@hydra.main(version_base="1.3", config_path="setting", config_name="config-infer")
def infer_main(cfg):
    run_cli(infer, cfg, list(HydraConfig.get().overrides.task))


@hydra.main(version_base="1.3", config_path="setting", config_name="config-baseline")
def baseline_main(cfg):
    run_cli(baseline, cfg, list(HydraConfig.get().overrides.task))


def wants_baseline(argv):
    """baseline=<value> on the command line: (asked, argv without a baseline=false). A value
    other than false goes to the baseline's config, which checks it."""
    given = [a for a in argv if a.split("=", 1)[0].lstrip("+") == "baseline"]
    if not given:
        return False, argv
    if given[-1].partition("=")[2] in FALSE:
        return False, [a for a in argv if a not in given]
    return True, [a.lstrip("+") if a in given else a for a in argv]  # the key exists there


if __name__ == "__main__":
    asked, sys.argv[1:] = wants_baseline(sys.argv[1:])
    baseline_main() if asked else infer_main()
