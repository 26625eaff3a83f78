"""The search web app: draw on a canvas, upload a sketch or type words, press Search, see the
top-k photos of a gallery with their scores. Served by gradio on 127.0.0.1 only.

What it exposes: the result photos as thumbnails it writes itself (nothing under the gallery
folder is served as a file), to requests whose Host is the address it serves (a page elsewhere
that rebinds its name to 127.0.0.1 is refused). Uploads are limited in size, read by search.py's
query reader, and kept in a temporary folder of the app's own, removed when it stops."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from config.entry import prepare
from data.image import read_image
from gallery.search import IMAGE_MODALITIES, QUERY_MODES, Searcher, load_query_image
from runtime.io import atomic_path
from runtime.errors import UserError
from runtime.logs import setup_logging
from runtime.signals import exit_on_sigterm, sigterm_handler

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine
import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

HOST = "127.0.0.1"
SOURCES = ("draw", "upload", "words")
THUMBNAIL = 384  # px, the longer side of a result shown in the page


class HostGuard:
    """ASGI middleware: answers 403 to a request whose Host header is not the served address
    (DNS rebinding: a foreign page whose name resolves to 127.0.0.1 sends its own name)."""

    def __init__(self, app, port):
        self.app = app
        self.allowed = {f"{h}:{port}" for h in (HOST, "localhost")} | {HOST, "localhost"}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").lower()
            if host not in self.allowed:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = f"refused: Host {host!r} is not this app's address\n".encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [
                            (b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def thumbnail(file, max_pixels=None):
    """A result photo as a small upright RGB image (the page never gets the file itself), read
    by the project's one reader (data/image.py); JPEGs decode at a reduced size directly."""
    im = read_image(file, max_pixels, key="max_image_pixels", draft=(THUMBNAIL, THUMBNAIL))
    im.thumbnail((THUMBNAIL, THUMBNAIL))
    return im


def _query_image(source, drawing, upload, max_pixels=None):
    if source == "draw":
        if drawing is None or drawing.get("composite") is None:
            raise UserError("the canvas is empty: draw something first.")
        return drawing["composite"]
    if upload is None:
        raise UserError("no image uploaded: upload a sketch or a photo first (or draw one).")
    return load_query_image(upload, max_pixels)  # a file of the app's upload folder, as search.py


def _preview(upload, max_pixels=None):
    """The uploaded file as the query reader reads it (its one-line error in the page if not)."""
    if upload is None:
        return None
    try:
        return load_query_image(upload, max_pixels)
    except UserError as e:
        raise gr.Error(str(e)) from None


def make_handler(searcher, save_queries=None):
    """The function behind the Search button: (source, drawing, upload, upload_modality, text,
    query_mode, k) -> (gallery items, status markdown). A drawing is a sketch; an upload is what
    upload_modality says (sketch or photo), as query_modality for search.py's query=."""

    def run(source, drawing, upload, upload_modality, text, query_mode, k):
        try:
            if source not in SOURCES:
                raise UserError(f"unknown query source {source!r}; use one of {list(SOURCES)}.")
            if source == "words":
                vector, what = searcher.embed_text(text, query_mode), f'words "{text.strip()}"'
            else:
                image = _query_image(source, drawing, upload, searcher.max_pixels)
                modality = "sketch" if source == "draw" else upload_modality
                vector = searcher.embed_image(image, modality, query_mode)
                what = "your drawing" if source == "draw" else f"the uploaded {modality}"
                if save_queries:
                    with atomic_path(Path(save_queries) / "last-query.png") as tmp:
                        image.save(tmp, format="PNG")
            hits = searcher.search(vector, int(k))
            items = [  # a photo changed since indexing (now unreadable, too large): its line
                (thumbnail(h.file, searcher.max_pixels), f"{h.rank}. {h.score:.3f}  {h.path}")
                for h in hits
            ]
        except UserError as e:
            raise gr.Error(str(e)) from None
        return items, _status(searcher, what, searcher.mode_of(query_mode), hits)

    return run


def _status(searcher, what, query_mode, hits):
    g = searcher.gallery
    lines = [
        f"Top {len(hits)} of {len(g.paths)} photos under `{g.root}` for {what} ({query_mode} "
        f"query).",
        "",
        "| rank | score | photo |",
        "|---:|---:|---|",
    ]
    lines += [f"| {h.rank} | {h.score:.4f} | `{h.path}` |" for h in hits]
    if g.skipped:
        lines += [
            "",
            f"**{len(g.skipped)} unreadable image(s) skipped:** "
            + ", ".join(f"`{p}`" for p in list(g.skipped)[:20])
            + (" ..." if len(g.skipped) > 20 else ""),
        ]
    return "\n".join(lines)


