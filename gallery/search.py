"""Search a photo folder with a sketch, a photo or words, using a trained run:
python search.py path=<run> gallery=<folder> query=<image> | text="a bicycle"."""

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import ImageOps

from model.backbone import build_model
from model.checkpoint import load_checkpoint
from config.entry import prepare
from data.image import ImageUnreadable, read_image, to_rgb
from gallery.ann import gallery_ann, top_k
from gallery.index import index_folder, update_index
from runtime.io import save_text
from runs.folder import RunFolder, is_baseline
from runtime.device import autocast, pick_device
from runtime.errors import UserError
from runtime.logs import log, setup_logging

MODES = {"photo": 0, "sketch": 1, "text": 3}
QUERY_MODES = ("original", "converted")
IMAGE_MODALITIES = (
    "sketch",
    "photo",
)  # what a query image shows: query_modality= and the app's Upload tab


@dataclass
class Hit:
    rank: int
    path: str  # relative to the gallery folder
    file: Path
    score: float


def flatten_on_white(image):
    """An RGB image; transparent parts (a drawing's or a PNG sketch's) become white."""
    return to_rgb(image)


def check_not_blank(image, what="the query image"):
    pixels = np.asarray(image.convert("L"), dtype=np.int16)
    if pixels.max() - pixels.min() < 8:
        raise UserError(f"{what} is blank (one flat colour): draw something first.")


def load_query_image(path, max_pixels=None):
    """A query file read by the project's one reader (data/image.py): upright, 8-bit RGB,
    transparency on white; more than `max_pixels` (the search/app key max_image_pixels; None:
    Pillow's default) is refused from the header, before decoding."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"query file {path} does not exist; pass query=<a sketch or photo file>.")
    try:
        return read_image(path, max_pixels, key="max_image_pixels")
    except ImageUnreadable as e:
        raise UserError(
            f"query file {path} is not an image that can be read ({e.reason}); pass "
            f"query=<a .png/.jpg/.webp sketch or photo>."
        ) from None


class Searcher:
    """A run's model and a gallery index, ready to answer queries."""

    def __init__(self, cfg, progress=True):
        if cfg.query_mode not in QUERY_MODES:
            raise UserError(f"unknown query_mode={cfg.query_mode!r}. Use original or converted.")
        if cfg.query_modality not in IMAGE_MODALITIES:
            raise UserError(f"unknown query_modality={cfg.query_modality!r}. Use sketch or photo.")
        run = Path(cfg.path)
        if not run.is_dir():
            raise UserError(
                f"run folder {run} does not exist; pass path=<the folder train.py wrote>."
            )
        self.max_pixels = cfg.get("max_image_pixels")  # of a query and a result's thumbnail
        self.checkpoint = RunFolder(run).checkpoint(cfg.mode)
        ckpt = load_checkpoint(self.checkpoint)
        train_cfg = OmegaConf.create(ckpt["config"])
        # a pretrained-CLIP baseline (infer.py baseline=true): its mode vectors are untrained, so
        # every query is searched with its original embedding
        self.baseline = is_baseline(train_cfg)
        if self.baseline and cfg.query_mode == "converted":
            log.info(
                f"{run} is a pretrained-CLIP baseline: its mode vectors are untrained, so queries "
                f"are searched with their original embeddings (query_mode=original)"
            )
        self.device = pick_device(cfg.device)
        self.precision = cfg.precision
        self.model, _, self.transform, self.tokenizer = build_model(
            OmegaConf.create(dict(train_cfg.model, pretrained=None))
        )
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(
                f"{self.checkpoint} does not fit the model its config describes: "
                f"{str(e).splitlines()[0]} Use the run folder the checkpoint came from."
            ) from None
        self.model.to(self.device).eval()
        ix = cfg.index
        self.gallery = update_index(
            self.model,
            self.transform,
            self.device,
            index_folder(run, cfg.gallery, ix.get("cache_dir")),
            cfg.gallery,
            self.checkpoint,
            int(cfg.batch_size),
            int(cfg.num_workers),
            self.precision,
            float(ix.save_every_s),
            progress,
            dim=self.model.modes.embedding_dim,  # the width of every embedding the model makes
            max_pixels=self.max_pixels,  # a larger photo is skipped and listed, not decoded
        )
        self.ann = gallery_ann(
            self.gallery, ix.kind, ix.hnsw_m, ix.ef_construction, ix.ef_search, progress
        )

    @torch.no_grad()
    def _finish(self, z, mode, query_mode):
        if query_mode not in QUERY_MODES:
            raise UserError(f"unknown query_mode={query_mode!r}. Use original or converted.")
        if self.mode_of(query_mode) == "converted":
            z = self.model.convert(z, torch.tensor([mode], device=self.device))[:, MODES["photo"]]
        return z[0].float().cpu().numpy()

    def mode_of(self, query_mode):
        """The query mode a search really uses: original for a baseline."""
        return "original" if self.baseline else query_mode

    @torch.no_grad()
    def embed_image(self, image, modality="sketch", query_mode="converted"):
        if modality not in IMAGE_MODALITIES:
            raise UserError(f"unknown query_modality={modality!r}. Use sketch or photo.")
        image = flatten_on_white(image)
        check_not_blank(image)
        x = self.transform(image)[None].to(self.device)
        with autocast(self.device, self.precision):
            z = self.model.encode_image(x).float()
        return self._finish(z, MODES[modality], query_mode)

    @torch.no_grad()
    def embed_text(self, text, query_mode="converted"):
        if not text or not text.strip():
            raise UserError(
                'the text query is empty: type some words first (e.g. text="a bicycle").'
            )
        with autocast(self.device, self.precision):
            z = self.model.encode_text(self.tokenizer([text.strip()]).to(self.device)).float()
        return self._finish(z, MODES["text"], query_mode)

    def search(self, vector, k=10):
        scores, rows = top_k(self.ann, vector, k)
        return [
            Hit(r + 1, self.gallery.paths[i], self.gallery.root / self.gallery.paths[i], float(s))
            for r, (s, i) in enumerate(zip(scores[0], rows[0]))
            if i >= 0
        ]


