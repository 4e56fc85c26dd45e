"""When figures get described, and where descriptions go: glues the describing model
(``assistant.describe``) to the description store and the passage index (``index``).

A description is asked for once per figure image and describing model and kept in
``DATA_DIR/descriptions.sqlite`` the moment it arrives; it then becomes one more passage of its
figure (``df-<figure id>``, beside the caption+context ``tf-`` and caption+labels ``lf-`` ones) in
the passage collection, so the passage and keyword signals find the figure by what it shows.

Failures never reach the caller: a figure whose description failed is simply not described yet.
After ``BREAKER`` failures in a row a run stops asking (one warning names the reason), so a dead or
stalled model costs one round of timeouts, not one per figure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from assistant.describe import Describer
from assistant.llm import LLMError
from index.descriptions import DescriptionStore, StoredDescription, image_sha
from index.records import TextItem, VisualItem

log = logging.getLogger(__name__)
BREAKER = 3  # failures in a row after which a run stops asking the model
WRITE_BATCH = 8  # descriptions embedded and stored together


@dataclass(frozen=True)
class FigureToDescribe:
    """What the describing prompt needs about one stored figure, and where its passage goes."""

    id: str  # figure id (f-…)
    image: str  # image path relative to the data dir
    caption: str
    context: str  # the text around the figure
    doc: str
    passage: dict  # TextItem fields its description passage shares with it: doc_sha, doc, page, bbox, source

    @classmethod
    def of(cls, item: VisualItem, context: str | None = None) -> FigureToDescribe:
        """From a stored figure; ``context`` defaults to its stored text without the caption."""
        if context is None:
            context = item.text
            if item.caption and context.startswith(item.caption):
                context = context[len(item.caption):].strip()
        return cls(item.id, item.image, item.caption, context, item.doc,
                   {"doc_sha": item.doc_sha, "doc": item.doc, "page": item.page, "bbox": item.bbox,
                    "source": item.kind})

    @property
    def image_sha(self) -> str:
        return image_sha(self.image)

    def description_passage(self, text: str) -> TextItem:
        """The ``df-`` passage that stands for the figure in passage and keyword search."""
        return TextItem("d" + self.id, kind="figure_text", unit=self.id, text=text, **self.passage)


@dataclass
class DescribeStats:
    described: int = 0  # new descriptions from the model
    reused: int = 0  # found already stored (no request)
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"described": self.described, "reused": self.reused, "failed": self.failed,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "errors": self.errors[:5]}


class _Run:
    """One run's thread pool and failure breaker."""

    def __init__(self, service: Describing):
        self.service = service
        self.pool = ThreadPoolExecutor(max_workers=int(service.cfg["concurrency"]), thread_name_prefix="describe")
        self.failures_in_row = 0
        self.stopped: str | None = None
        self.lock = threading.Lock()
        self.stats = DescribeStats()
        self.inflight: dict[str, Future] = {}  # image sha -> its request (one image placed twice: one call)

    def submit(self, fig: FigureToDescribe) -> Future:
        with self.lock:
            fut = self.inflight.get(fig.image_sha)
            if fut is None:
                fut = self.inflight[fig.image_sha] = self.pool.submit(self._one, fig)
            return fut

    def _one(self, fig: FigureToDescribe) -> StoredDescription | None:
        svc = self.service
        if self.stopped:
            return None
        try:
            d = svc.describer.describe(svc.library.images.path(fig.image), fig.caption, fig.context, fig.doc)
        except (LLMError, OSError, ValueError) as exc:
            with self.lock:
                self.stats.failed += 1
                self.stats.errors.append(f"{fig.doc} {fig.id}: {exc}")
                self.failures_in_row += 1
                if self.failures_in_row >= BREAKER and not self.stopped:
                    self.stopped = str(exc)
                    log.warning("figure descriptions stopped after %d failures in a row (%s); the figures left "
                                "are described by `mmrag describe` or on demand later", BREAKER, exc)
            return None
        stored = StoredDescription(fig.image_sha, svc.describer.model, d.text, d.prompt_tokens, d.completion_tokens)
        svc.store.put(stored)  # kept at once: an interrupted run loses nothing described
        with self.lock:
            self.failures_in_row = 0
            self.stats.described += 1
            self.stats.prompt_tokens += d.prompt_tokens
            self.stats.completion_tokens += d.completion_tokens
        return stored

    def close(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=not wait)


