"""How a training run picks best.pth: the rule (train.select, with `auto` resolved), the score it
asks for at the end of an epoch, and whether that score is a new best."""

import math

from omegaconf import OmegaConf

from data.index import has_val_pairs, make_splits, partial, validation_problem
from data.pairs import NAMING_RULE
from metrics.validation import (
    split_loss,
    validation_embeddings,
    validation_fine_grained,
    validation_map,
)
from runtime.logs import log


def choose_rule(select, splits, fine_grained=False):
    """The configured train.select, with `auto` and a val_map or val_fg that has too little to go
    on resolved to `last` (said in the log). `auto` in fine-grained training (train.fg_ratio > 0)
    is val_fg when the validation classes have pairs."""
    problem = validation_problem(splits)
    if select == "auto":
        if fine_grained and has_val_pairs(splits):
            return "val_fg"
        select = "val_map" if splits.val and problem is None else "last"
    elif select == "val_fg" and not has_val_pairs(splits):
        log.warning(
            "train.select=val_fg: no validation sketch is paired with a validation photo "
            f"({NAMING_RULE}). best.pth falls back to the last epoch (train.select=last)."
        )
        select = "last"
    elif select == "val_map" and problem is not None:
        log.warning(
            f"train.select=val_map: {problem}. best.pth falls back to the last epoch "
            f"(train.select=last)."
        )
        select = "last"
    if select == "test_loss":
        log.warning(
            "train.select=test_loss: best.pth is chosen on the TEST split's loss (the authors' "
            "protocol); its scores are not a clean zero-shot estimate, and eval_result.json says "
            "so."
        )
    return select


class Selection:
    """The selection of one run: `rule` is last, val_map, val_fg or test_loss. Fine-grained runs
    whose validation classes have pairs log the validation fine-grained Acc@1 every epoch."""

    def __init__(self, cfg, splits):
        self.cfg, self.splits = cfg, splits
        self.fine_grained = float(cfg.train.fg_ratio) > 0 or float(cfg.train.fg_shuffle_ratio) > 0
        self.rule = choose_rule(cfg.train.select, splits, self.fine_grained)
        self.fg_scored = (self.fine_grained or self.rule == "val_fg") and has_val_pairs(splits)
        self.rows = self.test_loss_rows() if self.rule == "test_loss" else []

    def test_loss_rows(self):
        """The labelled split whose loss picks best.pth: dataset.valid_idx's test split (default the
        run's own), cut to dataset.valid_partial_ratio."""
        dcfg = self.cfg.dataset
        if dcfg.valid_idx is None or str(dcfg.valid_idx) == str(dcfg.test_idx):
            rows = self.splits.test
        else:
            rows = make_splits(
                OmegaConf.merge(dcfg, {"test_idx": dcfg.valid_idx}), need_train=False
            ).test
        return partial(rows, float(dcfg.valid_partial_ratio), int(dcfg.split_seed))

    def score(self, epoch, model, eval_tf, tokenizer, ratios, device, info):
        """(score to maximise, what it is) after `epoch`, or (None, None) when not due."""
        tcfg = self.cfg.train
        if epoch % int(tcfg.eval_every) and epoch != int(tcfg.epochs):
            return None, None
        if self.rule in ("val_map", "val_fg") or (self.splits.val and self.rule == "last"):
            z, rows = validation_embeddings(
                model, self.splits.val, eval_tf, tokenizer, self.cfg, device, info
            )
            val_map = validation_map(z, rows, self.cfg, device)
            what = f"validation mAP@all {val_map:.4f}"
            if not self.fg_scored:
                return val_map, what
            val_fg = validation_fine_grained(z, rows, self.cfg, device)
            what += f", validation fine-grained Acc@1 {val_fg:.4f}"
            return (val_fg if self.rule == "val_fg" else val_map), what
        if self.rule == "test_loss" and info.is_main:
            loss = split_loss(model, self.rows, eval_tf, tokenizer, ratios, self.cfg, device)
            return -loss, f"test-split loss {loss:.4f}"
        return None, None

    def improved(self, score, best=-math.inf):
        """Whether this epoch's weights become best.pth (always, for `last`)."""
        return self.rule == "last" or (score is not None and score >= best)
