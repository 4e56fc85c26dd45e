"""Images as a vision model can read them: pure functions from a PIL image to the bytes sent.

A figure goes to the model as the page shows it: transparency composited onto white (a soft-masked
figure whose transparent pixels are black must not arrive as a black square), scaled down to
``llm.image_max_side``, in PNG (line art, few colours) or JPEG (photographs), within the strictest
hosted provider's limits. A very long thin image (a timeline, a colour scale, a tall screenshot) is
folded into a few stacked pieces and padded, not squashed into an unreadable sliver.
"""

from __future__ import annotations

import base64
import io
import math
import os

from PIL import Image

WHITE = (255, 255, 255)
MAX_ASPECT = 4.0  # longer/shorter side beyond which a shrunk image is folded, then padded up to
MAX_FOLDS = 8  # pieces a long image is cut into at most
MIN_SIDE = 32  # px; some servers (Qwen-VL's processor) refuse images smaller than 28 px
MAX_SIDE = 8000  # px; Anthropic's per-side limit, the strictest hosted one
MAX_BYTES = 3_750_000  # bytes before base64 (5 MB encoded: Anthropic's per-image limit)
PNG_MAX_COLOURS = 4096  # images with at most this many colours (diagrams, charts, scans of text) stay PNG


def flatten(im: Image.Image) -> Image.Image:
    """An RGB copy, with any transparency (RGBA, LA, P or L/RGB with a transparent colour)
    composited onto white, the way a PDF viewer shows it on a white page.

    >>> im = Image.new("RGBA", (2, 1), (0, 0, 0, 0))  # transparent black, as soft-masked figures store it
    >>> im.putpixel((1, 0), (0, 0, 0, 255))
    >>> [flatten(im).getpixel((x, 0)) for x in (0, 1)]
    [(255, 255, 255), (0, 0, 0)]
    >>> p = Image.new("P", (1, 1), 0); p.info["transparency"] = 0
    >>> flatten(p).getpixel((0, 0))
    (255, 255, 255)
    >>> flatten(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).mode
    'RGB'
    """
    alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if not alpha:
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    page = Image.new("RGBA", rgba.size, WHITE + (255,))
    page.alpha_composite(rgba)
    return page.convert("RGB")


