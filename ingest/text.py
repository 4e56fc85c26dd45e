"""Text blocks in reading order, running headers/footers, and chunking. Pure functions on tuples."""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable

from .records import BBox

Block = tuple[str, BBox]

MARGIN = 0.07  # top/bottom share of the page where running headers and footers live
_DIGITS = re.compile(r"\d+")
_SPACES = re.compile(r"\s+")


def normalise_margin_text(text: str) -> str:
    """Key used to spot running headers: ``normalise_margin_text("Page 12 of 30") == "page # of #"``."""
    return _DIGITS.sub("#", _SPACES.sub(" ", text.strip().lower()))


def running_lines(margin_texts: Iterable[list[str]], n_pages: int) -> set[str]:
    """Margin texts (normalised) that repeat on enough pages to be running headers/footers."""
    counts = Counter(key for texts in margin_texts for key in set(map(normalise_margin_text, texts)))
    need = max(3, int(0.2 * n_pages))
    return {key for key, c in counts.items() if c >= need}


def is_margin(bbox: BBox, page_height: float) -> bool:
    return bbox[3] <= page_height * MARGIN or bbox[1] >= page_height * (1 - MARGIN)


def drop_running(blocks: list[Block], page_height: float, running: set[str]) -> list[Block]:
    """Drop header/footer blocks: repeated margin lines and bare page numbers."""
    out = []
    for text, bbox in blocks:
        if is_margin(bbox, page_height):
            key = normalise_margin_text(text)
            if key in running or key in ("#", "- # -", "page #") or len(key) <= 3:
                continue
        out.append((text, bbox))
    return out


def reading_order(blocks: list[Block], page_width: float, vertical: Collection[BBox] = ()) -> list[Block]:
    """Order blocks for reading: full-width blocks split the page into bands; in each band the
    left column is read before the right one. Single-column pages come out top to bottom.
    ``vertical`` holds the boxes of blocks of vertical text (``vertical_blocks``): in a band of
    only such blocks the right column is read first, and blocks side by side right to left.

    >>> v = [("right half", (320, 100, 500, 400)), ("left half", (100, 100, 280, 400))]
    >>> [t for t, _ in reading_order(v, 612)], [t for t, _ in reading_order(v, 612, [b for _, b in v])]
    (['left half', 'right half'], ['right half', 'left half'])
    """
    mid = page_width / 2
    ordered: list[Block] = []
    band: list[Block] = []

    def flush() -> None:
        left = [b for b in band if (b[1][0] + b[1][2]) / 2 < mid]
        right = [b for b in band if (b[1][0] + b[1][2]) / 2 >= mid]
        two_columns = left and right and all(b[1][2] <= mid + 0.05 * page_width for b in left) and all(
            b[1][0] >= mid - 0.05 * page_width for b in right
        )
        rtl = bool(band) and all(b[1] in vertical for b in band)  # vertical text: columns right to left
        if two_columns:
            for side in ((right, left) if rtl else (left, right)):
                ordered.extend(sorted(side, key=lambda b: (b[1][1], -b[1][2] if rtl else b[1][0])))
        else:
            for row in rows(band):
                ordered.extend(sorted(row, key=lambda b: -b[1][2] if rtl else b[1][0]))
        band.clear()

    for block in sorted(blocks, key=lambda b: (b[1][1], b[1][0])):
        x0, _, x1, _ = block[1]
        if x0 < mid - 0.05 * page_width and x1 > mid + 0.05 * page_width:  # spans both columns
            flush()
            ordered.append(block)
        else:
            band.append(block)
    flush()
    return ordered


