"""Fine-grained training (train.fg_ratio): the instance losses by hand, the class-batch sampler,
categorical runs unchanged, and its refusals."""

from collections import Counter
import math

import pytest
import torch

from data.sampler import ClassBatchSampler
from model.instance_loss import instance_triplet, shuffle_patches, triplets
from pipeline.train import train
from runtime.errors import UserError
from tests.conftest import folder_dataset


def test_the_triplet_by_hand():
    # rows: photo A (instance 0), photo B (1), sketch of A, photo C of another class (2)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    instance = torch.tensor([0, 1, 0, 2])
    labels = torch.tensor([5, 5, 5, 9])
    mode = torch.tensor([0, 0, 1, 0])
    anchors, positives, negatives = triplets(instance, labels, mode)
    assert anchors.tolist() == [2] and positives.tolist() == [0]
    assert negatives.tolist() == [[False, True, False, False]]  # C is of another class
    # d(a, p) = 1 - 0.8 = 0.2; d(a, n) = 1 - 0.6 = 0.4; relu(0.2 - 0.4 + 0.3) = 0.1
    loss = instance_triplet(z, anchors, positives, negatives, margin=0.3)
    assert float(loss) == pytest.approx(0.1)
    assert float(instance_triplet(z, anchors, positives, negatives, margin=0.1)) == 0.0


def test_the_batch_all_warm_up_triplet_by_hand():
    # rows: photo A (instance 0), photos B (1) and C (2) of its class, the sketch of A
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    anchors, positives, negatives = triplets(
        torch.tensor([0, 1, 2, 0]), torch.tensor([5, 5, 5, 5]), torch.tensor([0, 0, 0, 1])
    )
    assert anchors.tolist() == [3] and negatives.tolist() == [[False, True, True, False]]
    # d(a, A) = 0.2, d(a, B) = 1 - 0.6 = 0.4, d(a, C) = 1 - 0.96 = 0.04, margin 0.3:
    # batch-hard relu(0.2 - 0.04 + 0.3) = 0.46; batch-all (relu(0.1) + relu(0.46)) / 2 = 0.28
    hard = instance_triplet(z, anchors, positives, negatives, margin=0.3)
    assert float(hard) == pytest.approx(0.46)
    every = instance_triplet(z, anchors, positives, negatives, margin=0.3, hard=False)
    assert float(every) == pytest.approx(0.28)


def test_anchors_need_their_photo_and_a_negative_in_the_batch():
    instance = torch.tensor([0, 0, 1, -1])  # photo 0, its sketch, a sketch whose photo is absent
    labels = torch.tensor([1, 1, 1, 1])
    mode = torch.tensor([0, 1, 1, 1])
    anchors, _, _ = triplets(instance, labels, mode)
    assert anchors.tolist() == []  # the sketch of 0 has no other photo of its class as negative
    z = torch.nn.functional.normalize(torch.randn(4, 3, requires_grad=True), dim=1)
    loss = instance_triplet(z, anchors, anchors, torch.zeros(0, 4, dtype=torch.bool), 0.3)
    assert loss.item() == 0.0 and loss.requires_grad


def test_shuffle_patches_moves_the_four_cells():
    img = torch.arange(16.0).reshape(1, 1, 4, 4)  # cells: 0 top-left, 1 top-right, 2, 3
    out = shuffle_patches(img, [3, 2, 1, 0])
    assert out[0, 0, :2, :2].tolist() == img[0, 0, 2:, 2:].tolist()
    assert out[0, 0, 2:, 2:].tolist() == img[0, 0, :2, :2].tolist()
    assert shuffle_patches(img, [0, 1, 2, 3]).equal(img)


def sampler_rows():
    """3 classes; per class 6 photos with 2 sketches each, and 4 unpaired sketches."""
    classes, instance = [], []
    for c in range(3):
        for p in range(6):
            k = c * 10 + p
            classes += [f"c{c}"] * 3
            instance += [k, k, k]
        classes += [f"c{c}"] * 4
        instance += [-1] * 4
    return classes, instance