def search(cfg):
    """The search.py entry point: prints the top-k photos and writes results.html; returns the
    hits."""
    cfg = prepare(cfg, "search")  # every value checked before any work
    setup_logging()
    if (cfg.query is None) == (cfg.text is None):
        raise UserError(
            'give exactly one query: query=<sketch or photo file> or text="some words".'
        )
    # the query is read first: a bad or too large one is refused before any gallery is indexed
    image = None if cfg.query is None else load_query_image(cfg.query, cfg.max_image_pixels)
    searcher = Searcher(cfg)
    query_mode = searcher.mode_of(cfg.query_mode)
    if cfg.query is not None:
        hits = searcher.search(
            searcher.embed_image(image, cfg.query_modality, cfg.query_mode), cfg.k
        )
        title = f"{cfg.query_modality} {cfg.query}"
    else:
        hits = searcher.search(searcher.embed_text(str(cfg.text), cfg.query_mode), cfg.k)
        title = f'text "{cfg.text}"'
    print(
        f"top {len(hits)} of {len(searcher.gallery.paths)} photos under {searcher.gallery.root} "
        f"for {title} ({query_mode}):"
    )
    for h in hits:
        print(f"{h.rank:4d}  {h.score:.4f}  {h.path}")
    skipped = searcher.gallery.skipped
    if skipped:
        print(f"{len(skipped)} unreadable image(s) skipped:")
        for p, reason in skipped.items():
            print(f"  {p}: {reason}")
    page = write_results_page(
        Path(cfg.out) / "results.html",
        title,
        query_mode,
        image,
        hits,
        skipped,
        cfg.max_image_pixels,
    )
    print(f"wrote {page}")
    return hits


def _data_uri(image, size=160):
    buf = io.BytesIO()
    ImageOps.pad(image.convert("RGB"), (size, size), color=(255, 255, 255)).save(
        buf, "JPEG", quality=85
    )
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_results_page(path, title, query_mode, query_image, hits, skipped, max_pixels=None):
    """One self-contained HTML file (thumbnails inline) with the query and its ranked photos."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>ma-sbir search</title><style>"
        "body{font-family:sans-serif;margin:1.5em}figure{display:inline-block;margin:4px;"
        "width:170px;vertical-align:top}figcaption{font-size:12px;word-break:break-all}</style>",
        f"<h1>Search: {html.escape(title)}</h1><p>query mode: {html.escape(query_mode)}</p>",
    ]
    if query_image is not None:
        parts.append(
            f"<figure class='query'><img src='{_data_uri(query_image)}'>"
            f"<figcaption>query</figcaption></figure><hr>"
        )
    for h in hits:
        uri = _data_uri(read_image(h.file, max_pixels, key="max_image_pixels", draft=(160, 160)))
        parts.append(
            f"<figure class='hit' data-path='{html.escape(h.path)}'><img src='{uri}'>"
            f"<figcaption>{h.rank}. {h.score:.4f}<br>{html.escape(h.path)}</figcaption></figure>"
        )
    if skipped:
        parts.append(
            f"<h2>{len(skipped)} unreadable image(s) skipped</h2><ul>"
            + "".join(f"<li>{html.escape(p)}: {html.escape(v)}</li>" for p, v in skipped.items())
            + "</ul>"
        )
    save_text("\n".join(parts), path)
    return path
