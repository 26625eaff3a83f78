"""Config entry: every bad value is one user error naming it, the authors' key names work, and a
fuzz of random overrides never raises anything else."""

import random

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, compose_cfg
from config.entry import prepare
from runtime.errors import UserError

BASE = {
    "train": ["dataset=demo", "model=tiny"],
    "infer": ["path=outputs/x"],
    "eval": ["path=outputs/x"],
}
NAMES = {"train": "config-train", "infer": "config-infer", "eval": "config-eval"}


def composed(kind, *overrides):
    return compose_cfg(NAMES[kind], BASE[kind] + list(overrides))


@pytest.mark.parametrize(
    "kind, override, message",
    [
        ("train", "train.batch_size=0", "train.batch_size=0 must be a whole number from 1"),
        ("train", "train.num_workers=-1", "train.num_workers=-1 must be a whole number from 0"),
        ("train", "seed=-5", "seed=-5 must be a whole number from 0"),
        ("train", "model.n_mode=1", "model.n_mode=1 must be a whole number from 4"),
        ("train", "train.lr=-1", "train.lr=-1.0 must be a finite number > 0"),
        ("train", "train.epochs=-1", "train.epochs=-1 must be a whole number from 1"),
        ("train", "train.epochs=0", "train.epochs=0 must be a whole number from 1"),
        ("train", "train.lr=nan", "train.lr=nan must be a finite number"),
        (
            "train",
            "train.select=best",
            "train.select='best' must be one of auto, last, val_map, val_fg, test_loss",
        ),
        ("train", "dataset.cls_ratio=0", "dataset.cls_ratio=0.0 must be a finite number > 0"),
        ("train", "train.precision=true", "train.precision='True' must be one of bf16, fp16, fp32"),
        (
            "train",
            "dataset.root=[1]",
            "dataset.root=[1] must be a folder, or dataset.root.<sketchy|tuberlin|quickdraw>",
        ),
        ("train", "train.fg_ratio=-1", "train.fg_ratio=-1.0 must be a finite number >= 0"),
        ("train", "train.fg_margin=0", "train.fg_margin=0.0 must be a finite number > 0"),
        (
            "train",
            "train.fg_shuffle_ratio=-0.5",
            "train.fg_shuffle_ratio=-0.5 must be a finite number >= 0",
        ),
        (
            "train",
            "train.fg_classes_per_batch=0",
            "train.fg_classes_per_batch=0 must be a whole number from 1",
        ),
        (
            "train",
            "train.fg_hard_from_epoch=-1",
            "train.fg_hard_from_epoch=-1 must be a whole number from 0",
        ),
        ("train", "train.lr=${nope}", "bad config value of train.lr: Interpolation key 'nope'"),
        (
            "train",
            "train.lr=${ma.fine_grained:1}",
            "bad config value of train.lr: TypeError raised while resolving interpolation",
        ),
        (
            "train",
            "train.fg_categorical_ratio=-0.1",
            "train.fg_categorical_ratio=-0.1 must be a finite number >= 0",
        ),
        ("infer", "mode=nonsense", "mode='nonsense' must be one of best, last"),
        ("infer", "batch_size=0", "batch_size=0 must be a whole number from 1"),
        ("eval", "eval.chunk_size=0", "eval.chunk_size=0 must be a whole number from 1"),
        ("eval", "eval.chunk_size=-1", "eval.chunk_size=-1 must be a whole number from 1"),
        ("eval", "eval.protocols=[nonsense]", "eval.protocols has unknown name(s) ['nonsense']"),
        ("eval", "mode=nonsense", "mode='nonsense' must be one of best, last"),
    ],
)
def test_bad_value_is_one_clear_error(kind, override, message):
    with pytest.raises(UserError) as err:
        prepare(composed(kind, override), kind)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kind, override, message",
    [
        (
            "train",
            "train.batch_size=abc",
            "Value 'abc' of type 'str' could not be converted to Integer",
        ),
        ("train", "train.shuffle=maybe", "Value 'maybe' is not a valid bool"),
        ("train", "model.n_mode=4.5", "could not be converted to Integer"),
        ("train", "train.betas=[0.5,0.6]", "Key 'betas' not in 'TrainSection'"),
        ("train", "dataset.colour=red", "Key 'colour' not in 'DatasetConfig'"),
        ("infer", "batch_size=many", "could not be converted to Integer"),
        ("eval", "eval.report.enabled=perhaps", "is not a valid bool"),
    ],
)
def test_a_wrong_type_fails_at_composition(kind, override, message):
    """The schema (config/schema.py) types every key: Hydra refuses the override before any work."""
    with pytest.raises(UserError) as err:
        composed(kind, override)
    assert (
        override.split("=")[0] in str(err.value)
        and message in str(err.value)
        and "\n" not in str(err.value)
    )


