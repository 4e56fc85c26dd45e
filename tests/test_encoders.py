"""The ONNX runtime gives the fp32 torch vectors (the accuracy guard: cosine on real inputs, and
the same top-10 items for the eval-dev questions over the eval-dev index), its exports are cached
by the weights' hash and rebuilt when broken, and a question is encoded once however often it is
searched."""

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
# The probe check's bar for the tiny CLIP's int8 copies. Its weights are random: quantising them costs
# more than quantising trained ones (text tower ~0.93 against fp32 with torch 2.14 / open_clip 3.3, where
# trained ViT-B-32 towers kept >= 0.999), so tests of what int8 serves lower the bar to let it serve.
RANDOM_INT8_MIN = 0.9


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


TIE = 2e-6  # reference scores this close to the 10th are fp32 ties (e.g. two identical page renders)


def top10_changes(questions_fast: np.ndarray, items_fast: np.ndarray, questions_ref: np.ndarray,
                  items_ref: np.ndarray, ids: list[str]) -> tuple[list[str], int]:
    """Brute-force top 10 per question both ways: (one line per question whose top-10 items
    differ, beyond exact ties at rank 10; how many questions keep the items but in another order).

    >>> q = np.array([[1.0, 0.0]]); items = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> top10_changes(q, items, q, items, ["a", "b", "c"])
    ([], 0)
    """
    k = min(10, len(ids))
    fast, ref = questions_fast @ items_fast.T, questions_ref @ items_ref.T
    changed, reordered = [], 0
    for i in range(len(ref)):
        a, b = np.argsort(-ref[i], kind="stable")[:k], np.argsort(-fast[i], kind="stable")[:k]
        kth = ref[i][a[-1]]
        moved = [j for j in set(a) ^ set(b) if abs(ref[i][j] - kth) > TIE]
        if moved:
            changed.append(f"question {i}: reference {[ids[j] for j in a]} served {[ids[j] for j in b]}")
        elif list(a) != list(b):
            reordered += 1
    return changed, reordered


@pytest.mark.slow
def test_default_runtime_keeps_the_fp32_top10_for_every_eval_dev_question(eval_dev):
    """Over the whole eval-dev index (the session's `mmrag eval` ingest), per signal, the default
    runtime's vectors (figures and pages embedded again here, passages as stored) and fp32 torch's
    give the same top-10 items for all 48 questions: CLIP question vs figure/page vectors,
    passage-model question vs passage vectors. The tiny CLIP's random weights make its scores near-ties (the
    10th and 11th differ by ~4e-4), so any loss of precision shows here: int8 image vectors moved
    items for 25 of the 48 questions."""
    from index.embedders import ClipEmbedder, SentenceEmbedder, load_image
    from mmrag.config import DEFAULTS, load_config
    from mmrag.wiring import build

    assert eval_dev.process.returncode == 0, eval_dev.process.stderr[-2000:]
    cfg = load_config(eval_dev.config)
    app = build(cfg)
    clip, passages = app.library.clip, app.library.passages
    assert (clip.runtime, passages.runtime) == (DEFAULTS["clip"]["runtime"], DEFAULTS["text_embedder"]["runtime"])
    reference_clip = ClipEmbedder(cfg["clip"]["model"], cfg["clip"]["pretrained"], "cpu", runtime="torch")
    reference_passages = SentenceEmbedder(cfg["text_embedder"]["model"], "cpu", runtime="torch")
    questions = [json.loads(line)["query"] for line in (EVAL / "queries.jsonl").read_text().splitlines() if line.strip()]
    assert len(questions) == 48

    visual = app.library.store.visual_items()
    assert len(visual) > 500 and {v.kind for v in visual} >= {"page", "raster", "vector"}
    served_visual, reference_visual = [], []
    for i in range(0, len(visual), 32):
        images = [load_image(app.library.images.path(v.image)) for v in visual[i:i + 32]]
        served_visual.append(clip.embed_images(images))
        reference_visual.append(reference_clip.embed_images(images))
    served_visual, reference_visual = np.concatenate(served_visual), np.concatenate(reference_visual)
    assert worst_cosine(served_visual, reference_visual) >= MIN_COSINE
    served = np.stack([clip.embed_query(q) for q in questions])
    reference = reference_clip.embed_texts(questions)
    assert worst_cosine(served, reference) >= MIN_COSINE
    changed, _ = top10_changes(served, served_visual, reference, reference_visual, [v.id for v in visual])
    assert clip.backend == "onnx" and not changed, \
        f"CLIP ({clip.backend}): {len(changed)} of 48 questions get other top-10 figures/pages than fp32 torch:\n" + \
        "\n".join(changed[:3])

    # the passages as ingest stored them (the default runtime's vectors: embedding them again here
    # would double the test's time), against fp32 sentence-transformers
    got = app.library.store.text.get(include=["documents", "embeddings"])
    ids, texts, served_text = got["ids"], got["documents"], np.asarray(got["embeddings"], np.float32)
    assert len(ids) > 1000
    reference_text = reference_passages.embed(texts)
    assert worst_cosine(served_text, reference_text) >= MIN_COSINE
    served = np.stack([passages.embed_query(q) for q in questions])
    reference = reference_passages.embed(questions)
    assert worst_cosine(served, reference) >= MIN_COSINE
    changed, _ = top10_changes(served, served_text, reference, reference_text, ids)
    assert passages.backend == "onnx" and not changed, \
        f"passages ({passages.backend}): {len(changed)} of 48 questions get other top-10 passages than fp32 " \
        f"torch:\n" + "\n".join(changed[:3])


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


