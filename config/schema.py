"""Typed config: the dataclasses behind setting/config-{train,infer,eval,search,app}.yaml and the
model and
dataset groups, registered in Hydra's ConfigStore. Each field holds its one default, its type
(Hydra refuses a wrong type at composition) and its range check (config/entry.py, before any work).
The defaults are the authors' recipe (eunyi-lyou/MA-ZS-SBIR); the group files set only what
differs."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from config.checks import (
    anything,
    boolean,
    cache_setting,
    dataset_id,
    dataset_list,
    integer,
    number,
    one_of,
    roots,
    text,
)

PRECISIONS = ("bf16", "fp16", "fp32")
SETTING = Path(__file__).resolve().parent.parent / "setting"


def setting(default, check, factory=False):
    """A field with its default and its value check (`factory`: a fresh list or dict per config)."""
    if factory:
        return field(
            default_factory=lambda: OmegaConf.to_container(OmegaConf.create(default)),
            metadata={"check": check},
        )
    return field(default=default, metadata={"check": check})


def alias():
    """One of the authors' key names: null unless given, then moved onto our key
    (config/entry.py)."""
    return field(default=None, metadata={"check": anything, "alias": True})


RATIO = number(0, 1e6)


def if_fine_grained(yes, no, *, _root_):
    """The resolver of `${ma.fine_grained:A,B}` in a preset (setting/): A in fine-grained training
    (train.fg_ratio or train.fg_shuffle_ratio above 0), else B. A value given on the command
    line replaces the whole interpolation."""
    t = _root_.get("train") if OmegaConf.is_dict(_root_) else None
    try:
        fine = t is not None and max(float(t.get(k) or 0) for k in FG_KEYS) > 0
    except (TypeError, ValueError):  # a bad value: validate() names it
        fine = False
    return yes if fine else no


FG_KEYS = ("fg_ratio", "fg_shuffle_ratio")
OmegaConf.register_new_resolver("ma.fine_grained", if_fine_grained, replace=True)


@dataclass
class ModelConfig:
    backbone: str = setting(MISSING, text())  # an open_clip name (setting/model/*.yaml)
    pretrained: Optional[str] = setting(
        None, text(optional=True)
    )  # a tag, a weight file, or null (random)
    n_mode: int = setting(4, integer(4, 1024))  # 0 photo, 1 sketch, 2 spare, 3 text
    temperature: float = setting(2.6592, number(-20, 20))  # initial logit scale (log 1/0.07)
    clip_loss_ratio: float = setting(1.0, RATIO)
    sem_loss_ratio: float = setting(0.1, RATIO)
    disc_loss_ratio: float = setting(0.1, RATIO)
    rec_loss_ratio: float = setting(0.02, RATIO)
    orth_loss_ratio: float = setting(0.0, RATIO)
    max_length: Optional[int] = setting(
        30, integer(2, 77, optional=True)
    )  # prompt tokens kept; null: 77
    quick_gelu: Optional[bool] = setting(None, boolean(optional=True))  # null: as the weights say
    common_semantic_loss_ratio: Optional[float] = alias()  # = sem_loss_ratio
    ortho_loss_ratio: Optional[float] = alias()  # = orth_loss_ratio
    d_model: Optional[int] = alias()  # checked against the embedding size


@dataclass
class CsvFiles:
    train: Optional[str] = setting(None, text(optional=True))
    test: Optional[str] = setting(None, text(optional=True))


@dataclass
class DatasetConfig:
    train_idx: List[Any] = setting([], dataset_list, factory=True)  # set by setting/dataset/*.yaml
    test_idx: Any = setting(None, dataset_id())
    root: Any = setting({"tuberlin": None, "quickdraw": None, "sketchy": None}, roots, factory=True)
    split: Optional[str] = setting(
        None, text(optional=True)
    )  # null: the dataset's default (data/splits/)
    unseen_file: Optional[str] = setting(None, text(optional=True))
    cls_ratio: float = setting(
        1.0, number(0, 1, lo_open=True)
    )  # seen classes trained on; the rest validate
    split_seed: int = setting(0, integer(0, 2**32 - 1))
    valid_idx: Any = setting(
        None, dataset_id(optional=True)
    )  # test_loss selection: whose test split
    train_partial_ratio: float = setting(
        1.0, number(0, 1, lo_open=True)
    )  # a seeded share of the images
    valid_partial_ratio: float = setting(1.0, number(0, 1, lo_open=True))
    csv: CsvFiles = field(
        default_factory=CsvFiles
    )  # seed-style annotation CSVs instead of the layout
    augment: bool = setting(False, boolean())  # the authors: CLIP preprocessing only
    on_bad_image: str = setting("error", one_of("error", "skip"))
    max_image_pixels: Optional[int] = setting(
        89478485, integer(1, optional=True)
    )  # decompression bombs
    cache: Any = setting(False, cache_setting)  # true, false, or the cache folder


@dataclass
class TrainSection:
    epochs: int = setting(100, integer(1, 100_000))
    batch_size: int = setting(
        256, integer(1, 1_000_000)
    )  # per rank; global = batch_size x world size
    accum_steps: int = setting(1, integer(1, 100_000))
    lr: float = setting(5e-3, number(0, 1, lo_open=True))  # mode vectors and discriminator
    clip_lr: float = setting(5e-8, number(0, 1))  # the CLIP backbone, its logit scale included
    weight_decay: float = setting(0.1, number(0, 10))  # AdamW, on every parameter
    beta1: float = setting(0.9, number(0, 1, hi_open=True))
    beta2: float = setting(0.999, number(0, 1, hi_open=True))
    eps: float = setting(1e-6, number(0, 1, lo_open=True))
    warmup_ratio: float = setting(0.05, number(0, 1, hi_open=True))  # share of all optimiser steps
    warmup_steps: Optional[int] = setting(None, integer(0, optional=True))  # a count instead
    schedule: str = setting("constant", one_of("constant", "linear"))
    precision: str = setting("fp16", one_of(*PRECISIONS))  # CPU runs fp32
    num_workers: int = setting(4, integer(0, 256))
    pin_memory: bool = setting(True, boolean())
    shuffle: bool = setting(True, boolean())  # false: the authors' loader order
    grad_clip: float = setting(0.0, number(0))  # max gradient norm, 0 = off
    log_every: int = setting(25, integer(1))  # steps
    eval_every: int = setting(1, integer(1))  # epochs between selections
    select: str = setting(  # which epoch best.pth holds
        "auto", one_of("auto", "last", "val_map", "val_fg", "test_loss")
    )
    save_every_steps: int = setting(0, integer(0))  # also write last.pth every N steps
    on_nonfinite: str = setting("stop", one_of("stop", "skip"))
    gather_with_grad: bool = setting(True, boolean())
    compile: bool = setting(False, boolean())
    # fine-grained training (docs/training.md): weight of the instance triplet loss (0: off)
    fg_ratio: float = setting(0.0, number(0))
    fg_margin: float = setting(0.3, number(0, 2, lo_open=True))  # on 1 - cos
    fg_shuffle_ratio: float = setting(0.0, number(0))  # the 2x2 patch-shuffle triplet's weight
    fg_classes_per_batch: int = setting(1, integer(1, 100_000))  # classes a batch holds
    # epochs of batch-all negatives (mean over a class's other photos) before batch-hard ones
    fg_hard_from_epoch: int = setting(0, integer(0, 100_000))
    # in fine-grained runs, the weight of the ratio-normalised categorical loss (0: the triplets
    # alone, CLIP-AT's separate fine-grained model)
    fg_categorical_ratio: float = setting(1.0, number(0))
    gradient_accumulation_steps: Optional[int] = alias()  # = accum_steps
    log_every_step: Optional[int] = alias()  # = log_every
    eval_every_epoch: Optional[int] = alias()  # = eval_every


@dataclass
class ValidationSection:
    chunk_size: int = setting(512, integer(1, 1_000_000))


@dataclass
class Wandb:
    mode: str = setting("offline", one_of("online", "offline", "disabled"))
    project: str = setting("ma-sbir", text())
    name: Optional[str] = setting(None, text(optional=True))


@dataclass
class Logger:
    wandb: Wandb = field(default_factory=Wandb)


@dataclass
class TrainConfig:
    seed: int = setting(0, integer(0, 2**32 - 1))
    device: str = setting("auto", text())  # auto | cpu | cuda | cuda:1
    resume: Optional[str] = setting(None, text(optional=True))  # a run folder
    train: TrainSection = field(default_factory=TrainSection)
    eval: ValidationSection = field(default_factory=ValidationSection)
    logger: Logger = field(default_factory=Logger)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    num_workers: Optional[int] = alias()  # = train.num_workers
    pin_memory: Optional[bool] = alias()  # = train.pin_memory
    use_mixed_precision: Optional[bool] = alias()  # = train.precision (true: fp16, false: fp32)


@dataclass
class BaselineDataset(DatasetConfig):
    generalized: bool = setting(False, boolean())  # also embed the seen classes' photos (GZS-SBIR)


@dataclass
class BaselineConfig(TrainConfig):  # infer.py baseline=true (pipeline/baseline.py)
    baseline: bool = setting(True, boolean())
    path: Optional[str] = setting(
        None, text(optional=True)
    )  # null: outputs/baseline/<backbone>-<dataset>
    batch_size: int = setting(256, integer(1, 1_000_000))  # images per batch while embedding
    precision: str = setting("fp32", one_of(*PRECISIONS))  # of the embedding, as infer.py's
    dataset: BaselineDataset = field(default_factory=BaselineDataset)


@dataclass
class InferDataset:  # null: the run's own test dataset, root and setting
    test_idx: Any = setting(None, dataset_id(optional=True))
    root: Any = setting(None, roots)
    generalized: bool = setting(False, boolean())  # also embed the seen classes' photos (GZS-SBIR)
    max_image_pixels: Optional[int] = setting(None, integer(1, optional=True))
    valid_partial_ratio: Optional[float] = alias()  # the authors' key (no effect)


@dataclass
class InferTrainAliases:
    batch_size: Optional[int] = alias()  # = batch_size


@dataclass
class InferModelAliases:  # taken from the run
    backbone: Optional[str] = alias()
    max_length: Optional[int] = alias()
    n_mode: Optional[int] = alias()  # refused: fixed by the run's checkpoint (config/entry.py)


@dataclass
class InferConfig:
    path: str = setting(MISSING, text())  # the run folder (or relative to outputs/)
    mode: str = setting("best", one_of("best", "last"))
    device: str = setting("auto", text())
    batch_size: int = setting(256, integer(1, 1_000_000))
    num_workers: int = setting(4, integer(0, 256))
    precision: str = setting("fp32", one_of(*PRECISIONS))  # fp32 as the authors' inference
    allow_class_overlap: bool = setting(
        False, boolean()
    )  # a test split sharing training classes, labelled
    dataset: InferDataset = field(default_factory=InferDataset)
    train: InferTrainAliases = field(default_factory=InferTrainAliases)
    pin_memory: Optional[bool] = alias()
    model: InferModelAliases = field(default_factory=InferModelAliases)


@dataclass
class Report:  # report.html + report_grid.png beside eval_result.json
    enabled: bool = setting(True, boolean())
    image_root: Optional[str] = setting(
        None, text(optional=True)
    )  # null: the root infer.py recorded
    n_queries: int = setting(20, integer(0))
    grid_queries: int = setting(8, integer(0))
    grid_kind: str = setting("original", one_of("original", "converted"))
    seed: int = setting(0, integer(0))


@dataclass
class EvalSection:
    device: str = setting("auto", text())
    chunk_size: int = setting(
        512, integer(1, 1_000_000)
    )  # memory ~ chunk_size x gallery x 35 bytes
    protocols: Any = setting(
        ["default"], anything, factory=True
    )  # default | hits_over_k | noninterp
    generalized: bool = setting(False, boolean())  # rank seen-class photos too
    # instance-level Acc@k of sketches paired with their photo: null = when index.csv has pairs
    fine_grained: Optional[bool] = setting(None, boolean(optional=True))
    topk: int = setting(10, integer(1, 10_000))
    report: Report = field(default_factory=Report)


@dataclass
class EvalDataset:
    test_idx: Any = setting(None, dataset_id(optional=True))  # null: the run's own test dataset
    valid_partial_ratio: Optional[float] = alias()


@dataclass
class EvalConfig:
    path: str = setting(MISSING, text())
    mode: str = setting("best", one_of("best", "last"))
    allow_class_overlap: bool = setting(False, boolean())
    dataset: EvalDataset = field(default_factory=EvalDataset)
    eval: EvalSection = field(default_factory=EvalSection)
    batch_size: Optional[int] = alias()  # = eval.chunk_size


@dataclass
class IndexSection:  # the gallery index of search.py and app.py (gallery/index.py, gallery/ann.py)
    kind: str = setting("flat", one_of("flat", "hnsw"))  # exact IndexFlatIP | approximate HNSW
    hnsw_m: int = setting(32, integer(2, 1024))
    ef_construction: int = setting(200, integer(1, 1_000_000))
    ef_search: int = setting(128, integer(1, 1_000_000))
    save_every_s: float = setting(60, number(0, lo_open=True))  # an interrupted build keeps this
    cache_dir: Optional[str] = setting(None, text(optional=True))  # null: ~/.cache/ma-sbir/index


@dataclass
class GalleryRun:  # what search.py and app.py share: the run, the photo folder, embedding it
    path: str = setting(MISSING, text())  # the run folder written by train.py
    mode: str = setting("best", one_of("best", "last"))
    gallery: str = setting(MISSING, text())  # a folder of photos, searched recursively
    query_modality: str = setting("sketch", one_of("sketch", "photo"))
    query_mode: str = setting("converted", one_of("original", "converted"))
    device: str = setting("auto", text())
    precision: str = setting("bf16", one_of(*PRECISIONS))
    batch_size: int = setting(64, integer(1, 1_000_000))  # images per batch while indexing
    num_workers: int = setting(2, integer(0, 256))
    max_image_pixels: Optional[int] = setting(
        89478485, integer(1, optional=True)
    )  # a query or gallery image above this is refused from its header (null: Pillow's limit)
    index: IndexSection = field(default_factory=IndexSection)


@dataclass
class SearchConfig(GalleryRun):
    k: int = setting(10, integer(1, 100_000))
    out: str = setting("search_results", text())  # results.html goes here
    query: Optional[str] = setting(None, text(optional=True))  # a sketch or photo file ...
    text: Optional[str] = setting(None, text(optional=True))  # ... or words (last: it shadows text)


@dataclass
class AppConfig(GalleryRun):
    port: int = setting(7860, integer(1, 65_535))  # served on 127.0.0.1 only
    k: int = setting(10, integer(1, 100))  # results shown at first (the page has a slider to 100)
    save_queries: Optional[str] = setting(None, text(optional=True))  # a folder: last-query.png
    max_upload_mb: float = setting(10, number(0, 10_000, lo_open=True))


SCHEMAS = {
    "train": TrainConfig,
    "infer": InferConfig,
    "baseline": BaselineConfig,
    "eval": EvalConfig,
    "search": SearchConfig,
    "app": AppConfig,
}


def register():
    """Put the schemas into Hydra's ConfigStore (the configs' defaults lists name them)."""
    store = ConfigStore.instance()
    for kind, schema in SCHEMAS.items():
        store.store(name=f"{kind}_schema", node=schema)


def compose_config(name, overrides=()):
    """setting/<name>.yaml composed with overrides as its entry point would (for `python -m` tools
    and
    tests); Hydra's refusal of an override (a wrong type, an unknown key) is one user error."""
    from hydra import compose, initialize_config_dir

    from runtime.errors import UserError

    register()
    try:
        with initialize_config_dir(config_dir=str(SETTING), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))
    except Exception as e:  # Hydra's parse and composition errors
        text = f"{e} {e.__cause__ or ''}"
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        lines = [
            x for x in lines if not x.startswith(("full_key", "object_type", "reference_type"))
        ]
        raise UserError(f"config overrides {list(overrides)}: {' '.join(lines)}") from None


def dataset_defaults(dcfg):
    """A dataset config (possibly partial, e.g. of a run by an older version) over the defaults."""
    base = OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(DatasetConfig)))
    return OmegaConf.merge(base, dcfg)
