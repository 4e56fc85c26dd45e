"""Page extraction in worker processes: every core busy, and limits that hold within a page.

A ``PagePool`` runs ``workers`` processes. Each is a fresh interpreter (what multiprocessing's
``spawn`` start method makes: ``fork`` is unsafe beside the parent's torch and onnxruntime
threads; started with ``subprocess`` so the caller's main module is not run again in it) that
imports PyMuPDF and nothing else heavy; the OCR model loads in a worker on its first scanned page
or raster figure. The main process opens a file with :meth:`PagePool.open` and gets its pages back
in page order from :meth:`PagePool.pages`, at most ``window`` pages (16 per worker) ahead of what
it has asked for, so memory stays flat in document length while it embeds and stores. One worker
(``ingest.workers: 1``) takes turns with the main process, page by page, as ingest did before it
had workers, only with the limits below.

A service thread (one per pool; it also starts the workers, so they die with it: Linux's
parent-death signal follows the starting thread) sends pages to idle workers, reads their records
(a worker never waits for the main process to finish embedding), and watches the limits of the
file in progress every ``TICK`` seconds: a file past its deadline (``ingest.file_timeout_s``) or a
worker over ``ingest.file_memory_mb`` of resident memory is stopped by killing the busy workers,
which are replaced on the next use; the file fails with one line (BadDocument) naming the limit
and the page. A worker that dies by itself (MuPDF crashed, the kernel's OOM killer) costs only its
page: an empty record with a warning, and a new worker.

This module imports no PDF library itself: the main process never needs PyMuPDF to ingest.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

from .errors import BadDocument
from .records import PageRecord

log = logging.getLogger(__name__)

TICK = 0.1  # seconds between two looks at the limits
IDLE_S = 60.0  # a pool unused this long stops its workers (they start again when needed)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # where the worker imports ``ingest`` from
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(setting) -> int:
    """``ingest.workers`` as a number: ``"auto"`` is one per core.

    >>> worker_count(3)
    3
    >>> worker_count("auto") == cpu_cores()
    True
    """
    return cpu_cores() if setting in (None, "auto") else max(1, int(setting))


@dataclass
class Limits:
    """The limits of one file: a deadline (``time.monotonic()``) and a worker's memory (MB)."""

    name: str
    timeout_s: float
    memory_mb: float
    deadline: float = field(init=False)

    def __post_init__(self):
        self.deadline = time.monotonic() + self.timeout_s

    @classmethod
    def of(cls, name: str, icfg: dict) -> Limits:
        """From the ``ingest`` config section; the clock starts now."""
        return cls(name, float(icfg["file_timeout_s"]), float(icfg["file_memory_mb"]))

    def too_slow(self, page: int | None = None) -> BadDocument:
        where = f", stopped on page {page}" if page else ""
        return BadDocument(f"{self.name}: took longer than ingest.file_timeout_s ({self.timeout_s:g} s){where}; "
                           f"raise it for very long files")

    def too_big(self, page: int | None, mb: float) -> BadDocument:
        where = f"page {page}" if page else "opening it"
        return BadDocument(f"{self.name}: {where} needed more than ingest.file_memory_mb ({self.memory_mb:g} MB; "
                           f"the extraction worker reached {mb:.0f} MB), stopped; raise it for very large pages")

    def check(self) -> None:
        """Raise ``too_slow`` once the deadline has passed (the main process checks between pages)."""
        if time.monotonic() > self.deadline:
            raise self.too_slow()


@dataclass(frozen=True)
class DocPlan:
    """A file opened by a worker: its path, sha256, page count and what every page needs."""

    path: str
    sha: str
    pages: int
    skip: frozenset
    running: frozenset
    embedded: tuple = ()  # names of the PDFs embedded in the file (a portfolio's documents, attached PDFs)


# ---- the worker process -------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the thread that started it ends (the pool's service
    thread, or the whole main process, also on kill -9): a page that never finishes must not
    outlive the ingest."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool still kills its workers when it closes
        pass


