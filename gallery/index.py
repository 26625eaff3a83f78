"""Gallery index: the embeddings of every image under a folder, kept in step with the folder.

Stored as one file, `index.npz`, written atomically under `<run>/index/<name>-<hash>/`, with the
relative paths, sizes and modification times of the images and the identity (sha256) of the
checkpoint that embedded them. Updating embeds only new and changed files and drops deleted
ones; progress is saved as it goes, so an interrupted build continues where it stopped; another
checkpoint rebuilds. A lock file keeps two processes from indexing the same gallery at once.
"""

import fcntl
import hashlib
import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from runtime.io import atomic_path
from runs.folder import RunFolder
from runtime.device import autocast
from runtime.errors import UserError
from runtime.logs import log

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
INDEX_FILE = "index.npz"
DEFAULT_CACHE = Path.home() / ".cache" / "ma-sbir" / "index"


@dataclass
class Gallery:
    """An index: row i of `vectors` is the embedding of `root / paths[i]`."""

    root: Path
    folder: Path
    checkpoint: str
    paths: list = field(default_factory=list)
    stats: list = field(default_factory=list)  # (size, mtime_ns) per path
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    skipped: dict = field(default_factory=dict)  # path -> (size, mtime_ns, reason)
    build_id: str = ""


def scan(root):
    """{relative path: (size, mtime_ns)} of every image under `root`, recursively, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"gallery folder {root} does not exist or is not a folder; pass gallery=<a folder of "
            f"photos>."
        )
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTS) and not name.startswith("."):
                st = os.stat(os.path.join(dirpath, name))
                found[os.path.relpath(os.path.join(dirpath, name), root)] = (
                    st.st_size,
                    st.st_mtime_ns,
                )
    if not found:
        raise UserError(
            f"gallery folder {root} holds no images ({', '.join(e[1:] for e in IMAGE_EXTS)}; "
            f"searched recursively). Point gallery= at a folder of photos."
        )
    return found


def checkpoint_identity(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _writable(folder):
    return os.access(folder, os.W_OK)


def index_folder(run_dir, root, cache_dir=None):
    """`<run>/index/<name>-<hash>/`, or a cache folder (with a warning) when the run is
    read-only."""
    root = Path(root).resolve()
    name = f"{root.name or 'root'}-{hashlib.sha1(str(root).encode()).hexdigest()[:10]}"
    run_dir = Path(run_dir).resolve()
    index_parent = RunFolder(run_dir).index_dir
    if _writable(index_parent if index_parent.is_dir() else run_dir):
        return index_parent / name
    cache = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE
    folder = cache / f"{run_dir.name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]}" / name
    log.warning(
        f"run folder {run_dir} is read-only: the index of {root} is stored in {folder} instead."
    )
    return folder


@contextmanager
def index_lock(folder, root):
    """Hold an exclusive lock on the index folder; a second indexer gets a clear error at once."""
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / ".lock"
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another process is indexing gallery {root} right now (it holds the lock "
                f"{lock_file}). Wait for it to finish, then run again."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_index(folder, root):
    """The stored index in `folder`, or None when there is none yet."""
    file = Path(folder) / INDEX_FILE
    if not file.is_file():
        return None
    with np.load(file, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        paths = z["paths"].tolist()
        skipped = {
            p: (int(s), int(m), r)
            for p, s, m, r in zip(
                z["skipped_paths"].tolist(),
                z["skipped_sizes"].tolist(),
                z["skipped_mtimes"].tolist(),
                z["skipped_reasons"].tolist(),
            )
        }
        return Gallery(
            Path(root),
            Path(folder),
            meta["checkpoint"],
            paths,
            list(zip(z["sizes"].tolist(), z["mtimes"].tolist())),
            z["vectors"].copy(),
            skipped,
            meta["build_id"],
        )


def save_index(g):
    g.build_id = uuid.uuid4().hex[:12]
    meta = json.dumps(
        dict(checkpoint=g.checkpoint, root=str(g.root.resolve()), build_id=g.build_id)
    )
    sk = list(g.skipped.items())
    with atomic_path(g.folder / INDEX_FILE) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            meta=np.array(meta),
            vectors=g.vectors.astype(np.float32),
            paths=np.array(g.paths, dtype=str),
            sizes=np.array([s for s, _ in g.stats], dtype=np.int64),
            mtimes=np.array([m for _, m in g.stats], dtype=np.int64),
            skipped_paths=np.array([p for p, _ in sk], dtype=str),
            skipped_sizes=np.array([v[0] for _, v in sk], dtype=np.int64),
            skipped_mtimes=np.array([v[1] for _, v in sk], dtype=np.int64),
            skipped_reasons=np.array([v[2] for _, v in sk], dtype=str),
        )


class _Images(torch.utils.data.Dataset):
    def __init__(self, root, paths, transform):
        self.root, self.paths, self.transform = root, paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.root / self.paths[i]) as im:
                im.seek(0)  # a GIF's first frame
                return i, self.transform(im.convert("RGB")), None
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
            return i, None, f"{type(e).__name__}: {str(e)[:200]}"


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, _, err in items if err is not None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


def _current(stored, found, identity):
    """What of a stored index can be kept for the folder as it is now: (paths, stats, vectors,
    skipped)."""
    if stored is None:
        return [], [], np.zeros((0, 0), np.float32), {}
    if stored.checkpoint != identity:
        log.info(f"the checkpoint changed since {stored.folder} was built: rebuilding the index")
        return [], [], np.zeros((0, 0), np.float32), {}
    keep = [i for i, p in enumerate(stored.paths) if found.get(p) == tuple(stored.stats[i])]
    skipped = {p: v for p, v in stored.skipped.items() if found.get(p) == tuple(v[:2])}
    return (
        [stored.paths[i] for i in keep],
        [tuple(stored.stats[i]) for i in keep],
        stored.vectors[keep],
        skipped,
    )


@torch.no_grad()
def update_index(
    model,
    transform,
    device,
    folder,
    root,
    checkpoint_path,
    batch_size=64,
    num_workers=0,
    precision="bf16",
    save_every_s=60.0,
    progress=True,
):
    """Bring the index in `folder` up to date with the images under `root`; return the Gallery."""
    root, folder = Path(root), Path(folder)
    found = scan(root)
    identity = checkpoint_identity(checkpoint_path)
    stored = load_index(folder, root)
    if stored is not None and stored.checkpoint == identity and _up_to_date(stored, found):
        return _finish(stored)
    with index_lock(folder, root):
        stored = load_index(folder, root)  # another process may have finished meanwhile
        paths, stats, vectors, skipped = _current(stored, found, identity)
        done = set(paths) | set(skipped)
        todo = [p for p in found if p not in done]
        g = Gallery(root, folder, identity, paths, stats, vectors, skipped)
        if todo:
            _embed(
                g,
                todo,
                found,
                model,
                transform,
                device,
                batch_size,
                num_workers,
                precision,
                save_every_s,
                progress,
            )
        else:
            save_index(g)
        return _finish(g)


def _embed(
    g,
    todo,
    found,
    model,
    transform,
    device,
    batch_size,
    num_workers,
    precision,
    save_every_s,
    progress,
):
    log.info(f"indexing {len(todo)} of {len(found)} images under {g.root} into {g.folder}")
    model.eval()
    loader = torch.utils.data.DataLoader(
        _Images(g.root, todo, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    new_paths, new_vecs, last_save = [], [], time.monotonic()
    try:
        with tqdm(
            total=len(todo), desc="indexing", unit="img", disable=not progress, dynamic_ncols=True
        ) as bar:
            for idx, images, bad in loader:
                for i, err in bad:
                    g.skipped[todo[i]] = (*found[todo[i]], err)
                if images is not None:
                    with autocast(device, precision):
                        z = model.encode_image(images.to(device)).float()
                    new_paths += [todo[i] for i in idx]
                    new_vecs.append(z.cpu().numpy())
                bar.update(len(idx) + len(bad))
                if time.monotonic() - last_save > save_every_s:
                    _merge(g, new_paths, new_vecs, found)
                    save_index(g)
                    new_paths, new_vecs, last_save = [], [], time.monotonic()
    finally:  # an interrupted build keeps what it embedded
        _merge(g, new_paths, new_vecs, found)
        save_index(g)


def _up_to_date(stored, found):
    have = {p: tuple(s) for p, s in zip(stored.paths, stored.stats)}
    have.update({p: v[:2] for p, v in stored.skipped.items()})
    return have == found


def _merge(g, new_paths, new_vecs, found):
    if not new_paths:
        return
    block = np.concatenate(new_vecs)
    g.vectors = np.concatenate([g.vectors, block]) if g.paths else block
    g.paths += new_paths
    g.stats += [found[p] for p in new_paths]


def _finish(g):
    if not g.paths:
        first, (_, _, reason) = next(iter(g.skipped.items()))
        raise UserError(
            f"none of the {len(g.skipped)} images under gallery folder {g.root} could be read "
            f"(e.g. {first}: {reason}). Point gallery= at a folder of readable photos."
        )
    if g.skipped:
        log.warning(
            f"{len(g.skipped)} unreadable image(s) under {g.root} skipped: "
            + ", ".join(list(g.skipped)[:10])
            + (" ..." if len(g.skipped) > 10 else "")
        )
    return g
