"""Keyword search: a persistent BM25 index (Tantivy) of the passage collection's texts, with an
analyzer for every script.

Tantivy (the Rust search library, official Python bindings) keeps the index on disk, adds and
deletes incrementally, and scores with BM25 (k1 1.2, b 0.75) using block-max top-k. Texts are
tokenized here by :func:`tokenize` and indexed as space-separated tokens with Tantivy's
``whitespace`` tokenizer, so queries and texts go through the same Python analyzer.

Visibility follows the writer's commits: what a writer added is invisible to searches until
``commit()``. The library commits a document's terms once all its items are stored, and each
search names the documents it may return, so a half-ingested document is never found.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import regex

# Scripts written without spaces between words: split into overlapping character bigrams
# (as Lucene's CJK analyzer does); Japanese prolonged sound mark and iteration mark included.
# Korean is written with spaces, but particles and endings are part of the spaced word
# (비밀번호를 = password + object particle): bigrams, as Lucene's CJK analyzer does, let the
# bare noun of a question match it.
_NOSPACE = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\u30fc\u3005"
# Accents on Latin and Greek letters, which questions often leave out (cafe, upper-case Greek
# that drops its tonos): removed, as Lucene's ASCII and Greek folding filters do. Marks of other
# scripts (Devanagari vowel signs, Thai tone marks) are letters' parts and stay.
_ACCENT = regex.compile(r"(?<=[\p{Latin}\p{Greek}]\p{Mn}*)\p{Mn}+")
# A word: letters, marks and digits of any script, joined inside by . _ + - (env-var, set_size, 3.14)
_WORD = regex.compile(r"[\p{L}\p{M}\p{N}]+(?:[._+\-][\p{L}\p{M}\p{N}]+)*")
_ASCII_WORD = re.compile(r"[a-z0-9]+(?:[._+\-][a-z0-9]+)*")
_HAS_NOSPACE = regex.compile(f"[{_NOSPACE}]")
_SPLIT_NOSPACE = regex.compile(f"[{_NOSPACE}]+|[^{_NOSPACE}]+")
_JOINERS = "._+-"
MAX_TOKEN = 100  # longer "words" (base64, hashes run together) are noise
STOP = frozenset("a an and are as at be by can do does for from how i in is it of on or that the this to what when "
                 "where which who why with you your my me we".split())
ANALYZER_VERSION = "2"  # bump when tokenize() changes: an index made with another version is rebuilt


def tokenize(text: str) -> list[str]:
    """The keyword tokens of a text or a query, in any script.

    Unicode NFKC (ligatures, full-width and presentation forms) then case folding; a token is a
    run of letters, marks and digits joined inside by ``. _ + -`` (so code such as ``env-var``,
    ``set_size`` and ``M4PATH`` stays whole); Cyrillic, Greek, Arabic, Devanagari... words are
    tokens like Latin ones, accents of Latin and Greek letters removed (``café`` is ``cafe``);
    text in scripts written without spaces (Chinese, Japanese, Thai, Lao, Khmer, Myanmar) and
    Korean (whose spaced words carry their particles) becomes overlapping character bigrams, a
    lone character a unigram. English stop words and tokens over 100 characters are dropped.

    >>> tokenize("The M4PATH env-var, set_size! ﬁlter")
    ['m4path', 'env-var', 'set_size', 'filter']
    >>> tokenize("锂电池 пароль ΚΑΦΈΣ 猫 비밀번호를")
    ['锂电', '电池', 'пароль', 'καφεσ', '猫', '비밀', '밀번', '번호', '호를']
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    if text.isascii():  # the same rule on ASCII, in one pass of the (faster) re module
        return [w for w in _ASCII_WORD.findall(text) if w not in STOP and len(w) <= MAX_TOKEN]
    if not _HAS_NOSPACE.search(text):
        text = _fold_accents(text)  # (_tokens folds on its own)
        out = []
        for chunk in text.split():
            # a plain run of letters and digits is one token (str.isalnum is exactly that, and
            # fast); only words with punctuation or combining marks go through the regex
            for w in ((chunk,) if chunk.isalnum() else _WORD.findall(chunk)):
                if w not in STOP and len(w) <= MAX_TOKEN:
                    out.append(w)
        return out
    return _tokens(text)


