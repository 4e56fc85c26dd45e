"""Near-duplicate figures: groups of stored figures whose CLIP vectors are at least ``threshold``
cosine-similar (single linkage)."""

from __future__ import annotations

import numpy as np

from .records import FIGURE_KINDS, Filter
from .store import Store


def group_similar(vecs: np.ndarray, threshold: float) -> list[list[int]]:
    """Indexes grouped by single linkage over cosine similarity; singletons left out.

    >>> group_similar(np.array([[1, 0], [1, 0], [0, 1]], np.float32), 0.9)
    [[0, 1]]
    """
    n = len(vecs)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, n, 1024):
        sims = vecs[start:start + 1024] @ vecs.T
        for a, b in zip(*np.nonzero(sims >= threshold)):
            a += start
            if a < b:
                parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def near_duplicates(store: Store, threshold: float = 0.95) -> list[list[dict]]:
    """Groups of figures (of complete documents) at least ``threshold`` cosine-similar; each
    member as {id, doc, page, image (path under data_dir)}."""
    items, vecs = store.visual_vectors(Filter.of((d.sha256 for d in store.list_docs()), FIGURE_KINDS))
    return [[{"id": items[i].id, "doc": items[i].doc, "page": items[i].page, "image": items[i].image}
             for i in g] for g in group_similar(vecs, threshold)]
