"""What the app exposes: only result thumbnails it writes itself, never a file of the gallery
folder; nothing to a request with a foreign Host (DNS rebinding); uploads limited in size and
removed with the app's own temporary folder when it stops."""

import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.search_fixtures import make_gallery, random_run, start_app

pytestmark = pytest.mark.slow  # starts app.py in a process of its own


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_root):
    tmp = tmp_path_factory.mktemp("app-security")
    run = random_run(tmp / "run")
    gallery = make_gallery(tmp / "photos", demo_root, classes=("kite", "sun"), n=3)
    (gallery / "notes.txt").write_text("secret notes\n")
    (gallery / ".git").mkdir()
    (gallery / ".git" / "config").write_text("[core] secret\n")
    proc, url, serving = start_app(run, gallery, "max_upload_mb=1")
    own = Path(re.search(r"thumbnails in (\S+),", serving).group(1))
    yield dict(url=url, port=urllib.parse.urlsplit(url).port, gallery=gallery, proc=proc, own=own)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)


def fetch(url, headers=None, data=None):
    req = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_no_file_route_serves_a_file_of_the_gallery_folder(app):
    g = app["gallery"]
    photo = next((g / "kite").iterdir())
    targets = [g / "notes.txt", g / ".git" / "config", photo]
    for target in targets:
        for route in (
            "gradio_api/file=",
            "file=",
            "gradio_api/file/",
            "gradio_api/files/",
            "files/",
            "gradio_api/static/",
            "static/",
            "gradio_api/file%3D",
        ):
            forms = (
                str(target),
                str(target.relative_to(g)),
                f"{g}/./{target.name}",
                urllib.parse.quote(str(target)),
            )
            for form in forms:
                status, body, _ = fetch(app["url"] + route + form)
                assert b"secret" not in body, (route, form)
                assert status != 200 or target.read_bytes() not in body, (route, form, status)


def test_search_results_come_back_as_thumbnails(app):
    from gradio_client import Client

    client = Client(app["url"], verbose=False)
    items, status = client.predict(
        "words", None, None, "sketch", "a kite", "converted", 3, api_name="/search"
    )
    assert len(items) == 3 and "Top 3 of 6 photos" in status
    for item in items:
        assert Path(item["image"]).is_file()  # downloaded through the app: served to the page


def test_a_foreign_host_is_refused_without_an_allow_origin_header(app):
    status, body, headers = fetch(
        app["url"] + "config", headers={"Host": "evil.example", "Origin": "http://evil.example"}
    )
    assert status == 403 and b"not this app's address" in body
    assert not any(k.lower() == "access-control-allow-origin" for k in headers)
    status, _, _ = fetch(app["url"] + "config", headers={"Host": f"localhost:{app['port']}"})
    assert status == 200


@pytest.mark.parametrize("megabytes", [2, 50])  # just over max_upload_mb=1, and far over
def test_an_upload_over_the_limit_is_refused(app, megabytes):
    boundary = "xyzzy"
    payload = os.urandom(megabytes * 2**20)
    data = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + payload
        + (f"\r\n--{boundary}--\r\n").encode()
    )
    try:
        status, body, _ = fetch(
            app["url"] + "gradio_api/upload",
            data=data,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    except urllib.error.URLError as e:  # refused from its size before the body was read
        assert isinstance(e.reason, (ConnectionResetError, BrokenPipeError)), e
        status, body = 413, b"connection closed by the server"
    assert status in (400, 413), (status, body[:200])
    assert not [p for p in app["own"].rglob("big.png")]
    status, _, _ = fetch(app["url"] + "config")  # and the app still serves
    assert status == 200


def test_an_upload_that_is_no_image_gets_the_query_readers_message(app, tmp_path):
    from gradio_client import Client, handle_file

    fake = tmp_path / "sketch.png"
    fake.write_bytes(b"this is no image " * 100)
    client = Client(app["url"], verbose=False)
    with pytest.raises(Exception, match="is not an image that can be read"):
        client.predict(
            "upload", None, handle_file(str(fake)), "sketch", "", "converted", 3, api_name="/search"
        )


def test_the_apps_temporary_folder_is_gone_after_it_stops(app):
    assert app["own"].is_dir()
    app["proc"].terminate()
    app["proc"].wait(timeout=30)
    assert not app["own"].exists()
