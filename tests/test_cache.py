"""The prepared image cache: training from it equals training from the files, a changed image or a
damaged shard rebuilds that shard, another geometry never reads a cache built for this one, and
a full disk or a read-only folder fails cleanly."""

import errno
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from omegaconf import OmegaConf

import data.cache as dc
from data import check
from data.cache import ImageCache, cache_ops, decode, pixel_ops
from data.cached import CachedDataset, image_dataset
from data.demo import generate
from data.loader import PromptTable, SketchPhotoDataset, collate, model_input
from pipeline.train import Trainer
from config.entry import prepare
from runtime.distributed import DistInfo
from runs.folder import RunFolder
from runtime.errors import UserError

EVAL_TF = open_clip.image_transform(64, is_train=False)


@pytest.fixture
def small_root(tmp_path):
    """A demo dataset of our own (2 photos + 2 sketches a class) that a test may change."""
    return generate(tmp_path / "demo", n_photo=2, n_sketch=2)


def rels_of(root):
    return sorted(
        p.relative_to(root).as_posix()
        for p in Path(root).rglob("*")
        if p.suffix in (".png", ".jpg")
    )


def built(tmp_path, root, ops=pixel_ops(EVAL_TF)):
    cache = ImageCache.at(tmp_path / "cache", root, ops)
    cache.build(rels_of(root), workers=2, progress=False)
    return cache


def cached_pixels(cache, rel):
    path, offset, h, w, c = cache.table()[rel]
    return (
        np.fromfile(path, dtype=np.uint8)[offset : offset + h * w * c]
        .reshape(c, h, w)
        .transpose(1, 2, 0)
    )


def trainer(cfg, run):
    """A Trainer as train() builds it on one process."""
    return Trainer(prepare(cfg, "train"), RunFolder(run).claim(), DistInfo())


@pytest.mark.slow
def test_training_from_the_cache_gives_the_weights_of_training_from_files(
    tmp_path, tiny_train_cfg, small_root
):
    small = ("dataset.augment=false", f"dataset.root={small_root}", "train.batch_size=16")
    files = trainer(tiny_train_cfg(*small), tmp_path / "files")
    assert isinstance(files.loader.dataset, SketchPhotoDataset)
    files.fit()
    cached = trainer(tiny_train_cfg(*small, f"dataset.cache={tmp_path / 'c'}"), tmp_path / "cached")
    assert isinstance(cached.loader.dataset, CachedDataset)
    assert cached.loader.dataset.cached == len(cached.loader.dataset) > 0
    cached.fit()

    def load(run):
        return torch.load(run / "model" / "last.pth", weights_only=True)

    a, b = load(tmp_path / "files"), load(tmp_path / "cached")
    for name, value in a["model"].items():
        torch.testing.assert_close(
            b["model"][name], value, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}"
        )
    assert a["history"][0]["score"] == pytest.approx(b["history"][0]["score"], abs=1e-6)


def test_cached_batches_normalise_exactly_as_the_file_transform(small_root, tmp_path):
    rows = [
        (small_root, dict(img_path=r, text="t", m1=0, m2=3, label=1)) for r in rels_of(small_root)
    ]
    prompts = PromptTable(rows, lambda texts: None)
    files = collate([SketchPhotoDataset(rows, EVAL_TF, prompts)[i] for i in range(len(rows))])
    ds = image_dataset(rows, EVAL_TF, prompts, str(tmp_path / "c"), progress=False)
    cached = collate([ds[i] for i in range(len(rows))])
    assert cached["image"].dtype == torch.uint8 and cached["image"].shape == (len(rows), 3, 64, 64)
    torch.testing.assert_close(
        model_input(cached["image"], EVAL_TF), files["image"], atol=1e-6, rtol=0
    )
    assert any(w[4] == 1 for w in ds.where) and any(
        w[4] == 3 for w in ds.where
    )  # grey sketches: 1 channel