def test_the_defaults_live_in_the_schema():
    """A group file sets only what differs: the model's loss ratios come from ModelConfig, the
    datasets' shared keys from DatasetConfig, the recipe from TrainSection."""
    from config.schema import DatasetConfig, ModelConfig, TrainSection

    cfg = compose_cfg("config-train", ["dataset=tuberlin", "model=vit-b-32"])
    assert cfg.model.sem_loss_ratio == ModelConfig.sem_loss_ratio == 0.1
    assert cfg.dataset.max_image_pixels == DatasetConfig.max_image_pixels
    assert (cfg.train.lr, cfg.train.clip_lr, cfg.train.epochs) == (
        TrainSection.lr,
        TrainSection.clip_lr,
        100,
    )
    assert cfg.dataset.test_idx == 0 and cfg.model.backbone == "ViT-B-32"
    for group in ("dataset", "model"):
        for yaml in (REPO / "setting" / group).glob("*.yaml"):
            keys = set(OmegaConf.load(yaml).get(group, OmegaConf.load(yaml)))
            assert len(keys) <= 6, f"{yaml} repeats defaults: {sorted(keys)}"


def test_a_scalar_protocol_is_a_one_element_list():
    cfg = prepare(composed("eval", "eval.protocols=noninterp"), "eval")
    assert list(cfg.eval.protocols) == ["noninterp"]


def test_the_authors_keys_map_to_ours():
    cfg = prepare(
        composed(
            "train",
            "model.common_semantic_loss_ratio=0.3",
            "model.ortho_loss_ratio=0.2",
            "train.gradient_accumulation_steps=2",
            "train.log_every_step=7",
            "train.eval_every_epoch=3",
            "num_workers=1",
            "pin_memory=false",
            "use_mixed_precision=false",
            "model.d_model=128",
            "dataset.test_idx=[demo]",
            "model.backbone=openai/clip-vit-base-patch32",
        ),
        "train",
    )
    assert (cfg.model.sem_loss_ratio, cfg.model.orth_loss_ratio) == (0.3, 0.2)
    assert (cfg.train.accum_steps, cfg.train.log_every, cfg.train.eval_every) == (2, 7, 3)
    assert (cfg.train.num_workers, cfg.train.pin_memory, cfg.train.precision) == (1, False, "fp32")
    assert cfg.dataset.test_idx == "demo"
    assert (cfg.model.backbone, cfg.model.pretrained) == ("ViT-B-32", "openai")
    saved = OmegaConf.to_yaml(cfg)
    for alias in (
        "common_semantic_loss_ratio",
        "gradient_accumulation_steps",
        "use_mixed_precision",
        "d_model",
    ):
        assert alias not in saved  # config.yaml shows the canonical keys only
    cfg = prepare(
        composed("infer", "train.batch_size=64", "pin_memory=true", "model.backbone=null"), "infer"
    )
    assert cfg.batch_size == 64 and "train" not in cfg
    assert prepare(composed("eval", "batch_size=128"), "eval").eval.chunk_size == 128


def test_an_alias_and_its_key_disagreeing_is_an_error():
    given = ["model.common_semantic_loss_ratio=0.3", "model.sem_loss_ratio=0.1"]
    with pytest.raises(
        UserError,
        match=r"model.common_semantic_loss_ratio=0.3 .* model.sem_loss_ratio=0.1 disagree",
    ):
        prepare(composed("train", *given), "train", given)
    same = ["model.common_semantic_loss_ratio=0.3", "model.sem_loss_ratio=0.3"]
    assert prepare(composed("train", *same), "train", same).model.sem_loss_ratio == 0.3


VALUES = [
    "abc",
    "-1",
    "0",
    "1",
    "-0.5",
    "0.5",
    "1e30",
    "-1e30",
    "nan",
    "inf",
    "true",
    "false",
    "null",
    "[]",
    "[1,2]",
    "[nonsense]",
    "{a: 1}",
    "''",
    "99999999999999999999",
    "best",
    "cpu",
    "2",
]


def leaf_keys(cfg, prefix=""):
    keys = []
    for k, v in cfg.items():
        if k == "hydra":
            continue
        if OmegaConf.is_dict(v) and len(v):
            keys += leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


@pytest.mark.parametrize("kind", ["train", "infer", "eval"])
def test_fuzzed_overrides_validate_or_give_the_user_error(kind):
    base = composed(kind)
    keys = leaf_keys(base)
    rng = random.Random(kind)
    for i in range(200):
        picks = [f"{rng.choice(keys)}={rng.choice(VALUES)}" for _ in range(rng.randint(1, 3))]
        try:
            cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(picks))
        except Exception:
            continue  # a wrong type or a bad parse: Hydra refuses it before our code runs
        try:
            prepare(cfg, kind, picks)
        except UserError as e:
            assert str(e) and "\n" not in str(e), picks
        except Exception as e:  # pragma: no cover - the failure message names the overrides
            pytest.fail(f"{picks}: {type(e).__name__}: {e}")


def test_keys_that_nothing_reads_are_refused():
    with pytest.raises(UserError, match=r"train.betas is not a setting.*foo is not a setting"):
        prepare(composed("train", "+train.betas=[0.5,0.6]", "+foo=1"), "train")