def test_int8_precision_serves_the_int8_graphs_and_fp32_comes_back_exactly(real_inputs, tmp_path, tiny_clip_files,
                                                                         monkeypatch):
    """``clip.precision: int8`` serves each tower's int8 copy where it passes the probe check (its bar
    lowered to :data:`RANDOM_INT8_MIN` for random weights), built once beside the fp32 export without
    exporting again; switching back to fp32 gives the fp32 vectors exactly, and switching to int8
    again quantises nothing again."""
    from index.embedders import ClipEmbedder

    monkeypatch.setattr("index.onnxrt.MIN_COSINE", RANDOM_INT8_MIN)

    questions, captions, _, figures = real_inputs
    texts, images = questions[:12] + captions[:4], figures[:12]
    cache = tmp_path / "models"
    cfg, ckpt = str(tiny_clip_files[0]), str(tiny_clip_files[1])

    def vectors(precision: str):
        e = ClipEmbedder(cfg, ckpt, "cpu", runtime="onnx", cache_dir=cache, precision=precision)
        return e, np.concatenate([e.embed_texts(texts), np.stack([e.embed_query(q) for q in questions[:4]])]), \
            e.embed_images(images)

    fp32, fp32_text, fp32_images = vectors("fp32")
    assert fp32.served == {"text": "fp32", "image": "fp32"} and fp32.int8_meta is None
    export_stamp = (fp32.onnx_folder / "meta.json").stat().st_mtime_ns

    int8, int8_text, int8_images = vectors("int8")
    assert int8.backend == "onnx" and int8.served == {"text": "int8", "image": "int8"}
    assert int8.onnx_folder == fp32.onnx_folder and int8.int8_folder != fp32.onnx_folder
    assert (fp32.onnx_folder / "meta.json").stat().st_mtime_ns == export_stamp  # the fp32 export is shared
    on_disk = json.loads((int8.int8_folder / "meta.json").read_text())
    assert {t: on_disk[t]["file"] for t in ("text", "image")} == {"text": "text.int8.onnx", "image": "image.int8.onnx"}
    assert min(on_disk[t]["int8_min_cosine"] for t in ("text", "image")) >= RANDOM_INT8_MIN
    # the int8 graphs really serve: their vectors move far beyond fp32 rounding (~1e-6), yet stay close
    for served, reference in ((int8_text, fp32_text), (int8_images, fp32_images)):
        assert np.abs(served - reference).max() > 1e-3
        assert worst_cosine(served, reference) >= RANDOM_INT8_MIN
    int8_stamp = (int8.int8_folder / "meta.json").stat().st_mtime_ns

    back, back_text, back_images = vectors("fp32")
    assert back.served == {"text": "fp32", "image": "fp32"}
    assert np.allclose(back_text, fp32_text, atol=1e-6) and np.allclose(back_images, fp32_images, atol=1e-6)
    again, again_text, again_images = vectors("int8")
    assert again.served == {"text": "int8", "image": "int8"}
    assert np.allclose(again_text, int8_text, atol=1e-6) and np.allclose(again_images, int8_images, atol=1e-6)
    assert (int8.int8_folder / "meta.json").stat().st_mtime_ns == int8_stamp  # quantised once
    assert (fp32.onnx_folder / "meta.json").stat().st_mtime_ns == export_stamp
    assert sorted(p.name for p in cache.iterdir()) == sorted([fp32.onnx_folder.name, int8.int8_folder.name])

    broken = int8.int8_folder / "image.int8.onnx"  # a truncated int8 file: quantised again, not exported again
    broken.write_bytes(broken.read_bytes()[:1000])
    fixed, fixed_text, fixed_images = vectors("int8")
    assert fixed.served == {"text": "int8", "image": "int8"} and broken.stat().st_size > 1000
    assert np.allclose(fixed_images, int8_images, atol=1e-6) and np.allclose(fixed_text, int8_text, atol=1e-6)
    assert (fp32.onnx_folder / "meta.json").stat().st_mtime_ns == export_stamp
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_an_int8_build_that_fails_leaves_the_fp32_onnx_export_serving(real_inputs, tmp_path, tiny_clip_files,
                                                                       monkeypatch, caplog):
    """int8 asked for, but its folder cannot be made (a full disk, a read-only shared cache: here
    the write of the int8 folder fails): the fp32 ONNX graphs serve, with a warning, and the fp32
    export is neither rebuilt nor replaced by the slower torch runtime."""
    import logging

    from index import onnxrt
    from index.embedders import ClipEmbedder

    questions, _, _, figures = real_inputs
    cache = tmp_path / "models"
    cfg, ckpt = str(tiny_clip_files[0]), str(tiny_clip_files[1])
    fp32 = ClipEmbedder(cfg, ckpt, "cpu", runtime="onnx", cache_dir=cache)
    want = fp32.embed_images(figures[:4])
    stamp = (fp32.onnx_folder / "meta.json").stat().st_mtime_ns
    build = onnxrt.cached_build

    def no_room_for_int8(root, key, *args, **kwargs):
        if key.endswith("-int8"):
            raise OSError(28, "No space left on device")
        return build(root, key, *args, **kwargs)

    monkeypatch.setattr(onnxrt, "cached_build", no_room_for_int8)
    with caplog.at_level(logging.WARNING, logger="index.embedders"):
        int8 = ClipEmbedder(cfg, ckpt, "cpu", runtime="onnx", cache_dir=cache, precision="int8")
        got = int8.embed_images(figures[:4])
    assert int8.backend == "onnx" and int8.served == {"text": "fp32", "image": "fp32"}
    assert np.allclose(got, want, atol=1e-6)
    assert (fp32.onnx_folder / "meta.json").stat().st_mtime_ns == stamp  # not exported again
    assert any("No space left on device" in r.getMessage() and "serve fp32" in r.getMessage() for r in caplog.records)


