"""The library: ingest PDFs into the index, list, remove, reindex. Glues ``ingest`` (PDF → records)
to ``index`` (embedders, Chroma, image files); neither of those knows the other.

Crash safety: a document is registered as ``pending`` before any of its items is written and
becomes ``complete`` only after the last one; searches only see complete documents. A pending
document found later (the process was killed) is removed with its items and orphan images, so the
next run ingests it again from scratch. Deletes go the same way: a document being removed is first
marked ``removing`` (hidden from list and search), then its keyword terms, items, images and
finally its record go; a writer finding a ``removing`` document finishes the job. A replacement
flips the new version to ``complete`` and the old one to ``removing`` in one write, so exactly one
of them is visible at any moment. One writer at a time (a lock file in the data dir); the writer
bumps DATA_DIR/generation when it takes the lock and after each committed change, so other
processes re-open the index (``Store.refresh``).

The original PDF is kept as ``pdfs/<sha256>.pdf`` (``index.pdfs``), copied in after the document
is registered ``pending`` and deleted with its items, so a rolled-back or interrupted ingest leaves
none behind; ``recover`` also sweeps PDFs no document record names. Libraries ingested before
PDFs were kept have none: page views say to ingest the file again.

The keyword index (``index.keyword``, on disk in ``data_dir/keyword``) follows the same rule: a
document's terms are committed just before the document becomes complete, removed before its
items are, and a search names the complete documents it may return. Each writer and the first
search check it against the store's complete documents and rebuild it from the stored texts when
it disagrees (deleted by hand, made by an older mmrag, a rebuild cut short).
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from index.embedders import ImageTextEmbedder, PassageEmbedder, load_image
from index.errors import explain_storage_error
from index.images import ImageStore
from index.keyword import KeywordIndex
from index.pdfs import PdfStore
from index.records import FIGURE_KINDS, DocRecord, Filter, TextItem, VisualItem
from index.store import Store, now
from ingest.records import PageRecord

from .errors import USER_ERRORS, BadDocument, MMRagError, NotFound

log = logging.getLogger(__name__)
FLUSH_ITEMS = 64  # embed and write after this many images (bounded memory on long PDFs)


MAX_EMBEDDED_DEPTH = 2  # a portfolio's documents, and PDFs attached to those; no deeper


@dataclass(frozen=True)
class IngestResult:
    name: str
    status: str  # added | replaced | partial | unchanged | failed
    message: str
    sha256: str = ""
    pages: int = 0
    figures: int = 0
    chunks: int = 0
    # items left out, one line each naming page and reason; non-empty means status "partial"
    warnings: tuple[str, ...] = ()


class Progress:
    """Callbacks for long work; the CLI draws bars with them, the UI shows them in the browser."""

    def file(self, name: str, index: int, total: int, pages: int) -> None: ...

    def page(self, done: int) -> None: ...

    def described(self, done: int, total: int) -> None:
        """Figure descriptions done of total (``describe.mode: ingest`` and ``mmrag describe``)."""


def failpoint(name: str) -> None:
    """Crash-test hook: with ``MMRAG_FAILPOINT=name`` in the environment the process kills itself
    (SIGKILL, as ``kill -9``) at this step, so a test can crash a write exactly where a random kill
    rarely lands (tests/test_reliability.py). Does nothing otherwise."""
    if os.environ.get("MMRAG_FAILPOINT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class Library:
    def __init__(self, cfg: dict, store: Store, clip: ImageTextEmbedder, passages: PassageEmbedder,
                 keyword: KeywordIndex | None = None):
        self.cfg = cfg
        self.store = store
        self.clip = clip
        self.passages = passages
        self.data_dir = Path(cfg["data_dir"])
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.images = ImageStore(self.data_dir)
        self.pdfs = PdfStore(self.data_dir)  # the original PDFs, pdfs/<sha256>.pdf
        self.keyword = keyword or KeywordIndex(self.data_dir / "keyword")
        self._label_vecs: np.ndarray | None = None
        self.describing = None  # mmrag.describing.Describing, set by wiring (figure descriptions)
        self._describe_run = None  # this ingest's describing run (describe.mode: ingest)
        self._to_describe: list = []  # (figure, future) submitted during this ingest
        self._file_described = 0

    # ---- locking and recovery ---------------------------------------------------------------
    @contextmanager
    def writing(self):
        if self.store.read_only:  # a snapshot of an index on a read-only or full disk
            raise self.store.read_only
        try:
            lock = open(self.data_dir / "write.lock", "w")
        except OSError as exc:  # a read-only data dir: say so, in one line
            raise explain_storage_error(exc, self.data_dir) or exc from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.store.refresh()  # another process may have written since we last looked
                self.store.bump()  # readers re-open even if this writer is killed before its last bump
                self.recover()
                yield
            finally:
                self.store.bump()
                fcntl.flock(lock, fcntl.LOCK_UN)

    def sync_keyword(self) -> bool:
        """What a search calls before using the keyword index: when no writer is busy, recover
        and bring the keyword index in line with the store (False, and nothing done, while a
        writer holds the lock: it does the same when it starts, and keeps the index in line)."""
        if self.store.read_only:
            return False
        try:
            lock = open(self.data_dir / "write.lock", "w")
        except OSError:  # a read-only data dir: search what is there
            return False
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                if self.recover():
                    self.store.bump()
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def recover(self) -> list[str]:
        """Finish what an interrupted writer left: documents half ingested (``pending``) or half
        removed (``removing``) lose their keyword terms, items, images and record; stray image
        files are swept; then the keyword index is rebuilt if it does not match the store.
        Returns the names of the documents it finished off."""
        self.keyword.rollback()
        pending = self.store.list_docs(status="pending")
        removing = self.store.list_docs(status="removing")
        for doc in pending:
            log.warning("removing the half-ingested %s (interrupted earlier); ingest it again", doc.doc)
        for doc in removing:
            log.warning("finishing the interrupted removal of %s", doc.doc)
        if pending or removing:
            self._purge([d.sha256 for d in pending + removing])
        elif (self.data_dir / "images").exists() and self._has_stray_files():
            self.images.sweep(self.referenced_images())
        if self.pdfs.dir.is_dir():  # PDFs no record names: a crash before the record, temp files
            self.pdfs.sweep({d.sha256 for d in self.store.list_docs(status=None)})
        complete = [d.sha256 for d in self.store.list_docs()]
        if not self.keyword.covers(complete):
            self.rebuild_keyword(complete)
        return [d.doc for d in pending + removing]

    def _purge(self, shas: list[str]) -> None:
        """Keyword terms, items, unreferenced images, then the records: a crash at any point
        leaves the records (pending or removing) for ``recover`` to finish the job."""
        for sha in shas:
            self.keyword.delete_doc(sha)
        self.keyword.commit()
        for sha in shas:
            self.store.delete_items(sha)
        failpoint("purge:items")
        self.images.sweep(self.referenced_images())
        self.pdfs.delete(shas)
        self.store.delete_records(shas)

    def rebuild_keyword(self, complete: list[str] | None = None) -> int:
        """Rebuild the keyword index from the texts stored for complete documents; returns
        their number."""
        keep = set(complete if complete is not None else (d.sha256 for d in self.store.list_docs()))
        total = self.store.count("text")
        if total:
            log.warning("building the keyword index from %d stored texts (once, or after it was changed by hand)",
                        total)

        def batches():
            for items in self.store.iter_items("text"):
                rows = [t for t in items if t.doc_sha in keep]
                yield [t.id for t in rows], [t.text for t in rows], [t.doc_sha for t in rows], [t.stands_for for t in rows]

        def progress(done: int) -> None:
            if done % 100_000 < 1000:
                log.info("keyword index: %d of %d texts", done, total)

        return self.keyword.rebuild(batches(), keep, progress)

    def _has_stray_files(self) -> bool:
        return any(p.suffix.startswith(".tmp") for p in (self.data_dir / "images").glob("*/*"))

    def referenced_images(self) -> set[str]:
        return self.store.image_paths()

    # ---- ingest -------------------------------------------------------------------------------
    def ingest(self, paths: Iterable[str | os.PathLike], progress: Progress | None = None,
               names: list[str] | None = None) -> list[IngestResult]:
        """Ingest files; each failure is reported in its result and the others still go in.
        ``names`` gives display names (uploads arrive under temporary paths)."""
        progress = progress or Progress()
        paths = list(paths)
        results = []
        from ingest.workers import borrow

        # (path, name, index of the file given, embedded depth); a file's embedded PDFs follow it
        todo = [(Path(p), names[i] if names else Path(p).name, i, 0) for i, p in enumerate(paths)]
        with self.writing(), borrow(self.cfg["ingest"]["workers"]) as pool, ExitStack() as temp:
            self.store.check_models()  # a model mismatch stops the whole batch (before any file)
            self._start_describing()
            try:
                while todo:
                    path, name, i, depth = todo.pop(0)
                    self._file_described = 0
                    self._embedded = ()
                    try:
                        results.append(self._ingest_one(path, name, i, len(paths), progress, pool))
                    except USER_ERRORS as exc:
                        results.append(IngestResult(name, "failed", str(exc)))
                    except Exception as exc:  # an unexpected library error must not stop the batch
                        fault = explain_storage_error(exc, self.data_dir)
                        if fault is not None:  # the disk, not the file: the next files would fail the same way
                            results.append(IngestResult(name, "failed", f"{name}: {fault}"))
                            raise fault from None
                        log.exception("ingesting %s failed", name)
                        results.append(IngestResult(name, "failed", f"{name}: unexpected error: {exc}"))
                    if self._embedded and depth < MAX_EMBEDDED_DEPTH and results[-1].status != "failed":
                        saved, left = self._save_embedded(path, name, temp)
                        results += [IngestResult(f"{name}/{own}", "failed", f"{name}/{own}: {why}") for own, why in left]
                        todo[:0] = [(p, f"{name}/{own}", i, depth + 1) for p, own in saved]
                    if depth:  # an embedded PDF's copy: kept by the library now (or failed), its own ones saved
                        path.unlink(missing_ok=True)
                    self._store_descriptions(wait=False)
            finally:
                self._finish_describing(progress)
        return results

    def _save_embedded(self, path: Path, name: str, temp: ExitStack) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
        """The PDFs embedded in the file just ingested (``self._embedded``: a portfolio's
        documents, attached PDFs), written to a folder that lasts the batch (each file is
        deleted once ingested): (file, its own name) each, and (own name, why) for those left
        out (too large, unreadable, not a PDF). A failure to write them (a full temporary disk)
        is one line of its own; the batch goes on."""
        from ingest.extract import save_embedded_pdfs

        try:
            folder = temp.enter_context(tempfile.TemporaryDirectory(prefix="mmrag-embedded-"))
            saved, left = save_embedded_pdfs(path, self._embedded, folder,
                                             float(self.cfg["ingest"]["max_file_mb"]) * 1e6)
        except Exception as exc:  # the file went in; its embedded PDFs fail as one result, the batch goes on
            return [], [("*", f"its embedded PDFs could not be read or written ({exc})")]
        log.info("%s: %d embedded PDF(s) to ingest", name, len(saved))
        return saved, left

    # ---- figure descriptions while ingesting (describe.mode: ingest) ------------------------------
    def _start_describing(self) -> None:
        d = self.describing
        self._describe_run = d.start_run() if d is not None and d.mode == "ingest" else None
        self._to_describe = []

    def _submit_description(self, fig, item: VisualItem) -> None:
        """Ask for a figure's description in the background (its image file is already stored)."""
        run = self._describe_run
        if run is None or self._file_described >= int(self.cfg["describe"]["max_per_file"]):
            return
        from .describing import FigureToDescribe

        self._file_described += 1
        todo = FigureToDescribe.of(item, context=fig.nearby_text or fig.ocr_text)
        try:
            known = self.describing.known([todo]).get(todo.image_sha)
        except Exception as exc:  # descriptions never fail an ingest
            log.warning("figure descriptions unavailable: %s", exc)
            known = None
        if known:
            self._to_describe.append((todo, known.text))
        elif not run.stopped:
            self._to_describe.append((todo, run.submit(todo)))

    def _store_descriptions(self, wait: bool, progress: Progress | None = None) -> None:
        """Write the finished descriptions as passages (documents that completed); ``wait`` for the rest."""
        if not self._to_describe:
            return
        total = len(self._to_describe)
        ready, left = [], []
        done = 0
        for todo, got in self._to_describe:
            if not isinstance(got, str):
                if not got.done() and not wait:
                    left.append((todo, got))
                    continue
                try:
                    got = got.result()
                except Exception:  # pragma: no cover - _Run catches model failures itself
                    got = None
                got = got.text if got else None
            done += 1
            if progress:
                progress.described(done, total)
            if got:
                ready.append((todo, got))
        try:
            self.describing.write_passages(ready, locked=True)
        except Exception as exc:  # descriptions never fail an ingest: they are kept and written later
            log.warning("could not store figure descriptions: %s", exc)
        self._to_describe = left

    def _finish_describing(self, progress: Progress) -> None:
        if self._describe_run is None:
            return
        try:
            self._store_descriptions(wait=True, progress=progress)
        finally:
            self._describe_run.close()
            self._describe_run = None
            self._to_describe = []

    def figures_to_describe(self, docs=None, ids: list[str] | None = None) -> list:
        """Stored figures of complete documents (``docs``: names or sha256s, None: all; ``ids``:
        only these figures) as FigureToDescribe, in document, page and figure order."""
        from .describing import FigureToDescribe

        library = self.store.list_docs()
        if docs is not None:
            docs = set(docs)
            library = [d for d in library if d.doc in docs or d.sha256 in docs]
        flt = Filter.of([d.sha256 for d in library], FIGURE_KINDS)
        items = self.store.get_visual(ids) if ids is not None else self.store.visual_items(flt)
        out = [FigureToDescribe.of(it) for it in items if flt.accepts(it)]
        return sorted(out, key=lambda f: (f.doc, f.passage["page"], f.id))

    def described_figures(self, ids: list[str]) -> set[str]:
        """Those of these figure ids that have a description passage."""
        found: set[str] = set()
        for i in range(0, len(ids), 1000):
            found.update(t.unit for t in self.store.get_text(["d" + x for x in ids[i:i + 1000]]))
        return found

    def add_figure_passages(self, passages: list[TextItem]) -> int:
        """Embed and store figure passages of documents that are complete (one removed meanwhile
        gets none; one already there is not added twice). Returns how many were stored."""
        complete = {d.sha256 for d in self.store.list_docs()}
        have = {t.id for t in self.store.get_text([p.id for p in passages])}
        passages = [p for p in passages if p.doc_sha in complete and p.id not in have]
        if not passages:
            return 0
        vecs = self.passages.embed([t.text for t in passages])
        self.store.add_text(passages, vecs)
        self.keyword.add([t.id for t in passages], [t.text for t in passages], [t.doc_sha for t in passages],
                         [t.stands_for for t in passages])
        self.keyword.commit()
        return len(passages)

    def _ingest_one(self, path: Path, name: str, index: int, total: int, progress: Progress,
                    pool) -> IngestResult:
        """One file: its pages are extracted in ``pool``'s worker processes (ingest.workers) under
        the file's time and memory limits, embedded and stored here, in page order."""
        from ingest.files import check_pdf_file, file_sha256
        from ingest.workers import Limits

        icfg = self.cfg["ingest"]
        max_mb = float(icfg["max_file_mb"])
        if path.is_file() and path.stat().st_size > max_mb * 1e6:
            raise BadDocument(f"{name}: larger than ingest.max_file_mb ({max_mb:g} MB)")
        check_pdf_file(path)
        limits = Limits.of(name, icfg)  # the clock starts here
        sha = file_sha256(path)
        existing = self.store.get_doc(sha)
        if existing and existing.status == "complete":
            same = "" if existing.doc == name else f" as {existing.doc}"
            return IngestResult(name, "unchanged", f"{name}: already ingested{same}, nothing to do", sha,
                                existing.pages, existing.figures, existing.chunks)
        plan = pool.open(path, sha, limits)  # BadDocument: corrupt, encrypted, no pages, a limit
        self._embedded = plan.embedded
        older = [d for d in self.store.list_docs() if d.doc == name]
        progress.file(name, index, total, plan.pages)
        self.store.set_doc(sha, doc=name, status="pending", started=now(), pages=plan.pages, figures=0, chunks=0)
        try:
            self._keep_pdf(path, sha, name)
            counts = self._write_pages(pool, plan, name, progress, limits)
            self.keyword.commit([sha])  # its terms, just before the document is complete
        except BaseException:  # roll back what this file wrote; a kill -9 is cleaned by recover()
            self.keyword.rollback()
            self._purge([sha])
            raise
        # one write: the new version complete and the old one removing (a changed file
        # replaces its old version once the new one is whole), then the old one goes
        self.store.set_docs({sha: dict(status="complete", ingested_at=now(), figures=counts["figures"],
                                       chunks=counts["chunks"]),
                             **{old.sha256: {"status": "removing"} for old in older}})
        if older:
            self._purge([old.sha256 for old in older])
        self.store.bump()
        lost = tuple(counts["warnings"])  # stored, but not all of it: say what is missing
        status = "partial" if lost else "replaced" if older else "added"
        msg = (f"{name}: {status}{' (replaced the older version)' if lost and older else ''}, {plan.pages} "
               f"pages, {counts['figures']} figures, {counts['chunks']} chunks")
        if lost:
            msg += f"; {len(lost)} problem(s): " + "; ".join(lost[:3]) + ("; …" if len(lost) > 3 else "")
        return IngestResult(name, status, msg, sha, plan.pages, counts["figures"], counts["chunks"], lost)

    def _keep_pdf(self, path: Path, sha: str, name: str) -> None:
        """Keep the original as pdfs/<sha>.pdf (for page views and downloads); the document is
        already registered pending, so a failure from here on deletes it with the rest."""
        try:
            self.pdfs.put(path, sha)
        except ValueError as exc:  # the file changed after it was hashed
            raise BadDocument(f"{name}: {exc}") from None

    def _write_pages(self, pool, plan, name: str, progress: Progress, limits) -> dict:
        """Receive the file's pages in order and embed + store them in batches of ``FLUSH_ITEMS``
        images. With several extraction workers the batches are embedded and written by a
        background thread (:class:`_BatchWriter`; ONNX Runtime, Chroma and tantivy release the
        GIL) while this thread goes on receiving pages, so the workers never wait for an embedding
        burst; with one worker this thread does it itself, taking turns with the worker page by
        page as ingest did before it had workers. Either way batches are stored in page order, and
        every batch is written (or the writer stopped) before this returns or raises, so a
        rollback never races a write."""
        visual: list[tuple[VisualItem, bytes]] = []
        texts: list[TextItem] = []
        counts = {"figures": 0, "chunks": 0}
        warnings: list[str] = []
        writer = _BatchWriter(self._flush) if pool.size > 1 else None
        flush = writer.submit if writer else self._flush
        try:
            with closing(pool.pages(plan, self.cfg["ingest"], limits)) as pages:
                for rec in pages:  # in page order, while the workers extract the next ones
                    warnings += rec.warnings
                    self._collect(rec, name, visual, texts, counts)
                    if len(visual) >= FLUSH_ITEMS:
                        flush(visual, texts)
                    progress.page(rec.page)
                    limits.check()  # between pages too: the time spent embedding counts
            flush(visual, texts)
            if writer:
                writer.finish()  # the last batch is stored (or its error raised here)
        finally:
            if writer:
                writer.close(abort=True)  # after finish(): nothing left; after an error: stop
        return dict(counts, warnings=warnings)

    def _collect(self, rec: PageRecord, name: str, visual: list, texts: list, counts: dict) -> None:
        origin = {"doc_sha": rec.doc_sha, "doc": name, "page": rec.page}
        for fig in rec.figures:
            if not fig.png:
                continue
            item = VisualItem(fig.id, kind=fig.kind, image=self.images.put(fig.png), bbox=fig.bbox,
                              caption=fig.caption[:500], figure=fig.number, text=fig.text[:2000], **origin)
            visual.append((item, fig.png))
            # two passages stand for the figure: its caption with the surrounding text, and its
            # caption with the words inside it (labels, OCR), so noisy OCR cannot drown the context;
            # a third, its description by the vision model, comes when that is ready (describing.py)
            self._submit_description(fig, item)
            for prefix, body in (("t", fig.nearby_text), ("l", fig.ocr_text)):
                passage = "\n".join(t for t in (fig.caption, body) if t)
                if passage and (body or prefix == "t"):
                    texts.append(TextItem(prefix + fig.id, kind="figure_text", unit=fig.id, text=passage,
                                          bbox=fig.bbox, source=fig.kind, **origin))
            counts["figures"] += 1
        if rec.png:
            page_text = " ".join(c.text for c in rec.chunks)[:2000]
            visual.append((VisualItem(rec.id, kind="page", image=self.images.put(rec.png), scanned=rec.scanned,
                                      text=page_text, **origin), rec.png))
        for chunk in rec.chunks:
            texts.append(TextItem(chunk.id, kind="text", unit=chunk.id, text=chunk.text, bbox=chunk.bbox,
                                  source=chunk.source, **origin))
            counts["chunks"] += 1

    def _flush(self, visual: list, texts: list) -> None:
        if visual:
            vecs = self.clip.embed_images([load_image(png) for _, png in visual])
            items = self._labelled([it for it, _ in visual], vecs)
            self.store.add_visual(items, vecs)
            visual.clear()
        if texts:
            vecs = self.passages.embed([t.text for t in texts])
            self.store.add_text(texts, vecs)
            self.keyword.add([t.id for t in texts], [t.text for t in texts], [t.doc_sha for t in texts],
                             [t.stands_for for t in texts])
            texts.clear()

    def _labelled(self, items: list[VisualItem], vecs: np.ndarray) -> list[VisualItem]:
        """Figures get their zero-shot label; pages none."""
        labels = self.zero_shot(vecs)
        return [replace(it, label=lab if it.kind != "page" else "") for it, lab in zip(items, labels)]

    # ---- zero-shot labels -------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return list(self.cfg["retrieval"]["labels"])

    def zero_shot(self, vecs: np.ndarray) -> list[str]:
        """CLIP zero-shot label per image vector: the nearest of 'a {label} from a document'."""
        if not len(vecs) or not self.labels:
            return [""] * len(vecs)
        if self._label_vecs is None:
            self._label_vecs = self.clip.embed_texts([f"a {lab} from a document" for lab in self.labels])
        return [self.labels[i] for i in (vecs @ self._label_vecs.T).argmax(axis=1)]

    # ---- library ------------------------------------------------------------------------------
    def list(self) -> list[dict]:
        """Complete documents by name: doc, sha256, pages, figures, chunks, ingested_at (unix time)."""
        return [_doc_dict(d) for d in self.store.list_docs()]

    def find(self, doc: str) -> dict:
        """A complete document by file name or by (a prefix of, at least 8 hex of) its sha256."""
        docs = self.store.list_docs()
        hits = [d for d in docs if d.doc == doc] or [d for d in docs if len(doc) >= 8 and d.sha256.startswith(doc)]
        if not hits:
            raise NotFound(f"no ingested document named {doc!r}; `mmrag list` shows what is there")
        if len(hits) > 1:
            raise MMRagError(f"{doc!r} matches several documents; give its sha256 instead")
        return _doc_dict(hits[0])

    # ---- the original PDFs and their pages ----------------------------------------------------
    def pdf_path(self, doc: str) -> Path:
        """The kept original PDF (``data_dir/pdfs/<sha256>.pdf``) of a complete document named by
        file name or sha256 (a prefix of 8+ hex will do). ``NotFound`` when there is no such
        document, or when it was ingested before mmrag kept the originals (the message says to
        ingest it again)."""
        found = self.find(doc)
        path = self.pdfs.path(found["sha256"])
        if not path.is_file():
            raise NotFound(f"{found['doc']}: its original PDF is not kept (ingested before mmrag kept PDFs); "
                           "re-ingest it to enable page views and downloads")
        return path

    def locate(self, item_id: str) -> dict:
        """Where a stored item (figure ``f-…``, page ``p-…``, passage ``c-…``/``tf-…``/…) of a
        complete document is: ``{"id", "kind", "doc", "doc_sha", "page", "bbox"}``; page 1-based,
        bbox ``[x0, y0, x1, y1]`` in displayed-page PDF points, top-left origin (None for a whole
        page). ``NotFound`` for an unknown id."""
        item_id = str(item_id)
        found = None
        if 0 < len(item_id) <= 200:
            found = next(iter(self.store.get_visual([item_id]) or self.store.get_text([item_id])), None)
        if found is None or found.doc_sha not in {d.sha256 for d in self.store.list_docs()}:
            raise NotFound(f"no stored item with id {item_id[:80]!r}")
        return {"id": found.id, "kind": found.kind, "doc": found.doc, "doc_sha": found.doc_sha, "page": found.page,
                "bbox": list(found.bbox) if found.bbox else None}

    def page_png(self, doc: str, page: int, boxes: Iterable[Iterable[float]] = (), items: Iterable[str] = (),
                 dpi: float = 150.0) -> bytes:
        """PNG bytes of page ``page`` (1-based) of a document (file name or sha256, as ``find``),
        rendered from its kept PDF as displayed, at ``dpi`` (36..600, scaled down to a pixel
        budget), with each box highlighted: ``boxes`` are ``(x0, y0, x1, y1)`` in displayed-page
        PDF points, top-left origin (the ``bbox`` of hits, citations and ``locate``); ``items``
        are stored item ids on that page whose boxes are added (see ``ingest.render.render_page``
        for the drawing). Errors, each one line: ``NotFound`` (no such document or item, or no
        kept PDF: "re-ingest it to enable page views"), ``MMRagError`` (page out of range, a bad
        box, an item from another page), ``BadDocument`` (the kept PDF cannot be rendered)."""
        from ingest.render import render_page  # PyMuPDF: loaded by the first page view

        path = self.pdf_path(doc)
        sha = path.name[:-4]
        boxes = [list(b) for b in boxes]
        for item_id in items:
            where = self.locate(item_id)
            if where["doc_sha"] != sha or where["page"] != int(page):
                raise MMRagError(f"item {item_id} is on {where['doc']} p.{where['page']}, not on this page")
            if where["bbox"]:
                boxes.append(where["bbox"])
        try:
            return render_page(path, int(page), boxes, dpi=dpi)
        except ValueError as exc:
            raise MMRagError(str(exc)) from None

    def remove(self, doc: str) -> dict:
        with self.writing():
            found = self.find(doc)
            self.store.set_doc(found["sha256"], status="removing")  # hidden from now on
            self._purge([found["sha256"]])
        return found

    def reindex(self, progress: Callable[[str, int, int], None] | None = None) -> dict:
        """Re-embed every stored image and text with the configured models, without the PDFs.
        The new vectors fill a collection beside the live one, which is swapped in at the end.
        Returns counts: ``visual``, ``text``, ``keyword``, ``missing_images`` (items dropped, their
        image file gone) and ``without_pdf`` (documents whose original PDF is not kept: ingested
        before mmrag kept them, so no page views until they are ingested again)."""
        done = {}
        with self.writing():
            for which in ("visual", "text"):
                identity = self.clip.identity if which == "visual" else self.passages.identity
                new = self.store.start_replacement(which, identity)
                count = 0
                for items in self.store.iter_items(which):
                    if which == "visual":
                        kept = []
                        for it in items:  # one stat per stored image
                            if self.images.path(it.image).is_file():
                                kept.append(it)
                            else:
                                log.warning("dropping %s p.%s %s: its image file %s is missing", it.doc, it.page,
                                            it.kind, it.image)
                        done["missing_images"] = done.get("missing_images", 0) + len(items) - len(kept)
                        items = kept
                        if not items:
                            continue
                        vecs = self._embed_stored_images(items)
                        items = self._labelled(items, vecs)
                    else:
                        vecs = self.passages.embed([t.text for t in items])
                    Store.add_to(new, items, vecs)
                    count += len(items)
                    if progress:
                        progress(which, count, 0)
                self.store.finish_replacement(which, new)
                done[which] = count
            done["keyword"] = self.rebuild_keyword()  # the same texts, with the current analyzer
            kept = self.pdfs.shas()
            done["without_pdf"] = sum(d.sha256 not in kept for d in self.store.list_docs())
        return done

    def doctor(self, repair: bool = False) -> list[str]:
        """Check the library: documents left half ingested or half removed, figures/pages whose
        image file is missing, image files no item refers to. Returns one line per finding (empty:
        all well). ``repair``: finish interrupted work, drop the items whose image is gone (their
        documents stay, without those figures; ingest the PDF again to get them back), delete
        unreferenced image files."""
        lines = []
        for status in ("pending", "removing"):
            for d in self.store.list_docs(status=status):
                lines.append(f"{d.doc}: {status} (being changed now, or left by an interrupted command)")
        missing = [it for items in self.store.iter_items("visual") for it in items
                   if not self.images.path(it.image).is_file()]
        for it in missing:
            lines.append(f"{it.doc} p.{it.page} {it.kind} ({it.id}): image file {it.image} is missing")
        referenced = self.referenced_images()
        base = self.data_dir / "images"
        orphans = [p for p in base.glob("*/*") if str(p.relative_to(self.data_dir)) not in referenced] \
            if base.exists() else []
        if orphans:
            lines.append(f"{len(orphans)} image file(s) in {base} belong to no stored item")
        if repair and lines:
            with self.writing():  # recover() finishes pending/removing documents
                self.store.delete_visual([it.id for it in missing])
                self.images.sweep(self.referenced_images())
        return lines

    def _embed_stored_images(self, items: list[VisualItem]) -> np.ndarray:
        return self.clip.embed_images([load_image(self.images.path(it.image)) for it in items])