def test_a_changed_image_rebuilds_only_its_shard(small_root, tmp_path):
    cache = built(tmp_path, small_root)
    shards = {p.name: p.stat().st_mtime_ns for p in cache.dir.glob("*.u8")}
    rel = rels_of(small_root)[0]
    (small_root / rel).write_bytes((small_root / rels_of(small_root)[-1]).read_bytes())
    again = ImageCache.at(tmp_path / "cache", small_root, pixel_ops(EVAL_TF))
    rebuilt, total = again.build(rels_of(small_root), progress=False)
    assert (rebuilt, total) == (1, len(shards))
    changed = [p.name for p in cache.dir.glob("*.u8") if p.stat().st_mtime_ns != shards[p.name]]
    assert len(changed) == 1
    np.testing.assert_array_equal(
        cached_pixels(again, rel)[..., 0], decode(small_root / rel, again.ops)[..., 0]
    )


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_is_detected_and_rebuilt(small_root, tmp_path, caplog, damage):
    cache = built(tmp_path, small_root)
    rel = rels_of(small_root)[3]
    shard = Path(cache.table()[rel][0])
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data if damage == "flip" else data[:-10]))
    again = ImageCache.at(tmp_path / "cache", small_root, pixel_ops(EVAL_TF))
    assert len(again.check(rels_of(small_root))) == 1
    assert "damaged" in caplog.text or "bytes, not" in caplog.text
    assert again.build(rels_of(small_root), progress=False)[0] == 1
    a = cached_pixels(again, rel)
    np.testing.assert_array_equal(a, decode(small_root / rel, again.ops)[..., : a.shape[2]])


def test_another_geometry_never_reads_this_cache(small_root, tmp_path, caplog):
    cache = built(tmp_path, small_root)
    other = ImageCache.at(
        tmp_path / "cache", small_root, pixel_ops(open_clip.image_transform(48, is_train=False))
    )
    assert other.dir != cache.dir and len(other.check(rels_of(small_root))) > 0
    header = cache.dir / "cache.json"  # a cache folder whose header names another geometry
    header.write_text(header.read_text().replace("size=64", "size=96"))
    again = ImageCache.at(tmp_path / "cache", small_root, pixel_ops(EVAL_TF))
    assert again.build(rels_of(small_root), progress=False)[0] == len(list(cache.dir.glob("*.u8")))
    assert "was built for" in caplog.text and "size=96" in caplog.text
    assert "size=64" in header.read_text()


def test_a_full_disk_leaves_no_shard_that_is_read_later(small_root, tmp_path, monkeypatch):
    real, bad = dc.decode, rels_of(small_root)[5]

    def disk_full(path, ops):
        if str(path).endswith(bad):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, ops)

    monkeypatch.setattr(dc, "decode", disk_full)
    with pytest.raises(
        UserError, match="could not write the image cache.*No space left.*dataset.cache="
    ):
        built(tmp_path, small_root)
    cache = ImageCache.at(tmp_path / "cache", small_root, pixel_ops(EVAL_TF))
    assert not list(cache.dir.glob(".*.tmp"))
    stale = cache.check(rels_of(small_root))
    assert bad.rpartition("/")[0] in {folder for folder, _, _ in stale.values()}
    assert bad not in cache.table()
    monkeypatch.setattr(dc, "decode", real)
    assert cache.build(rels_of(small_root), progress=False)[0] == len(stale)
    assert bad in cache.table()


def test_ctrl_c_while_building_stops_every_thread_and_leaves_only_whole_shards(
    small_root, tmp_path, monkeypatch
):
    """The build runs in threads (a forked pool can deadlock in a process that has threads): a
    Ctrl-C in one stops the others at their next image, and no half shard or sidecar is left."""
    real, rels = dc.decode, rels_of(small_root)
    bad, decoded = rels[3], []

    def interrupted(path, ops):
        decoded.append(path)
        if str(path).endswith(bad):
            raise KeyboardInterrupt
        return real(path, ops)

    monkeypatch.setattr(dc, "SHARD_IMAGES", 1)  # one image a shard: many jobs for the threads
    monkeypatch.setattr(dc, "decode", interrupted)
    cache = ImageCache.at(tmp_path / "cache", small_root, pixel_ops(EVAL_TF))
    with pytest.raises(KeyboardInterrupt):
        cache.build(rels, workers=2, progress=False)
    assert len(decoded) < len(rels)  # the queued shards never started
    assert not list(cache.dir.glob(".*.tmp"))
    sidecars = {p.stem for p in cache.dir.glob("*.json")} - {"cache"}
    assert sidecars <= {
        p.stem for p in cache.dir.glob("*.u8")
    }  # a sidecar only after its whole shard
    fresh = ImageCache.at(tmp_path / "cache", small_root, pixel_ops(EVAL_TF))
    stale = fresh.check(rels)
    assert bad not in fresh.table() and len(fresh.table()) + len(stale) == len(rels)
    monkeypatch.setattr(dc, "decode", real)
    assert fresh.build(rels, progress=False)[0] == len(stale)
    for rel in rels:
        want = decode(small_root / rel, pixel_ops(EVAL_TF))
        assert np.array_equal(np.broadcast_to(cached_pixels(fresh, rel), want.shape), want)


