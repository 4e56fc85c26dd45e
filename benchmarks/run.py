"""mmrag benchmarks: one command, every figure beside its anchor measured in the same run.

    python benchmarks/run.py --corpus ../shared/eval-dev --out bench-out

Stages (each in its own process, so peak RSS is the stage's own):
  extract   pages/s: text only; + figures; + page renders; + OCR — beside pymupdf4llm.to_markdown(write_images=True)
  embed     CLIP image embedding img/s: the ingest pipeline (PNG bytes -> vectors) vs a bare batched open_clip
            forward vs one image at a time; text-query encode latency p50/p95
  chroma    Chroma query latency p50/p95 at 10k/100k/1M stored vectors, index size on disk
  retrieval retrieval latency p50/p95 (no LLM) and question -> first streamed token against a local server;
            then figure descriptions (`mmrag describe` on every figure) against the same local server:
            descriptions per minute with describe.concurrency calls in flight, and their cost in tokens as the
            responses' usage reports it (the test server's usage is made up: ~700 in, 20 out; a real VLM
            reports its own)
  ingest    full ingest pages/s (extract, render and OCR in worker processes; embed and store in the main
            process; CLIP --ingest-clip-model or --clip-model with random weights) with the default
            ingest.workers (one per core) beside ingest.workers: 1 (page by page, as before workers), taking
            turns document by document, and the speed-up; peak RSS of the main process, the largest worker
            and both together. Not in the default --only: benchmarks/run.py --only ingest
  keyword   keyword search on a synthetic library (Zipf vocabulary, 50-150 words per chunk, 100 chunks
            per document) at --keyword-sizes chunks: build, adding 1,000 chunks, query p50/p95 (all
            documents, one document, all but one), peak RSS, size on disk — the Tantivy index beside
            the hand-written in-memory BM25 it replaced (a copy below) at --old-bm25-sizes

CLIP throughput does not depend on the weights, so ViT-B-32 is built with random weights here
(no download); retrieval numbers use whatever clip model the config names.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return round(v[min(len(v) - 1, int(p * len(v)))], 2) if v else 0.0


# ---- stages ------------------------------------------------------------------------------------
def stage_extract(corpus: Path, mode: str) -> dict:
    """One extraction mode over every PDF of the corpus."""
    from mmrag.config import DEFAULTS

    pdfs = sorted((corpus / "pdfs").glob("*.pdf"))
    pages = 0
    t0 = time.perf_counter()
    if mode == "pymupdf4llm":
        import pymupdf4llm

        import pymupdf

        out = tempfile.mkdtemp()
        failed = []
        for p in pdfs:
            try:
                pymupdf4llm.to_markdown(str(p), write_images=True, image_path=out, show_progress=False)
                pages += pymupdf.open(p).page_count
            except Exception as exc:  # report, and count only the pages it got through
                failed.append(f"{p.name}: {type(exc).__name__}: {exc}")
        secs = time.perf_counter() - t0
        return {"mode": mode, "pages": pages, "seconds": round(secs, 2), "pages_per_s": round(pages / secs, 2),
                "peak_rss_mb": peak_rss_mb(), "images_written": len(list(Path(out).iterdir())), "failed": failed}
    else:
        import pymupdf

        from ingest import extract as E
        from ingest import text as T

        cfg = dict(DEFAULTS["ingest"], ocr="never" if mode != "ocr" else "auto", ocr_figures=mode == "ocr")
        for p in pdfs:
            doc = E.open_pdf(p)
            pages += doc.page_count
            if mode == "text":
                running = E.running_header_keys(doc)
                for page in doc:
                    blocks = [(T.clean_block_text(b[4]), tuple(b[:4])) for b in
                              page.get_text("blocks", flags=E.TEXT_FLAGS) if b[6] == 0]
                    blocks = T.drop_running(blocks, page.rect.height, running)
                    T.chunk_blocks(T.reading_order(blocks, page.rect.width), 1000, 150)
            else:
                # figures: no rendering of anything; renders: figure PNGs and page images
                for _ in E.extract_pages(doc, "x", dict(cfg, page_dpi=cfg["page_dpi"]), render=mode != "figures"):
                    pass
    secs = time.perf_counter() - t0
    return {"mode": mode, "pages": pages, "seconds": round(secs, 2), "pages_per_s": round(pages / secs, 2),
            "peak_rss_mb": peak_rss_mb()}


def _corpus_images(corpus: Path, n: int) -> list[bytes]:
    """Real figure and page PNGs from the corpus (rendered at the ingest's resolutions)."""
    import pymupdf

    out = []
    for p in sorted((corpus / "pdfs").glob("*.pdf")):
        doc = pymupdf.open(p)
        for page in doc:
            out.append(page.get_pixmap(dpi=72).tobytes("png"))
            if len(out) >= n:
                return out
    return out


def stage_embed(corpus: Path, model: str, n: int, batch: int) -> dict:
    import open_clip
    import torch

    from index.embedders import ClipEmbedder, load_image

    torch.manual_seed(0)
    emb = ClipEmbedder(model, None, "cpu", batch)  # random weights: same compute as real ones
    pngs = _corpus_images(corpus, n)
    emb.embed_images([load_image(pngs[0])])  # warm up

    t0 = time.perf_counter()
    for i in range(0, len(pngs), batch):
        emb.embed_images([load_image(b) for b in pngs[i:i + batch]])
    pipeline = len(pngs) / (time.perf_counter() - t0)

    images = [load_image(b) for b in pngs]  # the bare anchor gets decoded images for free
    model_, preprocess = emb.model, emb.preprocess
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.stack([preprocess(im) for im in images[i:i + batch]])
            f = model_.encode_image(x)
            f = f / f.norm(dim=-1, keepdim=True)
    bare = len(images) / (time.perf_counter() - t0)

    few = images[: max(8, n // 4)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for im in few:
            model_.encode_image(preprocess(im).unsqueeze(0))
    single = len(few) / (time.perf_counter() - t0)

    lat = []
    questions = [json.loads(line)["query"] for line in (corpus / "queries.jsonl").read_text().splitlines() if line.strip()]
    for q in questions * 2:
        t0 = time.perf_counter()
        emb.embed_texts([q])
        lat.append((time.perf_counter() - t0) * 1000)
    return {"model": model, "images": len(pngs), "batch": batch, "threads": torch.get_num_threads(),
            "pipeline_img_s": round(pipeline, 2), "bare_batched_img_s": round(bare, 2),
            "one_at_a_time_img_s": round(single, 2), "ratio_pipeline_to_bare": round(pipeline / bare, 3),
            "text_query_ms_p50": pct(lat, 0.5), "text_query_ms_p95": pct(lat, 0.95), "peak_rss_mb": peak_rss_mb()}


def _dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)


def stage_chroma(sizes: list[int], dim: int, queries: int) -> dict:
    import numpy as np

    from index.records import Filter, VisualItem
    from index.store import Store
    import chromadb
    from chromadb.config import Settings

    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        path = Path(tempfile.mkdtemp(prefix="mmrag-chroma-bench-"))
        client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
        store = Store(client, f"bench|{dim}", "bench-text|384")
        shas = [f"{i:064x}" for i in range(10)]
        t0 = time.perf_counter()
        batch = 5000
        for start in range(0, size, batch):
            n = min(batch, size - start)
            vecs = rng.standard_normal((n, dim), dtype=np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            store.add_visual([VisualItem(f"f{start + i}", shas[(start + i) % 10], "d", 1, "vector", "")
                              for i in range(n)], vecs)
            if (start + n) % 100_000 == 0:
                print(f"chroma: {start + n:,}/{size:,} vectors stored, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        insert_s = time.perf_counter() - t0
        flt = Filter.of(shas, ["vector", "raster", "page"])
        lat_ours, lat_raw = [], []
        q = rng.standard_normal((queries, dim), dtype=np.float32)
        for v in q:  # raw Chroma: the anchor
            t0 = time.perf_counter()
            store.visual.query(query_embeddings=[v.tolist()], n_results=50)
            lat_raw.append((time.perf_counter() - t0) * 1000)
        for v in q:  # as mmrag queries: filtered to complete documents and kinds, metadata included
            t0 = time.perf_counter()
            store.query_visual(v, 50, flt)
            lat_ours.append((time.perf_counter() - t0) * 1000)
        rows.append({"vectors": size, "dim": dim, "insert_s": round(insert_s, 1),
                     "raw_query_ms_p50": pct(lat_raw, 0.5), "raw_query_ms_p95": pct(lat_raw, 0.95),
                     "mmrag_query_ms_p50": pct(lat_ours, 0.5), "mmrag_query_ms_p95": pct(lat_ours, 0.95),
                     "disk_mb": _dir_mb(path)})
        del store, client
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows, "peak_rss_mb": peak_rss_mb()}


# ---- keyword search ------------------------------------------------------------------------------
_SYLLABLES = ["ka", "ne", "ri", "to", "mu", "sa", "lo", "vi", "de", "pa", "xu", "bo", "ze", "fi", "gu", "ha",
              "je", "co", "ly", "wa"]


def _vocabulary(size: int, rng) -> list[str]:
    """The commonest words of English text (the analyzer's stop words) first, then made-up words."""
    from index.keyword import STOP

    words, seen = sorted(STOP), set(STOP)
    while len(words) < size:
        w = "".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), rng.integers(2, 6)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


class SyntheticText:
    """Chunks of 50-150 words drawn from a Zipf distribution (exponent 1.07, as in English text)
    over a 200,000-word vocabulary; deterministic for a seed."""

    def __init__(self, vocab: int = 200_000, seed: int = 0):
        import numpy as np

        self.rng = np.random.default_rng(seed)
        self.words = np.array(_vocabulary(vocab, self.rng), dtype=object)
        p = 1.0 / np.arange(1, vocab + 1) ** 1.07
        self.cdf = np.cumsum(p / p.sum())

    def _draw(self, n: int):
        import numpy as np

        return np.minimum(np.searchsorted(self.cdf, self.rng.random(n)), len(self.words) - 1)

    def chunks(self, n: int) -> list[str]:
        lens = self.rng.integers(50, 151, n)
        ws = self.words[self._draw(int(lens.sum()))]
        out, o = [], 0
        for length in lens:
            out.append(" ".join(ws[o:o + length]))
            o += length
        return out

    def questions(self, n: int) -> list[str]:
        """Questions of 2 stop words and 2-6 other words, drawn with the same Zipf weights."""
        out = []
        for _ in range(n):
            k = int(self.rng.integers(2, 7))
            idx = self._draw(50 * k)
            content = [i for i in idx if i >= 40][:k]  # past the stop words
            out.append(" ".join(["how", "the"] + list(self.words[content])))
        return out


def synthetic_library(size: int, text: SyntheticText, per_doc: int = 100, batch: int = 10_000):
    """(ids, texts, doc shas, kinds) batches of ``size`` chunks, ``per_doc`` chunks per document."""
    for start in range(0, size, batch):
        n = min(batch, size - start)
        ids = [f"c{start + i}" for i in range(n)]
        yield ids, text.chunks(n), [f"{(start + i) // per_doc:064x}" for i in range(n)], ["text"] * n


class OldBM25:
    """The hand-written in-memory BM25 mmrag used before the Tantivy index (index/keyword.py at
    commit 9974d4a), kept here as the benchmark's anchor; rebuilt from every text on each change."""

    _WORD = None

    def __init__(self, ids: list[str], texts: list[str], k1: float = 1.5, b: float = 0.75):
        import math
        import re
        from collections import Counter

        from index.keyword import STOP

        OldBM25._WORD = re.compile(r"[a-z0-9]+(?:[._+-][a-z0-9]+)*")
        self.stop = STOP
        self.ids = ids
        self.k1, self.b = k1, b
        self.tfs = [Counter(self.tokenize(t)) for t in texts]
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

    def tokenize(self, text: str) -> list[str]:
        return [w for w in self._WORD.findall(text.lower()) if w not in self.stop]

    def search(self, query: str, n: int, allowed=None) -> list[tuple[str, float]]:
        scores: dict[int, float] = {}
        for w in set(self.tokenize(query)):
            idf = self.idf.get(w)
            if idf is None:
                continue
            for i in self.postings[w]:
                tf = self.tfs[i][w]
                norm = tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * self.lens[i] / (self.avg or 1)))
                scores[i] = scores.get(i, 0.0) + idf * norm
        ranked = sorted(((s, i) for i, s in scores.items() if allowed is None or allowed(i)), reverse=True)[:n]
        return [(self.ids[i], s) for s, i in ranked]