def rows(blocks: list[Block]) -> list[list[Block]]:
    """``blocks`` grouped in rows, top to bottom: a block joins the row above when it overlaps
    that row's first block down the page by at least half the taller of the two (blocks side by
    side, of about one height; reading order reads a row across). So a form's value, set in a
    taller box than its label, is read after the label though its top is higher; a paragraph
    and a short note beside it are not one row.

    >>> [[t for t, _ in r] for r in rows([("SN-44817", (180, 55.6, 270, 77.6)), ("Serial:", (72, 60.2, 143, 75.3)),
    ...                                    ("Next line", (72, 90, 200, 105)), ("note", (400, 95, 500, 107)),
    ...                                    ("paragraph", (72, 110, 300, 400)), ("side", (400, 112, 500, 124))])]
    [['SN-44817', 'Serial:'], ['Next line', 'note'], ['paragraph'], ['side']]
    """
    out: list[list[Block]] = []
    for block in sorted(blocks, key=lambda b: (round(b[1][1]), b[1][0])):
        if out:
            first = out[-1][0][1]
            overlap = min(first[3], block[1][3]) - max(first[1], block[1][1])
            if overlap >= 0.5 * max(first[3] - first[1], block[1][3] - block[1][1]) > 0:
                out[-1].append(block)
                continue
        out.append([block])
    return out


COLUMN_LINE = 0.2  # of the page width: lines of a column of text are at least this wide (most of them)


def join_line_pieces(lines: list[Block], gap: float = 2.0) -> list[Block]:
    """OCR lines with the pieces of one line joined: pieces in one row (``rows``) whose
    horizontal gap is at most ``gap`` times the line height, left to right. Pieces farther apart
    (two columns, a label beside a value) stay apart.

    >>> join_line_pieces([("pressure relief", (96, 90, 309, 104)), ("The", (72, 90, 95, 102)),
    ...                   ("bar.", (308, 91, 332, 101)), ("side note", (450, 90, 520, 103))])
    [('The pressure relief bar.', (72, 90, 332, 104)), ('side note', (450, 90, 520, 103))]
    """
    out: list[Block] = []
    for row in rows(lines):
        row = sorted(row, key=lambda b: b[1][0])
        text, box = row[0]
        for t, b in row[1:]:
            height = max(box[3] - box[1], b[3] - b[1], 1.0)
            if b[0] - box[2] <= gap * height:
                text, box = f"{text} {t}", (min(box[0], b[0]), min(box[1], b[1]), max(box[2], b[2]), max(box[3], b[3]))
            else:
                out.append((text, box))
                text, box = t, b
        out.append((text, box))
    return out