def _fold_accents(text: str) -> str:
    """Casefolded text without the accents of Latin and Greek letters (see ``_ACCENT``).

    >>> _fold_accents("café κωδικό ΚΩΔΙΚΌ हिन्दी")
    'cafe κωδικο ΚΩΔΙΚΟ हिन्दी'
    """
    decomposed = unicodedata.normalize("NFD", text)
    folded = _ACCENT.sub("", decomposed)
    return text if len(folded) == len(decomposed) else unicodedata.normalize("NFC", folded)


def _tokens(text: str) -> list[str]:
    """``tokenize`` without its shortcuts, on normalised text (tests compare the two)."""
    text = _fold_accents(text)
    out = []
    for word in _WORD.findall(text):
        if not _HAS_NOSPACE.search(word):
            if word not in STOP and len(word) <= MAX_TOKEN:
                out.append(word)
            continue
        for part in _SPLIT_NOSPACE.findall(word):  # e.g. "usb接口": "usb", then bigrams
            if _HAS_NOSPACE.match(part):
                out.extend([part] if len(part) == 1 else [part[i:i + 2] for i in range(len(part) - 1)])
            else:
                part = part.strip(_JOINERS)
                if part and part not in STOP and len(part) <= MAX_TOKEN:
                    out.append(part)
    return out


