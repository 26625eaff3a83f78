"""Gallery index and search: results against brute force, incremental updates, resume, rebuild on a
new checkpoint, the lock, HNSW, and each bad input of search.py."""

import fcntl
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from gallery.index import INDEX_FILE, index_folder, load_index, update_index
from gallery.search import Searcher, load_query_image, search
from tests.conftest import REPO
from tests.search_fixtures import make_gallery, random_run, search_cfg
from runtime.errors import UserError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return random_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def gallery(tmp_path, demo_root):
    return make_gallery(tmp_path / "photos", demo_root)


class Counting(torch.nn.Module):
    """Wraps a model and counts the images it embeds; raises KeyboardInterrupt after `stop_after`
    batches."""

    def __init__(self, model, stop_after=None):
        super().__init__()
        self.model, self.images, self.batches, self.stop_after = model, 0, 0, stop_after

    def encode_image(self, x):
        if self.stop_after is not None and self.batches == self.stop_after:
            raise KeyboardInterrupt
        self.images += len(x)
        self.batches += 1
        return self.model.encode_image(x)


def index(searcher, folder, stop_after=None, batch_size=4, checkpoint=None):
    model = Counting(searcher.model, stop_after)
    g = update_index(
        model,
        searcher.transform,
        searcher.device,
        folder,
        searcher.gallery.root,
        checkpoint or searcher.checkpoint,
        batch_size,
        0,
        "fp32",
        save_every_s=0,
        progress=False,
        dim=searcher.model.modes.embedding_dim,
    )
    return g, model.images


def test_photo_query_finds_itself_and_ranking_is_brute_force(run, gallery, tmp_path, capsys):
    photo = gallery / "kite" / sorted(os.listdir(gallery / "kite"))[2]
    hits = search(
        search_cfg(
            run,
            gallery,
            f"query={photo}",
            "query_modality=photo",
            "query_mode=original",
            "k=5",
            f"out={tmp_path / 'out'}",
        )
    )
    assert hits[0].path == "kite/" + photo.name and hits[0].score == pytest.approx(1.0, abs=1e-5)
    g = load_index(index_folder(run, gallery), gallery)
    q = g.vectors[g.paths.index(hits[0].path)]
    expected = np.argsort(-(g.vectors @ q), kind="stable")[:5]
    assert [h.path for h in hits] == [g.paths[i] for i in expected]
    printed = capsys.readouterr().out
    assert len(re.findall(r"^\s+\d+\s+\d\.\d{4}\s+\S+$", printed, flags=re.M)) == 5
    page = (tmp_path / "out" / "results.html").read_text()
    assert re.findall(r"data-path='([^']+)'", page) == [h.path for h in hits]
    assert page.count("data:image/jpeg;base64,") == 6  # the query and 5 hits


def test_text_and_converted_queries(run, gallery):
    s = Searcher(search_cfg(run, gallery), progress=False)
    for mode in ("original", "converted"):
        q = s.embed_text("a photo of a kite.", mode)
        hits = s.search(q, 24)
        scores = s.gallery.vectors @ q
        assert [h.score for h in hits] == pytest.approx(sorted(scores, reverse=True), abs=1e-5)
    sketch = Image.new("RGB", (64, 64), "white")
    sketch.paste((0, 0, 0), (10, 10, 50, 14))
    z = {m: s.embed_image(sketch, "sketch", m) for m in ("original", "converted")}
    expected = s.model.convert(torch.from_numpy(z["original"])[None], torch.tensor([1]))[
        0, 0
    ]  # sketch -> photo
    np.testing.assert_allclose(z["converted"], expected.detach().numpy(), atol=1e-5)
    assert not np.allclose(z["converted"], z["original"], atol=1e-3)


