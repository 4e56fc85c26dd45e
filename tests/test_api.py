"""The HTTP API on the real server (uvicorn, the Gradio UI mounted beside it), with login on:
the OpenAI SDK and curl hold conversations through /v1/chat/completions (streamed and not) with
the local LLM test server; JSON upload/list/search/remove; highlighted page renders; auth and
path traversal. One server and one ingested library for the module."""

import base64
import io
import json
import os
import re
import subprocess

import httpx
import pymupdf
import pytest
from PIL import Image

from mmrag.wiring import build
from tests import pdfgen
from tests.conftest import free_port
from tests.llm_server import LLMServer
from tests.test_pages import PANEL, magenta, rotated_cropped_doc

USER, PASSWORD, TOKEN = "ada", "s3cret-pw", "tok-9f2c4e"
QUESTION = "Which diagram shows the parser feeding the renderer?"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_clip_files, clip, passages, llm):
    """(app, base url, tmp folder): login on (user, password) and an API token."""
    import copy

    from mmrag.config import DEFAULTS
    from ui.server import launch

    tmp = tmp_path_factory.mktemp("api")
    cfg = copy.deepcopy(DEFAULTS)
    cfg["data_dir"] = str(tmp / "data")
    cfg["clip"].update(model=str(tiny_clip_files[0]), pretrained=str(tiny_clip_files[1]), device="cpu")
    cfg["llm"].update(model="openai/test-vlm", api_base=llm.api_base, vision=True, timeout_s=5)
    cfg["ui"].update(port=free_port(), max_upload_mb=5)
    env = {"MMRAG_USERNAME": USER, "MMRAG_PASSWORD": PASSWORD, "MMRAG_API_TOKEN": TOKEN}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    app = build(cfg, clip=clip, passages=passages)
    app.library.ingest([pdfgen.figure_doc(tmp / "manual.pdf", pages=3), rotated_cropped_doc(tmp / "turned.pdf")])
    running, url = launch(app, prevent_thread_lock=True, quiet=True)
    try:
        yield app, url.rstrip("/"), tmp
    finally:
        running.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server[1], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


def openai_client(url, key=TOKEN):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def one_line_error(resp, status):
    assert resp.status_code == status, resp.text
    msg = resp.json()["error"]["message"]
    assert msg and "\n" not in msg
    return msg


def answering(llm, since):
    return llm.answers()[since:]