def _timed(fn, items) -> list[float]:
    out = []
    for x in items:
        t0 = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def stage_keyword(impl: str, size: int, queries: int) -> dict:
    """One implementation at one size, in its own process (peak RSS is its own)."""
    text = SyntheticText()
    questions = text.questions(queries)
    docs = [f"{d:064x}" for d in range((size + 99) // 100)]
    one, all_but_one = {docs[len(docs) // 2]}, set(docs[1:])
    new_ids = [f"n{i}" for i in range(1000)]
    new_texts = text.chunks(1000)
    new_doc = "f" * 64
    row = {"impl": impl, "chunks": size, "documents": len(docs)}
    t0 = time.perf_counter()
    if impl == "tantivy":
        from index.keyword import KeywordIndex

        path = Path(tempfile.mkdtemp(prefix="mmrag-keyword-bench-"))
        kw = KeywordIndex(path / "keyword")

        def progress(done):
            if done % 100_000 == 0:
                print(f"keyword: {done:,}/{size:,} chunks indexed, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        kw.rebuild(synthetic_library(size, text), docs, progress)
        row["build_s"] = round(time.perf_counter() - t0, 1)
        kw.search(questions[0], 50)  # open the searcher
        lat = {"all": _timed(lambda q: kw.search(q, 50, docs=docs), questions),
               "one_doc": _timed(lambda q: kw.search(q, 50, docs=one), questions),
               "all_but_one": _timed(lambda q: kw.search(q, 50, docs=all_but_one), questions)}
        t1 = time.perf_counter()
        kw.add(new_ids, new_texts, [new_doc] * 1000, ["text"] * 1000)
        kw.commit([new_doc])
        row["add_1000_s"] = round(time.perf_counter() - t1, 3)
        assert kw.search(new_texts[0], 50, docs=[new_doc]), "the added chunks are searchable"
        row["disk_mb"] = _dir_mb(path)
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:  # the old in-memory BM25: everything held in Python objects, rebuilt on every change
        ids, texts, shas = [], [], []
        for i, t, s, _ in synthetic_library(size, text):
            ids += i
            texts += t
            shas += s
        t_build = time.perf_counter()
        bm = OldBM25(ids, texts)
        row["build_s"] = round(time.perf_counter() - t_build, 1)
        row["generate_s"] = round(t_build - t0, 1)

        def filtered(allowed_docs):
            return lambda q: bm.search(q, 50, allowed=lambda i: shas[i] in allowed_docs)
        all_docs = set(docs)
        lat = {"all": _timed(filtered(all_docs), questions), "one_doc": _timed(filtered(one), questions),
               "all_but_one": _timed(filtered(all_but_one), questions)}
        t1 = time.perf_counter()  # adding means rebuilding from every text (what the retriever did)
        OldBM25(ids + new_ids, texts + new_texts)
        row["add_1000_s"] = round(time.perf_counter() - t1, 1)
        row["disk_mb"] = 0.0
    for name, values in lat.items():
        row[f"query_ms_p50_{name}"] = pct(values, 0.5)
        row[f"query_ms_p95_{name}"] = pct(values, 0.95)
    row["peak_rss_mb"] = peak_rss_mb()
    row["queries"] = len(questions)
    row["example_question"] = questions[0]
    return row


def stage_retrieval(corpus: Path, config: str | None, docs: list[str]) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from llm_server import LLMServer

    from mmrag.config import load_config
    from mmrag.wiring import build

    cfg = load_config(config)
    cfg["data_dir"] = tempfile.mkdtemp(prefix="mmrag-bench-")
    cfg["chroma"]["path"] = None
    queries = [json.loads(line) for line in (corpus / "queries.jsonl").read_text().splitlines() if line.strip()]
    with LLMServer() as server:
        cfg["llm"].update(model="openai/bench", api_base=server.api_base, vision=True)
        cfg["describe"]["mode"] = "off"  # described apart below, not inside the ingest timing
        app = build(cfg)
        pdfs = [corpus / "pdfs" / d for d in docs] if docs else sorted((corpus / "pdfs").glob("*.pdf"))
        t0 = time.perf_counter()
        app.library.ingest(pdfs)
        ingest_s = time.perf_counter() - t0
        app.retriever.retrieve("warm up")
        lat, first, total = [], [], []
        for q in queries:
            t0 = time.perf_counter()
            app.retriever.retrieve(q["query"])
            lat.append((time.perf_counter() - t0) * 1000)
        for q in queries[:20]:
            answer = app.assistant.ask(q["query"])
            first.append(answer.timings.get("first_token_ms", float("nan")))
            total.append(answer.timings["total_ms"])
        figs = app.describing.undescribed()
        t0 = time.perf_counter()
        stats = app.describing.describe(figs)
        describe_s = time.perf_counter() - t0
    pages = sum(d["pages"] for d in app.library.list())
    n = stats.described or 1
    return {"docs": [p.name for p in pdfs], "pages": pages, "ingest_s": round(ingest_s, 1),
            "ingest_pages_per_s": round(pages / ingest_s, 2), "clip": app.library.clip.identity,
            "retrieval_ms_p50": pct(lat, 0.5), "retrieval_ms_p95": pct(lat, 0.95),
            "first_token_ms_p50": pct(first, 0.5), "first_token_ms_p95": pct(first, 0.95),
            "answer_ms_p50": pct(total, 0.5),
            "describe": {"figures": len(figs), "described": stats.described, "reused": stats.reused,
                         "failed": stats.failed, "seconds": round(describe_s, 1),
                         "descriptions_per_min": round(60 * stats.described / describe_s, 1) if describe_s else 0.0,
                         "concurrency": cfg["describe"]["concurrency"],
                         "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                         "tokens_per_description": round((stats.prompt_tokens + stats.completion_tokens) / n, 1)},
            "peak_rss_mb": peak_rss_mb()}


# ---- ingest on every core (issue 17) -------------------------------------------------------------
def stage_ingest(corpus: Path, settings: list[str], model: str, docs: list[str]) -> dict:
    """Full ingests (extract, render, OCR in the extraction workers; embed and store in this
    process) of the corpus, one fresh data dir per ``ingest.workers`` setting, the settings taking
    turns document by document (so both meet the same background load); CLIP ``model`` with random
    weights (same compute as real ones; a JSON config path for a small one), descriptions off.
    Peak RSS per setting, sampled every 0.2 s while it ingests: this process, its largest worker,
    and this process + its workers together."""
    import threading

    import torch

    from index.embedders import ClipEmbedder, SentenceEmbedder
    from ingest import workers as W
    from ingest.workers import cpu_cores, worker_count, worker_pids
    from mmrag.config import DEFAULTS, validate_config
    from mmrag.wiring import build

    torch.manual_seed(0)
    clip = ClipEmbedder(model, None, "cpu", DEFAULTS["clip"]["batch_size"])
    passages = SentenceEmbedder(DEFAULTS["text_embedder"]["model"], "cpu")
    clip.embed_texts(["warm up"])  # loading the models is not ingest time
    passages.embed(["warm up"])
    apps = {}
    for setting in settings:
        cfg = validate_config({"data_dir": tempfile.mkdtemp(prefix="mmrag-bench-ingest-"),
                               "ingest": {"workers": setting if setting == "auto" else int(setting)},
                               "describe": {"mode": "off"}}).model_dump()
        apps[setting] = build(cfg, clip=clip, passages=passages)
    pdfs = [corpus / "pdfs" / d for d in docs] if docs else sorted((corpus / "pdfs").glob("*.pdf"))
    page_size = os.sysconf("SC_PAGE_SIZE")
    W.IDLE_S = 24 * 3600  # the setting waiting for its turn keeps its workers
    import pymupdf

    from PIL import Image, ImageDraw

    shot = Image.new("RGB", (400, 120), "white")
    ImageDraw.Draw(shot).text((20, 40), "WARM UP", fill="black")
    warm = pymupdf.open()
    for i in range(8):  # a raster figure on every page: each worker loads its OCR model
        page = warm.new_page()
        page.insert_text((72, 72), f"Warm-up page {i}: starts the workers and the stores.")
        shot.putpixel((i, 0), (i, i, i))  # a different image each page (no OCR reuse)
        buf = io.BytesIO()
        shot.save(buf, "PNG")
        page.insert_image(pymupdf.Rect(72, 100, 472, 220), stream=buf.getvalue())
    warm_path = Path(tempfile.mkdtemp()) / "warm-up.pdf"
    warm.save(warm_path)
    for app in apps.values():  # worker start-up and first writes are not ingest time
        app.library.ingest([warm_path])

    def rss_mb(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * page_size / 2**20
        except OSError:
            return 0.0

    rows = {s: {"setting": s, "workers": worker_count(s if s == "auto" else int(s)), "seconds": 0.0, "pages": 0,
                "figures": 0, "chunks": 0, "failed": [], "peak_rss_main_mb": 0.0, "peak_rss_worker_mb": 0.0,
                "peak_rss_total_mb": 0.0} for s in settings}
    current = [None]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            row = current[0]
            if row is None:
                continue
            main = rss_mb(os.getpid())
            sizes = [rss_mb(pid) for pid in worker_pids(row["workers"])]
            row["peak_rss_main_mb"] = max(row["peak_rss_main_mb"], round(main, 1))
            row["peak_rss_worker_mb"] = max([row["peak_rss_worker_mb"], *(round(x, 1) for x in sizes)])
            row["peak_rss_total_mb"] = max(row["peak_rss_total_mb"], round(main + sum(sizes), 1))

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    for pdf in pdfs:
        for setting in settings:
            row = rows[setting]
            current[0] = row
            t0 = time.perf_counter()
            [res] = apps[setting].library.ingest([pdf])
            row["seconds"] += time.perf_counter() - t0
            current[0] = None
            row["pages"] += res.pages
            row["figures"] += res.figures
            row["chunks"] += res.chunks
            if res.status == "failed":
                row["failed"].append(res.message)
            print(f"ingest: {pdf.name} with workers {setting}: {res.pages} pages", file=sys.stderr, flush=True)
    done.set()
    watcher.join()
    out = []
    for row in rows.values():
        row["seconds"] = round(row["seconds"], 1)
        row["pages_per_s"] = round(row["pages"] / row["seconds"], 2) if row["seconds"] else 0.0
        out.append(row)
    return {"clip": model, "cores": cpu_cores(), "torch_threads": torch.get_num_threads(), "docs": len(pdfs),
            "rows": out, "speedup": round(out[0]["pages_per_s"] / out[-1]["pages_per_s"], 2) if out[-1]["pages_per_s"]
            else None}


# ---- driver ------------------------------------------------------------------------------------
def run_stage(args: list[str]) -> dict:
    # stderr passes through: long stages print their progress there
    out = subprocess.run([sys.executable, __file__, "--stage", *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"error": f"stage {args[0]} failed (exit {out.returncode}); its stderr is above"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(chroma: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = chroma["rows"]
    xs = [r["vectors"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("raw_query_ms_p50", "raw Chroma p50"), ("raw_query_ms_p95", "raw Chroma p95"),
                       ("mmrag_query_ms_p50", "mmrag query p50"), ("mmrag_query_ms_p95", "mmrag query p95")):
        ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("stored vectors")
    ax.set_ylabel("query latency (ms), top 50")
    ax.set_title(f"Chroma query latency vs index size (dim {rows[0]['dim']})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "eval-dev"))
    p.add_argument("--out", default=str(ROOT / "bench-out"))
    p.add_argument("--only", default="extract,embed,chroma,retrieval,keyword")
    p.add_argument("--modes", default="text,figures,renders,ocr,pymupdf4llm", help="extract modes")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--clip-model", default="ViT-B-32")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--config", help="mmrag config for the retrieval stage (clip weights)")
    p.add_argument("--docs", default="", help="comma-separated PDFs of the corpus for the retrieval stage (default all)")
    p.add_argument("--keyword-sizes", default="100000,1000000", help="chunks in the keyword index")
    p.add_argument("--old-bm25-sizes", default="100000", help="chunks for the old in-memory BM25 (needs ~10 GB at 1M)")
    p.add_argument("--keyword-queries", type=int, default=200)
    p.add_argument("--ingest-docs", default="", help="comma-separated PDFs of the corpus for the ingest stage (default all)")
    p.add_argument("--ingest-clip-model", default="", help="CLIP model for the ingest stage (default: --clip-model)")
    a = p.parse_args()
    if a.stage:
        name, *rest = a.stage
        fn = {"extract": lambda: stage_extract(Path(rest[0]), rest[1]),
              "embed": lambda: stage_embed(Path(rest[0]), rest[1], int(rest[2]), int(rest[3])),
              "chroma": lambda: stage_chroma([int(s) for s in rest[0].split(",")], int(rest[1]), int(rest[2])),
              "retrieval": lambda: stage_retrieval(Path(rest[0]), rest[1] or None, [d for d in rest[2].split(",") if d]),
              "keyword": lambda: stage_keyword(rest[0], int(rest[1]), int(rest[2])),
              "ingest": lambda: stage_ingest(Path(rest[0]), rest[1].split(","), rest[2],
                                             [d for d in rest[3].split(",") if d])}[name]
        print(json.dumps(fn()))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    only = a.only.split(",")
    report = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    if "extract" in only:
        report["extract"] = [run_stage(["extract", a.corpus, m]) for m in a.modes.split(",")]
        print(json.dumps(report["extract"], indent=1), flush=True)
    if "embed" in only:
        report["embed"] = run_stage(["embed", a.corpus, a.clip_model, str(a.images), "32"])
        print(json.dumps(report["embed"], indent=1), flush=True)
    if "chroma" in only:
        report["chroma"] = run_stage(["chroma", a.sizes, "512", "200"])
        print(json.dumps(report["chroma"], indent=1), flush=True)
        if "rows" in report["chroma"]:
            plot(report["chroma"], out / "query_latency.png")
    if "retrieval" in only:
        report["retrieval"] = run_stage(["retrieval", a.corpus, a.config or "", a.docs])
        print(json.dumps(report["retrieval"], indent=1), flush=True)
    if "keyword" in only:
        rows = [run_stage(["keyword", "tantivy", n, str(a.keyword_queries)]) for n in a.keyword_sizes.split(",") if n]
        rows += [run_stage(["keyword", "old-bm25", n, str(a.keyword_queries)]) for n in a.old_bm25_sizes.split(",") if n]
        report["keyword"] = rows
        print(json.dumps(rows, indent=1), flush=True)
    if "ingest" in only:  # the default workers beside one worker, taking turns in one run
        report["ingest"] = run_stage(["ingest", a.corpus, "auto,1", a.ingest_clip_model or a.clip_model, a.ingest_docs])
        print(json.dumps(report["ingest"], indent=1), flush=True)
    (out / "benchmarks.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'benchmarks.json'}")


if __name__ == "__main__":
    main()