def build_app(searcher, k=10, query_mode="converted", save_queries=None, query_modality="sketch"):
    g = searcher.gallery
    intro = (
        f"# Sketch-based photo search\nDraw something (or upload a sketch or a photo, or type "
        f"words) and "
        f"press **Search** to find it among the {len(g.paths)} photos under `{g.root}`."
    )
    if g.skipped:
        intro += f"\n\n{len(g.skipped)} unreadable image(s) in the folder were skipped."
    with gr.Blocks(title="ma-sbir search") as demo:
        gr.Markdown(intro)
        source = gr.Textbox(value="draw", visible=False, label="source")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tabs():
                    with gr.Tab("Draw") as draw_tab:
                        drawing = gr.Sketchpad(
                            label="Drawing",
                            type="pil",
                            image_mode="RGB",
                            canvas_size=(512, 512),
                            layers=False,
                            elem_id="canvas",
                            brush=gr.Brush(default_size=8, colors=["#000000"], color_mode="fixed"),
                        )
                    with gr.Tab("Upload") as upload_tab:
                        # a file, not gr.Image: gradio would decode it itself, and a file that is
                        # no image would end in a bare "Error" instead of the query reader's line
                        upload = gr.File(
                            label="Sketch or photo", type="filepath", file_types=["image"]
                        )
                        preview = gr.Image(label="Uploaded", interactive=False, height=200)
                        upload_modality = gr.Radio(
                            list(IMAGE_MODALITIES),
                            value=query_modality,
                            label="The image is a",
                            elem_id="upload-modality",
                            info="a photo query is a photo-mode vector (converted = original)",
                        )
                    with gr.Tab("Words") as words_tab:
                        text = gr.Textbox(label="Words", placeholder="a bicycle")
                query_mode = gr.Radio(
                    ["original"] if searcher.baseline else list(QUERY_MODES),
                    value=query_mode,
                    label="Query",
                    info=(
                        "a pretrained-CLIP baseline has no trained mode vectors"
                        if searcher.baseline
                        else "converted moves the query into the photo mode (the paper's method)"
                    ),
                )
                k_slider = gr.Slider(
                    1, min(100, len(g.paths)), value=min(k, len(g.paths)), step=1, label="Results"
                )
                button = gr.Button("Search", variant="primary", elem_id="search")
            with gr.Column(scale=2):
                results = gr.Gallery(label="Results", columns=5, height=340, elem_id="results")
                status = gr.Markdown(elem_id="status")
        for tab, name in ((draw_tab, "draw"), (upload_tab, "upload"), (words_tab, "words")):
            tab.select(lambda name=name: name, None, source, api_visibility="private")

        def preview_upload(file):
            return _preview(file, searcher.max_pixels)

        upload.change(preview_upload, upload, preview, api_visibility="private")
        handler = make_handler(searcher, save_queries)
        inputs = [source, drawing, upload, upload_modality, text, query_mode, k_slider]
        button.click(handler, inputs, [results, status], api_name="search")
        text.submit(handler, inputs, [results, status], api_visibility="private")
    return demo


def serve(cfg, block=True):
    """The app.py entry point: index the gallery (if needed), then serve on 127.0.0.1:<port>."""
    cfg = prepare(cfg, "app")  # every value checked before any work
    setup_logging()
    max_mb = cfg.max_upload_mb
    own = Path(tempfile.mkdtemp(prefix="ma-sbir-app-"))  # gradio's uploads and result thumbnails
    os.environ["GRADIO_TEMP_DIR"] = str(own)
    atexit.register(shutil.rmtree, own, ignore_errors=True)
    searcher = Searcher(cfg)
    demo = build_app(
        searcher,
        int(cfg.k),
        searcher.mode_of(cfg.query_mode),
        cfg.get("save_queries"),
        cfg.query_modality,
    )
    print(
        f"serving {len(searcher.gallery.paths)} photos of {searcher.gallery.root} at "
        f"http://{HOST}:{cfg.port} (uploads and thumbnails in {own}, removed at exit)",
        flush=True,
    )
    sigterm_handler(exit_on_sigterm)  # SIGTERM exits through atexit, which removes that folder
    demo.launch(
        server_name=HOST,
        server_port=int(cfg.port),
        max_file_size=int(max_mb * 2**20),
        app_kwargs={"middleware": [Middleware(HostGuard, port=int(cfg.port))]},
        ssr_mode=False,
        prevent_thread_lock=True,
        quiet=False,
        footer_links=["api"],
    )
    # gradio adds its CORS middleware outside the guard given above; put the guard outermost, so
    # that a foreign Host gets no allow-origin header either (Starlette rebuilds the stack).
    demo.app.user_middleware.insert(0, Middleware(HostGuard, port=int(cfg.port)))
    demo.app.middleware_stack = None
    if block:
        demo.block_thread()
    return demo
