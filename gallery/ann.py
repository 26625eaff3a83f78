"""Nearest-neighbour search over a gallery's normalised vectors with faiss: exact inner product
(`IndexFlatIP`, the default) or an HNSW graph for galleries of millions (`index.kind=hnsw`),
whose graph is saved beside the index so it is built once per index version."""

from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from runtime.io import atomic_path
from runtime.errors import UserError
from runtime.logs import log

KINDS = ("flat", "hnsw")


def build_ann(vectors, kind="flat", hnsw_m=32, ef_construction=200, ef_search=128, progress=True):
    """A faiss index over the rows of `vectors` (inner product = cosine for normalised rows); an
    HNSW
    graph is built in chunks under a progress bar (minutes for a million vectors)."""
    if kind not in KINDS:
        raise UserError(f"unknown index.kind={kind!r}. Use one of {list(KINDS)}.")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if kind == "flat":
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return index
    index = faiss.IndexHNSWFlat(vectors.shape[1], int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = int(ef_construction)
    with tqdm(total=len(vectors), unit="vec", desc="HNSW graph", disable=not progress) as bar:
        for chunk in np.array_split(vectors, max(1, -(-len(vectors) // 20_000))):
            index.add(chunk)
            bar.update(len(chunk))
    index.hnsw.efSearch = int(ef_search)
    return index


def gallery_ann(gallery, kind="flat", hnsw_m=32, ef_construction=200, ef_search=128, progress=True):
    """The faiss index of a Gallery; an HNSW graph is loaded from (or saved to) its index folder."""
    if kind != "hnsw":
        return build_ann(gallery.vectors, kind)
    file = Path(gallery.folder) / f"hnsw-{gallery.build_id}-M{hnsw_m}-efc{ef_construction}.faiss"
    if file.is_file():
        index = faiss.read_index(str(file))
        index.hnsw.efSearch = int(ef_search)
        return index
    log.info(f"building the HNSW graph of {len(gallery.paths)} vectors")
    index = build_ann(gallery.vectors, kind, hnsw_m, ef_construction, ef_search, progress)
    for old in Path(gallery.folder).glob("hnsw-*.faiss"):  # graphs of earlier index versions
        old.unlink()
    try:
        with atomic_path(file) as tmp:
            faiss.write_index(index, str(tmp))
    except OSError as e:
        log.warning(f"could not save the HNSW graph to {file} ({e}); it will be rebuilt next time.")
    return index


def top_k(index, queries, k):
    """(scores [Q,k], rows [Q,k]) of the k best gallery rows per query, k capped at the gallery
    size."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    return index.search(queries, min(int(k), index.ntotal))
