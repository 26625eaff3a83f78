"""Gallery index: the embeddings of every image under a folder, kept in step with the folder.

Stored as one file, `index.npz`, written atomically under `<run>/index/<name>-<hash>/`, with the
relative paths of the images, their size, modification time, inode and change time (so a file
swapped for another of the same size and time is seen), and the identity (sha256) of the
checkpoint that embedded them. Updating embeds only new and changed files and drops deleted
ones; progress is saved as it goes, so an interrupted build continues where it stopped; another
checkpoint rebuilds, and so does an index file that is damaged (cut short, overwritten, or not
agreeing with itself). A lock file keeps two processes from indexing the same gallery at once.
"""

import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from data.image import PILLOW_LIMIT, ImageTooLarge, ImageUnreadable, read_image
from runs.folder import RunFolder
from runtime.device import autocast
from runtime.errors import UserError
from runtime.io import atomic_path
from runtime.locks import HELD
from runtime.logs import log

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
INDEX_FILE = "index.npz"
DEFAULT_CACHE = Path.home() / ".cache" / "ma-sbir" / "index"
FORMAT = 2  # 2: a file's key is (size, mtime_ns, inode, ctime_ns); 1 had (size, mtime_ns)
ARRAYS = ("meta", "vectors", "paths", "stats", "skipped_paths", "skipped_reasons", "skipped_stats")


@dataclass
class Gallery:
    """An index: row i of `vectors` is the embedding of `root / paths[i]`."""

    root: Path
    folder: Path
    checkpoint: str
    paths: list = field(default_factory=list)
    stats: list = field(default_factory=list)  # file_key() per path
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    skipped: dict = field(default_factory=dict)  # path -> why it is not indexed
    skipped_stats: dict = field(default_factory=dict)  # path -> file_key() of unreadable images
    build_id: str = ""
    max_pixels: Optional[int] = None  # the pixel limit the skipped images were refused under


class DamagedIndex(Exception):
    """An index file that cannot be used as it is; the message is the short reason."""


