"""Value checks of config fields: each returns None for a good value, else what the value must be
(config/schema.py attaches one to every field; config/entry.py reports them as one error)."""

import math

from omegaconf import OmegaConf


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _range(lo, hi):
    if hi is None:
        return f">= {lo}"
    return f"from {lo} to {hi}" if lo is not None else f"<= {hi}"


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
        bad = (
            not _is_num(v)
            or (lo is not None and (v <= lo if lo_open else v < lo))
            or (hi is not None and (v >= hi if hi_open else v > hi))
        )
        if bad:
            left = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
            right = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
            return "a finite number " + " and ".join(x for x in (left, right) if x)

    return check


def one_of(*choices, optional=False):
    def check(v):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, str) or v not in choices:
            return "one of " + ", ".join(map(str, choices))

    return check


def boolean(optional=False):
    def check(v):
        if v is None and optional:
            return None
        if not isinstance(v, bool):
            return "true or false"

    return check


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


dataset_list.takes_group = True  # a list is its value, not a group of keys


def cache_setting(v):
    if not (isinstance(v, (bool, str)) and v != ""):
        return "true, false or a folder"


def roots(v):
    """dataset.root: a folder, or a mapping of dataset name -> folder (each may be null)."""

    def folder(x):
        return x is None or (isinstance(x, (str, int)) and not isinstance(x, bool) and x != "")

    if folder(v) or (OmegaConf.is_dict(v) and all(folder(x) for x in v.values())):
        return None
    return "a folder, or dataset.root.<sketchy|tuberlin|quickdraw>=<folder>"


roots.takes_group = True


def anything(v):
    return None


anything.takes_group = True