class Describing:
    """Descriptions for a library. ``cfg`` is the whole config; ``library`` the Library whose
    figures are described (its store, passage embedder and write lock are used)."""

    def __init__(self, cfg: dict, library, describer: Describer | None = None, store: DescriptionStore | None = None):
        self.cfg = cfg["describe"]
        self.library = library
        self.describer = describer or Describer(cfg["describe"], cfg["llm"])
        self.store = store or DescriptionStore(library.data_dir / "descriptions.sqlite")
        self._background: list[threading.Thread] = []

    @property
    def enabled(self) -> bool:
        """A describing model is configured (``describe.model`` or ``llm.model``)."""
        return self.describer.configured

    @property
    def mode(self) -> str:
        return self.cfg["mode"] if self.enabled else "off"

    # ---- ingest mode --------------------------------------------------------------------------
    def start_run(self) -> _Run:
        return _Run(self)

    def known(self, figs: list[FigureToDescribe]) -> dict[str, StoredDescription]:
        """Stored descriptions (by this model) for these figures' images."""
        if not figs or not self.enabled:
            return {}
        return self.store.get_many([f.image_sha for f in figs], self.describer.model)

    # ---- passages -----------------------------------------------------------------------------
    def write_passages(self, pairs: list[tuple[FigureToDescribe, str]], locked: bool = False) -> int:
        """Store each description as its figure's ``df-`` passage (of documents still complete).
        ``locked``: the caller holds the library's write lock (ingest)."""
        if not pairs:
            return 0
        items = [f.description_passage(text) for f, text in pairs]
        if locked:
            return self.library.add_figure_passages(items)
        with self.library.writing():
            return self.library.add_figure_passages(items)

    # ---- what is not described yet --------------------------------------------------------------
    def undescribed(self, docs: Iterable[str] | None = None) -> list[FigureToDescribe]:
        """Figures of complete documents (``docs``: names or sha256s; None: all) that have no
        description passage yet, in document and page order."""
        figs = self.library.figures_to_describe(docs)
        have = self.library.described_figures([f.id for f in figs])
        return [f for f in figs if f.id not in have]

    def describe(self, figs: list[FigureToDescribe], progress: Callable[[int, int], None] | None = None,
                 limit: int | None = None) -> DescribeStats:
        """Describe these figures: stored descriptions are reused (no request), the rest asked for
        ``describe.concurrency`` at a time, each kept as it arrives and written as a passage in
        small batches. ``limit`` caps the requests (not the reused). Never raises for a model
        failure: those are counted in the stats."""
        known = self.known(figs)
        reuse = [(f, known[f.image_sha].text) for f in figs if f.image_sha in known]
        ask = [f for f in figs if f.image_sha not in known]
        if limit is not None:
            ask = ask[:limit]
        total = len(reuse) + len(ask)
        self.write_passages(reuse)
        done = len(reuse)
        if progress:
            progress(done, total)
        run = self.start_run()
        run.stats.reused = len(reuse)
        if not self.enabled or not ask:
            run.close()
            return run.stats
        pending: list[tuple[FigureToDescribe, str]] = []
        try:
            futures: dict[Future, list[FigureToDescribe]] = {}
            for f in ask:
                futures.setdefault(run.submit(f), []).append(f)
            for fut in as_completed(futures):
                got = fut.result()
                done += len(futures[fut])
                if got:
                    pending += [(f, got.text) for f in futures[fut]]
                if len(pending) >= WRITE_BATCH:
                    self.write_passages(pending)
                    pending = []
                if progress:
                    progress(done, total)
        finally:
            self.write_passages(pending)
            run.close(wait=False)
        if run.stopped:
            run.stats.errors.insert(0, f"stopped after {BREAKER} failures in a row: {run.stopped}")
        return run.stats

    # ---- on demand --------------------------------------------------------------------------
    def after_answer(self, hits) -> threading.Thread | None:
        """``on_demand``: describe the question's top figure hits that have no description yet,
        in a background thread (returned; ``wait`` joins all of them)."""
        if self.mode != "on_demand":
            return None
        want = [h.id for h in hits if h.is_figure and not h.description][: int(self.cfg["on_demand_figures"])]
        if not want:
            return None
        t = threading.Thread(target=self._describe_ids, args=(want,), name="describe-on-demand", daemon=True)
        self._background = [b for b in self._background if b.is_alive()] + [t]
        t.start()
        return t

    def _describe_ids(self, ids: list[str]) -> None:
        try:
            figs = self.library.figures_to_describe(None, ids=ids)
            have = self.library.described_figures(ids)
            order = {i: n for n, i in enumerate(ids)}
            figs = sorted((f for f in figs if f.id not in have), key=lambda f: order[f.id])
            stats = self.describe(figs)
            if stats.failed:
                log.info("on-demand descriptions: %d failed (%s)", stats.failed, stats.errors[0])
        except Exception:  # a background helper must never take the app down
            log.exception("on-demand figure descriptions failed")

    def wait(self, timeout: float | None = None) -> None:
        """Join the background describing threads (the CLI waits before it exits)."""
        for t in list(self._background):
            t.join(timeout)