class _BatchWriter:
    """A thread that embeds and stores batches (``flush(visual, texts)``) one after another, in
    the order submitted, while the ingesting thread receives the next pages. At most one batch
    waits while one is written, so memory stays bounded. The first error is raised to the
    ingesting thread by the next ``submit`` or by ``finish``; batches after it are dropped (the
    file is rolled back)."""

    def __init__(self, flush: Callable[[list, list], None]):
        import queue
        import threading

        self._flush = flush
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, name="mmrag-ingest-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self._error is None and not self._abort:
                try:
                    self._flush(*batch)
                except BaseException as exc:  # raised in the ingesting thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, _WriterStopped()
            raise error

    def submit(self, visual: list, texts: list) -> None:
        """Hand over the collected items (the lists are emptied for the next batch); blocks while
        a batch is being written and another already waits."""
        self._raise()
        if visual or texts:
            self._queue.put((list(visual), list(texts)))
            visual.clear()
            texts.clear()

    def finish(self) -> None:
        """Wait until every submitted batch is stored; raise the writer's error if any."""
        self.close()
        self._raise()

    def close(self, abort: bool = False) -> None:
        """Stop after the batches already submitted, or (``abort``: the file failed) after the one
        being written; either way no write is under way when this returns."""
        self._abort = self._abort or abort
        interrupted: BaseException | None = None
        stop_sent = False
        while self._thread.is_alive():  # a second Ctrl-C here must not let the rollback race a write
            try:
                if not stop_sent:
                    self._queue.put(None)
                    stop_sent = True
                self._thread.join()
            except BaseException as exc:  # KeyboardInterrupt: abort, wait on, raise it afterwards
                self._abort = True
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted


class _WriterStopped(MMRagError):
    """A batch failed earlier in this file (already raised once)."""


def _doc_dict(d: DocRecord) -> dict:
    return {k: v for k, v in asdict(d).items() if k in ("doc", "sha256", "pages", "figures", "chunks", "ingested_at")}
