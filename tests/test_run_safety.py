"""Run folders as a careless or hostile user meets them: a failed start never deletes what the
project did not write, one trainer per folder, resume mistakes, stale temporary files."""

import errno
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.train import train
from tests.conftest import REPO
from runtime.io import save_torch
from runs.folder import MARKER, RunFolder, resume_config
from runtime.errors import UserError

TINY = [
    "model=tiny",
    "dataset=demo",
    "train.epochs=1",
    "train.batch_size=32",
    "train.num_workers=0",
    "device=cpu",
    "logger.wandb.mode=disabled",
]


def train_cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def user_folder(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("keep")
    return path


@pytest.mark.slow
def test_failed_start_keeps_a_users_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MA_SBIR_SKETCHY", raising=False)
    p = user_folder(tmp_path / "p")
    r = train_cli("model=tiny", "dataset=sketchy", f"hydra.run.dir={p}")
    assert (
        r.returncode == 1 and "is not empty (notes.txt" in r.stderr and "Traceback" not in r.stderr
    )
    assert sorted(os.listdir(p)) == ["notes.txt"] and (p / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_run_dir_dot_inside_a_clone_deletes_nothing(tmp_path, demo_root):
    clone = user_folder(tmp_path / "clone")
    (clone / ".git").mkdir()
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    r = train_cli(*TINY, f"dataset.root={demo_root}", "hydra.run.dir=.", cwd=clone)
    assert r.returncode == 1 and "not a ma-sbir run folder" in r.stderr
    assert (
        sorted(os.listdir(clone)) == [".git", "notes.txt"] and (clone / ".git" / "HEAD").is_file()
    )


@pytest.mark.slow
def test_failed_start_in_a_fresh_folder_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MA_SBIR_SKETCHY", raising=False)
    r = train_cli("model=tiny", "dataset=sketchy", cwd=tmp_path)  # default outputs/<date>/<time>
    assert r.returncode == 1 and "no root folder given" in r.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


@pytest.mark.slow
def test_resume_into_another_folder_and_of_a_missing_folder(tmp_path, demo_root, tiny_train_cfg):
    run = tmp_path / "run"
    train(tiny_train_cfg(), run)
    other = user_folder(tmp_path / "other")
    r = train_cli(f"resume={run}", "train.epochs=2", f"hydra.run.dir={other}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(other)) == ["notes.txt"]
    assert torch.load(run / "model" / "last.pth", weights_only=True)["epoch"] == 2
    r = train_cli(f"resume={tmp_path / 'nope'}", cwd=tmp_path)
    assert r.returncode == 1 and "cannot resume" in r.stderr and "no such folder" in r.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_resume_of_a_run_killed_before_its_first_checkpoint_keeps_its_files(
    tmp_path, tiny_train_cfg
):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text("{}")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(tiny_train_cfg()))
    (run / "train.log").write_text("the story so far\n")
    saved = (run / "config.yaml").read_text()
    with pytest.raises(UserError, match="no model/last.pth"):
        train(resume_config(run, []), run)
    assert (run / "train.log").read_text().startswith("the story so far")
    assert (run / "config.yaml").read_text() == saved and sorted(os.listdir(run)) == [
        MARKER,
        "config.yaml",
        "train.log",
    ]


@pytest.mark.slow
def test_new_run_in_a_finished_run_folder_is_refused(tmp_path, tiny_train_cfg):
    run = tmp_path / "run"
    train(tiny_train_cfg(), run)
    before = (run / "model" / "last.pth").read_bytes()
    with pytest.raises(UserError, match=r"already holds a run .*resume="):
        train(tiny_train_cfg("seed=3"), run)
    assert (run / "model" / "last.pth").read_bytes() == before


@pytest.mark.slow
def test_second_trainer_in_one_folder_is_told_who_holds_it(tmp_path, demo_root):
    holder = RunFolder(tmp_path / "c1").claim()
    try:
        r = train_cli(*TINY, f"dataset.root={demo_root}", f"hydra.run.dir={tmp_path / 'c1'}")
    finally:
        holder.release()
    assert r.returncode == 1 and f"is in use by process {os.getpid()}" in r.stderr
    assert sorted(os.listdir(tmp_path / "c1")) == [MARKER]


def test_the_lock_dies_with_its_process(tmp_path):
    code = (
        f"from runs.folder import RunFolder; RunFolder({str(tmp_path / 'r')!r}).claim(); "
        f"print('held')"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert p.stdout.strip() == "held"
    RunFolder(tmp_path / "r").claim(resume=False).release()  # a dead holder blocks nobody


def test_stale_temporary_files_go_at_the_next_save(tmp_path):
    path = tmp_path / "model" / "last.pth"
    save_torch({"w": torch.ones(2)}, path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = path.parent / f".last.pth.{dead}.abc123.tmp"
    stale.write_bytes(b"half")
    mine = path.parent / f".last.pth.{os.getpid()}.live.tmp"  # a save in progress is left alone
    mine.write_bytes(b"writing")
    save_torch({"w": torch.zeros(2)}, path)
    assert not stale.exists() and mine.exists()


def test_full_disk_during_a_save_says_so_and_keeps_the_last_good_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_torch({"w": torch.ones(2)}, path)

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        UserError,
        match=r"no space left on the device \(No space left on device\) while writing .*last.pth "
        r"is intact",
    ):
        save_torch({"w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["last.pth"]


@pytest.mark.slow
def test_disk_full_in_training_names_the_intact_checkpoint(tmp_path, tiny_train_cfg, monkeypatch):
    run = tmp_path / "run"
    train(tiny_train_cfg(), run)
    real = torch.save

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        UserError, match=r"no space left.*last.pth is intact.*best.pth is intact too"
    ):
        train(resume_config(run, ["train.epochs=2"]), run)
    monkeypatch.setattr(torch, "save", real)
    assert torch.load(run / "model" / "last.pth", weights_only=True)["epoch"] == 1


def test_path_as_given_or_relative_to_outputs_as_the_authors(tmp_path, monkeypatch):
    from runs.folder import find_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "2024-05-10" / "22-31-19").mkdir(parents=True)
    assert (
        find_run("2024-05-10/22-31-19").path.resolve()
        == (tmp_path / "outputs/2024-05-10/22-31-19").resolve()
    )
    assert find_run(tmp_path / "outputs" / "2024-05-10").path == tmp_path / "outputs" / "2024-05-10"
    with pytest.raises(
        UserError, match=r"run folder 2024-05-11 does not exist \(nor outputs/2024-05-11\)"
    ):
        find_run("2024-05-11")


def test_demo_data_is_never_written_over_a_users_folder(tmp_path):
    from data.demo import generate

    user = user_folder(tmp_path / "thesis")
    with pytest.raises(UserError, match="is not empty and holds no demo dataset"):
        generate(user, n_photo=2, n_sketch=2)
    assert sorted(os.listdir(user)) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["thesis"]


def test_a_marker_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / MARKER).symlink_to(target)
    with pytest.raises(UserError, match="is not a plain file"):
        RunFolder(tmp_path / "run").claim()
    assert target.read_text() == "precious"


def test_sigterm_while_a_run_is_set_up_leaves_nothing(tmp_path, tiny_train_cfg, monkeypatch):
    import signal
    from pipeline import train as pipeline_train

    real = pipeline_train.build_optimizer

    def killed_during_setup(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(pipeline_train, "build_optimizer", killed_during_setup)
    with pytest.raises(SystemExit) as stop:
        train(tiny_train_cfg(), tmp_path / "run")
    assert stop.value.code == 128 + signal.SIGTERM and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_ignores_group_choices_and_names_a_broken_config(tmp_path, tiny_train_cfg):
    run = tmp_path / "run"
    train(tiny_train_cfg(), run)
    cfg = resume_config(run, ["model=tiny", "dataset=demo", "train.epochs=2"])
    assert cfg.model.backbone == "ma-tiny" and cfg.train.epochs == 2
    (run / "config.yaml").write_text("garbage: [")
    with pytest.raises(
        UserError, match=r"config.yaml does not parse .*Restore it from .hydra/config.yaml"
    ):
        resume_config(run, [])


@pytest.mark.slow
def test_run_or_sweep_folder_on_a_users_files_is_refused_before_hydra_writes(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    r = train_cli(*TINY, f"hydra.run.dir={afile}")
    assert (
        r.returncode == 1
        and "is a file; choose a folder" in r.stderr
        and "Traceback" not in r.stderr
    )
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("mine")
    r = train_cli("-m", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 1 and "which no sweep of this project wrote" in r.stderr
    assert (sweep / "multirun.yaml").read_text() == "mine" and afile.read_text() == "keep"


@pytest.mark.slow
def test_a_sweep_whose_first_job_fails_to_start_leaves_nothing(tmp_path, monkeypatch):
    """Hydra writes multirun.yaml before any job runs; when the first job fails to start, the sweep
    folder it made goes again, but a sweep folder the user made beforehand stays."""
    monkeypatch.delenv("MA_SBIR_SKETCHY", raising=False)
    new = tmp_path / "sweeps" / "new"
    r = train_cli("-m", "model=tiny", "dataset=sketchy", "seed=0,1", f"hydra.sweep.dir={new}")
    assert r.returncode == 1 and "no root folder given" in r.stderr
    assert not new.exists() and (tmp_path / "sweeps").is_dir()
    mine = tmp_path / "mine"
    mine.mkdir()
    r = train_cli("-m", "model=tiny", "dataset=sketchy", "seed=0,1", f"hydra.sweep.dir={mine}")
    assert r.returncode == 1 and mine.is_dir() and os.listdir(mine) == ["multirun.yaml"]


def test_a_split_that_a_demo_or_folder_dataset_does_not_use_is_refused(tmp_path, tiny_train_cfg):
    with pytest.raises(
        UserError,
        match=r"dataset.split=sketchy_99 is not used by dataset 'demo': "
        r"its unseen classes are .*unseen.txt, and it is no split "
        r"of another dataset \(\[.*'sketchy_21'",
    ):
        train(tiny_train_cfg("dataset.split=sketchy_99"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_folder_dataset_with_a_mistyped_root_or_split_is_refused(
    tmp_path, demo_root, tiny_train_cfg
):
    """A user's own folder dataset: a root that is not there, or a split of no dataset, is one
    error naming the value and the fix, before a run folder exists; infer with a mistyped root
    says the same and writes nothing."""
    from data.index import make_splits
    from pipeline.infer import test_dataset_config
    from tests.conftest import compose_cfg, folder_dataset

    data = folder_dataset(demo_root, tmp_path / "data")
    typo = tmp_path / "dtaa"
    with pytest.raises(
        UserError,
        match=rf"dataset root {typo} for 'folder' does not exist or is not a folder\. Fix "
        r"dataset.root=\.\.\. \(or MA_SBIR_FOLDER\)",
    ):
        train(tiny_train_cfg("dataset=folder", f"dataset.root={typo}"), tmp_path / "run")
    with pytest.raises(
        UserError,
        match=r"dataset.split=sketchy_99 is not used by dataset 'folder': its unseen classes "
        rf"are {data}/unseen.txt.*Leave dataset.split out",
    ):
        train(
            tiny_train_cfg("dataset=folder", f"dataset.root={data}", "dataset.split=sketchy_99"),
            tmp_path / "run",
        )
    assert not (tmp_path / "run").exists() and not typo.exists()
    trained = compose_cfg("config-train", ["model=tiny", "dataset=folder", f"dataset.root={data}"])
    cfg = compose_cfg("config-infer", ["path=x", f"dataset.root={typo}"])
    with pytest.raises(UserError, match=rf"dataset root {typo} for 'folder' does not exist"):
        make_splits(test_dataset_config(trained, cfg), need_train=False)
    assert not typo.exists()


def test_infer_never_generates_a_demo_at_a_mistyped_root(tmp_path, demo_root):
    from pipeline.infer import test_dataset_config
    from tests.conftest import compose_cfg

    trained = compose_cfg(
        "config-train", ["model=tiny", "dataset=demo", f"dataset.root={demo_root}"]
    )
    typo = tmp_path / "dmeo"
    cfg = compose_cfg("config-infer", ["path=x", f"dataset.root={typo}"])
    with pytest.raises(
        UserError,
        match=rf"dataset.root={typo} holds no demo dataset "
        r"\(no demo.json\); "
        r"infer never generates data",
    ):
        test_dataset_config(trained, cfg)
    assert not typo.exists()
    ok = test_dataset_config(trained, compose_cfg("config-infer", ["path=x"]))
    assert str(ok.root) == str(demo_root)


@pytest.mark.slow
def test_infer_with_model_n_mode_is_one_line(tmp_path):
    infer = str(REPO / "infer.py")
    r = subprocess.run(
        [sys.executable, infer, f"path={tmp_path}", "model.n_mode=5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "model.n_mode=5 is a training setting: infer takes it from the" in r.stderr
    assert not (tmp_path / "infer_output").exists()
