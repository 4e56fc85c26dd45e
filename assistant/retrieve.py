"""Hybrid retrieval: CLIP text→image (and image→image), passage embeddings and BM25 keywords over
passages and figure texts, fused by weighted score fusion (``retrieval.fusion: score``) or weighted
reciprocal rank fusion (``rrf``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

from index.keyword import KeywordIndex
from index.records import FIGURE_KINDS, KINDS, Filter, TextItem, VisualItem
from index.store import Match, Store

from .records import Hit, key_name

log = logging.getLogger(__name__)

SIGNALS = ("clip", "text", "keyword")
# the passage side (encode, then its Chroma query) and the keyword search of each retrieval run
# here beside the CLIP side; tasks never wait on each other, so concurrent retrievals only queue
_SEARCH = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mmrag-search")


class OneByOne:
    """An executor that runs each task when it is submitted, in the caller's thread: put in place
    of ``_SEARCH``, retrieval searches its signals one after another (the reference order that
    tests and the benchmark compare the concurrent search with).

    >>> OneByOne().submit(sum, [1, 2]).result()
    3
    >>> OneByOne().submit(int, "x").exception()
    ValueError("invalid literal for int() with base 10: 'x'")
    """

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args))
        except Exception as exc:
            f.set_exception(exc)
        return f


ALL_KINDS = KINDS
# fused units whose records are read at once beyond the k still wanted (a unit whose record is
# gone or whose image file is missing is skipped; then the next ones are read)
_SLACK = 5
_UNREAD = object()  # a unit the searches named without its record: read once it survives fusion


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

    def _keyword_matches(self, question: str, n: int, complete: list[str], flt: Filter) -> list[Match]:
        """BM25 matches among the text items ``flt`` accepts (its documents and kinds), with their
        stored records (Chroma's copy is the truth: a record it lacks is skipped)."""
        if self.sync_keyword and not self.keyword.covers(complete):
            self.sync_keyword()
        wanted = sorted((flt.kinds or set(ALL_KINDS)) - {"page"})  # a text item is a passage or a figure's text
        if not wanted:
            return []
        every = set(wanted) >= set(ALL_KINDS) - {"page"}
        found = self.keyword.search(question, n, docs=sorted(flt.documents or complete),
                                    kinds=None if every else wanted)
        records = {t.id: t for t in self.store.get_text([i for i, _ in found])}
        return [Match(records[i], score) for i, score in found if i in records and flt.accepts(records[i])]

    def _cited_figures(self, refs: Sequence[tuple[str, int, int]], library, flt: Filter) -> list[VisualItem]:
        """The stored figures that citation keys name, as (document name, page, figure number), in
        the order given, those ``flt`` accepts; keys naming nothing stored are left out."""
        sha = {key_name(d.doc): d.sha256 for d in library}  # as the key writes the name
        out = []
        for doc, page, number in refs:
            if doc not in sha:
                continue
            items = self.store.visual_items(Filter.of([sha[doc]], FIGURE_KINDS, page=int(page)))
            out += [v for v in items if v.figure == int(number) and flt.accepts(v)][:1]
        return out

    def retrieve(self, question: str = "", k: int | None = None, kinds: Sequence[str] | None = None,
                 docs: Sequence[str] | None = None, labels: Sequence[str] | None = None, image=None,
                 signals: Sequence[str] = SIGNALS, prior: Sequence[tuple[str, int, int]] = ()) -> list[Hit]:
        """Ranked figures, pages and passages for a question and/or an image (a PIL image).

        ``kinds`` ⊆ raster, vector, table, page, text; ``docs`` are file names; ``labels`` are
        zero-shot labels (figures only); ``signals`` picks the signals to fuse (for ablations);
        ``prior``: figures cited earlier in the conversation, as (document, page, figure number),
        most relevant first: they stay candidates, fused as one more signal ("history", weight
        ``retrieval.weights.history``, default 1)."""
        rcfg = self.cfg["retrieval"]
        k = k or rcfg["k"]
        n = max(rcfg["candidates"], k)
        kinds = [x for x in (kinds or ALL_KINDS)]
        bad = set(kinds) - set(ALL_KINDS)
        if bad:
            raise ValueError(f"unknown kind(s) {sorted(bad)}; use {', '.join(ALL_KINDS)}")
        library = self.store.list_docs()
        complete = [d.sha256 for d in library]
        shas = frozenset(d.sha256 for d in library if not docs or d.doc in docs)
        if not shas:
            return []
        vis_kinds = [x for x in kinds if x != "text"]
        visual_filter = Filter.of(shas, vis_kinds, labels or None)
        text_filter = Filter.of(shas, kinds)
        rankings: dict[str, list[str]] = {}
        scored: dict[str, list[tuple[str, float]]] = {}
        units: dict[str, VisualItem | TextItem | None] = {}  # unit id -> the item first seen for it

        def take(signal: str, matches: list[Match]) -> None:
            ranked, seen = [], set()
            for m in matches:
                unit = m.item.unit if isinstance(m.item, TextItem) else m.id  # a figure text stands for its figure
                if unit in seen:
                    continue
                seen.add(unit)
                ranked.append((unit, m.score))
                units.setdefault(unit, _UNREAD if m.item is None else m.item)
            rankings[signal] = [u for u, _ in ranked]
            scored[signal] = ranked

        # The signals are searched at the same time (the encoders, Chroma's queries and Tantivy
        # release the GIL): the passage side and the keyword search in the pool, the CLIP side
        # here. Their matches are taken in a fixed order (it decides ties and each unit's record),
        # so the ranking is the one a sequential search gives.
        jobs: dict[str, Future] = {}
        if question and "text" in signals:
            jobs["text"] = _SEARCH.submit(
                lambda: self.store.query_text(self.passages.embed_query(question), n, text_filter))
        if question and "keyword" in signals:
            jobs["keyword"] = _SEARCH.submit(self._keyword_matches, question, n, complete, text_filter)
        try:
            if vis_kinds and question and "clip" in signals:
                take("clip", self.store.query_visual(self.clip.embed_query(question), n, visual_filter, records=False))
            if vis_kinds and image is not None:
                iv = self.clip.embed_images([image])[0]
                take("image", self.store.query_visual(iv, n, visual_filter, records=False))
            if prior and vis_kinds:
                found = self._cited_figures(prior, library, visual_filter)
                take("history", [Match(item, 1.0 - i / (len(found) + 1)) for i, item in enumerate(found)])
        finally:
            wait(jobs.values())  # an error above still lets them finish before it propagates
        for signal in ("text", "keyword"):
            if signal in jobs:
                take(signal, jobs[signal].result())
        weights = dict(rcfg["weights"])
        weights.setdefault("image", weights.get("clip", 1.0))
        weights.setdefault("history", 1.0)
        if rcfg["fusion"] == "score":
            fused = score_fusion(scored, weights)
        else:
            fused = rrf(rankings, weights, rcfg["rrf_k"])
        # records are read only for the units that survive fusion, k (and a few) at a time
        hits: list[Hit] = []
        start = 0
        while len(hits) < k and start < len(fused):
            window = fused[start:start + k - len(hits) + _SLACK]
            start += len(window)
            descriptions = self._read_records(units, [u for u, _ in window])
            for unit, score in window:
                item = units[unit]
                if item is None or (labels and getattr(item, "label", "") not in labels):
                    continue
                if isinstance(item, VisualItem) and item.image and not (self.data_dir / item.image).is_file():
                    # deleted by hand, or a disk restored without it: skip the item, keep answering
                    log.warning("skipping %s p.%s %s: its image file %s is missing (`mmrag doctor --repair` drops "
                                "such items)", item.doc, item.page, item.kind, item.image)
                    continue
                ranks = {s: r.index(unit) + 1 for s, r in rankings.items() if unit in r}
                hit = self._hit(item, score, ranks)
                if hit.is_figure:  # its description (the figure's ``df-`` passage), when it has one
                    hit = replace(hit, description=descriptions.get("d" + hit.id) or "")
                hits.append(hit)
                if len(hits) >= k:
                    break
        return hits

    def _read_records(self, units: dict, ids: list[str]) -> dict[str, str]:
        """Read what fusion's survivors ``ids`` still lack into ``units``: the visual record of a
        unit the searches named without one, and of a figure reached only through its text
        (image, caption); None for one no longer stored. Returns the stored descriptions of
        those that may be figures (``df-`` passage id -> text), read at the same time."""
        need = [u for u in ids if units[u] is _UNREAD or (isinstance(units[u], TextItem) and units[u].kind == "figure_text")]
        figures = [u for u in ids if not (isinstance(units[u], TextItem) and units[u].kind != "figure_text")
                   and not (isinstance(units[u], VisualItem) and units[u].kind == "page")]
        described = _SEARCH.submit(self.store.get_text, ["d" + u for u in figures]) if figures else None
        try:
            if need:
                found = {it.id: it for it in self.store.get_visual(need)}
                for u in need:
                    units[u] = found.get(u)
        except BaseException:
            if described:
                wait([described])  # it finishes before this error propagates (its own is dropped)
            raise
        return {t.id: t.text for t in (described.result() if described else [])}

    def page_image(self, doc: str, page: int) -> str | None:
        """The stored render of a page (for showing a figure in its page)."""
        rel = self.store.page_image(doc, page)
        return str(self.data_dir / rel) if rel else None

    def _hit(self, item: VisualItem | TextItem, score: float, ranks: dict) -> Hit:
        if isinstance(item, TextItem):
            return Hit(item.unit, "text", item.doc, item.page, _box(item.bbox), score, None, item.text, "", None, "",
                       ranks)
        image = str(self.data_dir / item.image) if item.image else None
        text = item.text[:300] if item.kind == "page" else (item.caption or item.text)
        return Hit(item.id, item.kind, item.doc, item.page, _box(item.bbox), score, image, text, item.caption,
                   item.figure or None, item.label, ranks)


def _box(bbox) -> list[float] | None:
    return list(bbox) if bbox else None
