"""The gallery index heals and holds: a damaged index.npz is reported in one line and rebuilt,
entries that are not regular image files are skipped and listed (a pipe never hangs the scan), a
photo swapped for another of the same size and time is re-embedded, and the index lock dies with
the process that took it, not with its forked loader workers."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

import gallery.index as gallery_index
from gallery.index import INDEX_FILE, _Images, index_folder
from gallery.search import Searcher
from tests.conftest import REPO
from tests.search_fixtures import make_gallery, random_run, search_cfg
from tests.test_kill_safety import children, flock_is_free, reap, wait_for


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return random_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory, demo_root):
    return make_gallery(tmp_path_factory.mktemp("heal") / "photos", demo_root)


@pytest.fixture(scope="module")
def fresh(run, photos):
    """A Searcher over a freshly built index, and the bytes of that index file."""
    s = Searcher(search_cfg(run, photos), progress=False)
    return s, (s.gallery.folder / INDEX_FILE).read_bytes()


@pytest.fixture
def logged(monkeypatch, caplog):
    monkeypatch.setattr(gallery_index.log, "propagate", True)
    monkeypatch.setattr(gallery_index.log, "disabled", False)
    return caplog


def _rewrite(file, change):
    """Save the arrays of an index file again after `change(arrays)` edits them."""
    with np.load(file) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(file, "wb") as f:
        np.savez(f, **arrays)


def _set_meta(arrays, **values):
    arrays["meta"] = np.array(json.dumps({**json.loads(str(arrays["meta"])), **values}))


def _old_format(arrays):  # an index of the (size, mtime_ns) version, before inode and ctime
    stats = arrays.pop("stats")
    arrays["sizes"], arrays["mtimes"] = stats[:, 0], stats[:, 1]
    meta = json.loads(str(arrays["meta"]))
    del meta["format"]
    arrays["meta"] = np.array(json.dumps(meta))


DAMAGE = {
    "half": (
        lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
        "cut short or corrupt (BadZipFile",
    ),
    "empty": (lambda f: f.write_bytes(b""), "the file is empty"),
    "text": (lambda f: f.write_text("these are notes, not an index\n" * 20), "not an .npz archive"),
    "pickled": (
        lambda f: _rewrite(f, lambda a: a.update(paths=np.array(list(a["paths"]), object))),
        "it holds pickled objects, which are never loaded",
    ),
    "wrong_width": (
        lambda f: _rewrite(f, lambda a: a.update(vectors=a["vectors"][:, :7])),
        "vectors 7 wide, the model's are 128",
    ),
    "missing_key": (lambda f: _rewrite(f, lambda a: a.pop("stats")), "no array stats"),
    "bad_metadata": (
        lambda f: _rewrite(f, lambda a: a.update(meta=np.array("{'checkpoint': "))),
        "its metadata is not a JSON object",
    ),
    "metadata_without_fields": (
        lambda f: _rewrite(f, lambda a: a.update(meta=np.array('{"format": 2}'))),
        "its metadata has no valid checkpoint",
    ),
    "bad_checkpoint_id": (
        lambda f: _rewrite(f, lambda a: _set_meta(a, checkpoint="../best.pth")),
        "its metadata has no valid checkpoint",
    ),
    "fewer_rows_than_paths": (
        lambda f: _rewrite(f, lambda a: a.update(vectors=a["vectors"][:-3])),
        "21 vectors for 24 paths",
    ),
    "fewer_stats_than_paths": (
        lambda f: _rewrite(f, lambda a: a.update(stats=a["stats"][:-1])),
        "stats has shape (23, 4), not (24, 4) whole numbers",
    ),
    "old_format": (lambda f: _rewrite(f, _old_format), "written by an older version of ma-sbir"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_index_is_reported_once_and_rebuilt(case, run, photos, fresh, logged):
    reference, good = fresh
    file = index_folder(run, photos) / INDEX_FILE
    file.write_bytes(good)
    damage, reason = DAMAGE[case]
    damage(file)
    logged.clear()
    s = Searcher(search_cfg(run, photos), progress=False)
    lines = [r.getMessage() for r in logged.records if "is damaged" in r.getMessage()]
    assert len(lines) == 1, lines
    pattern = rf"index {re.escape(str(file))} is damaged \((.+)\); rebuilding it"
    assert re.fullmatch(pattern, lines[0]) and reason in re.fullmatch(pattern, lines[0])[1]
    assert sorted(s.gallery.paths) == sorted(reference.gallery.paths)
    for p in reference.gallery.paths[::5]:
        q = reference.gallery.vectors[reference.gallery.paths.index(p)]
        hits, expected = s.search(q, 5), reference.search(q, 5)
        assert hits[0].path == p and [h.path for h in hits] == [h.path for h in expected]
        assert [h.score for h in hits] == pytest.approx([h.score for h in expected], abs=1e-5)
    logged.clear()
    Searcher(search_cfg(run, photos), progress=False)  # healed: the next start is quiet
    assert not [r for r in logged.records if "is damaged" in r.getMessage()]
    assert not [r for r in logged.records if r.getMessage().startswith("indexing ")]


def test_an_index_with_fewer_rows_than_paths_is_never_saved(run, photos, fresh):
    g = fresh[0].gallery
    before = (g.folder / INDEX_FILE).read_bytes()
    short = gallery_index.Gallery(g.root, g.folder, g.checkpoint, list(g.paths), list(g.stats))
    short.vectors = g.vectors[:-1]
    with pytest.raises(RuntimeError, match="refusing to save a broken index"):
        gallery_index.save_index(short)
    assert (g.folder / INDEX_FILE).read_bytes() == before


@contextmanager
def deadline(seconds):
    """Fail (instead of blocking the test run) when the body takes longer than `seconds`."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_entries_that_are_not_regular_images_are_skipped_and_listed(
    run, tmp_path, demo_root, monkeypatch
):
    folder = tmp_path / "odd"
    folder.mkdir()
    for src in sorted((demo_root / "photo" / "kite").iterdir())[:2]:
        (folder / src.name).write_bytes(src.read_bytes())
    os.symlink("nowhere.jpg", folder / "broken.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.mkfifo(folder / "pipe.jpg")
    os.symlink(os.devnull, folder / "device.png")
    real_walk = os.walk

    def walk_with_a_file_that_vanished(top, *args, **kwargs):
        for dirpath, dirnames, filenames in real_walk(top, *args, **kwargs):
            yield dirpath, dirnames, filenames + ["gone.jpg"]  # listed, then removed

    monkeypatch.setattr(os, "walk", walk_with_a_file_that_vanished)
    with deadline(120):
        s = Searcher(search_cfg(run, folder), progress=False)
        assert _Images(folder, ["pipe.jpg"], None)[0] == (0, None, "not a regular file")
    assert sorted(s.gallery.paths) == sorted(p.name for p in folder.glob("kite_*"))
    assert s.gallery.skipped == {
        "broken.jpg": "broken link",
        "loop.jpg": "link loop",
        "pipe.jpg": "not a regular file",
        "device.png": "not a regular file",
        "gone.jpg": "vanished",
    }
    q = s.gallery.vectors[0]
    assert s.search(q, 5)[0].path == s.gallery.paths[0] and len(s.search(q, 5)) == 2


def test_two_photos_of_equal_size_and_time_swapped_by_mv_are_re_embedded(run, tmp_path, demo_root):
    folder = tmp_path / "swap"
    folder.mkdir()
    for name, cls in (("a.bmp", "kite"), ("b.bmp", "apple")):
        src = sorted((demo_root / "photo" / cls).iterdir())[0]
        with Image.open(src) as im:
            im.convert("RGB").resize((48, 48)).save(folder / name)
    assert (folder / "a.bmp").stat().st_size == (folder / "b.bmp").stat().st_size
    for name in ("a.bmp", "b.bmp"):
        os.utime(folder / name, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    Searcher(search_cfg(run, folder), progress=False)
    os.rename(folder / "a.bmp", folder / "tmp.bmp")
    os.rename(folder / "b.bmp", folder / "a.bmp")
    os.rename(folder / "tmp.bmp", folder / "b.bmp")
    s = Searcher(search_cfg(run, folder), progress=False)
    for name in ("a.bmp", "b.bmp"):
        with Image.open(folder / name) as im:
            hit = s.search(s.embed_image(im, "photo", "original"), 2)[0]
        assert hit.path == name and hit.score == pytest.approx(1.0, abs=1e-5)


HOLDER = """
import multiprocessing, sys, time
from pathlib import Path
import torch
from gallery.index import update_index

class Stuck(torch.nn.Module):  # embeds nothing: holds the lock while its loader workers live
    def encode_image(self, x):
        print(*[p.pid for p in multiprocessing.active_children()], flush=True)
        time.sleep(600)

folder, root, checkpoint = sys.argv[1:]
update_index(Stuck(), lambda im: torch.zeros(3, 8, 8), torch.device("cpu"), Path(folder), root,
             checkpoint, 1, 2, "fp32", progress=False)
"""

SECOND = """
import sys
from pathlib import Path
import torch
from gallery.index import update_index
from runtime.errors import UserError

try:
    update_index(None, None, torch.device("cpu"), Path(sys.argv[1]), sys.argv[2], sys.argv[3])
except UserError as e:
    print(e)
"""


@pytest.mark.slow
def test_the_index_lock_is_in_use_for_a_second_indexer_and_dies_with_its_holder(
    run, photos, tmp_path
):
    folder, ckpt = tmp_path / "idx", run / "model" / "best.pth"
    args = [str(folder), str(photos), str(ckpt)]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        workers = [int(w) for w in holder.stdout.readline().split()]
        assert len(workers) == 2 and set(workers) <= set(children(holder.pid))
        second = subprocess.run(
            [sys.executable, "-c", SECOND, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.stdout.strip() == (
            f"gallery {photos} is in use: process {holder.pid} is indexing it right now (it "
            f"holds the lock {folder / '.lock'}). Wait for it to finish, then run again."
        ), second.stderr[-2000:]
        assert not flock_is_free(folder / ".lock")
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        killed = time.time()
        assert any(os.path.exists(f"/proc/{w}") for w in workers)  # the workers outlive it
        wait_for(lambda: flock_is_free(folder / ".lock"), timeout=0.5)
        assert time.time() - killed < 0.5
    finally:
        reap(holder)