def writable(folder):
    try:
        (folder / "probe").mkdir()
    except OSError:
        return False
    (folder / "probe").rmdir()
    return True


def test_a_read_only_cache_folder_is_one_clear_error(small_root, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    ro = next(
        (p for p in (tmp_path / "ro", Path("/sys/ma-sbir-cache-test")) if not writable(p)), None
    )
    if ro is None:
        pytest.skip("no read-only folder here (root ignores permissions)")
    rows = [
        (small_root, dict(img_path=r, text="t", m1=0, m2=3, label=1)) for r in rels_of(small_root)
    ]
    with pytest.raises(UserError, match=f"could not write the image cache in {ro}.*writable"):
        image_dataset(rows, EVAL_TF, PromptTable(rows, lambda t: None), str(ro), progress=False)


def test_augmented_training_reads_a_larger_cache(small_root, tmp_path, capsys):
    train_tf = open_clip.image_transform(64, is_train=True)
    argv = [
        "dataset=demo",
        "model=tiny",
        f"dataset.root={small_root}",
        f"dataset.cache={tmp_path / 'c'}",
    ]
    assert dc.main(argv) == 0
    assert "73px-" in capsys.readouterr().out  # 64 px x 8/7 for the augmenting crop
    rows = [
        (small_root, dict(img_path=r, text="t", m1=0, m2=3, label=1)) for r in rels_of(small_root)
    ]
    ds = image_dataset(rows, train_tf, PromptTable(rows, lambda t: None), False, progress=False)
    assert isinstance(
        ds, SketchPhotoDataset
    )  # dataset.cache=false, and no cache in the default place
    ds = image_dataset(
        rows, train_tf, PromptTable(rows, lambda t: None), str(tmp_path / "c"), progress=False
    )
    assert isinstance(ds, CachedDataset) and ds.cached == len(rows) and ds.augment is not None
    assert ds[0][0].shape == (3, 64, 64) and ds[0][0].dtype == torch.uint8
    assert cache_ops(pixel_ops(train_tf)).transforms[0].size == 73


def test_data_check_does_not_decode_cached_images_again(small_root, tmp_path, monkeypatch):
    dcfg = OmegaConf.create(
        dict(
            train_idx=["demo"],
            test_idx="demo",
            root=str(small_root),
            cls_ratio=1.0,
            csv={},
            cache=str(tmp_path / "c"),
        )
    )
    decoded = []
    monkeypatch.setattr(check, "unreadable", lambda path, max_pixels: decoded.append(path))
    check.check_dataset(dcfg, progress=False)
    assert len(decoded) == len(rels_of(small_root))
    rows = [(small_root, dict(img_path=r)) for r in rels_of(small_root)]
    ImageCache.at(tmp_path / "c", small_root, pixel_ops(EVAL_TF)).build(
        [r["img_path"] for _, r in rows], progress=False
    )
    changed = small_root / rels_of(small_root)[0]
    changed.touch()
    decoded.clear()
    check.check_dataset(dcfg, progress=False)
    assert sorted(Path(p) for p in decoded) == sorted(
        changed.parent.iterdir()
    )  # that image's shard only


def test_an_unreadable_image_while_caching_is_named(small_root, tmp_path):
    bad = small_root / rels_of(small_root)[2]
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match=f"cannot read image {bad}.*python -m data.check"):
        built(tmp_path, small_root)
    assert not list((tmp_path / "cache").rglob("*.tmp"))
