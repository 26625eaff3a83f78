"""Config entry checks of train, infer and evaluate: the authors' key names mapped to ours, and
every value's type and range validated before any work, with one clear error per bad value."""
import math

from omegaconf import OmegaConf, open_dict

from utils.runtime import UserError

PRECISIONS = ("bf16", "fp16", "fp32")
PROTOCOLS = ("default", "hits_over_k", "noninterp")


def _precision(flag):
    return "fp16" if flag else "fp32"


def _backbone(name):
    """The authors' HF model name -> (open_clip name, pretrained tag)."""
    known = {"openai/clip-vit-base-patch32": ("ViT-B-32", "openai"),
             "openai/clip-vit-base-patch16": ("ViT-B-16", "openai"),
             "openai/clip-vit-large-patch14": ("ViT-L-14", "openai")}
    return known.get(str(name))


# (alias as the authors' configs spell it, canonical key, value map)
TRAIN_ALIASES = [
    ("model.common_semantic_loss_ratio", "model.sem_loss_ratio", None),
    ("model.ortho_loss_ratio", "model.orth_loss_ratio", None),
    ("train.gradient_accumulation_steps", "train.accum_steps", None),
    ("train.log_every_step", "train.log_every", None),
    ("train.eval_every_epoch", "train.eval_every", None),
    ("num_workers", "train.num_workers", None),
    ("pin_memory", "train.pin_memory", None),
    ("use_mixed_precision", "train.precision", _precision),
]
INFER_ALIASES = [("train.batch_size", "batch_size", None)]
EVAL_ALIASES = [("batch_size", "eval.chunk_size", None)]
# The authors' keys whose value needs no key of its own here (checked, then dropped).
AUTHORS_ONLY = {"train": ["model.d_model"], "infer": ["model.backbone", "model.max_length", "pin_memory",
                                                      "dataset.valid_partial_ratio"],
                "eval": ["dataset.valid_partial_ratio"]}


def _given(key, given):
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in given)