def test_int8_passage_model_falls_back_to_fp32_through_the_probe_check(real_inputs, passages, caplog):
    """MiniLM's int8 copy is too far from fp32 on the probe texts (cosine ~0.977 < 0.99): with
    ``text_embedder.precision: int8`` the fp32 graph serves, the int8 folder records why, and every
    load warns (the decision is cached: nothing is quantised again)."""
    import logging

    from index.embedders import SentenceEmbedder
    from index.onnxrt import MIN_COSINE as PROBE_MIN

    questions, captions, texts, _ = real_inputs
    texts = questions[:8] + texts[:8]
    for attempt in range(2):  # the first builds the int8 folder, the second reads its decision
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="index.embedders"):
            int8 = SentenceEmbedder("all-MiniLM-L6-v2", "cpu", precision="int8")
            got = int8.embed(texts)
        assert int8.backend == "onnx" and int8.served == "fp32"
        meta = json.loads((int8.int8_folder / "meta.json").read_text())
        assert meta["serves"] == "fp32" and meta["file"] is None and meta["int8_min_cosine"] < PROBE_MIN
        assert not list(int8.int8_folder.glob("*.onnx"))
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("text_embedder.precision int8" in w and f"{meta['int8_min_cosine']:.4f} < 0.99" in w
                   for w in warned), warned
        if attempt == 0:
            stamp = (int8.int8_folder / "meta.json").stat().st_mtime_ns
    assert (int8.int8_folder / "meta.json").stat().st_mtime_ns == stamp
    assert np.allclose(got, passages.embed(texts), atol=1e-6)  # the fp32 vectors, exactly


def test_the_precision_setting_reaches_the_served_graphs(make_cfg):
    """``clip.precision`` / ``text_embedder.precision`` in the config choose what the app's encoders
    serve: with int8 asked for, each tower and the passage model serve what their probe check decided
    (recorded in their int8 folder; which way it goes is the probe test's business, not this one's);
    the default is fp32 with no int8 copy made."""
    from mmrag.wiring import build

    app = build(make_cfg(clip={"precision": "int8"}, text_embedder={"precision": "int8"}))
    clip, passages = app.library.clip, app.library.passages
    clip.embed_query("a bar chart of the planets"), passages.embed_query("a bar chart of the planets")
    assert clip.int8_meta is not None and passages.int8_meta is not None  # int8 was asked for and checked
    assert clip.served == {t: clip.int8_meta[t]["serves"] for t in ("text", "image")}
    assert passages.served == passages.int8_meta["serves"] == "fp32"  # MiniLM: refused by the probe check

    default = build(make_cfg())
    default.library.clip.embed_query("a bar chart of the planets")
    assert default.library.clip.served == {"text": "fp32", "image": "fp32"}
    assert default.library.clip.int8_meta is None
