"""The one image reader (data/image.py) and every path that reads through it: the training
loader, the infer/embed dataset (decoded and cached), the search query, the app's upload and the
gallery index. 16-bit and float images scaled (not white), EXIF orientation applied alike
everywhere, and an image above the pixel limit refused from its header, never decoded."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps
from torchvision import transforms as T

from data.cache import decode
from data.cached import CachedDataset, image_dataset
from data.image import PILLOW_LIMIT, ImageTooLarge, read_image
from data.loader import PromptTable, SketchPhotoDataset, open_image
from gallery.index import update_index
from gallery.search import load_query_image, search
from runtime.errors import UserError, run_cli
from tests.search_fixtures import random_run, search_cfg

HUGE = 20000  # a 20000 x 20000 header: 400,000,000 pixels, above twice Pillow's own limit


# ---------------------------------------------------------------- helpers


def pixels(x):
    """H x W x 3 uint8 of a PIL image, a CHW uint8 tensor or a CHW float tensor in [0, 1]."""
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB"))
    if x.dtype != torch.uint8:
        x = (x * 255).round().to(torch.uint8)
    return x.expand(3, -1, -1).permute(1, 2, 0).numpy()


def rows_of(path):
    row = dict(img_path=path.name, text="a photo of a thing", m1=0, m2=2, label=0)
    return [(path.parent, row)]


def prompts_of(rows):
    return PromptTable(rows, tokenizer=lambda texts: None)


TO_TENSOR = T.Compose([T.ToTensor(), T.Normalize([0.0] * 3, [1.0] * 3)])  # pixels / 255 as-is


def training_loader(path):
    rows = rows_of(path)
    return pixels(SketchPhotoDataset(rows, T.PILToTensor(), prompts_of(rows))[0][0])


def embed_dataset(path, cache=False):
    """The dataset model/embed.py (infer, validation) reads: decoded, or from the image cache."""
    rows = rows_of(path)
    dataset = image_dataset(rows, TO_TENSOR, prompts_of(rows), cache, progress=False)
    assert isinstance(dataset, CachedDataset) == bool(cache)
    return pixels(dataset[0][0])


class Recorder(torch.nn.Module):
    """A stand-in model that keeps every image the indexer gives it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def encode_image(self, x):
        self.seen.extend(x.clone())
        return x.flatten(1)[:, :8].float()


def index_gallery(folder, tmp_path, max_pixels=None):
    (tmp_path / "ckpt.pth").write_bytes(b"a checkpoint")
    model = Recorder()
    g = update_index(
        model,
        T.PILToTensor(),
        torch.device("cpu"),
        tmp_path / "index",
        folder,
        tmp_path / "ckpt.pth",
        batch_size=1,
        num_workers=0,
        precision="fp32",
        progress=False,
        max_pixels=max_pixels,
    )
    return g, model


def app_upload(path, max_pixels=None):
    from gallery.app import _preview, _query_image

    image = _query_image("upload", None, str(path), max_pixels)
    assert np.array_equal(pixels(_preview(str(path), max_pixels)), pixels(image))
    return pixels(image)


def every_path(path, tmp_path):
    """The pixels of one image file as each reader of the project gets them."""
    folder = tmp_path / "gallery"
    folder.mkdir()
    (folder / path.name).write_bytes(path.read_bytes())
    g, model = index_gallery(folder, tmp_path)
    assert g.paths == [path.name] and not g.skipped
    return dict(
        read_image=pixels(read_image(path)),
        training_loader=training_loader(path),
        embed_dataset=embed_dataset(path),
        embed_cached=embed_dataset(path, cache=str(tmp_path / "cache")),
        cache_decode=decode(path, T.Compose([])),
        search_query=pixels(load_query_image(path)),
        app_upload=app_upload(path),
        gallery_index=pixels(model.seen[0]),
    )


def header_only_png(path, width, height):
    """A valid PNG header of any size with a few bytes of image data: opening it reads only the
    header; decoding it would allocate width x height bytes."""

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.fixture
def no_decoding_above(monkeypatch):
    """Decoding an image of more than a million pixels fails the test (the refusal must come
    from the header); smaller images decode as usual."""
    load = ImageFile.ImageFile.load

    def guarded(self):
        if self.size[0] * self.size[1] > 1_000_000:
            raise AssertionError(f"decoded a {self.size} image")
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded)