def file_key(st):
    """What identifies a file's content without reading it: size, mtime, inode and ctime (a
    `mv` of another file of the same size and mtime over it changes the inode and ctime)."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def scan(root):
    """({relative path: file_key} of every regular image file under `root`, recursively, sorted;
    {relative path: reason} of the image names that are not one: a broken link, a link loop, a
    pipe or device, a file gone before it could be looked at). Nothing is opened here."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"gallery folder {root} does not exist or is not a folder; pass gallery=<a folder of "
            f"photos>."
        )
    found, irregular = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.lower().endswith(IMAGE_EXTS) or name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            try:
                st = os.stat(path)  # follows links; never opens (a pipe would block)
            except FileNotFoundError:
                irregular[rel] = "broken link" if os.path.islink(path) else "vanished"
                continue
            except OSError as e:
                irregular[rel] = (
                    "link loop" if e.errno == errno.ELOOP else f"cannot be looked at ({e.strerror})"
                )
                continue
            if not stat.S_ISREG(st.st_mode):
                irregular[rel] = "not a regular file"
                continue
            found[rel] = file_key(st)
    if not found and not irregular:
        raise UserError(
            f"gallery folder {root} holds no images ({', '.join(e[1:] for e in IMAGE_EXTS)}; "
            f"searched recursively). Point gallery= at a folder of photos."
        )
    return found, irregular


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
    """Hold an exclusive lock on the index folder; a second indexer gets a clear error at once.
    The lock dies with this process: forked loader workers drop their copy (runtime/locks.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / ".lock"
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read(20).strip()
            holder = f"process {pid}" if pid.isdigit() else "another process"
            raise UserError(
                f"gallery {root} is in use: {holder} is indexing it right now (it holds the lock "
                f"{lock_file}). Wait for it to finish, then run again."
            ) from None
        HELD.add(f.fileno())
        try:
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            yield
        finally:
            HELD.discard(f.fileno())
            fcntl.flock(f, fcntl.LOCK_UN)


def _arrays(file):
    """The arrays of an index file, read whole; DamagedIndex when the file does not load."""
    with open(file, "rb") as f:
        head = f.read(4)
    if not head:
        raise DamagedIndex("the file is empty")
    if head != b"PK\x03\x04":
        raise DamagedIndex("not an .npz archive")
    try:
        with np.load(file, allow_pickle=False) as z:
            missing = [k for k in ARRAYS if k not in z.files]
            if missing:
                old = "sizes" in z.files and "stats" not in z.files
                raise DamagedIndex(
                    "written by an older version of ma-sbir"
                    if old
                    else f"no array {', '.join(missing)}"
                )
            return {k: z[k] for k in ARRAYS}
    except DamagedIndex:
        raise
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise DamagedIndex(f"cut short or corrupt (ValueError: {str(e)[:100]})") from None
        raise DamagedIndex("it holds pickled objects, which are never loaded") from None
    except Exception as e:  # noqa: BLE001 - any reader failure (BadZipFile, EOFError, zlib ...)
        raise DamagedIndex(f"cut short or corrupt ({type(e).__name__}: {str(e)[:100]})") from None


def _text_array(a, name, n=None):
    if a.ndim != 1 or (a.size and a.dtype.kind != "U"):
        raise DamagedIndex(f"{name} is not a list of names")
    if n is not None and len(a) != n:
        raise DamagedIndex(f"{len(a)} {name} for {n} paths")
    return a.tolist()


def _stat_array(a, name, n):
    if a.shape != (n, 4) or (a.size and a.dtype.kind not in "iu"):
        raise DamagedIndex(f"{name} has shape {a.shape}, not ({n}, 4) whole numbers")
    return [tuple(r) for r in a.tolist()]


def _meta(a):
    try:
        meta = json.loads(str(a[()])) if a.ndim == 0 and a.dtype.kind == "U" else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise DamagedIndex("its metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise DamagedIndex(f"format {meta.get('format')!r}, not {FORMAT}")
    for key, pattern in (("checkpoint", r"[0-9a-f]{64}"), ("build_id", r"[0-9a-f]{12}")):
        if not isinstance(meta.get(key), str) or not re.fullmatch(pattern, meta[key]):
            raise DamagedIndex(f"its metadata has no valid {key}")
    if not isinstance(meta.get("root"), str):
        raise DamagedIndex("its metadata has no root")
    limit = meta.get("max_pixels")  # absent in indexes written before the key
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise DamagedIndex("its metadata has no valid max_pixels")
    return meta


def load_index(folder, root, dim=None):
    """The stored index in `folder`, or None when there is none yet; DamagedIndex (its message
    the short reason) when the file does not load or does not agree with itself, or its vectors
    are not `dim` wide."""
    file = Path(folder) / INDEX_FILE
    if not file.is_file():
        return None
    z = _arrays(file)
    meta = _meta(z["meta"])
    if meta["root"] != str(Path(root).resolve()):
        raise DamagedIndex(f"built for another folder, {meta['root'][:200]}")
    paths = _text_array(z["paths"], "paths")
    if len(set(paths)) != len(paths):
        raise DamagedIndex("a path appears twice")
    vectors = z["vectors"]
    if vectors.ndim != 2 or vectors.dtype.kind != "f":
        raise DamagedIndex(f"vectors of shape {vectors.shape} and type {vectors.dtype}")
    if len(vectors) != len(paths):
        raise DamagedIndex(f"{len(vectors)} vectors for {len(paths)} paths")
    if paths and dim is not None and vectors.shape[1] != dim:
        raise DamagedIndex(f"vectors {vectors.shape[1]} wide, the model's are {dim}")
    if not np.isfinite(vectors).all():
        raise DamagedIndex("vectors that are not finite numbers")
    stats = _stat_array(z["stats"], "stats", len(paths))
    skipped_paths = _text_array(z["skipped_paths"], "skipped_paths")
    reasons = _text_array(z["skipped_reasons"], "skipped_reasons", len(skipped_paths))
    skipped_stats = _stat_array(z["skipped_stats"], "skipped_stats", len(skipped_paths))
    return Gallery(
        Path(root),
        Path(folder),
        meta["checkpoint"],
        paths,
        stats,
        vectors.astype(np.float32),
        dict(zip(skipped_paths, reasons)),
        dict(zip(skipped_paths, skipped_stats)),
        meta["build_id"],
        meta.get("max_pixels"),
    )


def _check_whole(g):
    """Refuse to save an index whose rows do not match its paths (it would be short)."""
    n = len(g.paths)
    if (
        g.vectors.ndim != 2
        or len(g.vectors) != n
        or len(g.stats) != n
        or len(set(g.paths)) != n
        or not set(g.skipped_stats) <= set(g.skipped)
    ):
        raise RuntimeError(
            f"refusing to save a broken index of {g.root}: {len(g.vectors)} vectors, "
            f"{len(g.stats)} stats, {n} paths ({len(set(g.paths))} different)"
        )


def save_index(g):
    _check_whole(g)
    g.build_id = uuid.uuid4().hex[:12]
    meta = json.dumps(
        dict(
            format=FORMAT,
            checkpoint=g.checkpoint,
            root=str(g.root.resolve()),
            build_id=g.build_id,
            max_pixels=g.max_pixels,
        )
    )
    sk = list(g.skipped_stats.items())  # unreadable images; other entries are found each scan
    with atomic_path(g.folder / INDEX_FILE) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            meta=np.array(meta),
            vectors=g.vectors.astype(np.float32),
            paths=np.array(g.paths, dtype=str),
            stats=np.array(g.stats, dtype=np.int64).reshape(-1, 4),
            skipped_paths=np.array([p for p, _ in sk], dtype=str),
            skipped_reasons=np.array([g.skipped[p] for p, _ in sk], dtype=str),
            skipped_stats=np.array([k for _, k in sk], dtype=np.int64).reshape(-1, 4),
        )


class _NotRegular(Exception):
    pass


class _Images(torch.utils.data.Dataset):
    def __init__(self, root, paths, transform, max_pixels=None):
        self.root, self.paths, self.transform = root, paths, transform
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.root / self.paths[i]
        try:  # non-blocking: a file replaced by a pipe since the scan must not hang the loader
            with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise _NotRegular("not a regular file")
                # data/image.py, the one reader; its refusal is the skipped file's reason
                image = read_image(f, self.max_pixels, key="max_image_pixels", name=path)
        except _NotRegular as e:
            return i, None, str(e)
        except ImageTooLarge as e:
            return i, None, e.reason
        except ImageUnreadable as e:
            return i, None, e.reason
        except OSError as e:  # the file vanished or cannot be opened since the scan
            return i, None, f"{type(e).__name__}: {str(e)[:200]}"
        return i, self.transform(image), None


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, _, err in items if err is not None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


def _current(stored, found, identity, max_pixels=None):
    """What of a stored index can be kept for the folder as it is now: (paths, stats, vectors,
    skipped, skipped_stats). Under another pixel limit the skipped images are tried again (one
    refused as too large may now be allowed)."""
    if stored is None:
        return [], [], np.zeros((0, 0), np.float32), {}, {}
    if stored.checkpoint != identity:
        log.info(f"the checkpoint changed since {stored.folder} was built: rebuilding the index")
        return [], [], np.zeros((0, 0), np.float32), {}, {}
    keep = [i for i, p in enumerate(stored.paths) if found.get(p) == stored.stats[i]]
    skipped_stats = {p: k for p, k in stored.skipped_stats.items() if found.get(p) == k}
    if stored.max_pixels != max_pixels:
        skipped_stats = {}
    return (
        [stored.paths[i] for i in keep],
        [stored.stats[i] for i in keep],
        stored.vectors[keep],
        {p: stored.skipped[p] for p in skipped_stats},
        skipped_stats,
    )


def _load(folder, root, dim, report):
    """load_index, with a damaged index reported (when `report`) and treated as none."""
    try:
        return load_index(folder, root, dim)
    except DamagedIndex as e:
        if report:
            log.warning(f"index {Path(folder) / INDEX_FILE} is damaged ({e}); rebuilding it")
        return None


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
    dim=None,
    max_pixels=None,
):
    """Bring the index in `folder` up to date with the images under `root`; return the Gallery.
    `dim`, the width of the model's embeddings, makes a stored index of another width rebuild.
    `max_pixels` (the key max_image_pixels; None: Pillow's default) is the limit above which an
    image is skipped, from its header, without being decoded."""
    root, folder = Path(root), Path(folder)
    max_pixels = int(max_pixels or PILLOW_LIMIT)
    found, irregular = scan(root)
    identity = checkpoint_identity(checkpoint_path)
    stored = _load(folder, root, dim, report=False)  # a damaged one is reported under the lock
    if (
        stored is not None
        and stored.checkpoint == identity
        and _up_to_date(stored, found)
        and (stored.max_pixels == max_pixels or not stored.skipped_stats)
    ):
        return _finish(stored, irregular)
    with index_lock(folder, root):
        stored = _load(folder, root, dim, report=True)  # another process may have finished
        paths, stats, vectors, skipped, skipped_stats = _current(
            stored, found, identity, max_pixels
        )
        done = set(paths) | set(skipped)
        todo = [p for p in found if p not in done]
        g = Gallery(root, folder, identity, paths, stats, vectors, skipped, skipped_stats)
        g.max_pixels = max_pixels
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
        return _finish(g, irregular)


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
        _Images(g.root, todo, transform, g.max_pixels),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    pending, last_save = [], time.monotonic()  # (paths, vectors) of each batch not merged yet
    try:
        with tqdm(
            total=len(todo), desc="indexing", unit="img", disable=not progress, dynamic_ncols=True
        ) as bar:
            for idx, images, bad in loader:
                for i, err in bad:
                    g.skipped_stats[todo[i]] = found[todo[i]]
                    g.skipped[todo[i]] = err
                if images is not None:
                    with autocast(device, precision):
                        z = model.encode_image(images.to(device)).float()
                    pending.append(([todo[i] for i in idx], z.cpu().numpy()))  # one step
                bar.update(len(idx) + len(bad))
                if time.monotonic() - last_save > save_every_s:
                    _merge(g, pending, found)
                    save_index(g)
                    last_save = time.monotonic()
    finally:  # an interrupted build keeps what it embedded
        _merge(g, pending, found)
        save_index(g)


def _up_to_date(stored, found):
    have = dict(zip(stored.paths, stored.stats))
    have.update(stored.skipped_stats)
    return have == found


def _merge(g, pending, found):
    """Move the pending batches into the Gallery; each batch's paths and rows go in together."""
    if not pending:
        return
    batches = pending[:]
    pending.clear()
    new_paths = [p for paths, _ in batches for p in paths]
    block = np.concatenate([v for _, v in batches])
    vectors = np.concatenate([g.vectors, block]) if g.paths else block
    g.vectors, g.paths, g.stats = (
        vectors,
        g.paths + new_paths,
        g.stats + [found[p] for p in new_paths],
    )


def _finish(g, irregular):
    """The Gallery with the entries that are not image files added to its skipped ones."""
    g.skipped.update(irregular)
    if not g.paths:
        first, reason = next(iter(g.skipped.items()))
        raise UserError(
            f"none of the {len(g.skipped)} images under gallery folder {g.root} could be read "
            f"(e.g. {first}: {reason}). Point gallery= at a folder of readable photos."
        )
    if g.skipped:
        log.warning(
            f"{len(g.skipped)} unreadable image(s) under {g.root} skipped: "
            + ", ".join(f"{p} ({r[:60]})" for p, r in list(g.skipped.items())[:10])
            + (" ..." if len(g.skipped) > 10 else "")
        )
    return g
