"""The HTTP API beside the chat UI (same server, ``ui.server``):

- ``POST /v1/chat/completions`` (OpenAI's chat API, streamed as ``chat.completion.chunk`` server-sent
  events ending ``data: [DONE]``, or not): the conversation is ``messages``; earlier turns are the
  history the follow-up rewrite reads, image parts (``data:`` URLs) of the last user message are
  the attached image. The answer's citation keys are in the text, followed by a "Sources:" list
  linking each to its highlighted page, and come back as data in a top-level ``citations`` list
  (streamed: in the last chunk). ``mmrag: {"documents": [...], "kinds": [...]}`` limits retrieval.
- ``GET /v1/models``: the one model, ``mmrag``.
- JSON: ``POST /api/search``, ``GET/POST /api/documents`` (list, upload PDFs as multipart
  ``files``), ``DELETE /api/documents/{doc}``, ``GET /api/documents/{doc}/pdf`` (the original),
  ``GET /api/documents/{doc}/pages/{n}.png?item=ID&box=x0,y0,x1,y1&dpi=150`` (a page with boxes
  highlighted), ``GET /api/items/{id}`` and ``/api/items/{id}/page.png``.

``{doc}`` is a document's sha256 (or file name); nothing from a request is ever used as a path:
documents and items are looked up in the index, and files are opened by sha256 only. Errors are
``{"error": {"message": one line, "type", "code"}}`` with a 4xx status (OpenAI's error shape, which
its SDKs show). With login on (``ui.username_env``/``password_env``) or an API token
(``ui.api_token_env``) every route needs ``Authorization: Bearer TOKEN`` (the token, or the login
password when no token is set), HTTP Basic with the login, or the UI's session cookie.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from mmrag.errors import USER_ERRORS, NotFound
from mmrag.library import IngestResult

log = logging.getLogger(__name__)
MODEL_ID = "mmrag"
SOURCES_HEAD = "\n\nSources:\n"  # starts the list of linked sources after an answer's text
CHALLENGE = 'Bearer realm="mmrag", Basic realm="mmrag", charset="UTF-8"'
DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,(.*)", re.S)


class ApiError(Exception):
    """An error answered as one JSON line with this status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error shape, the message on one line.

    >>> error_body(400, "bad\\n  thing")
    {'error': {'message': 'bad thing', 'type': 'invalid_request_error', 'code': 400}}
    """
    return {"error": {"message": " ".join(str(message).split())[:500], "type": kind, "code": status}}


def install_errors(server: FastAPI) -> None:
    """Answer ApiError, FastAPI's validation errors and library user errors as one-line JSON."""

    @server.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.status, exc.message, exc.kind), exc.status, headers=exc.headers)

    @server.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        e = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
        return JSONResponse(error_body(400, f"{where}: {e.get('msg', 'invalid value')}"), 400)


