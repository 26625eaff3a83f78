"""The demo-sized run (`make demo`'s recipe and data, seed 0) learns what transfers to unseen
classes: its unseen-class mAP@all beats chance by a margin that an untrained model does not reach.

Measured on 2 CPU cores, 2026-11-30 (README, "Demo result"), unseen mAP@all over seeds 0 / 1 / 2:
- trained 40 epochs: 0.312 / 0.263 / 0.298 (original queries), 0.290 / 0.252 / 0.256 (converted);
- the same model untrained (learning rate ~0): 0.201 / 0.207 / 0.197 and 0.204 / 0.207 / 0.205;
- chance 1/6. So chance + MARGIN lies between the best untrained (chance + 0.040) and the worst
  trained score (chance + 0.085). About 4 minutes on 2 cores: the suite's one long test."""

import pytest
import json

from data.demo import generate
from pipeline.evaluate import evaluate
from pipeline.infer import infer
from pipeline.train import train
from tests.conftest import compose_cfg

MARGIN = 0.065


@pytest.mark.slow
def test_the_demo_run_beats_chance_on_unseen_classes(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("demo") / "demo")  # the full demo dataset, as make demo
    run = tmp_path_factory.mktemp("demo_run") / "run"
    train(
        compose_cfg(
            "config-train",
            [
                "dataset=demo",
                "model=tiny",
                f"dataset.root={root}",
                "seed=0",
                "train.num_workers=0",
                "device=cpu",
            ],
        ),
        run,
    )
    out = infer(compose_cfg("config-infer", [f"path={run}", "device=cpu", "num_workers=0"]))
    evaluate(
        compose_cfg("config-eval", [f"path={run}", "eval.device=cpu", "eval.report.enabled=false"])
    )
    result = json.loads(out.result.read_text())
    assert result["inference"]["epoch"] == 40 and result["zero_shot"] is True
    assert min(result["mAP@all"]) >= result["chance_mAP"] + MARGIN, (
        result["mAP@all"],
        result["chance_mAP"],
    )