def fold_count(long: int, short: int, max_side: int, max_folds: int = MAX_FOLDS) -> int:
    """How many pieces to cut a ``long`` × ``short`` image into so that, stacked and scaled to fit
    ``max_side``, it keeps the most detail; 1 when it fits or folding does not help.

    >>> fold_count(4000, 40, 1024)   # a 100:1 strip: 8 rows of 500 px, scaled by 1.0 instead of 0.26
    8
    >>> fold_count(1200, 300, 1024)  # an ordinary wide figure is left alone
    1
    >>> fold_count(800, 10, 1024)    # fits already: nothing to gain
    1
    """
    if long <= max_side or long <= MAX_ASPECT * short:
        return 1

    def extent(n: int) -> float:  # the larger side of the folded image
        gap = max(2, short // 8)
        return max(math.ceil(long / n), n * short + (n - 1) * gap)

    return min(range(1, max_folds + 1), key=lambda n: (extent(n), n))


def fold(im: Image.Image, pieces: int) -> Image.Image:
    """Cut a long image into ``pieces`` along its long side and stack them (rows for a wide image,
    columns for a tall one), reading order kept, white gaps between.

    >>> wide = Image.new("RGB", (100, 10), (0, 0, 0))
    >>> fold(wide, 4).size   # 4 rows of 25 px, 2 px gaps
    (25, 46)
    >>> fold(Image.new("RGB", (10, 100)), 2).size
    (22, 50)
    >>> fold(wide, 1) is wide
    True
    """
    if pieces <= 1:
        return im
    w, h = im.size
    wide = w >= h
    long, short = (w, h) if wide else (h, w)
    seg, gap = math.ceil(long / pieces), max(2, short // 8)
    across = pieces * short + (pieces - 1) * gap
    out = Image.new("RGB", (seg, across) if wide else (across, seg), WHITE)
    for i in range(pieces):
        a, b = i * seg, min(long, (i + 1) * seg)
        if a >= b:
            break
        piece = im.crop((a, 0, b, h) if wide else (0, a, w, b))
        out.paste(piece, (0, i * (short + gap)) if wide else (i * (short + gap), 0))
    return out


def pad(im: Image.Image, max_aspect: float = MAX_ASPECT, min_side: int = MIN_SIDE) -> Image.Image:
    """White margins, centred, so that neither side is shorter than ``min_side`` nor than
    1/``max_aspect`` of the other (servers refuse or distort extreme shapes).

    >>> pad(Image.new("RGB", (400, 20))).size
    (400, 100)
    >>> pad(Image.new("RGB", (10, 10))).size
    (32, 32)
    >>> pad(Image.new("RGB", (300, 200))).size
    (300, 200)
    """
    w, h = im.size
    nw = max(w, min_side, math.ceil(h / max_aspect))
    nh = max(h, min_side, math.ceil(w / max_aspect))
    if (nw, nh) == (w, h):
        return im
    out = Image.new("RGB", (nw, nh), WHITE)
    out.paste(im, ((nw - w) // 2, (nh - h) // 2))
    return out


def shrink(im: Image.Image, max_side: int) -> Image.Image:
    """Scaled down (never up) so that its longer side is at most ``max_side`` px.

    >>> shrink(Image.new("RGB", (2000, 1000)), 1024).size
    (1024, 512)
    >>> shrink(Image.new("RGB", (20, 10)), 1024).size
    (20, 10)
    """
    w, h = im.size
    if max(w, h) <= max_side:
        return im
    s = max_side / max(w, h)
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


def choose_format(im: Image.Image) -> str:
    """"PNG" for images of few colours (diagrams, charts, text: sharp edges, small as PNG),
    "JPEG" for photographs and other continuous-tone images.

    >>> choose_format(Image.new("RGB", (64, 64), WHITE))
    'PNG'
    >>> import random; rnd = random.Random(0)
    >>> noise = Image.new("RGB", (100, 100)); noise.putdata([tuple(rnd.randrange(256) for _ in "rgb") for _ in range(10000)])
    >>> choose_format(noise)
    'JPEG'
    """
    return "PNG" if im.getcolors(PNG_MAX_COLOURS) is not None else "JPEG"


def encode(im: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, format="JPEG", quality=quality, optimize=True)
    else:
        im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def prepare(im: Image.Image, max_side: int, max_bytes: int = MAX_BYTES) -> tuple[bytes, str, tuple[int, int]]:
    """The bytes to send for an image, their MIME type and the pixel size sent.

    Transparency onto white, long thin images folded, extreme shapes padded, scaled to
    ``max_side`` (capped at 8000 px), PNG or JPEG by content, re-encoded smaller (JPEG, lower
    quality, then fewer pixels) until it fits ``max_bytes``.

    >>> data, mime, size = prepare(Image.new("LA", (3000, 2000), (0, 0)), 1024)
    >>> mime, size, Image.open(io.BytesIO(data)).getpixel((5, 5))
    ('image/png', (1024, 683), (255, 255, 255))
    >>> prepare(Image.new("RGB", (6000, 30), (0, 0, 0)), 1024)[2]   # 200:1 strip folded into 8 rows
    (750, 261)
    """
    side = max(MIN_SIDE, min(int(max_side), MAX_SIDE))
    im = flatten(im)
    im = fold(im, fold_count(max(im.size), min(im.size), side))
    im = shrink(pad(im), side)
    fmt = choose_format(im)
    data = encode(im, fmt)
    quality = 85
    while len(data) > max_bytes:
        if fmt == "PNG" or quality > 60:
            fmt, quality = "JPEG", (quality if fmt == "JPEG" else 90) - 10
        else:
            im = shrink(im, int(max(im.size) * 0.75))
        data = encode(im, fmt, quality)
    return data, f"image/{fmt.lower()}", im.size


def data_url(image: Image.Image | str | os.PathLike, max_side: int) -> tuple[str, tuple[int, int]]:
    """A ``data:image/...;base64,...`` URL for an image (a PIL image or a file path), prepared by
    :func:`prepare`; returns it and the pixel size sent. Raises OSError for an unreadable file."""
    if isinstance(image, Image.Image):
        data, mime, size = prepare(image, max_side)
    else:
        with Image.open(image) as im:
            data, mime, size = prepare(im, max_side)
    return f"data:{mime};base64," + base64.b64encode(data).decode(), size