@pytest.mark.slow
def test_index_updates_only_new_and_changed_files_and_drops_deleted(
    run, gallery, tmp_path, demo_root
):
    s = Searcher(search_cfg(run, gallery), progress=False)
    folder = tmp_path / "idx"
    g0, n = index(s, folder)
    assert n == 24 and len(g0.paths) == 24
    before = dict(zip(g0.paths, g0.vectors))
    os.remove(gallery / "sun" / sorted(os.listdir(gallery / "sun"))[0])
    changed = gallery / "kite" / sorted(os.listdir(gallery / "kite"))[0]
    shutil.copy(demo_root / "photo" / "tent" / "tent_000.jpg", changed)
    (gallery / "new" / "deeper").mkdir(parents=True)
    shutil.copy(demo_root / "photo" / "tent" / "tent_001.jpg", gallery / "new" / "deeper" / "t.png")
    g1, n = index(s, folder)
    assert n == 2 and len(g1.paths) == 24
    assert "new/deeper/t.png" in g1.paths and not any(p.startswith("sun/sun_000") for p in g1.paths)
    after = dict(zip(g1.paths, g1.vectors))
    rel = f"kite/{changed.name}"
    assert not np.allclose(after[rel], before[rel])
    assert all(np.array_equal(after[p], before[p]) for p in after if p in before and p != rel)
    assert index(s, folder)[1] == 0  # nothing changed: nothing embedded


@pytest.mark.slow
def test_interrupted_build_resumes_where_it_stopped(run, gallery, tmp_path):
    s = Searcher(search_cfg(run, gallery), progress=False)
    with pytest.raises(KeyboardInterrupt):
        index(s, tmp_path / "idx", stop_after=3)
    partial = load_index(tmp_path / "idx", gallery)
    assert len(partial.paths) == 12  # 3 batches of 4 were kept
    g, n = index(s, tmp_path / "idx")
    assert n == 12 and sorted(g.paths) == sorted(s.gallery.paths)
    full = dict(zip(s.gallery.paths, s.gallery.vectors))
    assert all(np.allclose(v, full[p], atol=1e-6) for p, v in zip(g.paths, g.vectors))


@pytest.mark.slow
def test_new_checkpoint_rebuilds(run, gallery, tmp_path):
    s = Searcher(search_cfg(run, gallery), progress=False)
    index(s, tmp_path / "idx")
    other = random_run(tmp_path / "other", seed=1) / "model" / "best.pth"
    g, n = index(s, tmp_path / "idx", checkpoint=other)
    assert n == 24 and len(g.paths) == 24


@pytest.mark.slow
def test_second_indexer_gets_a_clear_error_and_the_index_stays_whole(run, gallery, tmp_path):
    s = Searcher(search_cfg(run, gallery), progress=False)
    folder = tmp_path / "idx"
    index(s, folder)
    shutil.copy(gallery / "sun" / sorted(os.listdir(gallery / "sun"))[0], gallery / "extra.jpg")
    with open(folder / ".lock", "a") as held:  # another indexer holds the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="gallery .* is in use: .* is indexing it right now"):
            index(s, folder)
    assert len(load_index(folder, gallery).paths) == 24
    assert len(index(s, folder)[0].paths) == 25


def test_hnsw_agrees_with_exact_and_saves_its_graph(run, gallery):
    exact = Searcher(search_cfg(run, gallery), progress=False)
    hnsw = Searcher(search_cfg(run, gallery, "index.kind=hnsw"), progress=False)
    graphs = list(index_folder(run, gallery).glob("hnsw-*.faiss"))
    assert len(graphs) == 1
    for p in exact.gallery.paths[:5]:
        q = exact.gallery.vectors[exact.gallery.paths.index(p)]
        assert hnsw.search(q, 1)[0].path == exact.search(q, 1)[0].path == p


def test_unreadable_images_are_skipped_counted_and_listed(run, gallery, tmp_path, capsys):
    (gallery / "broken.jpg").write_bytes(b"not a jpeg")
    (gallery / "notes.txt").write_text("ignored: not an image extension")
    query = gallery / "kite" / sorted(os.listdir(gallery / "kite"))[0]
    search(search_cfg(run, gallery, f"query={query}", f"out={tmp_path}"))
    out = capsys.readouterr().out
    assert "1 unreadable image(s) skipped:" in out and "broken.jpg: UnidentifiedImageError" in out
    assert "broken.jpg" in (tmp_path / "results.html").read_text()
    assert "top 10 of 24 photos" in out


