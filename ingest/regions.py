"""Figure regions from an ink grid: pure numpy/scipy, no PyMuPDF.

Both born-digital pages (vector paths and placed images, from the page's bbox log) and scanned
pages (dark pixels minus OCR'd text) become a boolean grid of "ink" cells. Ink closer than
``gap`` points joins one region, so a figure made of many small shapes is one figure; the text
lines that label it (node labels, tick labels, legends) are then pulled into its box.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .records import BBox

CELL = 2.0  # grid resolution in PDF points


@dataclass
class Region:
    bbox: BBox
    n_paths: int = 0
    n_thin: int = 0
    image_area: float = 0.0
    images: list[int] = field(default_factory=list)  # indexes into the items given

    @property
    def area(self) -> float:
        return max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1])


def area(b: BBox) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def intersection(a: BBox, b: BBox) -> float:
    return area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def union(a: BBox, b: BBox) -> BBox:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def gap(a: BBox, b: BBox) -> float:
    """Distance between two boxes (0 when they touch or overlap)."""
    dx = max(0.0, max(a[0], b[0]) - min(a[2], b[2]))
    dy = max(0.0, max(a[1], b[1]) - min(a[3], b[3]))
    return max(dx, dy)


def paint(size: tuple[float, float], rects: list[BBox]) -> np.ndarray:
    """Boolean grid (rows = y) with every rect's cells set."""
    w, h = size
    grid = np.zeros((int(h / CELL) + 1, int(w / CELL) + 1), dtype=bool)
    for x0, y0, x1, y1 in rects:
        c0, c1 = max(0, int(x0 / CELL)), min(grid.shape[1], int(x1 / CELL) + 1)
        r0, r1 = max(0, int(y0 / CELL)), min(grid.shape[0], int(y1 / CELL) + 1)
        if c0 < c1 and r0 < r1:
            grid[r0:r1, c0:c1] = True
    return grid


def largest_patch(size: tuple[float, float], rects: list[BBox]) -> float:
    """The share of the page (``size``, points) covered by the largest patch of ``rects`` that
    touch or overlap each other (rects apart by more than a grid cell do not join), measured on
    the ``CELL`` grid (a rect's far edge rounds up to the next cell).

    >>> largest_patch((100, 100), [(0, 0, 100, 25), (0, 25, 100, 50), (0, 50, 100, 75)])  # three strips
    0.76
    >>> largest_patch((100, 100), [(0, 0, 40, 100), (60, 0, 100, 100)])  # two apart
    0.42
    """
    grid = paint(size, rects)
    grid[-1, :] = grid[:, -1] = False  # paint's extra row and column past the page's edge
    if not grid.any():
        return 0.0
    labels, n = ndimage.label(grid)
    biggest = np.bincount(labels.ravel())[1:].max()
    return float(biggest) / ((grid.shape[0] - 1) * (grid.shape[1] - 1))


def ink_regions(grid: np.ndarray, gap_pt: float) -> list[BBox]:
    """Boxes (points) of ink clusters; ink within ``gap_pt`` of each other joins one cluster."""
    if not grid.any():
        return []
    reach = max(1, int(round(gap_pt / CELL / 2)))
    joined = ndimage.binary_dilation(grid, structure=np.ones((2 * reach + 1, 2 * reach + 1), bool))
    labels, _ = ndimage.label(joined)
    labels[~grid] = 0  # boxes hug the ink itself, not its dilation
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        ys, xs = sl
        boxes.append((xs.start * CELL, ys.start * CELL, xs.stop * CELL, ys.stop * CELL))
    return boxes


def grow_with_labels(box: BBox, lines: list[tuple[str, BBox]], reach: float = 10.0, short: int = 30) -> BBox:
    """Pull text lines into a figure box: lines mostly inside it, and short lines (tick labels,
    axis titles, node labels) within ``reach`` points of it. Two passes, so a title above the
    tick labels joins too."""
    for _ in range(2):
        grown = box
        for text, lb in lines:
            la = area(lb) or 1.0
            inside = intersection(box, lb) / la
            if inside >= 0.5 or (len(text.strip()) <= short and gap(box, lb) <= reach):
                grown = union(grown, lb)
        if grown == box:
            break
        box = grown
    return box


def describe(box: BBox, items: list[tuple[BBox, str]]) -> Region:
    """Count what a region is made of: path items (thin or not), placed images."""
    reg = Region(box)
    for i, (r, kind) in enumerate(items):
        cx, cy = (r[0] + r[2]) / 2, (r[1] + r[3]) / 2
        if not (box[0] <= cx <= box[2] and box[1] <= cy <= box[3]):
            continue
        if kind == "image":
            reg.images.append(i)
            reg.image_area += intersection(r, box)
            continue
        reg.n_paths += 1
        w, h = r[2] - r[0], r[3] - r[1]
        if min(w, h) <= 1.5:
            reg.n_thin += 1
    return reg


def looks_like_table(segments: int, rules: int, wide_rules: int, vertical_rules: int) -> bool:
    """Ruled tables are drawn with axis-aligned rules only: several full-width horizontal ones,
    and either vertical rules or enough rows. (Text in the cells is checked by the caller.)"""
    return (segments >= 4 and rules >= 0.9 * segments and wide_rules >= 2
            and (vertical_rules >= 2 or wide_rules >= 3))
