"""A small BM25 keyword index over passages and figure texts (Okapi BM25, k1=1.5, b=0.75)."""

from __future__ import annotations

import math
import re
from collections import Counter

_WORD = re.compile(r"[a-z0-9]+(?:[._+-][a-z0-9]+)*")
STOP = frozenset("a an and are as at be by can do does for from how i in is it of on or that the this to what when "
                 "where which who why with you your my me we".split())


def tokenize(text: str) -> list[str]:
    """``tokenize("The M4PATH env-var, set_size!") == ['m4path', 'env-var', 'set_size']``"""
    return [w for w in _WORD.findall(text.lower()) if w not in STOP]


class BM25:
    def __init__(self, ids: list[str], texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.ids = ids
        self.k1, self.b = k1, b
        self.tfs = [Counter(tokenize(t)) for t in texts]
        self.lens = [sum(tf.values()) for tf in self.tfs]
        self.avg = (sum(self.lens) / len(self.lens)) if self.lens else 0.0
        df: Counter[str] = Counter()
        for tf in self.tfs:
            df.update(tf.keys())
        n = len(texts)
        self.idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}
        self.postings: dict[str, list[int]] = {}
        for i, tf in enumerate(self.tfs):
            for w in tf:
                self.postings.setdefault(w, []).append(i)

    def search(self, query: str, n: int, allowed=None) -> list[tuple[str, float]]:
        """Top ``n`` (id, score) with score > 0; ``allowed(i)`` may veto documents by position."""
        scores: dict[int, float] = {}
        for w in set(tokenize(query)):
            idf = self.idf.get(w)
            if idf is None:
                continue
            for i in self.postings[w]:
                tf = self.tfs[i][w]
                norm = tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * self.lens[i] / (self.avg or 1)))
                scores[i] = scores.get(i, 0.0) + idf * norm
        ranked = sorted(((s, i) for i, s in scores.items() if allowed is None or allowed(i)), reverse=True)[:n]
        return [(self.ids[i], s) for s, i in ranked]