def test_openai_sdk_holds_a_conversation_streamed_and_not_with_citations(server, llm):
    app, url, _ = server
    client = openai_client(url)
    assert [m.id for m in client.models.list().data] == ["mmrag"]
    llm.mode, llm.rewrite = "ok", None
    llm.reply = "The parser feeds the renderer, drawn in {fig}."
    first = client.chat.completions.create(model="mmrag", messages=[{"role": "user", "content": QUESTION}])
    text = first.choices[0].message.content
    cites = first.model_extra["citations"]
    key = LLMServer.first_key(llm.answers()[-1]["body"], figure=True)
    assert key and key in text and text.startswith("The parser feeds the renderer")
    [cite] = [c for c in cites if c["key"] == key]
    # the figure the key names, where it is: manual.pdf p.1, the vector diagram drawn at 150,200-450,380
    assert (cite["doc"], cite["page"], cite["figure"], cite["kind"]) == ("manual.pdf", 1, 1, "vector")
    assert cite["doc_sha"] == app.library.find("manual.pdf")["sha256"]
    x0, y0, x1, y1 = cite["bbox"]
    assert abs(x0 - 150) < 15 and abs(y0 - 200) < 25 and abs(x1 - 450) < 15 and abs(y1 - 380) < 15
    assert f"Sources:\n- [{key}]({cite['page_url']})" in text  # a link in the text too
    png = httpx.get(cite["page_url"], headers={"Authorization": f"Bearer {TOKEN}"}).content
    mask = magenta(png)
    z = Image.open(io.BytesIO(png)).width / pymupdf.open(app.library.pdf_path("manual.pdf"))[0].rect.width
    inside = mask[int((y0 - 8) * z):int((y1 + 8) * z), int((x0 - 8) * z):int((x1 + 8) * z)].sum()
    assert inside > 0.9 * mask.sum() > 0

    # the second turn, streamed, with an image: earlier turns are the history the rewrite reads
    llm.rewrite = "What does the parser feed in the manual.pdf diagram, and is it blue?"
    llm.reply = "It feeds the renderer {cite}."
    picture = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 200)).save(picture, "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    asked = len(llm.answers())
    stream = client.chat.completions.create(model="mmrag", stream=True, messages=[
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": text},
        {"role": "user", "content": [{"type": "text", "text": "and is it blue like this?"},
                                     {"type": "image_url", "image_url": {"url": data_url}}]}])
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    cites2 = chunks[-1].model_extra["citations"]
    assert streamed.startswith("It feeds the renderer [") and "Sources:\n- [" in streamed
    assert cites2 and all(c["key"] in streamed for c in cites2)
    assert chunks[-1].model_extra["standalone_question"] == llm.rewrite
    [req] = answering(llm, asked)
    msgs = req["body"]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"] == QUESTION
    assert msgs[2]["content"].startswith("The parser feeds the renderer") and "Sources:" not in msgs[2]["content"]
    last = "".join(p["text"] for p in msgs[3]["content"] if p["type"] == "text")
    assert "and is it blue like this?" in last and llm.rewrite in last and key in last  # earlier figure kept
    assert llm.images()[0].convert("RGB").getpixel((5, 5)) == (10, 20, 200)
    rewrite = [r for r in llm.requests if not r["body"].get("stream")][-1]
    assert QUESTION in json.dumps(rewrite["body"])
    llm.rewrite = None


def test_curl_streams_and_asks_with_document_scope(server, llm):
    app, url, _ = server
    llm.mode, llm.rewrite, llm.reply = "ok", None, "Here {cite}."

    def curl(body):
        out = subprocess.run(["curl", "-sS", "-N", "-H", f"Authorization: Bearer {TOKEN}", "-H",
                              "Content-Type: application/json", "-d", json.dumps(body), url + "/v1/chat/completions"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    raw = curl({"model": "mmrag", "stream": True, "mmrag": {"documents": ["turned.pdf"]},
                "messages": [{"role": "user", "content": "Which figure shows the blue panel of the results?"}]})
    events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    cites = chunks[-1]["citations"]
    assert cites and {c["doc"] for c in cites} == {"turned.pdf"}  # the scope reached retrieval
    prompt = "".join(t for _, t in LLMServer.texts({"messages": llm.answers()[-1]["body"]["messages"][-1:]}))
    sent = re.findall(r'<source key="\[([^"]+?) p\.', prompt)
    assert sent and set(sent) == {"turned.pdf"}  # the model was given sources of that document only
    # the second turn, not streamed
    again = json.loads(curl({"model": "mmrag", "messages": [
        {"role": "user", "content": "Which figure shows the blue panel of the results?"},
        {"role": "assistant", "content": text}, {"role": "user", "content": "what is its caption?"}]}))
    assert again["object"] == "chat.completion" and again["choices"][0]["message"]["content"].startswith("Here [")
    msgs = llm.answers()[-1]["body"]["messages"]
    assert msgs[1]["content"] == "Which figure shows the blue panel of the results?"
    assert "what is its caption?" in json.dumps(msgs[-1])


def test_login_covers_every_api_route(server):
    app, url, _ = server
    sha = app.library.find("manual.pdf")["sha256"]
    routes = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/api/documents"),
              ("POST", "/api/search"), ("DELETE", f"/api/documents/{sha}"), ("GET", f"/api/documents/{sha}/pdf"),
              ("GET", f"/api/documents/{sha}/pages/1.png"), ("POST", "/api/documents")]
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    wrong_basic = "Basic " + base64.b64encode(f"{USER}:nope".encode()).decode()
    for method, path in routes:
        for header in (None, "Bearer wrong", f"Bearer {PASSWORD}", wrong_basic):  # a token is set: it alone
            r = httpx.request(method, url + path, headers={"Authorization": header} if header else {},
                              json={"model": "mmrag", "messages": [{"role": "user", "content": "x"}]})
            one_line_error(r, 401)
            assert "Bearer" in r.headers["www-authenticate"] and "Basic" in r.headers["www-authenticate"]
    for header in (f"Bearer {TOKEN}", basic):
        assert httpx.get(url + "/v1/models", headers={"Authorization": header}).status_code == 200
        assert httpx.get(url + f"/api/documents/{sha}/pages/1.png", headers={"Authorization": header}).status_code == 200
    # a browser signed in to the web chat (Gradio's login form sets its cookie) opens page links
    with httpx.Client(base_url=url) as browser:
        assert browser.get(f"/api/documents/{sha}/pages/1.png").status_code == 401
        assert browser.post("/login", data={"username": USER, "password": "nope"}).status_code >= 400
        assert browser.get(f"/api/documents/{sha}/pages/1.png").status_code == 401
        assert browser.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        assert browser.get(f"/api/documents/{sha}/pages/1.png").status_code == 200
        # the cookie rides along on requests another site's page makes: it opens reads only
        pdf = pdfgen.figure_doc(server[2] / "forged.pdf", pages=1).read_bytes()
        assert browser.post("/api/documents", files=[("files", ("forged.pdf", pdf, "application/pdf"))]).status_code == 401
        assert browser.post("/v1/chat/completions", content=json.dumps(
            {"model": "mmrag", "messages": [{"role": "user", "content": "hi"}]}), headers={"Content-Type": "text/plain"}).status_code == 401
        assert browser.delete(f"/api/documents/{sha}").status_code == 401
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        openai_client(url, key="wrong").models.list()
    assert [d["doc"] for d in app.library.list()] == ["manual.pdf", "turned.pdf"]  # the DELETEs did nothing


def test_upload_list_search_download_remove(server, http):
    app, url, tmp = server
    pdf = pdfgen.figure_doc(tmp / "upload src.pdf", pages=4)  # 5 figures: p.2 holds two images
    files = [("files", ("extra manual.pdf", pdf.read_bytes(), "application/pdf")),
             ("files", ("notes.txt", b"not a pdf", "text/plain")),
             ("files", ("broken.pdf", b"%PDF-1.7 garbage", "application/pdf")),
             ("files", ("../../huge.pdf", b"%PDF-1.7 " + b"0" * 5_100_000, "application/pdf"))]
    r = http.post("/api/documents", files=files)
    assert r.status_code == 200, r.text
    by_name = {x["name"]: x for x in r.json()}
    assert by_name["extra manual.pdf"]["status"] == "added" and by_name["extra manual.pdf"]["figures"] == 5
    assert by_name["notes.txt"]["status"] == "failed" and "only .pdf" in by_name["notes.txt"]["message"]
    assert by_name["broken.pdf"]["status"] == "failed"
    assert by_name["huge.pdf"]["status"] == "failed" and "larger than 5 MB" in by_name["huge.pdf"]["message"]
    assert all(set(x) == set(by_name["extra manual.pdf"]) for x in by_name.values())  # one shape for all
    sha = by_name["extra manual.pdf"]["sha256"]
    listed = {d["doc"]: d for d in http.get("/api/documents").json()}
    assert set(listed) == {"manual.pdf", "turned.pdf", "extra manual.pdf"}
    assert listed["extra manual.pdf"]["sha256"] == sha and listed["extra manual.pdf"]["pdf_kept"]
    assert http.get(f"/api/documents/{sha}/pdf").content == pdf.read_bytes()
    hits = http.post("/api/search", json={"question": "Values in a ruled table", "k": 5,
                                          "documents": ["extra manual.pdf"]}).json()
    assert hits and {h["doc"] for h in hits} == {"extra manual.pdf"} and {h["doc_sha"] for h in hits} == {sha}
    assert all(isinstance(h["score"], float) and h["page_url"] for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    table = [h for h in hits if h["kind"] == "table"]
    assert table and http.get(table[0]["page_url"]).headers["content-type"] == "image/png"
    one_line_error(http.post("/api/search", json={"question": ""}), 400)
    one_line_error(http.post("/api/search", json={"question": "x", "documents": ["nope.pdf"]}), 404)
    removed = http.delete(f"/api/documents/{sha}")
    assert removed.status_code == 200 and removed.json()["removed"]["doc"] == "extra manual.pdf"
    assert [d["doc"] for d in http.get("/api/documents").json()] == ["manual.pdf", "turned.pdf"]
    assert "no ingested document" in one_line_error(http.delete(f"/api/documents/{sha}"), 404)
    one_line_error(http.get(f"/api/documents/{sha}/pdf"), 404)
    assert not (app.library.data_dir / "pdfs" / f"{sha}.pdf").exists()


def test_page_render_highlights_the_figure_over_http(server, http):
    app, url, _ = server
    [fig] = [it for it in app.library.store.visual_items() if it.doc == "turned.pdf" and it.kind != "page"]
    item = http.get(f"/api/items/{fig.id}").json()
    assert item["doc"] == "turned.pdf" and item["page"] == 1
    r = http.get(f"/api/items/{fig.id}/page.png", params={"dpi": 72})
    assert r.headers["content-type"] == "image/png"
    mask = magenta(r.content)
    assert Image.open(io.BytesIO(r.content)).size == (712, 552)  # the turned, cropped page, one pixel a point
    x0, y0, x1, y1 = (int(v) for v in PANEL)
    assert mask[y0 - 8:y1 + 8, x0 - 8:x1 + 8].sum() > 0.9 * mask.sum() > 0
    # an explicit box: drawn where asked, nothing elsewhere
    r = http.get(f"/api/documents/{item['doc_sha']}/pages/1.png", params={"box": "20,400,120,500", "dpi": 72})
    mask = magenta(r.content)
    assert mask[392:508, 12:128].sum() == mask.sum() > 0


def test_traversal_and_bad_input_get_one_line_errors_and_lose_nothing(server, http):
    app, url, _ = server
    before = http.get("/api/documents").json()
    sha = app.library.find("manual.pdf")["sha256"]
    for path in ("/api/documents/..%2F..%2F..%2Fetc%2Fpasswd/pdf", "/api/documents/%2e%2e/pdf",
                 "/api/documents/..%2Fconfig.yaml/pages/1.png", f"/api/documents/{sha}%2F..%2F..%2Fpasswd/pdf",
                 "/api/items/..%2F..%2Fetc%2Fpasswd", "/api/items/%2e%2e%2fkeyword/page.png",
                 f"/api/documents/{sha}/pages/1.png?item=../../etc/passwd"):
        r = http.get(path)
        assert r.status_code in (400, 404), (path, r.status_code)
        assert b"root:" not in r.content and not r.headers.get("content-type", "").startswith("application/pdf")
    # a name that is no document; a sha-looking name of a file placed in pdfs/ by hand is not served either
    stray = app.library.data_dir / "pdfs" / ("e" * 64 + ".pdf")
    stray.write_bytes(b"%PDF-1.4 secret")
    try:
        one_line_error(http.get(f"/api/documents/{'e' * 64}/pdf"), 404)
    finally:
        stray.unlink()
    kept = app.library.pdf_path(sha)  # as in a library ingested before PDFs were kept
    kept.rename(kept.with_name("away"))
    try:
        assert "re-ingest it to enable page views" in one_line_error(http.get(f"/api/documents/{sha}/pages/1.png"), 404)
        one_line_error(http.get(f"/api/documents/{sha}/pdf"), 404)
    finally:
        kept.with_name("away").rename(kept)
    one_line_error(http.get(f"/api/documents/{sha}/pages/9.png"), 400)
    one_line_error(http.get(f"/api/documents/{sha}/pages/one.png"), 400)
    one_line_error(http.get(f"/api/documents/{sha}/pages/1.png", params={"box": "1,2,3"}), 400)
    one_line_error(http.get(f"/api/documents/{sha}/pages/1.png", params={"dpi": "lots"}), 400)
    one_line_error(http.get(f"/api/documents/{sha}/pages/1.png", params={"dpi": "nan"}), 400)
    # a file part without a file name is refused, not stored under a stock name another such upload would replace
    r = http.post("/api/documents", files=[("files", ("", b"%PDF-1.7 x", "application/pdf"))])
    one_line_error(r, 400)
    chat = "/v1/chat/completions"
    assert "JSON" in one_line_error(http.post(chat, content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    one_line_error(http.post(chat, json={"model": "mmrag"}), 400)
    one_line_error(http.post(chat, json={"model": "mmrag", "messages": [{"role": "assistant", "content": "x"}]}), 400)
    one_line_error(http.post(chat, json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404)
    one_line_error(http.post(chat, json={"messages": [{"role": "user", "content": "x"}], "mmrag": {"documents": ["nope.pdf"]}}), 404)
    for url_ in ("http://169.254.169.254/latest/meta-data", "file:///etc/passwd", "data:image/png;base64,"):
        one_line_error(http.post(chat, json={"messages": [{"role": "user", "content": [
            {"type": "text", "text": "like this?"}, {"type": "image_url", "image_url": {"url": url_}}]}]}), 400)
    bad_image = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    msg = one_line_error(http.post(chat, json={"stream": True, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "like this?"}, {"type": "image_url", "image_url": {"url": bad_image}}]}]}), 400)
    assert "not a readable image" in msg
    one_line_error(http.post("/api/documents", content=b"x", headers={"Content-Type": "text/plain"}), 400)
    assert http.get("/api/documents").json() == before
    assert pymupdf.open(stream=http.get(f"/api/documents/{sha}/pdf").content, filetype="pdf").page_count == 3


def test_an_api_token_alone_also_closes_the_web_ui(tiny_clip_files, clip, passages, tmp_path, monkeypatch):
    """With only ``MMRAG_API_TOKEN`` set (no user and password) the API wants the token, and so
    does the web UI: its login takes any user name with the token as password."""
    import copy

    from mmrag.config import DEFAULTS
    from ui.server import launch

    cfg = copy.deepcopy(DEFAULTS)
    cfg["data_dir"] = str(tmp_path / "data")
    cfg["clip"].update(model=str(tiny_clip_files[0]), pretrained=str(tiny_clip_files[1]), device="cpu")
    cfg["ui"].update(port=free_port())
    for k in ("MMRAG_USERNAME", "MMRAG_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MMRAG_API_TOKEN", TOKEN)
    running, url = launch(build(cfg, clip=clip, passages=passages), prevent_thread_lock=True, quiet=True)
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=60) as browser:
            assert browser.get("/api/documents").status_code == 401
            assert browser.get("/config").status_code == 401
            assert browser.post("/login", data={"username": "anyone", "password": "wrong"}).status_code >= 400
            assert browser.get("/config").status_code == 401
            assert browser.post("/login", data={"username": "anyone", "password": TOKEN}).status_code == 200
            assert browser.get("/config").status_code == 200
    finally:
        running.close()


def test_streamed_answer_of_a_model_whose_template_opens_thinking(server, llm):
    """DeepSeek-R1 behind the API: the stream carries the answer once, and none of the thinking."""
    app, url, _ = server
    from assistant.llm import LiteLLM

    app.assistant.llm = LiteLLM(app.cfg["llm"])  # a process's first look at this model (a style is kept)
    llm.mode, llm.rewrite = "ok", None
    llm.pieces = ["Okay, the user asks about the blue panel.", "\n</think>\n\n", "Here {cite}."]
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"model": "mmrag", "stream": True, "messages": [
                              {"role": "user", "content": "Which figure shows the blue panel?"}]}, timeout=120) as r:
            events = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    finally:
        llm.pieces = None
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text.startswith("Here [") and text.count("Here [") == 1 and "Okay" not in text