BAD_INPUT = {
    "not_image": "is not an image that can be read",
    "blank": "blank .*draw something first",
    "no_images": "holds no images",
    "all_unreadable": "none of the 1 images under gallery folder .* could be read",
    "no_checkpoint": "holds no trained model: train first",
    "both": "give exactly one query",
    "bad_mode": "query_mode='sideways' must be one of original, converted",
    "bad_modality": "query_modality='drawing' must be one of sketch, photo",
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_one_clear_message(case, run, gallery, tmp_path):
    query = gallery / "kite" / sorted(os.listdir(gallery / "kite"))[0]
    args = [f"query={query}", f"out={tmp_path / 'out'}"]
    path, folder = run, gallery
    if case == "not_image":
        (tmp_path / "q.png").write_text("hello")
        args[0] = f"query={tmp_path / 'q.png'}"
    elif case == "blank":
        Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(tmp_path / "blank.png")
        args[0] = f"query={tmp_path / 'blank.png'}"
    elif case == "no_images":
        folder = tmp_path / "empty"
        (folder / "sub").mkdir(parents=True)
    elif case == "all_unreadable":
        folder = tmp_path / "bad"
        folder.mkdir()
        (folder / "x.png").write_bytes(b"\x89PNG broken")
    elif case == "no_checkpoint":
        path = tmp_path / "untrained"
        (path / "model").mkdir(parents=True)
    elif case == "both":
        args.append("text=kite")
    elif case == "bad_mode":
        args.append("query_mode=sideways")
    elif case == "bad_modality":
        args.append("query_modality=drawing")
    with pytest.raises(UserError, match=BAD_INPUT[case]):
        search(search_cfg(path, folder, *args))


def test_read_only_run_folder_puts_the_index_in_the_cache(
    run, gallery, tmp_path, monkeypatch, caplog
):
    import gallery.index as gallery_module

    monkeypatch.setattr(gallery_module, "_writable", lambda folder: False)  # root ignores chmod
    monkeypatch.setattr(gallery_module.log, "propagate", True)
    monkeypatch.setattr(gallery_module.log, "disabled", False)
    s = Searcher(search_cfg(run, gallery, f"index.cache_dir={tmp_path / 'cache'}"), progress=False)
    assert s.gallery.folder.is_relative_to(tmp_path / "cache")
    assert (s.gallery.folder / INDEX_FILE).is_file()
    assert (
        f"is read-only: the index of {gallery.resolve()} is stored in {s.gallery.folder}"
        in caplog.text
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_read_only_run_folder_for_real(run, gallery, tmp_path):
    ro = tmp_path / "ro"
    shutil.copytree(run, ro)
    os.chmod(ro, 0o555)
    try:
        s = Searcher(
            search_cfg(ro, gallery, f"index.cache_dir={tmp_path / 'cache'}"), progress=False
        )
        assert s.gallery.folder.is_relative_to(tmp_path / "cache")
    finally:
        os.chmod(ro, 0o755)


def test_query_image_with_transparency_is_flattened_on_white(tmp_path):
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    im.putpixel((1, 1), (0, 0, 0, 255))
    im.save(tmp_path / "s.png")
    rgb = load_query_image(tmp_path / "s.png")
    assert (
        rgb.mode == "RGB"
        and rgb.getpixel((0, 0)) == (255, 255, 255)
        and rgb.getpixel((1, 1)) == (0, 0, 0)
    )


@pytest.mark.slow
def test_cli_reports_bad_query_and_exits_1(run, gallery, tmp_path):
    (tmp_path / "q.jpg").write_text("text, not pixels")
    proc = subprocess.run(
        [
            sys.executable,
            "search.py",
            f"path={run}",
            f"gallery={gallery}",
            f"query={tmp_path / 'q.jpg'}",
            "device=cpu",
            "num_workers=0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: query file {tmp_path / 'q.jpg'} is not an image")
    )