def apply_aliases(cfg, kind, given=()):
    """Move each alias's value onto its canonical key and drop the alias. `given`: the command-line
    overrides; an alias and its canonical key both given with different values is an error."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    table = {"train": TRAIN_ALIASES, "infer": INFER_ALIASES, "eval": EVAL_ALIASES}[kind]
    for alias, key, convert in table:
        value = OmegaConf.select(cfg, alias)
        if value is None:
            _drop(cfg, alias)
            continue
        new = convert(value) if convert else value
        if _given(key, given) and OmegaConf.select(cfg, key) != new:
            raise UserError(f"{alias}={value} (the authors' name) and {key}={OmegaConf.select(cfg, key)} "
                            f"disagree; they are the same setting. Give one of them.")
        OmegaConf.update(cfg, key, new, force_add=True)
        _drop(cfg, alias)
    if kind == "train":
        _train_specials(cfg)
    for alias in AUTHORS_ONLY[kind]:
        _drop(cfg, alias)
    for key in [k for k, v in cfg.items() if OmegaConf.is_dict(v) and len(v) == 0]:
        cfg.pop(key)  # a group that held only aliases
    for key in ("dataset.test_idx", "dataset.valid_idx"):  # the authors' train config: [2]
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_list(value) and len(value) == 1:
            OmegaConf.update(cfg, key, value[0])
    return cfg


def _train_specials(cfg):
    d_model = OmegaConf.select(cfg, "model.d_model")
    if d_model is not None and not (isinstance(d_model, int) and d_model > 0):
        raise UserError(f"model.d_model={d_model!r} must be a positive whole number (the embedding size).")
    backbone = OmegaConf.select(cfg, "model.backbone")
    mapped = _backbone(backbone)
    if mapped:
        cfg.model.backbone, cfg.model.pretrained = mapped
    elif isinstance(backbone, str) and "/" in backbone:
        raise UserError(f"model.backbone={backbone!r}: of the Hugging Face names only "
                        f"openai/clip-vit-base-patch32, -base-patch16 and -large-patch14 are mapped; use an "
                        f"open_clip name (ViT-B-32 ...) with model.pretrained=<tag or weight file>.")


def _drop(cfg, dotted):
    *parents, leaf = dotted.split(".")
    node = OmegaConf.select(cfg, ".".join(parents)) if parents else cfg
    if node is not None and OmegaConf.is_dict(node) and leaf in node:
        with open_dict(node):
            node.pop(leaf)


# ---- value checks -------------------------------------------------------------------------------
def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(lo=None, hi=None, optional=False):
    def check(v):
        if v is None and optional:
            return None
        if not _is_int(v):
            return "a whole number"
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"a whole number {_range(lo, hi)}"
    return check


def number(lo=None, hi=None, lo_open=False, hi_open=False, optional=False):
    def check(v):
        if v is None and optional:
            return None
        bad = not _is_num(v) or (lo is not None and (v <= lo if lo_open else v < lo)) \
            or (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            left = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
            right = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
            return "a finite number " + " and ".join(x for x in (left, right) if x)
    return check


def _range(lo, hi):
    if hi is None:
        return f">= {lo}"
    return f"from {lo} to {hi}" if lo is not None else f"<= {hi}"


def one_of(*choices, optional=False):
    def check(v):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, str) or v not in choices:
            return "one of " + ", ".join(map(str, choices))
    return check


def boolean(v):
    if not isinstance(v, bool):
        return "true or false"


def text(optional=False):
    def check(v):
        if v is None and optional:
            return None
        if not isinstance(v, (str, int)) or isinstance(v, bool) or v == "":
            return "a name or path"
    return check


def dataset_id(optional=False):
    def check(v):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            return "a dataset index (0, 1, 2) or name"
    return check


def dataset_list(v):
    if not OmegaConf.is_list(v) and not isinstance(v, list) or len(v) == 0:
        return "a non-empty list of dataset indices or names, e.g. [2]"
    if any(dataset_id()(x) for x in v):
        return "a list of dataset indices (0, 1, 2) or names"


TRAIN_RULES = {
    "seed": integer(0, 2**32 - 1), "device": text(), "resume": text(optional=True),
    "train.epochs": integer(1, 100_000), "train.batch_size": integer(1, 1_000_000),
    "train.accum_steps": integer(1, 100_000), "train.lr": number(0, 1, lo_open=True),
    "train.clip_lr": number(0, 1), "train.weight_decay": number(0, 10),
    "train.warmup_ratio": number(0, 1, hi_open=True), "train.warmup_steps": integer(0, optional=True),
    "train.schedule": one_of("constant", "linear"), "train.precision": one_of(*PRECISIONS),
    "train.num_workers": integer(0, 256), "train.pin_memory": boolean, "train.shuffle": boolean,
    "train.grad_clip": number(0), "train.log_every": integer(1), "train.eval_every": integer(1),
    "train.select": one_of("auto", "last", "val_map", "test_loss"),
    "train.save_every_steps": integer(0), "train.on_nonfinite": one_of("stop", "skip"),
    "train.gather_with_grad": boolean, "train.compile": boolean,
    "train.beta1": number(0, 1, hi_open=True), "train.beta2": number(0, 1, hi_open=True),
    "train.eps": number(0, 1, lo_open=True),
    "eval.chunk_size": integer(1, 1_000_000),
    "model.backbone": text(), "model.pretrained": text(optional=True), "model.n_mode": integer(4, 1024),
    "model.temperature": number(-20, 20), "model.max_length": integer(2, 77, optional=True),
    "model.quick_gelu": lambda v: None if v is None else boolean(v),
    **{f"model.{k}_loss_ratio": number(0, 1e6) for k in ("clip", "sem", "rec", "disc", "orth")},
    "dataset.train_idx": dataset_list, "dataset.test_idx": dataset_id(),
    "dataset.valid_idx": dataset_id(optional=True), "dataset.cls_ratio": number(0, 1, lo_open=True),
    "dataset.train_partial_ratio": number(0, 1, lo_open=True),
    "dataset.valid_partial_ratio": number(0, 1, lo_open=True),
    "dataset.split_seed": integer(0, 2**32 - 1), "dataset.augment": boolean,
    "dataset.on_bad_image": one_of("error", "skip"), "dataset.max_image_pixels": integer(1, optional=True),
    "dataset.split": text(optional=True), "dataset.unseen_file": text(optional=True),
    "dataset.cache": lambda v: None if isinstance(v, (bool, str)) and v != "" else "true, false or a folder",
    "logger.wandb.mode": one_of("online", "offline", "disabled"),
}
INFER_RULES = {
    "path": text(), "mode": one_of("best", "last"), "device": text(), "batch_size": integer(1, 1_000_000),
    "num_workers": integer(0, 256), "precision": one_of(*PRECISIONS),
    "dataset.test_idx": dataset_id(optional=True), "dataset.generalized": boolean,
    "dataset.max_image_pixels": integer(1, optional=True), "allow_class_overlap": boolean,
}
EVAL_RULES = {
    "path": text(), "mode": one_of("best", "last"), "dataset.test_idx": dataset_id(optional=True),
    "eval.device": text(), "eval.chunk_size": integer(1, 1_000_000), "eval.generalized": boolean,
    "eval.topk": integer(1, 10_000), "eval.report.enabled": boolean, "eval.report.n_queries": integer(0),
    "eval.report.grid_queries": integer(0), "eval.report.grid_kind": one_of("original", "converted"),
    "eval.report.seed": integer(0), "allow_class_overlap": boolean,
}
RULES = {"train": TRAIN_RULES, "infer": INFER_RULES, "eval": EVAL_RULES}


def validate(cfg, kind):
    """Raise one UserError naming each bad value and what it must be."""
    problems = []
    for key, check in RULES[kind].items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception:  # a missing mandatory value (???) or a broken interpolation
            problems.append(f"{key} is not set")
            continue
        if OmegaConf.is_config(value) and check not in (dataset_list,):
            problems.append(f"{key}={_show(value)} must be a single value, not a group")
            continue
        want = check(value)
        if want:
            problems.append(f"{key}={_show(value)} must be {want}")
    if kind == "eval":
        problems += _protocol_problems(cfg)
    if kind == "train":
        problems += _unknown_train_keys(cfg)
    if problems:
        raise UserError("bad config value(s): " + "; ".join(problems) + ". Fix them on the command line "
                        "(key=value) or in setting/.")
    return cfg


TRAIN_TOP = {"seed", "device", "resume", "train", "eval", "model", "dataset", "logger", "run"}


def _unknown_train_keys(cfg):
    """Keys added with `+` that nothing reads (`+train.betas=...`, `+foo=1`): refused, not ignored."""
    known = {k for k in TRAIN_RULES if k.startswith(("train.", "eval."))}
    unknown = sorted(k for k in cfg if k not in TRAIN_TOP)
    for group in ("train", "eval"):
        node = cfg.get(group)
        if OmegaConf.is_dict(node):
            unknown += sorted(f"{group}.{k}" for k in node if f"{group}.{k}" not in known)
    return [f"{k} is not a setting (nothing reads it; see setting/config-train.yaml)" for k in unknown]


def _show(v):
    return OmegaConf.to_container(v) if OmegaConf.is_config(v) else repr(v)


def _protocol_problems(cfg):
    value = OmegaConf.select(cfg, "eval.protocols")
    if isinstance(value, str):  # eval.protocols=noninterp: one name, not its letters
        cfg.eval.protocols = [value]
        value = cfg.eval.protocols
    if not OmegaConf.is_list(value) or not all(isinstance(p, str) for p in value):
        return [f"eval.protocols={_show(value)} must be a list of protocol names from {list(PROTOCOLS)}"]
    unknown = [p for p in value if p not in PROTOCOLS]
    return [f"eval.protocols has unknown name(s) {unknown}; use {list(PROTOCOLS)}"] if unknown else []


def prepare(cfg, kind, given=()):
    """The config a pipeline runs with: aliases applied, every value checked."""
    return validate(apply_aliases(cfg, kind, given), kind)
