"""mmrag benchmarks: one command, every figure beside its anchor measured in the same run.

    python benchmarks/run.py --corpus ../shared/eval-dev --out bench-out

Stages (each in its own process, so peak RSS is the stage's own):
  extract   pages/s: text only; + figures; + page renders; + OCR — beside pymupdf4llm.to_markdown(write_images=True)
  embed     CLIP image embedding img/s: the ingest pipeline (PNG bytes -> vectors) vs a bare batched open_clip
            forward vs one image at a time; text-query encode latency p50/p95
  chroma    Chroma query latency p50/p95 at 10k/100k/1M stored vectors, index size on disk
  retrieval retrieval latency p50/p95 (no LLM) and question -> first streamed token against a local server

CLIP throughput does not depend on the weights, so ViT-B-32 is built with random weights here
(no download); retrieval numbers use whatever clip model the config names.
"""

from __future__ import annotations

import argparse
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
            metas = [{"doc_sha": shas[(start + i) % 10], "kind": "vector", "doc": "d", "page": 1} for i in range(n)]
            store.visual.add(ids=[f"f{start + i}" for i in range(n)], embeddings=vecs, metadatas=metas)
            if (start + n) % 100_000 == 0:
                print(f"chroma: {start + n:,}/{size:,} vectors stored, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        insert_s = time.perf_counter() - t0
        where = {"$and": [{"doc_sha": {"$in": shas}}, {"kind": {"$in": ["vector", "raster", "page"]}}]}
        allowed = set(shas)

        def keep(m):
            return m["doc_sha"] in allowed and m["kind"] in ("vector", "raster", "page")
        lat_ours, lat_raw = [], []
        q = rng.standard_normal((queries, dim), dtype=np.float32)
        for v in q:  # raw Chroma: the anchor
            t0 = time.perf_counter()
            store.visual.query(query_embeddings=[v.tolist()], n_results=50)
            lat_raw.append((time.perf_counter() - t0) * 1000)
        for v in q:  # as mmrag queries: filtered to complete documents and kinds, metadata included
            t0 = time.perf_counter()
            store.query_visual(v, 50, where, keep)
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
    pages = sum(d["pages"] for d in app.library.list())
    return {"docs": [p.name for p in pdfs], "pages": pages, "ingest_s": round(ingest_s, 1),
            "ingest_pages_per_s": round(pages / ingest_s, 2), "clip": app.library.clip.identity,
            "retrieval_ms_p50": pct(lat, 0.5), "retrieval_ms_p95": pct(lat, 0.95),
            "first_token_ms_p50": pct(first, 0.5), "first_token_ms_p95": pct(first, 0.95),
            "answer_ms_p50": pct(total, 0.5), "peak_rss_mb": peak_rss_mb()}


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
    p.add_argument("--only", default="extract,embed,chroma,retrieval")
    p.add_argument("--modes", default="text,figures,renders,ocr,pymupdf4llm", help="extract modes")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--clip-model", default="ViT-B-32")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--config", help="mmrag config for the retrieval stage (clip weights)")
    p.add_argument("--docs", default="", help="comma-separated PDFs of the corpus for the retrieval stage (default all)")
    a = p.parse_args()
    if a.stage:
        name, *rest = a.stage
        fn = {"extract": lambda: stage_extract(Path(rest[0]), rest[1]),
              "embed": lambda: stage_embed(Path(rest[0]), rest[1], int(rest[2]), int(rest[3])),
              "chroma": lambda: stage_chroma([int(s) for s in rest[0].split(",")], int(rest[1]), int(rest[2])),
              "retrieval": lambda: stage_retrieval(Path(rest[0]), rest[1] or None, [d for d in rest[2].split(",") if d])}[name]
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
    (out / "benchmarks.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'benchmarks.json'}")


if __name__ == "__main__":
    main()
