"""The one image reader of training, infer, search, the app and the report thumbnails.

read_image(path) -> an upright 8-bit RGB image: the first frame of an animation, EXIF
orientation applied, 16-bit and float greys scaled to 8 bit (not clipped to white), transparent
parts on white (sketches are black lines on a transparent or white ground). The pixel limit is
checked against the header before any pixel is decoded (Image.open reads only the header)."""

import re
import warnings

import numpy as np
from PIL import Image

from runtime.errors import UserError

PILLOW_LIMIT = Image.MAX_IMAGE_PIXELS  # Pillow's own default (89478485 px), before any change
# Pillow warns inside Image.open above its MAX_IMAGE_PIXELS, which _arm keeps at or above the
# limit in force: an image it warns of is refused by read_image anyway. A process-wide filter,
# not catch_warnings (not thread-safe: the app, the cache builder read in threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# EXIF orientation -> the transpose that makes the image upright (as PIL.ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageTooLarge(UserError):
    """An image whose header gives more pixels than the limit (a possible decompression bomb);
    `reason` is the short form a gallery lists. Built as any exception from its message (torch
    re-raises a worker's error so), which is why the helpers below make them."""


class ImageUnreadable(UserError):
    """A file that is missing, truncated, corrupt or no image; `reason` says which."""


def too_large(path, limit, key, size=None, pixels=None):
    pixels = size[0] * size[1] if size else pixels
    dims = f"{size[0]}x{size[1]} = {pixels} pixels" if size else f"{pixels} pixels"
    e = ImageTooLarge(
        f"image {path} is larger than {key}={limit} ({dims}), refused before decoding. "
        f"If the file is genuine, raise {key}; else delete it."
    )
    e.reason = f"too large: {dims}, more than {key}={limit}"
    return e


def unreadable_image(path, reason):
    e = ImageUnreadable(
        f"cannot read image {path}: {reason}. Replace or delete the file "
        f"(python -m data.check lists every bad file)."
    )
    e.reason = reason
    return e


def _reason(e):
    return " ".join(f"{type(e).__name__}: {str(e)[:200]}".split())  # one line


def to_8bit(im):
    """A 16-bit, 32-bit int or float image as 8-bit grey ("L"), scaled, not clipped: I;16*
    0..65535 -> 0..255 (divided by 257); I kept when within 0..255, divided by 257 when within
    0..65535 (a 16-bit grey some Pillow versions open as I), else scaled from its range; F in
    [0, 1] times 255, else scaled from its range (NaN and infinities 0). Other modes unchanged."""
    if im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64) / 257.0
    elif im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = np.where(np.isfinite(a), a, 0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if im.mode == "I" and lo >= 0 and hi <= 255:
            pass
        elif im.mode == "I" and lo >= 0 and hi <= 65535:
            a = a / 257.0
        elif im.mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0
        else:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    else:
        return im
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im):
    """Any decoded image as RGB: 16-bit/float greys scaled (to_8bit), transparency on white,
    palette, CMYK and the rest through Pillow's convert."""
    im = to_8bit(im)
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _arm(max_pixels):
    """The limit in force, with Pillow's own check (which errs at twice its MAX_IMAGE_PIXELS,
    inside Image.open) raised to it when lower, so that it never refuses what the limit allows.
    Only ever raised: a thread reading under a lower limit cannot make another's read fail."""
    limit = int(max_pixels or PILLOW_LIMIT)
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit
    return limit


def _bomb(name, limit, key, e):
    n = re.search(r"\((\d+) pixels\)", str(e))  # more than twice Pillow's limit: its refusal
    return too_large(name, limit, key, pixels=n.group(1) if n else "more than the limit")


def read_image(source, max_pixels=None, key="dataset.max_image_pixels", draft=None, name=None):
    """Decode an image file (a path or an open binary file; `name` names it in messages) as an
    upright 8-bit RGB image (see the module's text). `max_pixels` (None: Pillow's default) is
    checked against the header before decoding; `key` is the setting the refusal names.
    draft=(w, h): a JPEG may decode at a reduced scale (the whole stream is still read, so
    truncation is caught). Raises ImageTooLarge or ImageUnreadable (UserErrors, one line)."""
    limit = _arm(max_pixels)
    name = source if name is None else name
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > limit:  # from the header: nothing is decoded yet
                raise too_large(name, limit, key, size=(w, h))
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", draft)
            im.load()
            orientation = im.getexif().get(0x0112)  # after load: a PNG's eXIf may trail
            out = to_rgb(im)
    except UserError:
        raise
    except Image.DecompressionBombError as e:
        raise _bomb(name, limit, key, e) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise unreadable_image(name, _reason(e)) from None
    if orientation in _UPRIGHT:
        out = out.transpose(_UPRIGHT[orientation])
    return out
