"""Hybrid retrieval: CLIP text→image (and image→image), passage embeddings and BM25 keywords (a
persistent Tantivy index, ``index.keyword``) over passages and figure texts, fused by weighted score fusion (``retrieval.fusion: score``) or weighted
reciprocal rank fusion (``rrf``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from index.keyword import KeywordIndex
from index.store import Match, Store, bbox_from_meta

from .records import FIGURE_KINDS, Hit

SIGNALS = ("clip", "text", "keyword")
ALL_KINDS = FIGURE_KINDS + ("page", "text")


def score_fusion(scored: dict[str, Sequence[tuple[str, float]]], weights: dict[str, float]) -> list[tuple[str, float]]:
    """Weighted sum of min-max normalised scores (CombSUM). ``scored`` maps a signal to its
    (unit, score) list in any score unit; each signal's scores are rescaled to [0, 1] (a signal
    that returned one unit, or equal scores, gives each 1), multiplied by the signal's weight
    (1 when absent from ``weights``) and summed; a unit a signal did not return gets 0 from it.
    Returns (unit, fused score) best first; ties keep the order of first appearance.

    Here x is a's best (1) and y a's worst (0) but b's only unit (1), so they tie:

    >>> score_fusion({"a": [("x", 2.0), ("y", 1.0)], "b": [("y", 0.5)]}, {"a": 1, "b": 1})
    [('x', 1.0), ('y', 1.0)]
    """
    totals: dict[str, float] = {}
    for signal, ranked in scored.items():
        if not ranked:
            continue
        hi, lo = max(s for _, s in ranked), min(s for _, s in ranked)
        w = weights.get(signal, 1.0)
        for unit, s in ranked:
            norm = (s - lo) / (hi - lo) if hi > lo else 1.0
            totals[unit] = totals.get(unit, 0.0) + w * norm
    return sorted(totals.items(), key=lambda t: -t[1])


def rrf(rankings: dict[str, Sequence[str]], weights: dict[str, float], k: int = 60) -> list[tuple[str, float]]:
    """Weighted reciprocal rank fusion: ``score(u) = Σ_s w_s / (k + rank_s(u))``, ranks 1-based,
    a signal that did not rank ``u`` adds nothing; ``w_s`` is 1 when absent from ``weights``.
    Returns (unit, fused score) best first; ties keep the order of first appearance.

    >>> rrf({"a": ["x", "y"], "b": ["y"]}, {"a": 1, "b": 1}, k=0)
    [('y', 1.5), ('x', 1.0)]
    """
    scores: dict[str, float] = {}
    for signal, ranked in rankings.items():
        w = weights.get(signal, 1.0)
        for rank, unit in enumerate(ranked, 1):
            scores[unit] = scores.get(unit, 0.0) + w / (k + rank)
    return sorted(scores.items(), key=lambda t: -t[1])


class Retriever:
    def __init__(self, store: Store, clip, passages, cfg: dict, data_dir: str, keyword: KeywordIndex | None = None,
                 sync_keyword: Callable[[], object] | None = None):
        """``keyword`` is the keyword index (default: the one in ``data_dir/keyword``);
        ``sync_keyword`` is called when that index does not cover every complete document (the
        library's ``sync_keyword``, which rebuilds it when no writer is busy)."""
        self.store, self.clip, self.passages = store, clip, passages
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.keyword = keyword or KeywordIndex(self.data_dir / "keyword")
        self.sync_keyword = sync_keyword

    def _keyword_matches(self, question: str, n: int, complete: list[str], shas: list[str],
                         kinds: Sequence[str]) -> list[Match]:
        """BM25 matches among the text items of documents ``shas`` that stand for ``kinds``,
        with their stored records (Chroma's copy is the truth: a record it lacks is skipped)."""
        if self.sync_keyword and not self.keyword.covers(complete):
            self.sync_keyword()
        wanted = [x for x in kinds if x != "page"]  # a text item is a passage or a figure's text
        if not wanted:
            return []
        every = set(wanted) >= set(ALL_KINDS) - {"page"}
        found = self.keyword.search(question, n, docs=shas, kinds=None if every else wanted)
        records = {m.id: m for m in self.store.get_text([i for i, _ in found])}
        allowed = set(shas)
        out = []
        for i, score in found:
            m = records.get(i)
            if m and m.metadata["doc_sha"] in allowed:
                out.append(Match(i, score, m.metadata, m.document))
        return out

    def retrieve(self, question: str = "", k: int | None = None, kinds: Sequence[str] | None = None,
                 docs: Sequence[str] | None = None, labels: Sequence[str] | None = None, image=None,
                 signals: Sequence[str] = SIGNALS) -> list[Hit]:
        """Ranked figures, pages and passages for a question and/or an image (a PIL image).

        ``kinds`` ⊆ raster, vector, table, page, text; ``docs`` are file names; ``labels`` are
        zero-shot labels (figures only); ``signals`` picks the signals to fuse (for ablations)."""
        rcfg = self.cfg["retrieval"]
        k = k or rcfg["k"]
        n = max(rcfg["candidates"], k)
        kinds = [x for x in (kinds or ALL_KINDS)]
        bad = set(kinds) - set(ALL_KINDS)
        if bad:
            raise ValueError(f"unknown kind(s) {sorted(bad)}; use {', '.join(ALL_KINDS)}")
        library = self.store.list_docs()
        complete = [d["sha256"] for d in library]
        shas = [d["sha256"] for d in library if not docs or d["doc"] in docs]
        if not shas:
            return []
        vis_kinds = [x for x in kinds if x != "text"]
        vwhere = {"$and": [{"doc_sha": {"$in": shas}}, {"kind": {"$in": vis_kinds}}]}
        if labels:
            vwhere["$and"].append({"label": {"$in": list(labels)}})
        allowed = set(shas)

        def vkeep(meta: dict) -> bool:  # the same filter as vwhere, applied to results
            return (meta["doc_sha"] in allowed and meta["kind"] in vis_kinds
                    and (not labels or meta.get("label") in labels))

        def tkeep(meta: dict) -> bool:
            return meta["doc_sha"] in allowed
        rankings: dict[str, list[str]] = {}
        scored: dict[str, list[tuple[str, float]]] = {}
        units: dict[str, dict] = {}  # unit id -> metadata (+ document)

        def take(signal: str, matches: list[tuple[str, dict, str | None, float]]) -> None:
            ranked, seen = [], set()
            for unit, meta, doc, score in matches:
                if unit in seen:
                    continue
                seen.add(unit)
                ranked.append((unit, score))
                units.setdefault(unit, dict(meta, _doc=doc))
            rankings[signal] = [u for u, _ in ranked]
            scored[signal] = ranked

        if vis_kinds and question and "clip" in signals:
            qv = self.clip.embed_texts([question])[0]
            take("clip", [(m.id, m.metadata, m.document, m.score) for m in self.store.query_visual(qv, n, vwhere, vkeep)])
        if vis_kinds and image is not None:
            iv = self.clip.embed_images([image])[0]
            take("image", [(m.id, m.metadata, m.document, m.score) for m in self.store.query_visual(iv, n, vwhere, vkeep)])
        if question and ("text" in signals or "keyword" in signals):
            def wanted(meta: dict) -> bool:
                if meta["kind"] == "text":
                    return "text" in kinds
                return meta.get("source") in kinds

            if "text" in signals:
                tv = self.passages.embed([question])[0]
                found = self.store.query_text(tv, 2 * n, {"doc_sha": {"$in": shas}}, tkeep)
                take("text", [self._unit(m) for m in found if wanted(m.metadata)][:n])
            if "keyword" in signals:
                found = self._keyword_matches(question, n, complete, shas, kinds)
                take("keyword", [self._unit(m) for m in found if wanted(m.metadata)])
        weights = dict(rcfg["weights"])
        weights.setdefault("image", weights.get("clip", 1.0))
        if rcfg["fusion"] == "score":
            fused = score_fusion(scored, weights)
        else:
            fused = rrf(rankings, weights, rcfg["rrf_k"])
        figure_units = [u for u, _ in fused if units[u].get("_figure_text")]
        self._fill_figures(units, figure_units)
        hits = []
        for unit, score in fused:
            meta = units[unit]
            if meta.get("_missing") or (labels and meta.get("label") not in labels):
                continue
            ranks = {s: r.index(unit) + 1 for s, r in rankings.items() if unit in r}
            hits.append(self._hit(unit, meta, score, ranks))
            if len(hits) >= k:
                break
        return hits

    def page_image(self, doc: str, page: int) -> str | None:
        """The stored render of a page (for showing a figure in its page)."""
        rel = self.store.page_image(doc, page)
        return str(self.data_dir / rel) if rel else None

    @staticmethod
    def _unit(m: Match) -> tuple[str, dict, str | None, float]:
        """A text match stands for its unit: a chunk for itself, a figure text for its figure."""
        if m.metadata["kind"] == "figure_text":
            return m.metadata["unit"], {"_figure_text": True, **m.metadata}, m.document, m.score
        return m.id, m.metadata, m.document, m.score

    def _fill_figures(self, units: dict, ids: list[str]) -> None:
        """Figures reached only through their text need their visual record (image, caption)."""
        if not ids:
            return
        found = {m.id: m for m in self.store.get_visual(ids)}
        for i in ids:
            m = found.get(i)
            units[i] = dict(m.metadata, _doc=m.document) if m else {"_missing": True}

    def _hit(self, unit: str, meta: dict, score: float, ranks: dict) -> Hit:
        kind = meta["kind"]
        image = str(self.data_dir / meta["image"]) if meta.get("image") else None
        text = meta.get("caption") or (meta.get("_doc") or "")
        if kind == "page":
            text = (meta.get("_doc") or "")[:300]
        return Hit(unit, kind, meta["doc"], int(meta["page"]), bbox_from_meta(meta.get("bbox", "")), score, image,
                   text, meta.get("caption", ""), int(meta.get("figure") or 0) or None, meta.get("label", ""), ranks)
