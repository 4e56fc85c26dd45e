"""2 MB pages for the large in-memory indexes (Linux): a vector query walks Chroma's HNSW graph
through the vectors at random (100,000 CLIP vectors are 220 MB), so with 4 KB pages nearly every
vector read is a TLB miss. Backing the process's large resident anonymous memory with
transparent huge pages (``madvise(MADV_COLLAPSE)``, Linux 6.1+, even where the system's
``transparent_hugepage`` setting is ``madvise``) made the CLIP-space query at 100,000 items
17.5 instead of 21 ms p50 on its own and 17.7 instead of 19.5 ms inside retrieval (the
hits of the 48 eval-dev questions byte for byte the same: only the page size changes, not a
byte of the data). Only resident 2 MB chunks are collapsed, so the index's room to grow stays
unallocated. Elsewhere (another OS, an older kernel, THP ``never``) it does nothing; with THP
``always`` the kernel already backs large allocations with 2 MB pages at their first write, and
regions mostly huge already are skipped."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
import threading

log = logging.getLogger(__name__)

MADV_COLLAPSE = 25
HUGE = 2 << 20
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+ *(.*)$")
_done: set[int] = set()  # 2 MB chunks (their start) collapsed in this process
_again = False  # asked again while the thread runs
_lock = threading.Lock()
_threads: list[threading.Thread] = []  # the one collapsing thread, while it runs


def large_regions(smaps: str, min_bytes: int) -> list[tuple[int, int]]:
    """The 2 MB-aligned (start, end) inside each private writable anonymous mapping of at least
    ``min_bytes`` that is at least a quarter resident and mostly not huge yet, from the text of
    ``/proc/PID/smaps``.

    >>> text = '''7f0000000000-7f0010000000 rw-p 00000000 00:00 0
    ... Size:             262144 kB
    ... Rss:              200000 kB
    ... AnonHugePages:         0 kB
    ... 7f0010000000-7f0010400000 rw-p 00000000 00:00 0
    ... Size:               4096 kB
    ... Rss:                4096 kB
    ... AnonHugePages:         0 kB
    ... 7f0020000000-7f0030000000 r--p 00000000 08:01 123    /usr/lib/x.so
    ... Size:             262144 kB
    ... Rss:              262144 kB
    ... AnonHugePages:         0 kB
    ... '''
    >>> [(hex(a), (b - a) >> 20) for a, b in large_regions(text, 64 << 20)]
    [('0x7f0000000000', 256)]
    """
    out, current = [], None
    for line in smaps.splitlines():
        m = _HEADER.match(line)
        if m:
            path = m.group(4).strip()
            anon = m.group(3).startswith("rw") and m.group(3).endswith("p") and path in ("", "[heap]")
            current = {"lo": int(m.group(1), 16), "hi": int(m.group(2), 16)} if anon else None
            if current is not None:
                out.append(current)
        elif current is not None and ":" in line:
            key, _, value = line.partition(":")
            if key in ("Size", "Rss", "AnonHugePages"):
                current[key] = int(value.split()[0]) << 10
    regions = []
    for r in out:
        size = r.get("Size", 0)
        if size < min_bytes or r.get("Rss", 0) < size / 4 or r.get("AnonHugePages", 0) > size / 2:
            continue
        lo, hi = (r["lo"] + HUGE - 1) & ~(HUGE - 1), r["hi"] & ~(HUGE - 1)
        if hi > lo:
            regions.append((lo, hi))
    return regions


def resident_runs(present: list[bool], lo: int, full: float = 0.9) -> list[tuple[int, int]]:
    """Runs of 2 MB chunks, from address ``lo`` (aligned), whose 4 KB pages (``present``, one
    flag a page) are at least ``full`` present: only those are collapsed, so holes (an index's
    room to grow) are not filled with memory.

    >>> chunk = 512  # 4 KB pages in 2 MB
    >>> flags = [True] * chunk * 2 + [False] * chunk + [True] * chunk
    >>> [((a - 0x200000) >> 20, (b - a) >> 20) for a, b in resident_runs(flags, 0x200000)]
    [(0, 4), (6, 2)]
    """
    per = HUGE // 4096
    runs: list[tuple[int, int]] = []
    for i in range(0, len(present) - per + 1, per):
        if sum(present[i:i + per]) >= full * per:
            start = lo + i * 4096
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + HUGE)
            else:
                runs.append((start, start + HUGE))
    return runs


def _present(lo: int, hi: int) -> list[bool]:
    """Which 4 KB pages of [lo, hi) are in memory (bit 63 of each /proc/self/pagemap entry)."""
    import numpy as np

    with open("/proc/self/pagemap", "rb") as f:
        f.seek((lo // 4096) * 8)
        entries = np.frombuffer(f.read(((hi - lo) // 4096) * 8), dtype=np.uint64)
    return ((entries >> np.uint64(63)) & np.uint64(1)).astype(bool).tolist()


def thp_allowed(setting: str | None = None) -> bool:
    """Whether the system lets a process ask for 2 MB pages: Linux with ``transparent_hugepage``
    set to ``always`` or ``madvise`` (``setting``: that file's text, read from
    ``/sys/kernel/mm/transparent_hugepage/enabled`` when None). MADV_COLLAPSE itself ignores the
    setting, so an admin's ``never`` is honoured here.

    >>> thp_allowed("always [madvise] never"), thp_allowed("always madvise [never]")
    (True, False)
    """
    if setting is None:
        try:
            with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
                setting = f.read()
        except OSError:
            return False
    return "[never]" not in setting


def collapse_large_regions(min_mb: int = 64) -> int:
    """Back the resident 2 MB chunks (``resident_runs``) of this process's large anonymous
    regions (``large_regions``) with 2 MB pages, one madvise per chunk, each chunk once per
    process (a chunk the kernel refused is tried again at the next call). Returns the bytes the
    kernel collapsed (0 where it cannot or must not: not Linux, a kernel without
    ``MADV_COLLAPSE``, THP ``never``: :func:`thp_allowed`). Took 0.55 s for a 100k-item HNSW index
    (206 MB) and 3.2 s for everything a retrieval process at 100k holds (1,268 MB: both indexes,
    every encoder's weights); the memory stays readable and writable meanwhile."""
    if not sys.platform.startswith("linux") or not thp_allowed() or os.sysconf("SC_PAGE_SIZE") != 4096:
        return 0  # (pagemap offsets and chunk sizes here assume 4 KB base pages)
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
        madvise = ctypes.CDLL(None).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return 0
    done = 0
    for region in large_regions(text, min_mb << 20):
        try:
            runs = resident_runs(_present(*region), region[0])
        except OSError:
            return done
        for lo, hi in runs:
            for chunk in range(lo, hi, HUGE):
                with _lock:
                    if chunk in _done:
                        continue
                # per chunk: MADV_COLLAPSE fails a whole range when one chunk fails (in use, no THP)
                if madvise(chunk, HUGE, MADV_COLLAPSE) == 0:
                    done += HUGE
                    with _lock:
                        _done.add(chunk)
    log.debug("collapsed %d MB into huge pages", done >> 20)
    return done


def _collapse_while_asked(min_mb: int) -> None:
    global _again
    while True:
        collapse_large_regions(min_mb)
        with _lock:
            if not _again:
                _threads.clear()
                return
            _again = False


def collapse_in_background(min_mb: int = 64) -> None:
    """``collapse_large_regions`` on a daemon thread (ctypes releases the GIL, so searches go on).
    One thread at a time: asked while it runs, it scans once more when done (new sessions and
    indexes load while it works)."""
    global _again
    with _lock:
        if _threads:
            _again = True
            return
        t = threading.Thread(target=_collapse_while_asked, args=(min_mb,), name="mmrag-hugepages", daemon=True)
        _threads.append(t)
        t.start()


def settle() -> None:
    """Wait for the collapses started in the background (benchmarks measure after it)."""
    with _lock:
        pending = list(_threads)
    for t in pending:
        t.join()
