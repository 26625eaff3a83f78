"""The image cache built by two builders at once, by another machine on a shared folder, and with an
image changed while its shard is decoded: nobody's file is deleted and no stale pixel is read."""

import os
import threading
import time

import numpy as np
import pytest

import data.cache as dc
from data.cache import ImageCache, pixel_ops
from data.demo import generate
from tests.test_cache import EVAL_TF, cached_pixels, rels_of
from runtime import io


@pytest.fixture
def small_root(tmp_path):
    return generate(tmp_path / "demo", n_photo=2, n_sketch=2)


def cache_of(tmp_path, root):
    return ImageCache.at(tmp_path / "cache", root, pixel_ops(EVAL_TF))


def assert_pixels_of_the_files(cache, root):
    for rel in rels_of(root):
        want = dc.decode(root / rel, cache.ops)
        assert np.array_equal(np.broadcast_to(cached_pixels(cache, rel), want.shape), want), rel


def test_two_builders_of_one_cache_folder_at_once_both_finish_and_agree(
    small_root, tmp_path, monkeypatch
):
    """Two builds of the same shards side by side (two jobs sharing dataset.cache): each renames
    whole shards over the other's, and the cache they leave is fresh and right."""
    real = dc.decode
    monkeypatch.setattr(dc, "SHARD_IMAGES", 1)
    monkeypatch.setattr(dc, "decode", lambda path, ops: time.sleep(0.005) or real(path, ops))
    results, errors = [], []

    def build():
        try:
            results.append(
                cache_of(tmp_path, small_root).build(rels_of(small_root), workers=2, progress=False)
            )
        except Exception as e:  # reported below
            errors.append(e)

    builders = [threading.Thread(target=build) for _ in range(2)]
    for b in builders:
        b.start()
    for b in builders:
        b.join()
    assert not errors and len(results) == 2
    fresh = cache_of(tmp_path, small_root)
    assert fresh.check(rels_of(small_root)) == {}
    assert not list(fresh.dir.glob(".*.tmp"))
    assert_pixels_of_the_files(fresh, small_root)


def test_another_machines_shard_in_progress_is_left_alone(tmp_path):
    """On a folder shared between machines, a temporary file of a process id that is not running
    here may be another machine's write in progress: only this machine's dead writers' are
    removed."""
    path = tmp_path / "abc-0.u8"
    dead = 2**22 + 12345  # above Linux's pid_max: never a running process here
    assert not io._alive(dead)
    other = tmp_path / f".abc-0.u8.{dead}-{'other_host'}.x1.tmp"
    mine = tmp_path / f".abc-0.u8.{dead}-{io.HOST}.x2.tmp"
    older = tmp_path / f".abc-0.u8.{dead}.x3.tmp"  # named before host names were added
    for p in (other, mine, older):
        p.write_bytes(b"half a shard")
    with io.atomic_path(path) as tmp:
        assert io.HOST in tmp.name and f".{os.getpid()}-" in tmp.name
        tmp.write_bytes(b"whole")
    assert other.exists() and not mine.exists() and not older.exists()
    assert path.read_bytes() == b"whole"


def test_an_image_changed_while_its_shard_is_built_is_rebuilt_next_time(
    small_root, tmp_path, monkeypatch
):
    """The sidecar keeps the image's size and mtime from before its decode: an image replaced
    during the build makes its shard stale, never a shard of the old pixels taken as fresh."""
    rels = rels_of(small_root)
    changed, replacement = small_root / rels[0], (small_root / rels[-1]).read_bytes()
    real = dc.decode

    def decode_then_change(path, ops):
        pixels = real(path, ops)
        if path == changed and changed.read_bytes() != replacement:
            changed.write_bytes(replacement)
            os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
        return pixels

    monkeypatch.setattr(dc, "decode", decode_then_change)
    cache_of(tmp_path, small_root).build(rels, workers=2, progress=False)
    monkeypatch.setattr(dc, "decode", real)
    again = cache_of(tmp_path, small_root)
    stale = again.check(rels)
    assert [folder for folder, _, _ in stale.values()] == [rels[0].rpartition("/")[0]]
    assert again.build(rels, progress=False)[0] == 1
    assert_pixels_of_the_files(again, small_root)


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_shards_finished_before_a_stop_keep_their_sidecars(
    small_root, tmp_path, monkeypatch, error
):
    """The first shard is slow and then fails (Ctrl-C, a disk error) after the other thread has
    finished three shards: those three are kept, and the next build makes only the rest."""
    rels = rels_of(small_root)
    first, real, done = rels[0], dc.decode, threading.Event()
    decoded = []

    def slow_first(path, ops):
        if str(path).endswith(first):
            assert done.wait(10)
            time.sleep(0.5)  # the third shard's file is renamed into place meanwhile
            raise error("stopped")
        pixels = real(path, ops)
        decoded.append(path)
        if len(decoded) == 3:
            done.set()
        return pixels

    monkeypatch.setattr(dc, "SHARD_IMAGES", 1)
    monkeypatch.setattr(dc, "decode", slow_first)
    with pytest.raises((error, dc.UserError)):
        cache_of(tmp_path, small_root).build(rels, workers=2, progress=False)
    monkeypatch.setattr(dc, "decode", real)
    again = cache_of(tmp_path, small_root)
    assert len(again.check(rels)) <= len(rels) - 3
    assert not list(again.dir.glob(".*.tmp"))
    assert_pixels_of_the_files(again.build(rels, progress=False) and again, small_root)


def test_a_failing_shard_stops_the_others_at_their_next_image(small_root, tmp_path, monkeypatch):
    """One shard fails while another thread is half-way through its shard: that thread stops
    before its next image (a 1,024-image shard would otherwise decode on) and leaves no
    temporary."""
    folders = sorted({rel.rpartition("/")[0] for rel in rels_of(small_root)})[:2]
    failing, other = (
        [rel for rel in rels_of(small_root) if rel.rpartition("/")[0] == f] for f in folders
    )
    assert len(other) >= 2
    stops, decoded, first_done = [], [], threading.Event()
    real_write, real_decode = dc.write_shard, dc.decode

    def write_shard(job, stop=None):
        stops.append(stop)
        return real_write(job, stop)

    def decode(path, ops):
        if path == small_root / failing[0]:
            assert first_done.wait(10)
            raise OSError("a disk error")
        decoded.append(path)
        first_done.set()
        assert stops[0].wait(10)  # the build has stopped
        return real_decode(path, ops)

    monkeypatch.setattr(dc, "write_shard", write_shard)
    monkeypatch.setattr(dc, "decode", decode)
    with pytest.raises(dc.UserError, match="could not write the image cache .*a disk error"):
        cache_of(tmp_path, small_root).build(failing + other, workers=2, progress=False)
    assert decoded == [small_root / other[0]]
    assert not list((tmp_path / "cache").rglob(".*.tmp"))
