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


def test_fine_grained_columns_and_the_papers_fine_grained_figures(tmp_path, capsys):
    run = tmp_path / "r"
    out = run / "infer_output" / "best" / "2"
    out.mkdir(parents=True)
    (run / "config.yaml").write_text("dataset:\n  test_idx: 2\n  split: sketchy_21\n")
    fg = {"acc@1": [0.25, 0.3], "acc@5": [0.5, 0.625], "acc@10": [0.75, 0.875]}
    result = {m: [0.5, 0.5] for m in ("mAP@all", "mAP@200", "p@100", "p@200")}
    result.update(fine_grained=fg, inference=dict(dataset="sketchy", mode="best", epoch=3))
    (out / "eval_result.json").write_text(json.dumps(result))
    assert main([str(run), "--csv", str(tmp_path / "t.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    conv = next(r for r in rows if r["query"] == "converted")
    assert (conv["FG acc@1"], conv["FG acc@5"], conv["FG acc@10"]) == ("30.00", "62.50", "87.50")
    papers = {
        r["run"]: (r["FG acc@1"], r["FG acc@5"]) for r in rows if r["run"].startswith("paper")
    }
    assert papers == {
        "paper: MA-SBIR (Lyou et al., WACV 2024)": ("29.96", "58.53"),
        "paper: CLIP-AT (Sain et al., CVPR 2023)": ("28.68", "62.34"),
        "paper: SpLIP (ECCV 2024)": ("33.45", "66.71"),
    }