# ---------------------------------------------------------------- 16-bit and float


def grey16_png(path):
    """4 x 16 I;16 PNG, column i = i * 4369: 0 .. 65535 in 15 equal steps (4369 = 17 * 257)."""
    Image.fromarray(np.tile((np.arange(16) * 4369).astype(np.uint16), (4, 1))).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16" and im.getextrema() == (0, 65535)
    return path


def test_16bit_grey_png_reads_as_a_grey_gradient_everywhere(tmp_path):
    path = grey16_png(tmp_path / "grey16.png")
    with Image.open(path) as im:  # what Pillow alone makes of it: all but the first column white
        assert (np.asarray(im.convert("RGB"))[:, 1:] == 255).all()
    expected = np.broadcast_to((np.arange(16) * 17).astype(np.uint8)[None, :, None], (4, 16, 3))
    for where, got in every_path(path, tmp_path).items():
        assert np.array_equal(got, expected), where


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("F", [0.0, 0.2, 1.0], [0, 51, 255]),  # within [0, 1]: times 255
        ("F", [-1.0, 0.0, 3.0], [0, 64, 255]),  # otherwise from its range: (v + 1) * 255 / 4
        ("F", [0.0, float("nan"), 1.0], [0, 0, 255]),  # NaN is 0
        ("I", [0, 100, 200], [0, 100, 200]),  # 32-bit int within 0..255: kept
        ("I", [0, 25700, 65535], [0, 100, 255]),  # within 0..65535: a 16-bit grey, / 257
        ("I", [0, 40000, 100000], [0, 102, 255]),  # beyond: from its range
    ],
)
def test_float_and_32bit_tiffs_are_scaled_to_8bit(tmp_path, mode, values, expected):
    dtype = np.float32 if mode == "F" else np.int32
    path = tmp_path / "x.tif"
    Image.fromarray(np.array([values] * 2, dtype=dtype)).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
    got = pixels(read_image(path))
    assert np.array_equal(
        got, np.broadcast_to(np.array(expected, np.uint8)[None, :, None], got.shape)
    )
    assert np.array_equal(training_loader(path), got)
    assert np.array_equal(pixels(load_query_image(path)), got)


def test_transparent_png_is_on_white_in_training_as_in_search(tmp_path):
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # a transparent ground ...
    im.paste((0, 0, 0, 255), (2, 2, 6, 6))  # ... and black lines
    im.save(tmp_path / "sketch.png")
    expected = np.full((8, 8, 3), 255, np.uint8)
    expected[2:6, 2:6] = 0
    got = pixels(read_image(tmp_path / "sketch.png"))
    assert np.array_equal(got, expected)
    assert np.array_equal(training_loader(tmp_path / "sketch.png"), expected)


# ---------------------------------------------------------------- EXIF orientation


def exif6_jpeg(path):
    """32 x 16 (w x h) JPEG, a red block in its top-left corner, EXIF orientation 6: upright it
    is 16 x 32 with the block in the top-right corner (turned 90 degrees clockwise)."""
    im = Image.new("RGB", (32, 16), "white")
    im.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    im.save(path, "JPEG", quality=95, exif=exif)
    return path


def test_exif_orientation_6_jpeg_comes_out_upright_and_alike_everywhere(tmp_path):
    path = exif6_jpeg(tmp_path / "phone.jpg")
    with Image.open(path) as im:
        oracle = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))  # Pillow's own
    assert oracle.shape == (32, 16, 3)
    red = np.array([255, 0, 0])
    assert np.abs(oracle[1:7, 9:15].astype(int) - red).max() < 40  # the block: top right
    assert (oracle[1:7, 1:7] > 200).all()  # top left is white
    for where, got in every_path(path, tmp_path).items():
        assert np.array_equal(got, oracle), where


# ---------------------------------------------------------------- the pixel limit


