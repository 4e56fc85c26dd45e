"""The ONNX runtime gives the fp32 torch vectors (the accuracy guard), its exports are cached by
the weights' hash and rebuilt when broken, and a question is encoded once however often it is
searched. The eval-dev top-10 comparison is in tests/test_eval.py (it shares that ingest)."""

import io
import json
import re
import uuid

import numpy as np
import pymupdf
import pytest
from PIL import Image

from tests import pdfgen
from tests.conftest import EVAL, eval_pdf

MIN_COSINE = 0.99


@pytest.fixture(scope="module")
def real_inputs():
    """Real questions (the eval-dev queries), captions and passages from the pages they point at,
    and the labelled figures rendered from those PDFs at the ingest's figure resolution."""
    queries = [json.loads(line) for line in (EVAL / "queries.jsonl").read_text().splitlines() if line.strip()]
    questions = [q["query"] for q in queries]
    captions, passages, figures = [], [], []
    for q in queries:
        if not q.get("bbox"):
            continue
        with pymupdf.open(eval_pdf(q["doc"])) as doc:
            page = doc[q["pages"][0] - 1]
            png = page.get_pixmap(dpi=144, clip=pymupdf.Rect(q["bbox"])).tobytes("png")
            figures.append(Image.open(io.BytesIO(png)).convert("RGB"))
            for block in page.get_text("blocks"):
                text = " ".join(block[4].split())
                if re.match(r"(Figure|Fig\.|Table)\s*\d", text):
                    captions.append(text)
                elif len(text) > 200:
                    passages.append(text)
    assert len(figures) >= 20 and len(captions) >= 10 and len(passages) >= 20, (len(figures), len(captions),
                                                                                   len(passages))
    # a long passage (past MiniLM's 256 tokens, truncated the same way) and two very short texts
    passages += [" ".join(passages[:6]), "x", "PID"]
    return questions, captions, passages, figures


def worst_cosine(fast: np.ndarray, reference: np.ndarray) -> float:
    """The smallest row-wise dot product: the vectors are unit length as the store gets them."""
    assert fast.shape == reference.shape and fast.dtype == np.float32
    assert np.allclose(np.linalg.norm(fast, axis=1), 1, atol=1e-4)
    return float((fast * reference).sum(1).min())


def test_onnx_clip_gives_the_fp32_torch_vectors(real_inputs, clip, tiny_clip_files):
    from index.embedders import ClipEmbedder

    questions, captions, _, figures = real_inputs
    reference = ClipEmbedder(str(tiny_clip_files[0]), str(tiny_clip_files[1]), "cpu", 32, runtime="torch")
    texts = questions + captions
    assert worst_cosine(clip.embed_texts(texts), reference.embed_texts(texts)) >= MIN_COSINE
    assert worst_cosine(clip.embed_images(figures), reference.embed_images(figures)) >= MIN_COSINE
    assert clip.backend == "onnx" and reference.backend == "torch"
    # one text at a time (the trimmed sequence is then as short as the text), as a question is
    one = np.stack([clip.embed_query(t) for t in questions])
    assert worst_cosine(one, reference.embed_texts(questions)) >= MIN_COSINE


def test_onnx_passages_give_the_sentence_transformers_vectors(real_inputs, passages):
    from index.embedders import SentenceEmbedder

    questions, captions, texts, _ = real_inputs
    reference = SentenceEmbedder("all-MiniLM-L6-v2", "cpu", runtime="torch")
    texts = questions + captions + texts
    assert worst_cosine(passages.embed(texts), reference.embed(texts)) >= MIN_COSINE
    assert passages.backend == "onnx" and reference.backend == "torch"


def test_export_is_keyed_by_the_weights_and_a_broken_cache_is_rebuilt(tmp_path, tiny_clip_files):
    from index.embedders import ClipEmbedder
    from mmrag.devtools import write_tiny_clip

    cache = tmp_path / "models"
    cfg, ckpt = tiny_clip_files
    probe = ["a bar chart of the planets", "the block diagram of an amplifier"]
    first = ClipEmbedder(str(cfg), str(ckpt), "cpu", runtime="onnx", cache_dir=cache)
    vecs = first.embed_texts(probe)
    folders = [p for p in cache.iterdir()]
    assert len(folders) == 1 and first.onnx_folder == folders[0]
    stamp = (folders[0] / "meta.json").stat().st_mtime_ns

    again = ClipEmbedder(str(cfg), str(ckpt), "cpu", runtime="onnx", cache_dir=cache)
    assert np.allclose(again.embed_texts(probe), vecs, atol=1e-6)
    assert (folders[0] / "meta.json").stat().st_mtime_ns == stamp  # reused, not exported again

    other_cfg, other_ckpt = write_tiny_clip(tmp_path / "other", seed=1)  # a changed checkpoint
    other = ClipEmbedder(str(other_cfg), str(other_ckpt), "cpu", runtime="onnx", cache_dir=cache)
    other_vecs = other.embed_texts(probe)
    assert len([p for p in cache.iterdir()]) == 2 and other.onnx_folder != first.onnx_folder
    assert (other_vecs * vecs).sum(1).max() < 0.9  # its own weights, not the cached ones

    served = folders[0] / first.onnx_meta["text"]["file"]
    served.write_bytes(served.read_bytes()[:1000])  # a truncated file: e.g. a full disk
    rebuilt = ClipEmbedder(str(cfg), str(ckpt), "cpu", runtime="onnx", cache_dir=cache)
    assert np.allclose(rebuilt.embed_texts(probe), vecs, atol=1e-6)
    assert rebuilt.backend == "onnx" and served.stat().st_size > 1000
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_a_question_is_encoded_once_however_often_it_is_searched(app, clip, passages, tmp_path, monkeypatch):
    """Count the encoder calls through the real path: ask (retrieval, fusion), ask again,
    search one signal at a time (what eval's ablation does), then a follow-up."""
    app.library.ingest([pdfgen.figure_doc(tmp_path / "a.pdf", pages=2)])
    calls = {"clip": [], "text": []}

    def counting(name, fn):
        def wrapped(texts):
            calls[name].append(list(texts))
            return fn(texts)
        return wrapped

    monkeypatch.setattr(clip, "_text_vectors", counting("clip", clip._text_vectors))
    monkeypatch.setattr(passages, "_vectors", counting("text", passages._vectors))
    question = f"which figure shows the parser and renderer {uuid.uuid4().hex[:6]}"
    first = app.assistant.ask(question)
    assert calls == {"clip": [[question]], "text": [[question]]}
    second = app.assistant.ask(question)
    for signals in (("clip",), ("text",), ("keyword",), ("clip", "text", "keyword")):
        app.retriever.retrieve(question, signals=signals)
    assert calls == {"clip": [[question]], "text": [[question]]}
    assert [h.id for h in second.hits] == [h.id for h in first.hits] and first.hits

    follow = app.assistant.ask("and the second one?", history=[{"role": "user", "content": question},
                                                                 {"role": "assistant", "content": "See [a.pdf p.1]."}])
    assert len(calls["clip"]) == len(calls["text"]) == 2  # the rewritten question, once per encoder
    assert calls["clip"][1] == calls["text"][1] == [follow.standalone] and follow.standalone != question
