"""Retrieval metrics as defined in shared/eval-dev/README.md. Pure functions.

A ranking is a list of relevance flags (True = relevant) after the level's reduction
(unique pages at page level; first hit only at figure level)."""

from __future__ import annotations

import math

PAGE_IMAGE_SHARE = 0.8  # a region covering this much of its page counts as a page image


def recall_at(flags: list[bool], k: int) -> float:
    """1 if a relevant item is among the first ``k`` flags, else 0.

    >>> recall_at([False, True], 1), recall_at([False, True], 2)
    (0.0, 1.0)
    """
    return 1.0 if any(flags[:k]) else 0.0


def mrr_at(flags: list[bool], k: int = 10) -> float:
    """1/rank (1-based) of the first relevant item within the first ``k`` flags, else 0.

    >>> mrr_at([False, True]), mrr_at([False, True], k=1)
    (0.5, 0.0)
    """
    for i, f in enumerate(flags[:k], 1):
        if f:
            return 1.0 / i
    return 0.0


def ndcg_at(flags: list[bool], n_relevant: int, k: int = 5) -> float:
    """Binary-gain nDCG@k (gain 1/log2(rank+1)); the ideal ranking puts min(k, n_relevant)
    relevant items first, so finding k of more than k relevant items scores 1.

    >>> ndcg_at([False, True], n_relevant=1, k=5) == 1 / math.log2(3)
    True
    >>> ndcg_at([True] * 5, n_relevant=9, k=5)
    1.0
    """
    dcg = sum(1.0 / math.log2(i + 1) for i, f in enumerate(flags[:k], 1) if f)
    idcg = sum(1.0 / math.log2(i + 1) for i in range(1, min(k, n_relevant) + 1))
    return dcg / idcg if idcg else 0.0


def iou(a, b) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1); 0 for no overlap or empty boxes.

    >>> iou([0, 0, 10, 10], [5, 0, 15, 10])  # 50 / 150
    0.3333333333333333
    """
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_hit(region, target) -> bool:
    """IoU >= 0.3, or the region contains the target's centre (boxes in the same page coordinates).

    >>> box_hit([7, 0, 10, 10], [0, 0, 10, 10]), box_hit([7.1, 0, 10, 10], [0, 0, 10, 10])
    (True, False)
    """
    cx, cy = (target[0] + target[2]) / 2, (target[1] + target[3]) / 2
    return iou(region, target) >= 0.3 or (region[0] <= cx <= region[2] and region[1] <= cy <= region[3])


def page_flags(results: list[dict], query: dict) -> list[bool]:
    """Unique (doc, page) in rank order, flagged relevant when in the query's doc and pages."""
    seen, flags = set(), []
    for r in results:
        key = (r["doc"], r["page"])
        if key in seen:
            continue
        seen.add(key)
        flags.append(r["doc"] == query["doc"] and r["page"] in query["pages"])
    return flags


def figure_flags(results: list[dict], query: dict, page_area: dict | None = None) -> list[bool]:
    """Figure items only (no whole pages, no region of >= 80% of its page); only the first hit counts."""
    flags, hit = [], False
    for r in results:
        if not r.get("bbox") or r.get("kind") in ("page", "text"):
            continue
        b = r["bbox"]
        area = page_area.get((r["doc"], r["page"])) if page_area else None
        if area and (b[2] - b[0]) * (b[3] - b[1]) >= PAGE_IMAGE_SHARE * area:
            continue
        ok = (not hit and r["doc"] == query["doc"] and r["page"] in query["pages"] and box_hit(b, query["bbox"]))
        hit = hit or ok
        flags.append(ok)
    return flags


def score(flags: list[bool], n_relevant: int) -> dict:
    return {"recall@1": recall_at(flags, 1), "recall@5": recall_at(flags, 5), "mrr@10": mrr_at(flags, 10),
            "ndcg@5": ndcg_at(flags, n_relevant, 5)}


def mean(rows: list[dict]) -> dict:
    if not rows:
        return {"recall@1": 0.0, "recall@5": 0.0, "mrr@10": 0.0, "ndcg@5": 0.0, "n": 0}
    out = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in rows[0]}
    out["n"] = len(rows)
    return out