# ---- auth ---------------------------------------------------------------------------------------
@dataclass
class ApiAuth:
    """Who may call the API: the UI's login (user, password) and/or a bearer token. ``session``
    (set by the server once the UI is mounted) tells whether a request carries the UI's login
    cookie, so a browser signed in to the UI can open page links."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    session: Callable[[Request], bool] | None = None

    def allows(self, request: Request) -> bool:
        scheme, _, cred = request.headers.get("authorization", "").partition(" ")
        cred = cred.strip()
        if scheme.lower() == "bearer" and cred:
            want = self.token or self.password
            return bool(want) and hmac.compare_digest(cred.encode(), want.encode())
        if scheme.lower() == "basic" and cred and self.user:
            try:
                user, _, pw = base64.b64decode(cred, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return hmac.compare_digest(user.encode(), self.user.encode()) & \
                hmac.compare_digest(pw.encode(), (self.password or "").encode())
        # the UI's session cookie opens only reads (page links in a signed-in browser): a cookie
        # rides along on cross-site requests, so it must never authorise an ingest, a remove or a
        # model call another site's page could send
        return request.method in ("GET", "HEAD") and bool(self.session and self.session(request))


def api_auth(cfg: dict) -> ApiAuth | None:
    """The API's access rule from the environment: None (open) when neither the login
    (``ui.username_env`` and ``ui.password_env`` both set) nor a token (``ui.api_token_env``) is."""
    from .app import auth_from_env

    login = auth_from_env(cfg)
    token = os.environ.get(cfg["ui"].get("api_token_env") or "") or None
    if not login and not token:
        return None
    return ApiAuth(*(login or (None, None)), token=token)


# ---- helpers --------------------------------------------------------------------------------------
def _user_error(exc: Exception) -> ApiError:
    return ApiError(404 if isinstance(exc, NotFound) else 400, str(exc),
                    "not_found_error" if isinstance(exc, NotFound) else "invalid_request_error")


def parse_box(value: str) -> list[float]:
    """A ``box`` query value, ``x0,y0,x1,y1`` in PDF points.

    >>> parse_box("10,20.5,30,40")
    [10.0, 20.5, 30.0, 40.0]
    >>> parse_box("1,2")
    Traceback (most recent call last):
    ...
    ui.api.ApiError: box must be four numbers x0,y0,x1,y1 (PDF points), not '1,2'
    """
    try:
        box = [float(v) for v in value.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not all(abs(v) < 1e7 for v in box):
        raise ApiError(400, f"box must be four numbers x0,y0,x1,y1 (PDF points), not {value[:60]!r}")
    return box


def split_sources(text: str) -> str:
    """An assistant message without the "Sources:" list this API appended to it (a client sends
    earlier answers back as history; the links are not conversation).

    >>> split_sources("It is red [a.pdf p.1].\\n\\nSources:\\n- [[a.pdf p.1]](http://x/a.png)")
    'It is red [a.pdf p.1].'
    """
    return text.split(SOURCES_HEAD, 1)[0]


@dataclass
class Turns:
    question: str
    history: list[dict]
    image: bytes | None


def parse_messages(messages) -> Turns:
    """OpenAI ``messages`` as the assistant takes them: the last message (a user's) is the
    question, its image part (a ``data:`` URL) the attached image; the messages before are the
    history (system messages are dropped by the assistant).

    >>> t = parse_messages([{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A."},
    ...                     {"role": "user", "content": [{"type": "text", "text": "and b?"}]}])
    >>> t.question, t.history[1], t.image
    ('and b?', {'role': 'assistant', 'content': 'A.'}, None)
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise ApiError(400, f"messages[{i}]: role must be system, user or assistant")
    last = messages[-1]
    if last["role"] != "user":
        raise ApiError(400, "the last message must be the user's question")
    content = last.get("content")
    texts, image = [], None
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text") or ""))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                image = image or _data_url(str(url or ""))
            else:
                raise ApiError(400, f"unsupported content part {kind!r} in the last message (text and image_url only)")
    else:
        raise ApiError(400, "the last message's content must be a string or a list of parts")
    question = " ".join(t.strip() for t in texts if t.strip())
    if not question and image is None:
        raise ApiError(400, "the last message has no text and no image")
    history = []
    for m in messages[:-1]:
        if m["role"] not in ("user", "assistant"):
            continue
        c = m.get("content")
        history.append({"role": m["role"], "content": split_sources(c) if isinstance(c, str) and m["role"] == "assistant"
                        else c if c is not None else ""})
    return Turns(question, history, image)


def _data_url(url: str) -> bytes:
    m = DATA_URL.fullmatch(url.strip())
    if not m:
        raise ApiError(400, "images must be data: URLs (data:image/png;base64,...); the server fetches nothing")
    try:
        data = base64.b64decode(m.group(1), validate=False)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image's data: URL is not valid base64") from None
    if not data:
        raise ApiError(400, "the attached image is empty (0 bytes)")
    return data


# ---- the routes ----------------------------------------------------------------------------------
def api_router(app, auth: ApiAuth | None) -> APIRouter:
    """The API routes for ``app`` (mmrag.wiring.App); ``auth`` None leaves them open."""
    cfg = app.cfg
    library = app.library
    max_bytes = float(cfg["ui"]["max_upload_mb"]) * 1e6

    def check(request: Request) -> None:
        if auth is not None and not auth.allows(request):
            raise ApiError(401, "login required: send Authorization: Bearer <token> or HTTP Basic credentials",
                           "authentication_error", {"WWW-Authenticate": CHALLENGE})

    router = APIRouter(dependencies=[Depends(check)])

    def sha_of(doc: str) -> dict:
        try:
            return library.find(doc)
        except USER_ERRORS as exc:
            raise _user_error(exc) from None

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def page_url(request: Request, sha: str, page: int, items: list[str]) -> str:
        query = urlencode([("item", i) for i in items])
        return f"{base(request)}/api/documents/{sha}/pages/{int(page)}.png" + (f"?{query}" if query else "")

    def doc_json(request: Request, d: dict) -> dict:
        kept = library.pdfs.has(d["sha256"])
        return {**d, "pdf_url": f"{base(request)}/api/documents/{d['sha256']}/pdf" if kept else None,
                "pdf_kept": kept}

    def scope(body: dict) -> dict:
        ext = body.get("mmrag") or {}
        if not isinstance(ext, dict):
            raise ApiError(400, "mmrag must be an object, e.g. {\"documents\": [\"a.pdf\"]}")
        filters = {}
        docs = ext.get("documents")
        if docs is not None:
            if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
                raise ApiError(400, "mmrag.documents must be a list of document names or sha256s")
            filters["docs"] = [sha_of(d)["doc"] for d in docs]
            if not filters["docs"]:
                raise ApiError(400, "mmrag.documents is empty: name at least one document, or leave it out")
        kinds = ext.get("kinds")
        if kinds is not None:
            if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
                raise ApiError(400, "mmrag.kinds must be a list (raster, vector, table, page, text)")
            filters["kinds"] = kinds
        return filters

    def citations(request: Request, answer) -> list[dict]:
        names = {d["doc"]: d["sha256"] for d in library.list()}
        out = []
        for c in answer.citations:
            hits = [h for h in answer.hits if h.key == c.key]
            if c.figure:
                hits = [h for h in hits if h.id == c.figure] or hits[:1]
            else:
                hits = [h for h in hits if not h.is_figure]
            sha = names.get(c.doc)
            items = [h.id for h in hits if h.bbox]
            out.append({"key": c.key, "doc": c.doc, "doc_sha": sha, "page": c.page,
                        "kind": hits[0].kind if hits else None,
                        "figure": hits[0].figure if c.figure and hits else None,
                        "item": c.figure or (hits[0].id if hits else None),
                        "bbox": hits[0].bbox if hits else None, "boxes": [h.bbox for h in hits if h.bbox],
                        "score": round(c.score, 6), "description": c.description,
                        "page_url": page_url(request, sha, c.page, items) if sha else None,
                        "pdf_url": f"{base(request)}/api/documents/{sha}/pdf" if sha else None})
        return out

    def compose(answer, cites: list[dict]) -> str:
        text = answer.text
        notes = [n for n in (answer.error and f"Note: {answer.error}", answer.note) if n]
        if notes:
            text += "\n\n" + "\n".join(f"_{n}_" for n in notes)
        linked = [f"- [{c['key']}]({c['page_url']})" if c["page_url"] else f"- {c['key']}" for c in cites]
        return text + (SOURCES_HEAD + "\n".join(linked) if linked else "")

    def chunk(cid: str, created: int, delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    @router.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "mmrag"}]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model", MODEL_ID)
        if model != MODEL_ID:
            raise ApiError(404, f"unknown model {str(model)[:80]!r}; this server offers {MODEL_ID!r}",
                           "model_not_found")
        turns = parse_messages(body.get("messages"))
        filters = await run_in_threadpool(scope, body)
        if turns.image is not None and len(turns.image) > max_bytes:
            raise ApiError(413, f"the attached image is larger than ui.max_upload_mb ({max_bytes / 1e6:g} MB)")
        tmp = None
        if turns.image is not None:
            fd, tmp = tempfile.mkstemp(prefix="mmrag-api-", suffix=".img")
            with os.fdopen(fd, "wb") as f:
                f.write(turns.image)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = app.assistant.stream(turns.question, history=turns.history, image=tmp, **filters)

        def first():
            try:
                return next(events)  # history and image checked, retrieval done
            except ValueError as exc:  # a malformed history, an unreadable image, an unknown kind
                raise ApiError(400, str(exc)) from None
            except USER_ERRORS as exc:
                raise _user_error(exc) from None

        try:
            await run_in_threadpool(first)
        except BaseException:
            if tmp:
                os.unlink(tmp)
            raise
        if not body.get("stream"):
            def rest():
                try:
                    for kind, value in events:
                        if kind == "answer":
                            return value
                finally:
                    if tmp:
                        os.unlink(tmp)

            answer = await run_in_threadpool(rest)
            cites = citations(request, answer)
            return {"id": cid, "object": "chat.completion", "created": created, "model": MODEL_ID,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": compose(answer, cites)},
                                 "finish_reason": "stop"}],
                    "citations": cites, "standalone_question": answer.standalone}

        def sse() -> Iterator[str]:
            sent = []
            try:
                yield chunk(cid, created, {"role": "assistant", "content": ""})
                for kind, value in events:
                    if kind == "token" and value:
                        sent.append(value)
                        yield chunk(cid, created, {"content": value})
                    elif kind == "answer":
                        cites = citations(request, value)
                        full, streamed = compose(value, cites), "".join(sent)
                        # only what was not streamed: the notes and sources after the answer (never the answer
                        # again, even when the final text differs from the streamed one)
                        tail = full[len(streamed):] if full.startswith(streamed) else \
                            full[len(value.text):] if sent else full
                        if tail:
                            yield chunk(cid, created, {"content": tail})
                        yield chunk(cid, created, {}, "stop", citations=cites, standalone_question=value.standalone)
                yield "data: [DONE]\n\n"
            finally:
                events.close()
                if tmp:
                    os.unlink(tmp)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @router.post("/api/search")
    def search(request: Request, body: dict):
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ApiError(400, "question must be a non-empty string")
        k = body.get("k", cfg["retrieval"]["k"])
        if not isinstance(k, int) or not 1 <= k <= 100:
            raise ApiError(400, "k must be a whole number from 1 to 100")
        filters = scope({"mmrag": {key: body[key] for key in ("documents", "kinds") if key in body}})
        try:
            hits = app.retriever.retrieve(question, k=k, **filters)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        names = {d["doc"]: d["sha256"] for d in library.list()}
        out = []
        for h in hits:
            row = {"id": h.id, "key": h.key, **h.to_json(), "doc_sha": names.get(h.doc), "caption": h.caption,
                   "figure": h.figure, "label": h.label}
            row.pop("image", None)  # a server path: the page render is what a client can open
            sha = names.get(h.doc)
            row["page_url"] = page_url(request, sha, h.page, [h.id] if h.bbox else []) if sha else None
            out.append(row)
        return out

    @router.get("/api/documents")
    def list_documents(request: Request):
        return [doc_json(request, d) for d in library.list()]

    @router.post("/api/documents")
    async def upload(request: Request):
        if int(request.headers.get("content-length") or 0) > 100 * max_bytes:  # before anything is spooled
            raise ApiError(413, f"upload too large: at most 100 files of ui.max_upload_mb ({max_bytes / 1e6:g} MB) each")
        try:
            form = await request.form(max_files=100, max_fields=10, max_part_size=int(max_bytes) + 1)
        except Exception as exc:  # not multipart, a part over the limit
            raise ApiError(400, f"upload PDFs as multipart/form-data field 'files' ({exc})") from None
        files = [f for f in form.getlist("files") if hasattr(f, "filename")]
        if not files:
            raise ApiError(400, "no files: upload PDFs as multipart/form-data field 'files'")
        folder = Path(tempfile.mkdtemp(prefix="mmrag-upload-"))
        try:
            paths, names, refused = [], [], []
            for i, f in enumerate(files):
                name = Path(f.filename or "").name
                if not name:  # a part without a file name: refused rather than named alike (same name replaces)
                    refused.append(IngestResult(f"part {i + 1}", "failed",
                                                f"part {i + 1}: refused, an uploaded file needs a file name"))
                    continue
                if not name.lower().endswith(".pdf"):
                    refused.append(IngestResult(name, "failed", f"{name}: refused, only .pdf files are accepted"))
                    continue
                path = folder / f"{i}.pdf"  # the upload's name is shown, never used as a path
                with open(path, "wb") as out:
                    await run_in_threadpool(shutil.copyfileobj, f.file, out)
                if path.stat().st_size > max_bytes:
                    refused.append(IngestResult(name, "failed", f"{name}: refused, larger than {max_bytes / 1e6:g} MB"))
                    continue
                paths.append(path)
                names.append(name)
            try:
                results = await run_in_threadpool(library.ingest, paths, None, names) if paths else []
            except USER_ERRORS as exc:
                raise _user_error(exc) from None
            return [r.__dict__ for r in refused + results]  # the shape of `mmrag ingest --json`
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @router.delete("/api/documents/{doc}")
    def remove(doc: str):
        try:
            return {"removed": library.remove(doc)}
        except USER_ERRORS as exc:
            raise _user_error(exc) from None

    @router.get("/api/documents/{doc}/pdf")
    def original(doc: str):
        try:
            path = library.pdf_path(doc)
            name = library.find(doc)["doc"]
        except USER_ERRORS as exc:
            raise _user_error(exc) from None
        return FileResponse(path, media_type="application/pdf", filename=name,
                            content_disposition_type="inline")

    def render(doc: str, page: int, boxes: list, items: list[str], dpi: float) -> Response:
        try:
            png = library.page_png(doc, page, boxes=boxes, items=items, dpi=dpi)
        except USER_ERRORS as exc:
            raise _user_error(exc) from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/api/documents/{doc}/pages/{page}.png")
    def page_png(request: Request, doc: str, page: int, dpi: float = 150.0):
        q = request.query_params
        if len(q.getlist("box")) + len(q.getlist("item")) > 50:
            raise ApiError(400, "at most 50 boxes and items per page")
        boxes = [parse_box(b) for b in q.getlist("box")]
        return render(doc, page, boxes, q.getlist("item"), dpi)

    @router.get("/api/items/{item}")
    def item(request: Request, item: str):
        try:
            where = library.locate(item)
        except USER_ERRORS as exc:
            raise _user_error(exc) from None
        return {**where, "page_url": page_url(request, where["doc_sha"], where["page"], [item] if where["bbox"] else [])}

    @router.get("/api/items/{item}/page.png")
    def item_page(item: str, dpi: float = 150.0):
        try:
            where = library.locate(item)
        except USER_ERRORS as exc:
            raise _user_error(exc) from None
        return render(where["doc_sha"], where["page"], [], [item] if where["bbox"] else [], dpi)

    return router
