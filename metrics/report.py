"""report.html beside eval_result.json: sampled sketch queries with their top-10 photos (correct
ones framed green, wrong ones red) and, fine-grained, their own photo and its rank; per-class AP
sorted, and a PNG grid for papers. Thumbnails
are copied next to the report, so it opens offline and survives moving the folder."""

import html
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from data.image import read_image
from runtime.io import atomic_path, save_text
from runtime.logs import log

GREEN, RED = (40, 160, 60), (200, 40, 40)
KINDS = ("original", "converted")  # the query kinds of eval_result.json's [original, converted]


def _thumb(src, dst, size):
    im = read_image(src, draft=(size, size))  # the one reader: upright, 8-bit, RGB
    im = ImageOps.pad(im, (size, size), color=(255, 255, 255))
    with atomic_path(dst) as tmp:
        im.save(tmp, format="JPEG", quality=85)
    return im


def write_report(
    output,
    result,
    rows,
    image_root,
    n_queries=20,
    grid_queries=8,
    seed=0,
    size=96,
    grid_kind="original",
):
    """Write report.html, report_grid.png and report_images/ of an InferOutput (runs/folder.py);
    return the HTML path."""
    image_root = Path(image_root)
    label_of = {r["img_path"]: r["label"] for r in rows}
    class_of = {r["img_path"]: Path(r["img_path"]).parent.name for r in rows}
    top = result["top10_retrieved"]
    queries = sorted(top)
    sample = sorted(random.Random(seed).sample(queries, min(n_queries, len(queries))))
    thumbs, images = {}, output.report_images

    def thumb(path):
        if path not in thumbs:
            name = f"{len(thumbs):05d}.jpg"
            thumbs[path] = (name, _thumb(image_root / path, images / name, size))
        return thumbs[path]

    parts = [
        "<!doctype html><meta charset='utf-8'><title>ma-sbir retrieval report</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}img{width:%dpx;height:%dpx;margin:2px;"
        "border:4px solid #ccc}.ok{border-color:rgb%s}.no{border-color:rgb%s}.q{border-color:#333}"
        "td{padding:2px 8px}.bar{background:#69c;height:12px}</style>" % (size, size, GREEN, RED),
        "<h1>Retrieval report</h1>",
        "<table><tr><th>metric</th><th>original</th><th>converted</th></tr>",
    ]
    for key in ("mAP@all", "mAP@200", "p@100", "p@200"):
        parts.append(
            f"<tr><td>{key}</td>" + "".join(f"<td>{_fmt(v)}</td>" for v in result[key]) + "</tr>"
        )
    parts.append(
        f"</table><p>{result['n_queries']} sketch queries, {result['n_gallery']} photos; "
        f"chance mAP {_fmt(result['chance_mAP'])}.</p>"
    )
    if result.get("converted_null_reason"):
        parts.append(f"<p>converted: n/a, {html.escape(result['converted_null_reason'])}.</p>")
    fg = result.get("fine_grained") or {}
    parts += _fine_grained_table(fg)
    own_of = {r["img_path"]: r.get("photo") for r in rows}
    parts.append("<h2>Sampled queries</h2>")
    for q in sample:
        parts.append(
            f"<div class='query' data-query='{html.escape(q)}'><p>{html.escape(q)} "
            f"(class {html.escape(class_of[q])})</p>"
        )
        rank = (fg.get("own_photo_rank") or {}).get(q)
        if rank:  # fine-grained: the photo this sketch was drawn from, and where it ranked
            own = own_of.get(q)
            said = " / ".join(f"{k} {r}" for k, r in zip(KINDS, rank) if r is not None)
            parts.append(
                f"<div class='own'>own photo: <img class='q' src='{images.name}/{thumb(own)[0]}' "
                f"title='{html.escape(own)}'> rank among the {html.escape(fg['gallery'])} "
                f"gallery: {said}</div>"
            )
        for kind in [k for k in KINDS if top[q].get(k) is not None]:
            cells = [f"<img class='q' src='{images.name}/{thumb(q)[0]}' title='{html.escape(q)}'>"]
            for p in top[q][kind]:
                ok = label_of[p] == label_of[q]
                cells.append(
                    f"<img class='{'ok' if ok else 'no'}' src='{images.name}/{thumb(p)[0]}' "
                    f"title='{html.escape(p)}'>"
                )
            parts.append(f"<div>{kind}: {''.join(cells)}</div>")
        parts.append("</div>")
    parts.append("<h2>Per-class AP (mAP@all, original queries), sorted</h2><table>")
    per_class = sorted(result["per_class_AP"].items(), key=lambda kv: -(kv[1][0] or 0))
    for cls, (orig, conv) in per_class:
        parts.append(
            f"<tr><td>{html.escape(cls)}</td><td>{_fmt(orig)}</td><td>{_fmt(conv)}</td>"
            f"<td><div class='bar' style='width:{int(300 * (orig or 0))}px'></div></td></tr>"
        )
    parts.append("</table>")
    out = output.report_html
    save_text("\n".join(parts), out)
    if sample and top[sample[0]].get(grid_kind) is None:
        log.warning(f"report grid: no {grid_kind} results here (a baseline); drawn from original")
        grid_kind = "original"
    _grid(output.report_grid, sample[:grid_queries], top, grid_kind, label_of, thumb, size)
    return out


def _fine_grained_table(fg):
    """Acc@k of the fine-grained block (each query's own photo), when evaluate.py wrote one."""
    if not fg:
        return []
    parts = ["<h2>Fine-grained: each sketch's own photo</h2><table>"]
    parts.append("<tr><th>gallery</th><th>metric</th><th>original</th><th>converted</th></tr>")
    for block in (fg, fg["unseen"]):
        for key in ("acc@1", "acc@5", "acc@10"):
            parts.append(
                f"<tr><td>{html.escape(block['gallery'])}</td><td>{key}</td>"
                + "".join(f"<td>{_fmt(v)}</td>" for v in block[key])
                + "</tr>"
            )
    parts.append(
        f"</table><p>{fg['n_queries']} sketches paired with their photo; chance acc@1 "
        f"{_fmt(fg['chance_acc@1'])} (class gallery), {_fmt(fg['unseen']['chance_acc@1'])} "
        f"(unseen gallery). A rank counts the photos scoring at least the own photo's score.</p>"
    )
    return parts


def _grid(path, queries, top, kind, label_of, thumb, size):
    pad = 6
    cols = 11
    grid = Image.new(
        "RGB", (cols * (size + pad) + pad, max(1, len(queries)) * (size + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(grid)
    for r, q in enumerate(queries):
        for c, p in enumerate([q] + top[q][kind]):
            x, y = pad + c * (size + pad), pad + r * (size + pad)
            grid.paste(thumb(p)[1], (x, y))
            if c:
                color = GREEN if label_of[p] == label_of[q] else RED
                draw.rectangle([x - 3, y - 3, x + size + 2, y + size + 2], outline=color, width=3)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def _fmt(v):
    return "n/a" if v is None else f"{v:.4f}"