class _Documents:
    """The worker's open document (pages of one file arrive one by one)."""

    def __init__(self):
        self.key = None
        self.doc = None
        self.xref_png: dict = {}

    def use(self, path: str, sha: str):
        from .extract import open_pdf

        if self.key != (path, sha):
            self.release()
            self.doc = open_pdf(path)
            self.key = (path, sha)
        return self.doc

    def release(self) -> None:
        if self.doc is None:
            return
        import pymupdf

        self.doc.close()
        self.doc, self.key, self.xref_png = None, None, {}
        pymupdf.TOOLS.store_shrink(100)  # MuPDF's resource cache: the next file starts lean
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back (resident size is the limit)
        except (OSError, AttributeError):
            pass

    def open(self, path: str, sha: str) -> tuple:
        from .extract import document_context, embedded_pdfs

        doc = self.use(path, sha)
        skip, running = document_context(doc)
        return doc.page_count, frozenset(skip), frozenset(running), embedded_pdfs(doc)

    def page(self, path: str, sha: str, pno: int, cfg: dict, skip, running) -> PageRecord:
        from .extract import extract_page

        return extract_page(self.use(path, sha), pno, sha, cfg, set(skip), set(running), self.xref_png)


def _serve(conn, ocr_threads: int) -> None:
    """A worker's loop: ``(op, args)`` in, ``(status, value)`` out, until the pipe closes."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; the parent decides
    from . import ocr

    ocr.set_threads(ocr_threads)
    docs = _Documents()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        op, args = msg
        try:
            if op == "open":
                out = ("ok", docs.open(*args))
            elif op == "page":
                out = ("ok", docs.page(*args))
            else:  # "done": the file is finished, let its memory go
                docs.release()
                continue
        except BadDocument as exc:
            out = ("bad", str(exc))
        except Exception as exc:  # reported to the main process, which fails the file
            out = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(out)
        except (BrokenPipeError, OSError):
            return


# ---- the main process's side ------------------------------------------------------------------
class _Worker:
    """One extraction process: a fresh interpreter (what multiprocessing's ``spawn`` start
    method makes, minus re-running the caller's main module, so a script without an
    ``if __name__ == "__main__"`` guard can ingest too), talking over a socket pair."""

    def __init__(self, ocr_threads: int):
        ours, theirs = socket.socketpair()
        code = (f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); from ingest.workers import _child; "
                f"_child({theirs.fileno()}, {os.getpid()}, {ocr_threads})")
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def rss_mb(self) -> float:
        """Resident memory of the worker in MB (0 where /proc is missing)."""
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * _PAGE / 2**20
        except (OSError, ValueError, IndexError):
            return 0.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refused
            pass
        self.conn.close()


def _child(fd: int, parent: int, ocr_threads: int) -> None:
    """The worker process's entry point."""
    _die_with_parent()
    if os.getppid() != parent:  # the parent was gone before we asked to die with it
        return
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    _serve(Connection(fd), ocr_threads)


@dataclass
class _Died:
    """A worker ended without answering (crash, OOM killer)."""

    exitcode: int | None

    def reason(self) -> str:
        code = self.exitcode
        if code is not None and code < 0:
            try:
                return f"the PDF reader crashed on it ({signal.Signals(-code).name})"
            except ValueError:
                pass
        return f"the PDF reader crashed on it (exit {code})"


@dataclass
class _Failed:
    """The worker answered with an error: ``bad`` (BadDocument's message) or ``error``."""

    status: str
    message: str


@dataclass
class _Stopped:
    """A limit was hit: the run ends with this error."""

    error: BadDocument


class _Run:
    def __init__(self, tasks: list, labels: list, limits: Limits):
        self.tasks = tasks
        self.labels = labels  # page numbers (1-based) for messages; None for the open task
        self.limits = limits
        self.out: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.done = threading.Event()
        self.asked = 0  # results the main process has asked for so far
        self.wake = threading.Event()  # set when it asks (or stops)

    def ask(self) -> None:
        self.asked += 1
        self.wake.set()