def test_the_class_batch_sampler_keeps_pairs_and_classes_together():
    classes, instance = sampler_rows()
    s = ClassBatchSampler(classes, instance, batch_size=11, classes_per_batch=1, seed=3)
    order = list(s)
    assert sorted(order) == list(range(len(classes)))  # every row once an epoch
    batches = [order[i : i + 11] for i in range(0, len(order), 11)]
    of_pairs = [b for b in batches if min(instance[i] for i in b) >= 0]
    assert of_pairs and max(len({classes[i] for i in b}) for b in of_pairs) <= 2
    together = sum(
        1
        for b in batches
        for i in b
        if instance[i] >= 0 and sum(instance[j] == instance[i] for j in b) == 3
    )
    assert together / sum(k >= 0 for k in instance) > 0.6
    s.set_epoch(1)
    assert list(s) != order and sorted(s) == sorted(order)
    s.set_epoch(1, start=5)
    assert list(s) == s.epoch_order()[5:] and len(s) == len(classes) - 5


def test_a_batch_of_pairs_holds_no_lone_rows():
    """Free sketches and photos without a sketch give the triplet no anchor: they get batches of
    their own, so a batch of pairs is all anchors, positives and negatives (issue 21 point 4)."""
    classes, instance = [], []
    for c in range(4):  # per class 8 photos with 1 sketch each, 8 free sketches, 4 lone photos
        for p in range(8):
            classes += [f"c{c}"] * 2
            instance += [c * 100 + p] * 2
        classes += [f"c{c}"] * 12
        instance += [-1] * 8 + [c * 100 + 50 + k for k in range(4)]
    s = ClassBatchSampler(classes, instance, batch_size=16, classes_per_batch=2, seed=0)
    order = s.epoch_order()
    assert sorted(order) == list(range(len(classes)))
    paired = {i for i, k in enumerate(instance) if instance.count(k) == 2}
    batches = [order[i : i + 16] for i in range(0, len(order), 16)]
    kinds = [{i in paired for i in b} for b in batches]
    assert kinds.count({True}) == 4 and kinds.count({False}) == 3  # 64 paired, 48 lone rows
    for b in batches:
        if {i in paired for i in b} == {True}:  # 2 classes, 4 photos each with its sketch
            assert sorted(Counter(classes[i] for i in b).values()) == [8, 8]
            assert all(Counter(instance[i] for i in b)[instance[i]] == 2 for i in b)


def test_ranks_take_disjoint_whole_batches():
    classes, instance = sampler_rows()
    parts = [list(ClassBatchSampler(classes, instance, 8, 1, 0, rank=r, world=2)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) and len(parts[0]) % 8 == 0
    assert not set(parts[0]) & set(parts[1])


@pytest.mark.slow
def test_a_categorical_run_is_unchanged(tiny_train_cfg, tmp_path):
    """fg_ratio=0 (the default) trains exactly as before fine-grained training existed: the
    sum of the weights after this 1-epoch run, recorded on the code before it (2026-12-07)."""
    run = tmp_path / "run"
    train(tiny_train_cfg(), run)
    sd = torch.load(run / "model" / "last.pth", weights_only=False)["model"]
    total = sum(float(v.double().sum()) for v in sd.values() if v.is_floating_point())
    assert total == pytest.approx(3316.7189798746126, rel=1e-6)


@pytest.mark.slow
def test_fine_grained_training_runs_and_logs_its_loss(tiny_train_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_train_cfg("train.fg_ratio=1.0", "train.fg_shuffle_ratio=0.5"), run)
    log = (run / "train.log").read_text()
    assert "epoch 1 done" in log
    sd = torch.load(run / "model" / "last.pth", weights_only=False)["model"]
    total = sum(float(v.double().sum()) for v in sd.values() if v.is_floating_point())
    assert math.isfinite(total) and total != pytest.approx(3316.7189798746126, rel=1e-6)


def test_fg_ratio_without_pairs_is_refused(demo_root, tmp_path, tiny_train_cfg):
    data = folder_dataset(demo_root, tmp_path / "data")
    for f in (data / "sketch").rglob("*-1.png"):
        f.rename(f.with_name(f.name.replace("-1.png", "_x.png")))
    cfg = tiny_train_cfg("dataset=folder", f"dataset.root={data}", "train.fg_ratio=1.0")
    with pytest.raises(UserError, match=r"needs sketches paired with their photos.*a sketch <"):
        train(cfg, tmp_path / "run")