class KeywordIndex:
    """BM25 keyword index of text items, on disk in the directory ``path`` (Tantivy).

    An item is (id, text, document sha256, kind); ``kind`` is what searches filter by (mmrag
    passes ``text`` for passages and the figure's kind for a figure's texts). Writes (``add``,
    ``delete_doc``) are queued and become visible together at ``commit()``. One writer at a
    time: Tantivy locks the directory while a writer is open, and the caller serialises writers
    (mmrag's library write lock). Searches may run from any thread or process; each sees the
    last commit.

    A manifest beside the index records the analyzer version, whether the last full build
    finished, and the documents the index may hold: before a commit it already names the
    documents being added, so it is always a superset of what a search can find. ``covers()``
    compares it with the store's complete documents, a cheap check on open that decides whether
    ``rebuild()`` is needed (an index deleted by hand, one from an older mmrag, a build cut short).
    """

    MANIFEST = "mmrag-keyword.json"

    def __init__(self, path: str | os.PathLike, heap_mb: int = 64):
        import tantivy

        self._t = tantivy
        self.path = Path(path)
        self.heap = heap_mb * 1_000_000
        self.index = None
        self._writer = None
        self._added: set[str] = set()  # ids queued since the last commit (an id added twice replaces)
        self._docs: set[str] = set()  # the documents after the queued operations
        self._manifest: tuple[tuple, dict] | None = None  # (stat key, parsed) cache
        self._lock = threading.Lock()

    # ---- the manifest -------------------------------------------------------------------------
    def manifest(self) -> dict:
        """``{"analyzer": str, "complete": bool, "docs": [sha, ...]}``, or {} without one."""
        p = self.path / self.MANIFEST
        try:
            st = p.stat()
        except OSError:
            return {}
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._manifest
        if cached and cached[0] == key:
            return cached[1]
        try:
            m = json.loads(p.read_text())
            m["docs"] = frozenset(m["docs"])
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        self._manifest = (key, m)
        return m

    def _write_manifest(self, docs: Iterable[str], complete: bool = True) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / (self.MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"analyzer": ANALYZER_VERSION, "complete": complete, "docs": sorted(docs)}))
        os.replace(tmp, self.path / self.MANIFEST)

    def documents(self) -> frozenset[str]:
        """The documents the index may hold (a superset of those a search can return)."""
        return self.manifest().get("docs", frozenset())

    def covers(self, docs: Iterable[str]) -> bool:
        """True when the index was built by this analyzer, its last build finished, and it holds
        the items of every document in ``docs`` (the store's complete documents)."""
        m = self.manifest()
        return (bool(m) and m.get("analyzer") == ANALYZER_VERSION and bool(m.get("complete"))
                and set(docs) <= m["docs"] and self._reader() is not None)

    # ---- opening ------------------------------------------------------------------------------
    def _schema(self):
        b = self._t.SchemaBuilder()
        b.add_text_field("id", stored=True, tokenizer_name="raw", index_option="basic")
        b.add_text_field("doc_sha", tokenizer_name="raw", index_option="basic")
        b.add_text_field("kind", tokenizer_name="raw", index_option="basic")
        b.add_text_field("body", tokenizer_name="whitespace", index_option="freq")
        return b.build()

    def _reader(self):
        """The index for searching, opened once; None while there is none on disk."""
        if self.index is None:
            with self._lock:
                if self.index is None and self.path.is_dir() and self._t.Index.exists(str(self.path)):
                    try:
                        index = self._t.Index.open(str(self.path))
                        index.config_reader(reload_policy="Manual")
                        self.index = index
                    except (OSError, ValueError):
                        return None
        return self.index

    def _open_for_writing(self, fresh: bool):
        """The index for writing (the caller holds the write lock); ``fresh`` starts a new one.
        An index that cannot be opened with this schema is replaced."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not fresh:
            try:
                self.index = self._t.Index(self._schema(), path=str(self.path), reuse=True)
            except (OSError, ValueError):
                fresh = True
        if fresh:
            for p in self.path.iterdir():
                if p.name != self.MANIFEST:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            self.index = self._t.Index(self._schema(), path=str(self.path), reuse=False)
        self.index.config_reader(reload_policy="Manual")

    # ---- writing ------------------------------------------------------------------------------
    def _w(self):
        if self._writer is None:
            if self._reader() is None:
                self._open_for_writing(fresh=False)
            self._writer = self.index.writer(heap_size=self.heap, num_threads=1)
            # A writer killed inside Tantivy's commit leaves that commit's files behind its old
            # meta.json; the next commit doing the same operations gets the same opstamp, so the
            # same file name, and fails with FileAlreadyExists for good. Tantivy lists the files it
            # made, and removes those no commit uses (we hold the write lock: no other writer).
            self._writer.garbage_collect_files()
            self._docs = set(self.documents())
        return self._writer

    def _doc(self, item_id: str, text: str, sha: str, kind: str):
        return self._t.Document(id=item_id, doc_sha=sha, kind=kind, body=" ".join(tokenize(text)))

    def add(self, ids: Sequence[str], texts: Sequence[str], doc_shas: Sequence[str], kinds: Sequence[str]) -> None:
        """Queue items (searchable after the next commit); an id added again replaces the first."""
        w = self._w()
        for i, text, sha, kind in zip(ids, texts, doc_shas, kinds):
            if i in self._added:
                w.delete_documents_by_term("id", i)
            self._added.add(i)
            self._docs.add(sha)
            w.add_document(self._doc(i, text, sha, kind))

    def delete_doc(self, sha: str) -> None:
        """Queue the removal of every item of a document (applied at the next commit)."""
        self._w().delete_documents_by_term("doc_sha", sha)
        self._docs.discard(sha)

    def commit(self, complete: Iterable[str] = (), finished: bool | None = None) -> None:
        """Publish what was queued. ``complete`` names documents now fully written (also those
        with no text at all), which the manifest then lists; ``finished`` marks a full build done."""
        complete = set(complete)
        before = self.manifest()
        state = bool(before.get("complete")) if finished is None else finished
        if self._writer is None:
            if complete - self.documents() or state != bool(before.get("complete")):
                self._write_manifest(self.documents() | complete, state)
            return
        after = self._docs | complete
        # while Tantivy commits, the manifest names the old and the new documents (a superset)
        self._write_manifest(set(before.get("docs", ())) | after, bool(before.get("complete")))
        self._writer.commit()
        self._writer.wait_merging_threads()
        self._writer = None  # releases Tantivy's directory lock
        self._added.clear()
        self._write_manifest(after, state)
        self.index.reload()

    def rollback(self) -> None:
        """Drop everything queued since the last commit."""
        if self._writer is not None:
            self._writer.rollback()
            self._writer = None
            self._added.clear()
            self._docs = set(self.documents())

    def rebuild(self, batches: Iterable[tuple[Sequence[str], Sequence[str], Sequence[str], Sequence[str]]],
                complete: Iterable[str], progress=None) -> int:
        """Replace the whole index with ``batches`` of (ids, texts, doc shas, kinds) and mark
        ``complete`` (the documents they belong to) as held. Returns the number of items; calls
        ``progress(items_so_far)`` after each batch. Cut short, it leaves the manifest marked
        unfinished, so the next ``covers()`` is false and the build starts again."""
        self.rollback()
        complete = set(complete)
        self._write_manifest(self.documents() | complete, complete=False)
        self._open_for_writing(fresh=True)
        self._writer = self.index.writer(heap_size=self.heap, num_threads=1)
        n = 0
        for ids, texts, shas, kinds in batches:
            for i, text, sha, kind in zip(ids, texts, shas, kinds):
                self._writer.add_document(self._doc(i, text, sha, kind))
            n += len(ids)
            if progress:
                progress(n)
        self._docs = set(complete)
        self.commit(complete, finished=True)
        return n

    # ---- searching ----------------------------------------------------------------------------
    def ids(self) -> set[str]:
        """Every item id the last commit holds (for checks and tests; reads them all)."""
        index = self._reader()
        if index is None:
            return set()
        index.reload()
        searcher = index.searcher()
        if not searcher.num_docs:
            return set()
        hits = searcher.search(self._t.Query.all_query(), limit=searcher.num_docs, count=False).hits
        return {searcher.doc(addr)["id"][0] for _, addr in hits}

    def search(self, query: str, n: int, docs: Iterable[str] | None = None,
               kinds: Iterable[str] | None = None) -> list[tuple[str, float]]:
        """Top ``n`` (item id, BM25 score > 0), best first: items holding any of the query's
        tokens, among those of ``docs`` (document shas; None: every document) and of ``kinds``
        (None: every kind). Sees the last commit; an index not built yet finds nothing."""
        t = self._t
        terms = list(dict.fromkeys(tokenize(query)))
        index = self._reader()
        if not terms or n <= 0 or index is None:
            return []
        index.reload()
        schema = index.schema
        words = t.Query.boolean_query([(t.Occur.Should, t.Query.term_query(schema, "body", w)) for w in terms])
        clauses = [(t.Occur.Must, words)]
        if docs is not None:
            docs = set(docs)
            held = self.documents()
            if not held & docs:
                return []
            unwanted = held - docs  # the index holds nothing outside ``held``
            if unwanted:  # filter by the shorter list: the documents asked for, or those not
                if len(unwanted) < len(docs & held):
                    clauses.append((t.Occur.MustNot, t.Query.term_set_query(schema, "doc_sha", sorted(unwanted))))
                else:
                    clauses.append((t.Occur.Must, t.Query.const_score_query(
                        t.Query.term_set_query(schema, "doc_sha", sorted(docs & held)), 0.0)))
        if kinds is not None:
            clauses.append((t.Occur.Must, t.Query.const_score_query(
                t.Query.term_set_query(schema, "kind", sorted(set(kinds))), 0.0)))
        query_ = words if len(clauses) == 1 else t.Query.boolean_query(clauses)
        searcher = index.searcher()
        hits = searcher.search(query_, limit=n, count=False).hits
        return [(searcher.doc(addr)["id"][0], float(score)) for score, addr in hits if score > 0]
