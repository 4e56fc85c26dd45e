"""`mmrag eval`: ingest a labelled corpus (pdfs/ + queries.jsonl), run every query, score
retrieval at page and figure level overall, per slice and per signal, and score figure extraction."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from index.records import FIGURE_KINDS, Filter

from . import metrics as M

ABLATION = {"clip": ("clip",), "text": ("text",), "keyword": ("keyword",), "text+keyword": ("text", "keyword"),
            "fused": ("clip", "text", "keyword")}
RUN_DEPTH = 20


def load_queries(path: Path) -> list[dict]:
    queries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for q in queries:
        missing = {"id", "query", "doc", "pages"} - set(q)
        if missing:
            raise ValueError(f"{path}: query {q.get('id', '?')} lacks {sorted(missing)}")
        q.setdefault("bbox", None)
        q.setdefault("kind", "figure" if q["bbox"] else "text")
    return queries


def _results(hits) -> list[dict]:
    return [{"doc": h.doc, "page": h.page, "bbox": h.bbox, "kind": h.kind} for h in hits]


def run_eval(cfg: dict, corpus: Path, queries_path: Path | None = None, run_out: Path | None = None,
             quiet: bool = False, reuse: bool = False, app=None) -> dict:
    from .wiring import build

    queries = load_queries(queries_path or corpus / "queries.jsonl")
    pdfs = sorted((corpus / "pdfs").glob("*.pdf"))
    if not pdfs:
        raise ValueError(f"{corpus}/pdfs holds no PDF")
    tmp = None
    if not reuse and app is None:
        tmp = tempfile.TemporaryDirectory(prefix="mmrag-eval-")
        cfg = dict(cfg, data_dir=tmp.name, chroma=dict(cfg["chroma"], mode="local", path=None))
    # descriptions are scored apart: retrieval without them first, then with them (below)
    cfg = dict(cfg, describe=dict(cfg["describe"], mode="off"))
    try:
        app = app or build(cfg)
        t0 = time.perf_counter()
        progress = None
        if not quiet and sys.stderr.isatty():
            from .progress import BarProgress

            progress = BarProgress(True)
        results = app.library.ingest(pdfs, progress=progress)
        if progress:
            progress.close()
        ingest_s = time.perf_counter() - t0
        app.library.store.read_scans_now()  # a corpus above chroma.ef_search: every question searches the same way
        failed = [r.message for r in results if r.status == "failed"]
        report = {"corpus": str(corpus), "queries": len(queries), "ingest_s": round(ingest_s, 1),
                  "failed": failed, "clip_model": app.library.clip.identity}
        describing = getattr(app, "describing", None)
        if describing is not None and describing.enabled:
            without = score_retrieval(app, queries, None)
            report["without_descriptions"] = {k: without[k] for k in ("page", "figure", "by_kind", "ablation")}
            t0 = time.perf_counter()
            stats = describing.describe(describing.undescribed())
            report["descriptions"] = dict(stats.to_json(), model=describing.describer.model,
                                          seconds=round(time.perf_counter() - t0, 1))
        report.update(score_retrieval(app, queries, run_out))
        report["extraction"] = score_extraction(app, queries)
        return report
    finally:
        if tmp:
            tmp.cleanup()


def score_retrieval(app, queries: list[dict], run_out: Path | None) -> dict:
    lib = app.library
    from PIL import Image

    scale = 72.0 / float(app.cfg["ingest"]["page_dpi"])
    pages, page_area = {}, {}  # (doc, page) -> scanned; (doc, page) -> area in points²
    for item in lib.store.visual_items(Filter(kinds=frozenset({"page"}))):
        pages[(item.doc, item.page)] = item.scanned
        if item.image:
            with Image.open(lib.images.path(item.image)) as im:  # reads the header only
                page_area[(item.doc, item.page)] = im.width * scale * im.height * scale
    per_signal: dict[str, dict[str, list]] = {}
    rows = []
    latencies = []
    run_lines = []
    for q in queries:
        fig_kind = _figure_kind(app, q)
        for name, signals in ABLATION.items():
            t0 = time.perf_counter()
            hits = app.retriever.retrieve(q["query"], k=50, signals=signals)
            if name == "fused":
                latencies.append((time.perf_counter() - t0) * 1000)
            res = _results(hits)
            pg = M.score(M.page_flags(res, q), len(set(q["pages"])))
            fg = M.score(M.figure_flags(res, q, page_area), 1) if q["bbox"] else None
            per_signal.setdefault(name, {"page": [], "figure": []})
            per_signal[name]["page"].append(pg)
            if fg:
                per_signal[name]["figure"].append(fg)
            if name == "fused":
                rows.append({"q": q, "page": pg, "figure": fg, "fig_kind": fig_kind,
                             "scanned": pages.get((q["doc"], q["pages"][0]), False)})
                run_lines.append({"id": q["id"], "results": [{"doc": r["doc"], "page": r["page"], "bbox": r["bbox"]}
                                                             for r in res[:RUN_DEPTH]]})
    if run_out:
        run_out.write_text("".join(json.dumps(line) + "\n" for line in run_lines))
    by_kind = {}
    slices = {
        "figure": lambda r: r["q"]["kind"] == "figure", "text": lambda r: r["q"]["kind"] == "text",
        "born-digital": lambda r: not r["scanned"], "scanned": lambda r: r["scanned"],
        "vector": lambda r: r["fig_kind"] == "vector", "raster": lambda r: r["fig_kind"] == "raster",
    }
    for name, pick in slices.items():
        chosen = [r for r in rows if pick(r)]
        by_kind[name] = {"page": M.mean([r["page"] for r in chosen]),
                         "figure": M.mean([r["figure"] for r in chosen if r["figure"]])}
    latencies.sort()
    return {
        "page": M.mean([r["page"] for r in rows]),
        "figure": M.mean([r["figure"] for r in rows if r["figure"]]),
        "by_kind": by_kind,
        "ablation": {name: {"page": M.mean(v["page"]), "figure": M.mean(v["figure"])} for name, v in per_signal.items()},
        "retrieval_ms": {"p50": round(latencies[len(latencies) // 2], 1),
                         "p95": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1)},
    }


def _figure_kind(app, q: dict) -> str | None:
    """The kind (vector/raster) of the extracted figure matching a labelled box, if any."""
    if not q["bbox"]:
        return None
    for f in _figures_on(app, q["doc"], q["pages"][0]):
        if M.box_hit(f["bbox"], q["bbox"]):
            return f["kind"]
    return None


def _figures_on(app, doc: str, page: int) -> list[dict]:
    """The figures extracted on page ``page`` of the document named ``doc``."""
    store = app.library.store
    shas = [d.sha256 for d in store.list_docs() if d.doc == doc]
    items = store.visual_items(Filter.of(shas, FIGURE_KINDS, page=page))
    return [{"kind": it.kind, "bbox": list(it.bbox)} for it in items]


def score_extraction(app, queries: list[dict]) -> dict:
    """Recall of labelled figure boxes, and precision of extracted (non-table) figures on the
    labelled pages. Only queried figures are labelled, so precision counts unlabelled real
    figures on those pages as misses: read it as a lower bound."""
    labelled = [q for q in queries if q["bbox"]]
    found = sum(any(M.box_hit(f["bbox"], q["bbox"]) for f in _figures_on(app, q["doc"], q["pages"][0])
                    if f["kind"] != "table") for q in labelled)
    pages = {(q["doc"], q["pages"][0]) for q in labelled}
    extracted = [(d, p, f) for d, p in pages for f in _figures_on(app, d, p) if f["kind"] != "table"]
    correct = sum(any(M.box_hit(f["bbox"], q["bbox"]) for q in labelled if (q["doc"], q["pages"][0]) == (d, p))
                  for d, p, f in extracted)
    return {"labelled": len(labelled), "recall": round(found / len(labelled), 4) if labelled else 0.0,
            "precision_on_labelled_pages": round(correct / len(extracted), 4) if extracted else 0.0,
            "extracted_on_labelled_pages": len(extracted)}


def format_report(r: dict) -> str:
    def row(name, m):
        return (f"  {name:<14} R@1 {m['recall@1']:.3f}  R@5 {m['recall@5']:.3f}  MRR@10 {m['mrr@10']:.3f}  "
                f"nDCG@5 {m['ndcg@5']:.3f}  (n={m['n']})")

    out = [f"corpus {r['corpus']}: {r['queries']} queries, ingest {r['ingest_s']} s, CLIP {r['clip_model']}"]
    for f in r["failed"]:
        out.append(f"  ingest failed: {f}")
    for level in ("page", "figure"):
        out.append(f"{level} level")
        out.append(row("all", r[level]))
        for name, m in r["by_kind"].items():
            if m[level]["n"]:
                out.append(row(name, m[level]))
    if "without_descriptions" in r:
        d = r["descriptions"]
        out.append(f"figure descriptions by {d['model']}: {d['described']} new, {d['reused']} stored, {d['failed']} "
                   f"failed in {d['seconds']} s; tokens {d['prompt_tokens']} in, {d['completion_tokens']} out")
        for level in ("page", "figure"):
            out.append(row(f"{level} without", r["without_descriptions"][level]))
            out.append(row(f"{level} with", r[level]))
    out.append("ablation (signals fused)")
    for name, m in r["ablation"].items():
        out.append(row(f"page {name}", m["page"]))
        out.append(row(f"figure {name}", m["figure"]))
    e = r["extraction"]
    out.append(f"figure extraction: recall {e['recall']:.3f} of {e['labelled']} labelled boxes; precision on "
               f"labelled pages {e['precision_on_labelled_pages']:.3f} ({e['extracted_on_labelled_pages']} extracted)")
    out.append(f"retrieval latency p50 {r['retrieval_ms']['p50']} ms, p95 {r['retrieval_ms']['p95']} ms")
    return "\n".join(out)


__all__ = ["run_eval", "format_report", "load_queries"]
