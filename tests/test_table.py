"""python -m metrics.table: every eval_result.json of the given runs in one table, with the
paper's numbers beside the splits the paper used."""

import csv
import json

from pipeline.evaluate import evaluate
from metrics.table import main
from tests.test_evaluate import eval_cfg, fake_output


def test_table_collects_results_with_provenance_and_paper_numbers(tmp_path, capsys):
    run = tmp_path / "outputs" / "r1"
    out, _, _ = fake_output(run)
    (run / "config.yaml").write_text("dataset:\n  test_idx: 2\n  split: null\n")
    (out / "infer_meta.json").write_text(
        json.dumps(dict(dataset="sketchy", mode="best", epoch=7, selected_by="test_loss"))
    )
    result = evaluate(eval_cfg(run, "eval.protocols=[default,hits_over_k]"))
    assert main([str(tmp_path / "outputs" / "*"), "--csv", str(tmp_path / "t.csv")]) == 0
    text = capsys.readouterr().out
    assert (
        "| sketchy | sketchy_21 ZS | best (epoch 7) | test_loss (on test data) | default | "
        "original |" in text
    )
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert len(rows) == 4 and {r["protocol"] for r in rows} == {"default", "hits_over_k"}
    first = rows[0]
    assert first["mAP@all"] == f"{100 * result['mAP@all'][0]:.2f}"
    assert first["paper"] == "mAP@200 69.1 / p@200 75.5"
    hits = next(r for r in rows if r["protocol"] == "hits_over_k" and r["query"] == "converted")
    assert hits["p@100"] == f"{100 * result['protocols']['hits_over_k']['p@100'][1]:.2f}"


def test_table_without_results_says_what_to_run(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 1
    assert "run evaluate.py" in capsys.readouterr().err