class PagePool:
    """``workers`` extraction processes and the thread that feeds and watches them. Use one
    run at a time (``open``, then ``pages``); ``close`` stops everything."""

    def __init__(self, workers: int, window: int | None = None):
        self.size = max(1, int(workers))
        # pages extracted ahead of what the main process has asked for, at most; one worker
        # takes turns with the main process as ingest did before workers (extract a page, then
        # embed), several work ahead while it embeds
        self.window = window if window is not None else (0 if self.size == 1 else 16 * self.size)
        self.ocr_threads = max(1, cpu_cores() // self.size)
        self._workers: list[_Worker] = []
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.started = 0  # worker processes started so far (replacements included)
        _all_pools.add(self)

    # -- public ---------------------------------------------------------------------------------
    def open(self, path, sha: str, limits: Limits) -> DocPlan:
        """Open ``path`` in a worker: its page count, decoration images and running headers.
        BadDocument for a corrupt, encrypted or empty PDF, or a limit hit while opening."""
        [res] = list(self._results([("open", (str(path), sha))], [None], limits))
        if isinstance(res, _Died):
            raise BadDocument(f"{limits.name}: {res.reason().replace('on it', 'while opening it')}")
        pages, skip, running, embedded = res
        return DocPlan(str(path), sha, pages, skip, running, embedded)

    def pages(self, plan: DocPlan, cfg: dict, limits: Limits) -> Iterator[PageRecord]:
        """Each page's record, in page order. ``cfg`` is the ``ingest`` config section.
        BadDocument when a limit is hit (the workers on the file are killed first)."""
        tasks = [("page", (plan.path, plan.sha, pno, cfg, plan.skip, plan.running)) for pno in range(plan.pages)]
        try:
            with closing(self._results(tasks, list(range(1, plan.pages + 1)), limits)) as results:
                yield from self._records(plan, results)
        finally:
            for w in self._workers:  # the file's document and caches can go
                try:
                    w.conn.send(("done", ()))
                except OSError:
                    pass

    @staticmethod
    def _records(plan: DocPlan, results) -> Iterator[PageRecord]:
        for pno, res in enumerate(results):
            if isinstance(res, _Died):
                why = f"page {pno + 1}: skipped ({res.reason()})"
                log.warning("%s", why)
                res = PageRecord(plan.sha, pno + 1, (0.0, 0.0), [], [], None, warnings=(why,))
            yield res

    def close(self) -> None:
        """Stop the service thread and every worker."""
        with self._lock:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None
            self._stop_workers()

    # -- the service thread ----------------------------------------------------------------------
    def _results(self, tasks: list, labels: list, limits: Limits) -> Iterator:
        run = _Run(tasks, labels, limits)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="mmrag-extract-pool", daemon=True)
                self._thread.start()
        self._jobs.put(run)
        try:
            for _ in tasks:
                run.ask()
                while True:
                    try:
                        item = run.out.get(timeout=0.5)
                        break
                    except queue.Empty:
                        if run.done.is_set() and run.out.empty():
                            raise RuntimeError("page extraction stopped unexpectedly") from None
                if isinstance(item, _Stopped):
                    raise item.error
                if isinstance(item, _Failed):
                    raise BadDocument(item.message if item.status == "bad"
                                      else f"{limits.name}: extraction failed ({item.message})")
                yield item
        finally:
            run.stop.set()
            run.wake.set()
            run.done.wait()

    def _serve(self) -> None:
        while True:
            try:
                run = self._jobs.get(timeout=IDLE_S)
            except queue.Empty:  # idle: let the workers' memory go; they start again when needed
                self._stop_workers()
                continue
            if run is None:
                self._stop_workers()
                return
            try:
                self._execute(run)
            except BaseException as exc:  # never leave the main process waiting
                log.exception("page extraction failed")
                run.out.put(_Stopped(BadDocument(f"{run.limits.name}: extraction failed ({exc})")))
            finally:
                run.done.set()

    def _start_workers(self) -> None:
        self._workers = [w for w in self._workers if w.is_alive()]
        while len(self._workers) < self.size:
            self._workers.append(_Worker(self.ocr_threads))
            self.started += 1

    def _stop_workers(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            try:
                w.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
            w.kill()
        self._workers = []

    def _execute(self, run: _Run) -> None:
        pending = deque(range(len(run.tasks)))
        inflight: dict[_Worker, int] = {}
        ready: dict[int, object] = {}
        next_out = 0
        limits = run.limits
        try:
            self._start_workers()
            while next_out < len(run.tasks) and not run.stop.is_set():
                run.wake.clear()
                for w in self._workers:  # feed idle workers, at most `window` pages ahead
                    if w in inflight or not pending:
                        continue
                    if len(run.tasks) - len(pending) >= run.asked + self.window:
                        break
                    i = pending.popleft()
                    w.conn.send(run.tasks[i])
                    inflight[w] = i
                if inflight:
                    for conn in wait([w.conn for w in inflight], timeout=TICK):
                        w = next(x for x in inflight if x.conn is conn)
                        i = inflight.pop(w)
                        try:
                            ready[i] = w.conn.recv()
                        except (EOFError, OSError):
                            w.kill()
                            ready[i] = _Died(w.exitcode)
                            log.warning("%s: extraction worker died (exit %s)", limits.name, w.exitcode)
                            self._workers.remove(w)
                            self._start_workers()
                else:
                    run.wake.wait(TICK)  # the main process is busy (embedding): wait until it asks
                while next_out in ready:
                    got = ready.pop(next_out)
                    if isinstance(got, tuple):  # (status, value) from the worker
                        got = got[1] if got[0] == "ok" else _Failed(*got)
                    run.out.put(got)
                    next_out += 1
                # the limits, also while a page is in the middle of MuPDF
                busy = sorted(inflight.items(), key=lambda kv: kv[1])
                if time.monotonic() > limits.deadline and next_out < len(run.tasks):
                    page = run.labels[busy[0][1]] if busy else run.labels[next_out]
                    run.out.put(_Stopped(limits.too_slow(page)))
                    return
                for w, i in busy:
                    mb = w.rss_mb()
                    if mb > limits.memory_mb:
                        run.out.put(_Stopped(limits.too_big(run.labels[i], mb)))
                        return
        finally:
            if inflight:  # stopped, or a limit: these workers are busy with this file; replace them
                for w in inflight:
                    w.kill()
                    self._workers.remove(w)


_all_pools: weakref.WeakSet = weakref.WeakSet()


def worker_pids(size: int | None = None) -> list[int]:
    """Process ids of this process's live extraction workers, of pools of ``size`` workers
    (None: all); benchmarks sample their memory."""
    return [w.pid for pool in list(_all_pools) if size in (None, pool.size) for w in list(pool._workers)
            if w.is_alive()]


# ---- one pool per process, reused by every ingest -------------------------------------------------
_pools: dict[int, PagePool] = {}
_pools_lock = threading.Lock()


class borrow:
    """``with borrow(n) as pool``: the process's pool of ``n`` workers (made on first use; the
    workers start on the first page and stop after ``IDLE_S`` unused), or a private one while
    that one is busy (closed at the end)."""

    def __init__(self, workers: int):
        self.workers = worker_count(workers)
        self.pool: PagePool | None = None
        self.private = False

    def __enter__(self) -> PagePool:
        with _pools_lock:
            self.pool = _pools.pop(self.workers, None)
        if self.pool is None:
            self.pool = PagePool(self.workers)
        return self.pool

    def __exit__(self, *exc) -> None:
        with _pools_lock:
            if self.workers not in _pools:
                _pools[self.workers] = self.pool
                return
        self.pool.close()  # another ingest returned its pool meanwhile: keep one


@atexit.register
def _close_pools() -> None:
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()


__all__ = ["PagePool", "Limits", "DocPlan", "borrow", "worker_count", "cpu_cores", "worker_pids"]
