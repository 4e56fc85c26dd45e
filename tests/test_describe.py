"""Figure descriptions over real HTTP: litellm asks a local server (tests/llm_server.py) that
answers each description prompt with a made-up word no PDF contains, so a figure found by that
word was found by its description; the server records what each prompt carried."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from index.descriptions import DescriptionStore
from mmrag.config import load_config
from mmrag.describing import BREAKER
from mmrag.wiring import build
from tests import pdfgen
from tests.conftest import ROOT
from tests.llm_server import LLMServer

CONTEXT = "Figures explain what words cannot"  # pdfgen's body text around every figure


@pytest.fixture
def server():
    with LLMServer() as s:
        yield s


def distinct_figures(path, n: int = 5):
    """One page with ``n`` pictures of different colours, well apart: ``n`` distinct figure images."""
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page()
    for i in range(n):
        x, y = 72 + (i % 2) * 250, 72 + (i // 2) * 200
        page.insert_image(pymupdf.Rect(x, y, x + 180, y + 130), stream=pdfgen.png_bytes(color=(40 * i, 200 - 30 * i, 90)))
        page.insert_text((x, y + 150), f"Figure {i + 1}: picture number {i + 1}.", fontsize=9)
    doc.save(path)
    return path


def llm(server, **extra):
    return dict({"model": "openai/test-vlm", "api_base": server.api_base, "vision": True, "timeout_s": 5}, **extra)


def word_of(record: dict) -> str:
    return record["reply"].split()[-2]


@pytest.mark.parametrize("thinking", ["<think>\nA figure with two boxes. Blue?\n</think>\n\n",
                                      "A figure with two boxes. Blue?\n</think>\n\n"])
def test_a_reasoning_model_describes_without_its_thinking(server, tmp_path, thinking):
    """Qwen3 or DeepSeek-R1 as the describing model, without a reasoning parser on the server:
    the stored description is the text after the thinking (whose words would otherwise become
    searchable text of the figure)."""
    from assistant.describe import Describer

    (tmp_path / "f.png").write_bytes(pdfgen.png_bytes(color=(20, 90, 200)))
    server.describe_thinking = thinking
    cfg = {"model": None, "api_base": None, "api_key_env": None, "image_max_side": 256, "max_tokens": 400,
           "timeout_s": 5}
    got = Describer(cfg, llm(server)).describe(tmp_path / "f.png", "Figure 1: boxes.", "", "m.pdf")
    assert got.text == server.describes[-1]["reply"] and "Blue?" not in got.text


def test_a_model_without_system_role_describes(server, tmp_path):
    """Gemma on vLLM refuses the system role: the describing prompt is sent again with its
    instructions opening the user turn, and the figure is described."""
    from assistant.describe import SYSTEM, Describer

    (tmp_path / "f.png").write_bytes(pdfgen.png_bytes(color=(20, 90, 200)))
    server.template = "gemma"
    cfg = {"model": None, "api_base": None, "api_key_env": None, "image_max_side": 256, "max_tokens": 400,
           "timeout_s": 5}
    describer = Describer(cfg, llm(server))
    got = describer.describe(tmp_path / "f.png", "Figure 1: boxes.", "", "m.pdf")
    assert server.describe_refusals == ["System role not supported"]
    assert got.text == server.describes[-1]["reply"]
    [msg] = server.describes[-1]["body"]["messages"]
    assert msg["role"] == "user" and msg["content"][0]["text"].startswith(SYSTEM)
    assert msg["content"][-1]["type"] == "image_url"
    describer.describe(tmp_path / "f.png", "Figure 1: boxes.", "", "m.pdf")  # remembered: no second refusal
    assert server.describe_refusals == ["System role not supported"] and len(server.describes) == 2


def test_ollama_descriptions_send_the_num_ctx_answers_send(server, tmp_path):
    """Ollama cuts a prompt at its own default context and reloads the model at each change of
    num_ctx (ollama#9977): descriptions and answers of one model ask for the same context."""
    from assistant.describe import Describer
    from assistant.llm import LiteLLM

    (tmp_path / "f.png").write_bytes(pdfgen.png_bytes(color=(20, 90, 200)))
    server.show_parameters = "num_ctx 16384"
    chat = dict(llm(server), model="ollama_chat/qwen-test", api_base=server.ollama_base)
    cfg = {"model": None, "api_base": None, "api_key_env": None, "image_max_side": 256, "max_tokens": 400,
           "timeout_s": 5}
    got = Describer(cfg, chat).describe(tmp_path / "f.png", "Figure 1: boxes.", "", "m.pdf")
    assert got.text == server.describes[-1]["reply"]
    assert server.describes[-1]["body"]["options"]["num_ctx"] == 16384
    list(LiteLLM(chat).stream([{"role": "user", "content": "What does the parser feed?"}]))
    assert server.answers()[-1]["body"]["options"]["num_ctx"] == 16384


def test_ingest_describes_each_image_once_and_finds_figures_by_their_description(make_cfg, clip, passages, server,
                                                                                  tmp_path):
    cfg = make_cfg(llm=llm(server), describe={"mode": "ingest", "image_max_side": 200})
    app = build(cfg, clip=clip, passages=passages)
    pdf = pdfgen.figure_doc(tmp_path / "manual.pdf", pages=3)
    [res] = app.library.ingest([pdf])
    assert res.status == "added" and res.figures == 4
    # 4 figures, 3 distinct images (p.2 places one image twice): 3 requests
    assert len(server.describes) == 3 and all(r["reply"] for r in server.describes)
    figures = {h.id: h for h in app.retriever.retrieve("figure", k=50, kinds=["raster", "vector", "table"])}
    assert len(figures) == 4
    for record in server.describes:
        prompt = LLMServer.prompt_text(record["body"])
        [image] = server.images(body=record["body"])
        assert 0 < max(image.size) <= 200  # the figure image went with it, scaled
        assert "Document: manual.pdf" in prompt and CONTEXT in prompt
        hit = app.retriever.retrieve(word_of(record), k=1)[0]  # the word is only in the description
        assert hit.is_figure and hit.caption and hit.caption in prompt  # ... of the figure it was asked about
        assert hit.description == record["reply"]
        assert hit.to_json()["description"] == record["reply"]
    # the image placed twice: both figures carry its one description
    twins = [h for h in figures.values() if h.page == 2]
    raster = next(r for r in server.describes if "Fig. 2." in LLMServer.prompt_text(r["body"]))
    assert len(twins) == 2 and {h.id for h in app.retriever.retrieve(word_of(raster), k=2)} == {t.id for t in twins}

    # stored once: a copy, a document sharing a figure, reindex and a restart ask nothing again
    (tmp_path / "copy.pdf").write_bytes(pdf.read_bytes())
    other = pdfgen.figure_doc(tmp_path / "other.pdf", pages=1)  # its one figure is manual.pdf's p.1 figure
    copy_res, other_res = app.library.ingest([tmp_path / "copy.pdf", other])
    assert copy_res.status == "unchanged" and other_res.status == "added"
    assert len(server.describes) == 3
    p1 = next(r for r in server.describes if "Figure 1" in LLMServer.prompt_text(r["body"]))
    assert {h.doc for h in app.retriever.retrieve(word_of(p1), k=2)} == {"manual.pdf", "other.pdf"}
    app.library.reindex()
    restarted = build(cfg, clip=clip, passages=passages)
    restarted.library.ingest([pdf, other])
    assert restarted.describing.undescribed() == []
    assert restarted.describing.describe(restarted.describing.undescribed()).described == 0
    assert len(server.describes) == 3
    assert restarted.retriever.retrieve(word_of(p1), k=1)[0].description == p1["reply"]


@pytest.mark.parametrize("mode", ["500", "stall"])
def test_a_failing_or_slow_describer_never_fails_an_ingest_or_a_question(make_cfg, clip, passages, server, tmp_path,
                                                                         mode):
    server.describe_mode = mode
    cfg = make_cfg(llm=llm(server), describe={"mode": "ingest", "timeout_s": 1, "concurrency": 1})
    app = build(cfg, clip=clip, passages=passages)
    res, many = app.library.ingest([pdfgen.figure_doc(tmp_path / "manual.pdf", pages=3),
                                    distinct_figures(tmp_path / "many.pdf")])
    assert res.status == many.status == "added" and res.figures == 4 and many.figures == 5
    assert len(server.describes) == BREAKER  # of 8 distinct images: then it stopped asking
    hit = app.retriever.retrieve("parser feeds the renderer", k=1, kinds=["vector"])[0]
    assert hit.description == ""  # simply not described yet
    app.describing.cfg["mode"] = "on_demand"
    answer = app.assistant.ask("what does the parser feed?")
    assert answer.error is None and answer.citations
    app.describing.wait()
    server.describe_mode = "ok"  # the model is back: what failed is described now
    stats = app.describing.describe(app.describing.undescribed())
    assert stats.described == 8 and app.describing.undescribed() == []


def test_on_demand_describes_the_hits_of_a_question_after_answering_it(make_cfg, clip, passages, server, tmp_path):
    cfg = make_cfg(llm=llm(server))  # describe.mode defaults to on_demand
    app = build(cfg, clip=clip, passages=passages)
    app.library.ingest([pdfgen.figure_doc(tmp_path / "manual.pdf", pages=3)])
    assert server.describes == []  # nothing paid at ingest
    during = []
    for kind, value in app.assistant.stream("the diagram where the parser feeds the renderer"):
        if kind == "token":
            during.append(len(server.describes))
        if kind == "answer":
            answer = value
    assert during and set(during) == {0}  # nothing asked while answering
    app.describing.wait()
    top = [h for h in answer.hits if h.is_figure][:3]  # describe.on_demand_figures
    asked = len(server.describes)
    assert 1 <= asked <= 3
    for record in server.describes:
        hit = app.retriever.retrieve(word_of(record), k=1)[0]
        assert hit.id in {h.id for h in top} and hit.description == record["reply"]
        assert hit.caption in LLMServer.prompt_text(record["body"])
    assert {h.id for h in app.retriever.retrieve(word_of(server.describes[0]), k=1)} <= {h.id for h in top}
    described = app.retriever.retrieve(top[0].caption, k=1, kinds=[top[0].kind])[0]
    assert described.description  # the top hit's, too
    from ui.app import figure_md

    assert described.description in figure_md(described)  # shown beside the figure in the UI
    app.assistant.llm.cfg["vision"] = False  # a text-only model answers from the descriptions
    again = app.assistant.ask("the diagram where the parser feeds the renderer")
    app.describing.wait()
    assert server.images() == [] and "no vision support" in again.note
    assert f"Description (by a vision model): {described.description}" in LLMServer.prompt_text(
        server.requests[-1]["body"])
    assert len(server.describes) == asked or all(r["reply"] for r in server.describes[asked:])


def cli(config, *args, **kw):
    return subprocess.run([sys.executable, "-m", "mmrag", "--config", str(config), *args], cwd=ROOT,
                          capture_output=True, text=True, **kw)


def test_a_killed_describe_resumes_where_it_stopped(write_config, clip, passages, server, tmp_path):
    config = write_config(llm=llm(server), describe={"mode": "off", "concurrency": 1})
    app = build(load_config(config), clip=clip, passages=passages)
    app.library.ingest([pdfgen.figure_doc(tmp_path / "manual.pdf", pages=3)])
    assert server.describes == []  # mode off: nothing at ingest
    store = DescriptionStore(app.library.data_dir / "descriptions.sqlite")
    server.describe_delay = 0.5
    proc = subprocess.Popen([sys.executable, "-m", "mmrag", "--config", str(config), "describe"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while store.count() < 1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "describe ended before it could be killed (nothing kept along the way?)"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # a request sent just before the kill is still being recorded
    kept = store.count()
    assert 1 <= kept < 3, "the kill came too late to test a resume"
    first_run = len(server.describes)
    server.describe_delay = 0
    out = cli(config, "describe", "--limit", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["described"] == 1 and len(server.describes) == first_run + 1
    out = cli(config, "describe", "manual.pdf", "--json")
    data = json.loads(out.stdout)
    assert data["undescribed"] == 0 and data["failed"] == 0
    # every distinct image was asked for once after the kill, none kept before it asked again
    assert first_run + (3 - kept) == len(server.describes) and store.count() == 3
    for record in server.describes[first_run:]:  # (a reply sent as the kill came may never have arrived)
        if record["reply"]:
            assert app.retriever.retrieve(word_of(record), k=1)[0].description == record["reply"]


def test_eval_reports_retrieval_with_and_without_descriptions(make_cfg, clip, passages, server, tmp_path):
    from mmrag.evaluate import format_report, run_eval

    (tmp_path / "corpus" / "pdfs").mkdir(parents=True)
    pdfgen.figure_doc(tmp_path / "corpus" / "pdfs" / "manual.pdf", pages=3)
    # one describing call at a time, in page order: the first description (zorb0quux) is p.1's diagram
    query = {"id": "q1", "query": f"the {LLMServer.describe_word(0)} component", "doc": "manual.pdf", "pages": [1],
             "bbox": [150, 200, 450, 380]}
    (tmp_path / "corpus" / "queries.jsonl").write_text(json.dumps(query) + "\n")
    cfg = make_cfg(llm=llm(server), describe={"concurrency": 1})
    app = build(cfg, clip=clip, passages=passages)
    r = run_eval(cfg, tmp_path / "corpus", app=app, quiet=True)
    assert r["descriptions"]["described"] == 3 and r["descriptions"]["prompt_tokens"] > 0
    assert r["figure"]["recall@1"] == 1.0  # found by its description
    without = r["without_descriptions"]["ablation"]["keyword"]["figure"]
    assert without["recall@5"] == 0.0 and r["ablation"]["keyword"]["figure"]["recall@1"] == 1.0  # in no document
    assert "figure without" in format_report(r) and "figure with " in format_report(r)
