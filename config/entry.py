"""Config entry checks of train, infer and evaluate: the authors' key names mapped to ours, and
every value checked by its schema field's check (config/schema.py) before any work, all bad values
in one clear error."""

import difflib
from dataclasses import fields, is_dataclass

from omegaconf import OmegaConf, open_dict

from runtime.errors import UserError
from config.schema import SCHEMAS


PROTOCOLS = ("default", "hits_over_k", "noninterp")


def _precision(flag):
    return "fp16" if flag else "fp32"


def _backbone(name):
    """The authors' HF model name -> (open_clip name, pretrained tag)."""
    known = {
        "openai/clip-vit-base-patch32": ("ViT-B-32", "openai"),
        "openai/clip-vit-base-patch16": ("ViT-B-16", "openai"),
        "openai/clip-vit-large-patch14": ("ViT-L-14", "openai"),
    }
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
AUTHORS_ONLY = {
    "train": ["model.d_model"],
    "baseline": ["model.d_model"],
    "infer": [
        "model.backbone",
        "model.max_length",
        "model.n_mode",
        "pin_memory",
        "dataset.valid_partial_ratio",
    ],
    "eval": ["dataset.valid_partial_ratio"],
}


def _given(key, given):
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in given)


def apply_aliases(cfg, kind, given=()):
    """Move each alias's value onto its canonical key and drop the alias. `given`: the command-line
    overrides; an alias and its canonical key both given with different values is an error."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    table = {
        "train": TRAIN_ALIASES,
        "baseline": TRAIN_ALIASES,
        "infer": INFER_ALIASES,
        "eval": EVAL_ALIASES,
    }.get(kind, ())
    for alias, key, convert in table:
        value = OmegaConf.select(cfg, alias)
        if value is None:
            _drop(cfg, alias)
            continue
        new = convert(value) if convert else value
        if _given(key, given) and OmegaConf.select(cfg, key) != new:
            raise UserError(
                f"{alias}={value} (the authors' name) and {key}={OmegaConf.select(cfg, key)} "
                f"disagree; they are the same setting. Give one of them."
            )
        OmegaConf.update(cfg, key, new, force_add=True)
        _drop(cfg, alias)
    if kind in ("train", "baseline"):
        _train_specials(cfg)
    n_mode = OmegaConf.select(cfg, "model.n_mode")
    if kind == "infer" and n_mode is not None:
        raise UserError(
            f"model.n_mode={n_mode} is a training setting: infer takes it from the "
            f"run's checkpoint (its config.yaml), which fixes the model's mode "
            f"vectors. Leave it out."
        )
    for alias in AUTHORS_ONLY.get(kind, ()):
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
        raise UserError(
            f"model.d_model={d_model!r} must be a positive whole number (the embedding size)."
        )
    backbone = OmegaConf.select(cfg, "model.backbone")
    mapped = _backbone(backbone)
    if mapped:
        cfg.model.backbone, cfg.model.pretrained = mapped
    elif isinstance(backbone, str) and "/" in backbone:
        raise UserError(
            f"model.backbone={backbone!r}: of the Hugging Face names only "
            f"openai/clip-vit-base-patch32, -base-patch16 and -large-patch14 are mapped; use an "
            f"open_clip name (ViT-B-32 ...) with model.pretrained=<tag or weight file>."
        )


def _drop(cfg, dotted):
    *parents, leaf = dotted.split(".")
    node = OmegaConf.select(cfg, ".".join(parents)) if parents else cfg
    if node is not None and OmegaConf.is_dict(node) and leaf in node:
        with open_dict(node):
            node.pop(leaf)


def rules(schema, prefix=""):
    """{dotted key: value check} of every field of a schema dataclass, the authors' aliases left out
    (apply_aliases has moved them onto our keys)."""
    found = {}
    for f in fields(schema):
        if is_dataclass(f.type):
            found.update(rules(f.type, f"{prefix}{f.name}."))
        elif not f.metadata.get("alias"):
            found[f"{prefix}{f.name}"] = f.metadata["check"]
    return found


RULES = {kind: rules(schema) for kind, schema in SCHEMAS.items()}


def validate(cfg, kind):
    """Raise one UserError naming each bad or absent value and what it must be, so that a config
    that passes holds every key of its schema."""
    problems, absent = [], object()
    for key, check in RULES[kind].items():
        try:
            value = OmegaConf.select(cfg, key, default=absent, throw_on_missing=True)
        except Exception:  # a missing mandatory value (???) or a broken interpolation
            value = absent
        if value is absent:
            problems.append(f"{key} is not set")
            continue
        if OmegaConf.is_config(value) and not getattr(check, "takes_group", False):
            problems.append(f"{key}={_show(value)} must be a single value, not a group")
            continue
        want = check(value)
        if want:
            problems.append(f"{key}={_show(value)} must be {want}")
    if kind == "eval":
        problems += _protocol_problems(cfg)
    problems += _unknown_keys(cfg, SCHEMAS[kind], kind)
    if problems:
        raise UserError(
            "bad config value(s): " + "; ".join(problems) + ". Fix them on the command line "
            "(key=value) or in setting/."
        )
    return cfg


def _unknown_keys(cfg, schema, kind, prefix=""):
    """Keys that nothing reads (`+train.betas=...`, `+foo=1` in a resumed run's overrides, or a
    hand-made config): refused, not ignored."""
    known = {f.name: f.type for f in fields(schema)}
    problems = []
    for key in cfg:
        if key not in known:
            if not (
                kind == "train" and not prefix and key == "run"
            ):  # train.py's record of the classes
                near = difflib.get_close_matches(str(key), list(known), n=1)
                hint = f"; did you mean {prefix}{near[0]}?" if near else ""
                problems.append(
                    f"{prefix}{key} is not a setting (nothing reads it; see config/schema.py){hint}"
                )
        elif is_dataclass(known[key]) and OmegaConf.is_dict(cfg[key]):
            problems += _unknown_keys(cfg[key], known[key], kind, f"{prefix}{key}.")
    return problems


def _show(v):
    return OmegaConf.to_container(v) if OmegaConf.is_config(v) else repr(v)


def _protocol_problems(cfg):
    value = OmegaConf.select(cfg, "eval.protocols")
    if isinstance(value, str):  # eval.protocols=noninterp: one name, not its letters
        cfg.eval.protocols = [value]
        value = cfg.eval.protocols
    if not OmegaConf.is_list(value) or not all(isinstance(p, str) for p in value):
        return [
            f"eval.protocols={_show(value)} must be a list of protocol names from {list(PROTOCOLS)}"
        ]
    unknown = [p for p in value if p not in PROTOCOLS]
    return (
        [f"eval.protocols has unknown name(s) {unknown}; use {list(PROTOCOLS)}"] if unknown else []
    )


def _unresolvable_key(node, prefix=""):
    """The dotted name of the first value in `node` whose interpolation does not resolve."""
    for key in node:
        name = f"{prefix}{key}"
        try:
            value = node[key]
        except Exception:
            return name
        if OmegaConf.is_config(value):
            found = _unresolvable_key(value, f"{name}.") if OmegaConf.is_dict(value) else None
            if found:
                return found
    return None


def prepare(cfg, kind, given=()):
    """The config a pipeline runs with: aliases applied, interpolations resolved (so config.yaml
    records the values used), every value checked."""
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:  # an interpolation that cannot resolve: say which and why
        where = _unresolvable_key(cfg)
        raise UserError(
            f"bad config value{f' of {where}' if where else ''}: {str(e).splitlines()[0]}. Fix "
            f"the ${{...}} interpolation on the command line or in setting/."
        ) from None
    return validate(apply_aliases(cfg, kind, given), kind)