def split_columns(words: list[tuple], page_width: float) -> list[Block] | None:
    r"""The two column parts of one text block whose lines alternate between the columns of a
    two-column page (producers that draw a page row by row across the columns: MuPDF then holds
    'left line 1, right line 1, left line 2, ...' in one block), or None when the block is not so.

    ``words`` are the block's PyMuPDF words (x0, y0, x1, y1, text, block, line, word number) in
    displayed coordinates. A block splits when every word lies on one side of a gutter near the
    page middle (as ``reading_order`` defines columns) at least a line height wide, no line of the
    block runs across it (MuPDF starts a new line at a jump to the other column; a table row or
    text aligned with spaces is one line), and each side holds two lines or more, most of them as
    wide as a column's text (``COLUMN_LINE``): a form's short labels with their values beside
    them stay one block, read row by row.

    >>> row = lambda y, n: [(54, y, 290, y + 10, f"left{n}", 0, 2 * n, 0), (318, y, 556, y + 10, f"right{n}", 0, 2 * n + 1, 0)]
    >>> split_columns(row(72, 0) + row(84, 1), 612)
    [('left0\nleft1', (54, 72, 290, 94)), ('right0\nright1', (318, 72, 556, 94))]
    >>> split_columns([(54, 72, 120, 82, "Name:", 0, 0, 0), (318, 72, 400, 82, "Okonkwo", 0, 0, 1),
    ...                (54, 84, 120, 94, "Serial:", 0, 1, 0), (318, 84, 400, 94, "XK-42917", 0, 1, 1)], 612) is None
    True
    >>> one_line = lambda y, n: [(w[0], w[1], w[2], w[3], w[4], 0, n, w[7]) for w in row(y, n)]
    >>> split_columns(one_line(72, 0) + one_line(84, 1), 612) is None
    True
    """
    mid, slack = page_width / 2, 0.05 * page_width
    sides: tuple[list, list] = ([], [])
    for w in words:
        sides[(w[0] + w[2]) / 2 >= mid].append(w)
    left, right = sides
    if not left or not right or {(w[5], w[6]) for w in left} & {(w[5], w[6]) for w in right}:
        return None  # one side only, or a line runs across the gutter: a table row, text set with spaces
    height = sorted(w[3] - w[1] for w in words)[len(words) // 2]
    gutter = (max(w[2] for w in left), min(w[0] for w in right))
    if not (gutter[1] - gutter[0] >= height and gutter[0] <= mid + slack and gutter[1] >= mid - slack):
        return None
    for side in sides:
        by_line: dict[tuple, list] = {}  # one pass: each line's words' boxes
        for w in side:
            by_line.setdefault((w[5], w[6]), []).append(w[:4])
        lines = [_union(boxes) for boxes in by_line.values()]
        wide = sum(b[2] - b[0] >= COLUMN_LINE * page_width for b in lines)
        if len(lines) < 2 or 2 * wide < len(lines):
            return None
    return [words_block(left), words_block(right)]


def words_block(words: list[tuple]) -> Block:
    r"""A block made of PyMuPDF ``words`` (x0, y0, x1, y1, text, block, line, word number): its
    lines in order, each its words joined by spaces, and the box around them.

    >>> words_block([(72, 84, 90, 94, "two", 0, 1, 0), (72, 72, 90, 82, "one", 0, 0, 0), (95, 72, 120, 82, "line", 0, 0, 1)])
    ('one line\ntwo', (72, 72, 120, 94))
    """
    lines: dict[tuple, list] = {}
    for w in sorted(words, key=lambda w: (w[5], w[6], w[7])):
        lines.setdefault((w[5], w[6]), []).append(w[4])
    return "\n".join(" ".join(ws) for ws in lines.values()), _union([w[:4] for w in words])


_DINGBATS_MOVED = {0x25: 0x260E, 0x2A: 0x261B, 0x2B: 0x261E, 0x48: 0x2605, 0x6C: 0x25CF, 0x6E: 0x25A0,
                   0x73: 0x25B2, 0x74: 0x25BC, 0x75: 0x25C6, 0x77: 0x25D7}


def dingbats_text(text: str) -> str:
    """Text drawn in the ZapfDingbats font (form check boxes and radio buttons, ticks and
    bullets in lists) as the symbols a reader sees: the font has no ToUnicode map, so MuPDF
    reports its codes as ASCII (a ticked box reads "4"). Codes 0x21-0x7E map to Unicode's
    Dingbats block at the same offset, except the few Unicode placed elsewhere (Adobe's
    ZapfDingbats-to-Unicode table); other characters are kept.

    >>> dingbats_text("4"), dingbats_text("3"), dingbats_text("8"), dingbats_text("l"), dingbats_text("n")
    ('✔', '✓', '✘', '●', '■')
    """
    return "".join(chr(_DINGBATS_MOVED.get(ord(c), 0x2700 + ord(c) - 0x20)) if 0x21 <= ord(c) <= 0x7E else c
                   for c in text)


OVERPRINT = 0.3  # how far (share of the word's height) a second drawing of a word may sit and still be one word to a reader


def overprinted(words: list[tuple]) -> set[int]:
    """Indices of ``words`` (PyMuPDF words: x0, y0, x1, y1, text, ...) that draw again a word
    already drawn in nearly the same place: the same text, the same height within a point, each
    corner less than ``OVERPRINT`` × its height and half its width away. Producers simulate bold by drawing a line
    twice, a hair apart (Word's and many printer drivers' fake bold), or draw a shadow under a
    heading, and OCR run twice leaves two text layers: a reader sees one word, and the text keeps
    one. Each word is compared with the words of its text in the neighbouring grid cells only, so
    a page of one repeated word costs linear time.

    >>> bold = [(72, 57, 112, 76, "Safety", 0, 0, 0), (116, 57, 172, 76, "first", 0, 0, 1),
    ...         (72.4, 57, 112.4, 76, "Safety", 0, 1, 0), (116.4, 57, 172.4, 76, "first", 0, 1, 1)]
    >>> sorted(overprinted(bold))
    [2, 3]
    >>> overprinted([(72, 57, 80, 67, "la", 0, 0, 0), (84, 57, 92, 67, "la", 0, 0, 1)])  # said twice
    set()
    >>> overprinted([(297, 188, 300, 207, "·", 0, 0, 0), (302, 188, 305, 207, "·", 0, 0, 1)])  # \\cdots
    set()
    """
    seen: dict[tuple, list[tuple]] = {}
    repeats = set()
    for n, w in enumerate(words):
        height = w[3] - w[1]
        if height <= 0 or not w[4].strip():
            continue
        reach = min(OVERPRINT * height, 0.5 * (w[2] - w[0]))  # and half its width: "· · ·" are three dots
        cx, cy, r = int(w[0] // _CELL), int(w[1] // _CELL), math.ceil(reach / _CELL)
        if any(abs(o[0] - w[0]) < reach and abs(o[1] - w[1]) < reach and abs(o[2] - w[2]) < reach
               and abs(o[3] - w[3]) < reach and abs((o[3] - o[1]) - height) <= 1
               for hx in range(-r, r + 1) for hy in range(-r, r + 1)
               for o in seen.get((w[4], cx + hx, cy + hy), ())):
            repeats.add(n)
            continue
        seen.setdefault((w[4], cx, cy), []).append(w)
    return repeats


_CELL = 4.0  # pt: grid cell of overprinted's search (a word's reach spans one cell each way at 13 pt)


def vertical_blocks(lines: list[tuple]) -> list[Block]:
    r"""Blocks of vertical text (Chinese and Japanese set top to bottom, tategaki) in reading
    order: each column top to bottom, the columns of a region from right to left.

    ``lines`` are vertical text lines (x0, y0, x1, y1, text) in displayed coordinates, as MuPDF
    gives them for a font written vertically (line ``wmode`` 1: often one character a line).
    Lines one above the other, overlapping across, are one column (a gap of more than a
    character's width between them starts a space, of more than 1.5 a new column); columns side
    by side that overlap down the page with a gutter of at most two column widths are one region,
    one block: its columns joined by line breaks (so ``clean_block_text`` runs a sentence on from
    one column to the next without a space), and the box around them. Regions are returned top
    to bottom, the right one first (``reading_order`` then places them among horizontal blocks).

    >>> col = lambda x, s, y=100: [(x, y + 16 * i, x + 16, y + 16 * (i + 1), c) for i, c in enumerate(s)]
    >>> vertical_blocks(col(100, "見当が") + col(124, "名前は") + col(148, "吾輩は"))
    [('吾輩は\n名前は\n見当が', (100, 100, 164, 148))]
    >>> [t for t, _ in vertical_blocks(col(300, "下段", 400) + col(300, "上段") + col(100, "LED") + col(100, "AB", 170))]
    ['上段', 'LED AB', '下段']

    A glyph placed a hair to the right (producers that position and round each glyph), two
    tiers two characters apart, regions side by side whose tops differ by a point or two:

    >>> jit = lambda x, s: [(x + 0.01 * (i % 3 == 2), 100 + 16 * i, x + 16.01, 116 + 16 * i, c) for i, c in enumerate(s)]
    >>> vertical_blocks(jit(124, "吾輩は猫である") + jit(100, "名前はまだ無い"))[0][0]
    '吾輩は猫である\n名前はまだ無い'
    >>> [t for t, _ in vertical_blocks(col(124, "上一", 100) + col(100, "上二", 100) + col(124, "下一", 164) + col(100, "下二", 164))]
    ['上一\n上二', '下一\n下二']
    >>> [t for t, _ in vertical_blocks(col(300, "右", 102) + col(200, "中", 100) + col(100, "左", 101))]
    ['右', '中', '左']
    """
    cols: list[list] = []  # each: [x0, y0, x1, y1, [lines]]
    open_cols: list[list] = []  # the columns a line further down may still continue
    # top to bottom: a character slightly right of the one above it (producers that place and
    # round each glyph) still continues its column; columns a gap of more than 1.5 characters
    # above the current line are closed (two tiers' columns stay apart, and each line looks at
    # the open ones only)
    for ln in sorted(lines, key=lambda l: (l[1], -(l[0] + l[2]) / 2)):
        w = max(ln[2] - ln[0], 1e-3)
        open_cols = [c for c in open_cols if ln[1] - c[3] <= 1.5 * max(w, c[2] - c[0])]
        for c in open_cols:
            overlap = min(c[2], ln[2]) - max(c[0], ln[0])
            if overlap >= 0.5 * min(w, c[2] - c[0]) and -2 * w <= ln[1] - c[3] <= 1.5 * w:
                c[:4] = min(c[0], ln[0]), min(c[1], ln[1]), max(c[2], ln[2]), max(c[3], ln[3])
                c[4].append(ln)
                break
        else:
            cols.append([ln[0], ln[1], ln[2], ln[3], [ln]])
            open_cols.append(cols[-1])
    regions: list[list] = []  # each: [x0, y0, x1, y1, [columns]], columns right to left
    for c in sorted(cols, key=lambda c: (-c[2], c[1])):
        width = c[2] - c[0]
        for r in regions:
            last = r[4][-1]
            down = min(r[3], c[3]) - max(r[1], c[1])
            if (down > 0.5 * min(c[3] - c[1], r[3] - r[1]) and
                    -0.5 * width <= last[0] - c[2] <= 2 * max(width, last[2] - last[0])):
                r[:4] = min(r[0], c[0]), min(r[1], c[1]), max(r[2], c[2]), max(r[3], c[3])
                r[4].append(c)
                break
        else:
            regions.append([c[0], c[1], c[2], c[3], [c]])
    # regions side by side (overlapping down the page) right to left, one below another top first
    bands: list[list] = []  # each: [y0, y1, [regions]]
    for r in sorted(regions, key=lambda r: r[1]):
        if bands and r[1] < bands[-1][1]:
            bands[-1][1] = max(bands[-1][1], r[3])
            bands[-1][2].append(r)
        else:
            bands.append([r[1], r[3], [r]])
    regions = [r for band in bands for r in sorted(band[2], key=lambda r: -r[2])]
    out: list[Block] = []
    for r in regions:
        texts = []
        for c in r[4]:
            parts, prev = [], None
            for ln in sorted(c[4], key=lambda l: l[1]):
                if prev is not None and ln[1] - prev[3] > max(ln[2] - ln[0], 1e-3):
                    parts.append(" ")
                parts.append(ln[4])
                prev = ln
            texts.append("".join(parts))
        out.append(("\n".join(texts), (r[0], r[1], r[2], r[3])))
    return out


_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)  # zero-width, BOM, soft hyphen
# control characters (a font's stand-in codes for glyphs it maps to nothing, such as a TeX
# formula's large brace, code 26) and U+FFFD, a character the PDF could not say: no reader sees them
_INVISIBLE |= dict.fromkeys([*range(0x00, 0x09), *range(0x0e, 0x20), 0x7f, 0xfffd], None)
_INVISIBLE |= {0x0b: " ", 0x0c: " "}  # vertical tab, form feed: white space between words
_LINE_END_HYPHEN = re.compile(r"(\w)[-\u00ad\u2010]\s*\n\s*(\w)")


def normalise_text(text: str) -> str:
    r"""Text as a reader means it, the one form stored and searched: NFKC (ligatures, presentation
    and full-width forms become plain letters), words hyphenated at a line end joined, soft
    hyphens, zero-width and control characters (tab and line breaks apart; vertical tab and form
    feed become spaces) and U+FFFD removed.
    Line breaks are kept.

    >>> normalise_text("e\ufb03cient \ufb01lter, \ufb02ow")
    'efficient filter, flow'
    >>> normalise_text("ＡＢＣ１２３ re\u00adsult zero\u200bwidth")
    'ABC123 result zerowidth'
    >>> normalise_text("hyphen-\nated and soft\u00ad\nhyphen")
    'hyphenated and softhyphen'
    >>> normalise_text("median = \x1a s(N/2), N odd\ufffd\tend")
    'median =  s(N/2), N odd\tend'
    """
    text = _LINE_END_HYPHEN.sub(r"\1\2", text)
    return unicodedata.normalize("NFKC", text.translate(_INVISIBLE))


# Chinese and Japanese are written without spaces: a line break between two of their characters
# (a wrapped line, or each character of vertical text on a line of its own) joins without one.
_CJK = "\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uff60"
_CJK_BREAK = re.compile(rf"(?<=[{_CJK}])[ \t]*\n\s*(?=[{_CJK}])")


def clean_block_text(text: str) -> str:
    r"""Join a block's lines into one normalised paragraph; hyphenated line ends are joined, and
    line ends between Chinese or Japanese characters join without a space (vertical text holds
    one character a line).

    >>> clean_block_text("a figure-\nregion is\n drawn")
    'a figureregion is drawn'
    >>> clean_block_text("the e\ufb03cient\n\ufb01lter")
    'the efficient filter'
    >>> clean_block_text("水\n泵\n维\n修"), clean_block_text("更换叶\n轮 (impeller)\nnow")
    ('水泵维修', '更换叶轮 (impeller) now')
    """
    return _SPACES.sub(" ", _CJK_BREAK.sub("", normalise_text(text))).strip()


def _union(boxes: list[BBox]) -> BBox:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def chunk_blocks(blocks: list[Block], size: int, overlap: int) -> list[tuple[str, BBox]]:
    """Pack ordered blocks into chunks of at most ``size`` characters; each chunk starts with the
    last ``overlap`` characters (whole words) of the one before. Long blocks are cut at spaces."""
    overlap = min(overlap, size // 2)
    room = max(1, size - overlap - 1)  # a piece plus the carried tail always fits
    pieces: list[Block] = []
    for text, bbox in blocks:
        while len(text) > room:
            cut = text.rfind(" ", 0, room + 1)
            cut = cut if cut > room // 2 else room
            pieces.append((text[:cut].strip(), bbox))
            text = text[cut:].strip()
        if text:
            pieces.append((text, bbox))
    chunks: list[tuple[str, BBox]] = []
    cur: list[Block] = []

    def length(parts: list[Block]) -> int:
        return sum(len(t) for t, _ in parts) + max(0, len(parts) - 1)

    for piece in pieces:
        if cur and length(cur + [piece]) > size:
            chunks.append((" ".join(t for t, _ in cur), _union([b for _, b in cur])))
            joined = " ".join(t for t, _ in cur)
            tail = joined[len(joined) - overlap:] if overlap and len(joined) > overlap else (joined if overlap else "")
            tail = tail[tail.find(" ") + 1:] if " " in tail and len(joined) > overlap else tail
            cur = [(tail, cur[-1][1])] if tail else []
        cur.append(piece)
    if cur:
        chunks.append((" ".join(t for t, _ in cur), _union([b for _, b in cur])))
    return chunks
