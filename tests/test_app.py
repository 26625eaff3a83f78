"""The search web app, served by app.py in a subprocess: driven in headless Chromium (draw, press
Search) and through gradio_client; results must match the search library on the same query."""

import os
import subprocess

import pytest
from PIL import Image

from gallery.search import Searcher, search
from tests.conftest import REPO
from tests.search_fixtures import make_gallery, search_cfg, start_app, trained_run

CHROMIUM = "/usr/bin/chromium"
K = 5


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_root):
    tmp = tmp_path_factory.mktemp("app")
    run = trained_run(tmp / "run", demo_root)
    gallery = make_gallery(tmp / "photos", demo_root)
    (gallery / "broken.jpg").write_bytes(b"not a jpeg")
    proc, url, _ = start_app(run, gallery, f"k={K}", f"save_queries={tmp / 'queries'}")
    library = Searcher(search_cfg(run, gallery, name="config-app"), progress=False)
    yield dict(url=url, library=library, queries=tmp / "queries", tmp=tmp, run=run, gallery=gallery)
    proc.terminate()
    proc.wait(timeout=30)


def caption_path(caption):
    """'1. 0.734  kite/kite_003.jpg' -> 'kite/kite_003.jpg'"""
    return caption.split(None, 2)[2]


def caption_score(caption):
    return float(caption.split(None, 2)[1])


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)"
)
def test_draw_and_search_in_a_real_browser(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 950})
        page.goto(app["url"])
        page.wait_for_selector("#search")
        assert "1 unreadable image(s) in the folder were skipped" in page.inner_text("body")
        page.click("#search")  # nothing drawn yet
        page.get_by_text("draw something first").first.wait_for(timeout=20000)

        page.get_by_role("button", name="Brush").click()
        box = page.locator("#canvas canvas").first.bounding_box()
        x, y, w, h = box["x"], box["y"], box["width"], box["height"]
        for stroke in (((0.2, 0.8), (0.5, 0.2), (0.8, 0.8)), ((0.3, 0.55), (0.7, 0.55))):
            page.mouse.move(x + w * stroke[0][0], y + h * stroke[0][1])
            page.mouse.down()
            for (ax, ay), (bx, by) in zip(stroke, stroke[1:]):
                for t in range(1, 16):
                    page.mouse.move(
                        x + w * (ax + (bx - ax) * t / 15), y + h * (ay + (by - ay) * t / 15)
                    )
            page.mouse.up()
        page.click("#search")
        page.wait_for_function(
            f"document.querySelectorAll('#results img').length == {K}", timeout=30000
        )
        page.get_by_text(f"Top {K} of 24 photos").wait_for(timeout=10000)
        captions = page.locator("#results .caption-label").all_inner_texts()
        page.screenshot(path=str(app["tmp"] / "app.png"))
        browser.close()

    drawn = Image.open(app["queries"] / "last-query.png")
    pixels = drawn.convert("L").getextrema()
    assert pixels[0] < 50 and pixels[1] == 255, "the app received the strokes on a white canvas"
    hits = app["library"].search(app["library"].embed_image(drawn, "sketch", "converted"), K)
    assert len(captions) == K
    assert caption_path(captions[0]) == hits[0].path
    assert [caption_path(c) for c in captions] == [h.path for h in hits]


@pytest.mark.slow
def test_gradio_client_words_upload_and_empty_canvas(app, demo_root):
    from gradio_client import Client, handle_file

    client = Client(app["url"], verbose=False)
    lib = app["library"]
    items, status = client.predict(
        "words", None, None, "sketch", "a photo of a kite.", "converted", 3, api_name="/search"
    )
    assert [caption_path(i["caption"]) for i in items] == [
        h.path for h in lib.search(lib.embed_text("a photo of a kite.", "converted"), 3)
    ]
    assert (
        all(os.path.isfile(i["image"]) for i in items) and "1 unreadable image(s) skipped" in status
    )

    sketch = demo_root / "sketch" / "sun" / "sun_000-1.png"
    items, _ = client.predict(
        "upload", None, handle_file(str(sketch)), "sketch", "", "original", K, api_name="/search"
    )
    with Image.open(sketch) as im:
        expected = lib.search(lib.embed_image(im, "sketch", "original"), K)
    assert [caption_path(i["caption"]) for i in items] == [h.path for h in expected]

    with pytest.raises(Exception, match="draw something first"):
        client.predict("draw", None, None, "sketch", "", "converted", K, api_name="/search")
    with pytest.raises(Exception, match="no image uploaded: upload a sketch or a photo first"):
        client.predict("upload", None, None, "photo", "", "converted", K, api_name="/search")


def test_uploaded_photo_is_embedded_as_a_photo_like_search_py(app, demo_root, tmp_path):
    from gradio_client import Client, handle_file

    photo = sorted((demo_root / "photo" / "kite").iterdir())[-1]  # not one of the gallery's photos
    assert not (app["gallery"] / "kite" / photo.name).exists()
    client = Client(app["url"], verbose=False)
    as_photo, status = client.predict(
        "upload", None, handle_file(str(photo)), "photo", "", "converted", K, api_name="/search"
    )
    as_sketch, _ = client.predict(
        "upload", None, handle_file(str(photo)), "sketch", "", "converted", K, api_name="/search"
    )
    cli = search(
        search_cfg(
            app["run"],
            app["gallery"],
            f"query={photo}",
            "query_modality=photo",
            "query_mode=converted",
            f"k={K}",
            f"out={tmp_path}",
        )
    )
    assert "the uploaded photo" in status
    assert caption_path(as_photo[0]["caption"]) == cli[0].path
    assert caption_score(as_photo[0]["caption"]) == pytest.approx(cli[0].score, abs=2e-3)
    photo_scores = [caption_score(i["caption"]) for i in as_photo]
    sketch_scores = [caption_score(i["caption"]) for i in as_sketch]
    assert max(abs(a - b) for a, b in zip(photo_scores, sketch_scores)) > 0.01, (
        "the choice changes the query"
    )


def test_make_app_without_a_demo_run_says_to_run_make_demo(tmp_path):
    for name in ("Makefile", "requirements.txt", "requirements-test.txt"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".installed").touch()  # installed: make goes straight to the app recipe
    proc = subprocess.run(
        ["make", "-s", "app"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "error: no trained demo run under outputs/demo/: run make demo first" in proc.stderr