def test_a_header_only_20000x20000_png_is_refused_without_decoding(tmp_path, no_decoding_above):
    path = header_only_png(tmp_path / "huge.png", HUGE, HUGE)
    data = path.read_bytes()
    assert len(data) < 200 and struct.unpack(">II", data[16:24]) == (HUGE, HUGE)
    for read in (
        lambda: read_image(path),  # the reader: ImageTooLarge
        lambda: open_image(path),  # the training/infer loader: a plain UserError (workers)
        lambda: load_query_image(path, 89478485),  # search.py's query
    ):
        with pytest.raises(UserError) as e:
            read()
        message = str(e.value)
        assert "\n" not in message
        assert str(path) in message and f"{HUGE * HUGE} pixels" in message
        assert "refused before decoding" in message and "raise " in message


def test_between_the_limit_and_twice_it_the_header_check_gives_the_size(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (40, 30), 128).save(path)
    with pytest.raises(
        ImageTooLarge,
        match=r"big.png is larger than max_image_pixels=1000 "
        r"\(40x30 = 1200 pixels\).*raise max_image_pixels",
    ):
        read_image(path, 1000, key="max_image_pixels")
    with pytest.raises(UserError, match=r"dataset.max_image_pixels=1000 \(40x30 = 1200 pixels\)"):
        training_loader_limited(path, 1000)
    assert read_image(path, 1200).size == (40, 30)  # at the limit: read
    assert Image.MAX_IMAGE_PIXELS >= PILLOW_LIMIT  # a low limit never lowers Pillow's own


def training_loader_limited(path, limit):
    rows = rows_of(path)
    return SketchPhotoDataset(rows, T.PILToTensor(), prompts_of(rows), max_pixels=limit)[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return random_run(tmp_path_factory.mktemp("run"))


def test_a_too_large_query_is_one_line_before_any_indexing(
    run, tmp_path, capsys, no_decoding_above
):
    gallery = tmp_path / "photos"
    gallery.mkdir()
    Image.new("RGB", (16, 16), "red").save(gallery / "red.png")
    query = header_only_png(tmp_path / "huge.png", HUGE, HUGE)
    cfg = search_cfg(run, gallery, f"query={query}", f"out={tmp_path / 'out'}")
    with pytest.raises(SystemExit) as e:
        run_cli(search, cfg)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: image {query} is larger than max_image_pixels=89478485 ({HUGE * HUGE} pixels), "
        f"refused before decoding. If the file is genuine, raise max_image_pixels; else delete it."
    )
    assert not (run / "index").exists()  # refused before the gallery was indexed


def test_a_too_large_upload_in_the_app_is_its_one_line(tmp_path, no_decoding_above):
    import gradio as gr

    from gallery.app import make_handler

    class Searcher:  # the handler refuses the upload before it needs a model or a gallery
        max_pixels = 89478485

    query = header_only_png(tmp_path / "huge.png", HUGE, HUGE)
    handler = make_handler(Searcher())
    with pytest.raises(gr.Error) as e:
        handler("upload", None, str(query), "sketch", "", "converted", 5)
    message = e.value.message
    assert "\n" not in message and str(query) in message and f"{HUGE * HUGE} pixels" in message
    assert "raise max_image_pixels" in message


def test_too_large_gallery_photos_are_skipped_and_listed_then_read_under_a_higher_limit(
    tmp_path, no_decoding_above
):
    folder = tmp_path / "gallery"
    folder.mkdir()
    Image.new("RGB", (10, 10), "red").save(folder / "small.png")
    Image.new("RGB", (40, 30), "blue").save(folder / "big.png")
    header_only_png(folder / "huge.png", HUGE, HUGE)
    g, model = index_gallery(folder, tmp_path, max_pixels=1000)
    assert g.paths == ["small.png"] and len(model.seen) == 1
    assert g.skipped == {
        "big.png": "too large: 40x30 = 1200 pixels, more than max_image_pixels=1000",
        "huge.png": f"too large: {HUGE * HUGE} pixels, more than max_image_pixels=1000",
    }
    g, model = index_gallery(folder, tmp_path, max_pixels=1000)  # unchanged: nothing retried
    assert model.seen == [] and set(g.skipped) == {"big.png", "huge.png"}
    g, model = index_gallery(folder, tmp_path, max_pixels=1200)  # raised: the skipped retried
    assert sorted(g.paths) == ["big.png", "small.png"] and list(g.skipped) == ["huge.png"]
    assert len(model.seen) == 1 and tuple(model.seen[0].shape) == (3, 30, 40)
