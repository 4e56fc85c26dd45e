"""Gradio app: a streaming multimodal chat (questions, PDFs to ingest, images to search by) whose
citation keys are links to the cited page, rendered from the stored PDF with the figure's or
passage's box highlighted; conversations kept on the server (``ui.conversations``) per signed-in
user or per browser; a document scope; stop and a per-conversation question queue; a library
panel; and named API endpoints (``ingest``, ``ask``) for scripts."""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import re
import secrets
import tempfile
import threading
import uuid
from collections import deque
from pathlib import Path
from urllib.parse import quote, unquote

import gradio as gr

from assistant.records import KEY
from mmrag.library import IngestResult, Progress

from .conversations import ConversationStore

log = logging.getLogger(__name__)
IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
PAGE_DPI = 150  # a cited page's render: readable, and zoomable in the viewer's fullscreen
STOPPED = "_(stopped)_"
QUEUED = "_(queued: answered after the current question)_"
CITE = "#cite="  # citation links in answers: CITE + the url-quoted key
class GradioProgress(Progress):
    def __init__(self, progress: gr.Progress):
        self.progress = progress
        self.name, self.pages, self.index, self.total = "", 1, 0, 1

    def file(self, name, index, total, pages):
        self.name, self.index, self.total, self.pages = name, index, total, max(1, pages)
        self.progress((0, self.pages), desc=f"[{index + 1}/{total}] {name}", unit="pages")

    def page(self, done):
        self.progress((done, self.pages), desc=f"[{self.index + 1}/{self.total}] {self.name}", unit="pages")


def _check_upload(path: str, max_mb: float, kinds: tuple[str, ...]) -> str | None:
    name = Path(path).name
    if not name.lower().endswith(kinds):
        return f"{name}: refused, only {', '.join(kinds)} files are accepted here"
    if os.path.getsize(path) > max_mb * 1e6:
        return f"{name}: refused, larger than {max_mb:g} MB"
    return None


def ingest_files(app, paths: list[str], progress: Progress | None = None) -> list[IngestResult]:
    """Check type and size, then ingest. Uploads keep their display name; the stored paths are
    content-addressed, so an uploaded file name is never used as a path."""
    max_mb = float(app.cfg["ui"]["max_upload_mb"])
    refused, ok = [], []
    for p in paths:
        why = _check_upload(p, max_mb, (".pdf",))
        if why:
            refused.append(IngestResult(Path(p).name, "failed", why))
        else:
            ok.append(p)
    try:
        done = app.library.ingest(ok, progress=progress, names=[Path(p).name for p in ok]) if ok else []
    finally:
        _delete_uploads(paths)
    return refused + done


def _delete_uploads(paths: list[str]) -> None:
    """Uploaded files are temporary copies in Gradio's upload folder: once ingested (or refused)
    they go, so a document removed from the library leaves no copy behind. Files elsewhere (a
    script passing its own paths) are left alone."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()).resolve()
    for p in paths:
        path = Path(p).resolve()
        if folder in path.parents:
            path.unlink(missing_ok=True)


def _summary(results: list[IngestResult]) -> str:
    """An ingest's outcome: a heading that says whether it worked, then one line per file.

    >>> print(_summary([IngestResult("a.pdf", "added", "a.pdf: added"), IngestResult("b.txt", "failed", "b.txt: refused")]))
    Ingested 1 of 2 files:
    - a.pdf: added
    - b.txt: refused
    >>> _summary([IngestResult("b.pdf", "failed", "b.pdf: not a PDF")]).splitlines()[0]
    'Not ingested:'
    """
    if not results:
        return "Nothing to ingest."
    ok = sum(r.status != "failed" for r in results)
    head = "Ingested:" if ok == len(results) else "Not ingested:" if not ok else \
        f"Ingested {ok} of {len(results)} files:"
    return head + "\n" + "\n".join(f"- {r.message}" for r in results)


def _library_rows(app) -> list[list]:
    import datetime

    rows = []
    for d in app.library.list():
        when = datetime.datetime.fromtimestamp(d["ingested_at"]).strftime("%Y-%m-%d %H:%M") if d.get("ingested_at") else ""
        rows.append([d["doc"], d["pages"], d["figures"], d["chunks"], when])
    return rows


def figure_md(h) -> str:
    """What the UI shows beside a selected figure: key, caption, place, label and its description
    by the vision model (when it has one)."""
    md = f"**{h.key}** {h.caption}\n\n{h.doc} p.{h.page}" + (f" · {h.label}" if h.label else "")
    if h.description:
        md += f"\n\n**Description** (vision model): {h.description}"
    return md


def source_md(info: dict) -> str:
    """What the page viewer's caption says about a cited source (a stored ``source_info``).

    >>> source_md({"key": "[a.pdf p.2 fig.1]", "doc": "a.pdf", "page": 2, "kind": "vector", "caption": "Fig. 1 A parser", "label": "diagram", "boxes": [[1, 2, 3, 4]]})
    '**[a.pdf p.2 fig.1]** Fig. 1 A parser\\n\\na.pdf p.2 · diagram · highlighted on the page'
    """
    md = f"**{info['key']}** {info.get('caption') or ''}".rstrip()
    md += f"\n\n{info['doc']} p.{info['page']}" + (f" · {info['label']}" if info.get("label") else "")
    md += " · highlighted on the page" if info.get("boxes") else ""
    if info.get("kind") == "text" and info.get("text"):
        md += "\n\n> " + " ".join(info["text"].split())[:400]
    if info.get("description"):
        md += f"\n\n**Description** (vision model): {info['description']}"
    return md


def source_info(h) -> dict:
    """A hit as the conversation keeps it, so its citation can be opened later (after a reload
    or a restart): key, document, page, boxes (PDF points, top-left origin), image and texts."""
    return {"key": h.key, "doc": h.doc, "page": h.page, "kind": h.kind, "boxes": [h.bbox] if h.bbox else [],
            "image": h.image, "caption": h.caption, "label": h.label, "description": h.description,
            "text": h.text[:600] if h.kind == "text" else ""}


def remember_sources(citations: dict, hits) -> None:
    """Add an answer's hits to a conversation's citation map (key -> ``source_info``); hits that
    share a key (passages of one page) add their boxes to it."""
    for h in hits:
        info = source_info(h)
        old = citations.get(h.key)
        if old is None:
            citations[h.key] = info
        else:
            old["boxes"] = old.get("boxes", []) + [b for b in info["boxes"] if b not in old.get("boxes", [])]


def canonical_key(text: str) -> str | None:
    """The key a citation as written stands for (spacing and commas normalised), or None.

    >>> canonical_key("[a b.pdf, p. 3, fig. 2]"), canonical_key("[a.pdf p.3]"), canonical_key("[x]")
    ('[a b.pdf p.3 fig.2]', '[a.pdf p.3]', None)
    """
    m = KEY.fullmatch(text)
    if not m:
        return None
    doc, page, fig = m.groups()
    return f"[{doc.strip()} p.{page}" + (f" fig.{fig}" if fig else "") + "]"


def linkify(text: str, known) -> str:
    """Markdown where each citation key of a known source is a link the page viewer follows
    (``#cite=`` and the quoted key); other brackets are left as they are.

    >>> linkify("See [a.pdf, p.3] and [b.pdf p.1].", ["[a.pdf p.3]"])
    'See [\\\\[a.pdf p.3\\\\]](#cite=%5Ba.pdf%20p.3%5D) and [b.pdf p.1].'
    """
    lower = {k.lower(): k for k in known}

    def link(m: re.Match) -> str:
        key = lower.get((canonical_key(m.group(0)) or "").lower())
        if key is None:
            return m.group(0)
        shown = key.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace("*", "\\*").replace("_", "\\_")
        return f"[{shown}]({CITE}{quote(key, safe='')})"

    return KEY.sub(link, text or "")


def key_from_link(href: str) -> str:
    """The citation key a link carries.

    >>> key_from_link("http://x/#cite=%5Ba.pdf%20p.3%5D")
    '[a.pdf p.3]'
    """
    return unquote(href.split(CITE, 1)[-1]) if CITE in (href or "") else unquote(href or "")


def _cited_first(answer) -> list:
    """The retrieved hits with those the answer cites first, in the order it cites them."""
    order = {c.key: i for i, c in enumerate(answer.citations)}
    return sorted(answer.hits, key=lambda h: order.get(h.key, len(order)))


def _sources_md(answer, question: str = "") -> str:
    lines = []
    if answer.error:
        lines.append(f"**Note:** {answer.error}")
    if answer.note:
        lines.append(f"_{answer.note}_")
    if answer.citations:
        lines.append("**Sources:** " + ", ".join(c.key for c in answer.citations[:8]))
    if answer.standalone and question and answer.standalone.strip() != question.strip():
        lines.append(f"**Searched for:** {answer.standalone}")
    return "\n\n".join(lines)


def _path(f) -> str | None:
    """A file from the chat box or the API, whatever its shape (path, dict, FileData)."""
    if f is None or isinstance(f, str):
        return f
    if isinstance(f, dict):
        return f.get("path") or (f.get("file") or {}).get("path")
    return getattr(f, "path", None)


def check_image(path: str, max_mb: float) -> str | None:
    """Why an attached image cannot be used (one line naming the file), or None.

    >>> import tempfile, os
    >>> empty = os.path.join(tempfile.mkdtemp(), "blank.png"); open(empty, "wb").close()
    >>> check_image(empty, 5)
    'blank.png: left out, the file is empty (0 bytes)'
    """
    name = Path(path).name
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return f"{name}: left out, the file cannot be read ({exc.strerror or exc})"
    if size == 0:
        return f"{name}: left out, the file is empty (0 bytes)"
    if size > max_mb * 1e6:
        return f"{name}: left out, larger than {max_mb:g} MB"
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many kinds for broken files
        return f"{name}: left out, not a readable image ({' '.join(str(exc).split())[:120] or type(exc).__name__})"
    return None


def sort_attachments(paths: list[str], max_mb: float) -> tuple[list[str], str | None, list[str]]:
    """(PDFs to ingest, the image to ask with, one line per file left out and why). One image per
    question: the first usable one."""
    pdfs, image, notes = [], None, []
    for p in paths:
        name = Path(p).name
        low = name.lower()
        if low.endswith(".pdf"):
            pdfs.append(p)
        elif low.endswith(IMAGE_TYPES):
            why = check_image(p, max_mb)
            if why:
                notes.append(why)
            elif image is None:
                image = p
            else:
                notes.append(f"{name}: left out, one image per question ({Path(image).name} is used)")
        else:
            notes.append(f"{name}: left out, not a PDF or an image ({', '.join(IMAGE_TYPES)})")
    return pdfs, image, notes


def model_history(messages: list[dict]) -> list[dict]:
    """The turns the model sees from a stored conversation: questions (with their images) and
    answers with their sources line; notes (uploads, left-out files) and figure images are not
    conversation.

    >>> model_history([{"role": "user", "kind": "question", "text": "q"}, {"role": "assistant", "kind": "note", "text": "Ingested:"},
    ...                {"role": "assistant", "kind": "answer", "text": "a [x.pdf p.1]", "sources": "**Sources:** [x.pdf p.1]"}])
    [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a [x.pdf p.1]\\n\\n**Sources:** [x.pdf p.1]'}]
    """
    out = []
    for m in messages:
        if m.get("kind") == "question":
            out.append({"role": "user", "content": m["text"]})
        elif m.get("kind") == "image":
            out.append({"role": "user", "content": {"path": m["path"]}})
        elif m.get("kind") == "answer" and m.get("text"):
            out.append({"role": "assistant", "content": m["text"] + ("\n\n" + m["sources"] if m.get("sources") else "")})
    return out


def render_chat(conv: dict | None, pending=()) -> list[dict]:
    """A conversation as Gradio's Chatbot shows it: answers with their citation keys as links,
    stopped answers marked, queued questions last."""
    if not conv:
        return []
    known = list(conv.get("citations", {}))
    out = []
    for m in conv["messages"]:
        kind = m.get("kind")
        if kind in ("image", "figure"):
            # markdown, not a file message: Gradio's chat gives every file message a Share button
            # that only works on Hugging Face Spaces
            label = m.get("key") or m.get("name") or "image"
            if m.get("path") and Path(m["path"]).is_file():
                out.append({"role": m["role"], "content": md_image(m["path"], label)})
            else:
                out.append({"role": m["role"], "content": f"[image {label}]"})
        elif kind == "answer":
            body = linkify(m.get("text", ""), known)
            if m.get("stopped"):
                body = (body + "\n\n" if body else "") + STOPPED
            if m.get("sources"):
                body += "\n\n" + linkify(m["sources"], known)
            out.append({"role": "assistant", "content": body})
        else:
            out.append({"role": m["role"], "content": m.get("text", "")})
    for item in pending:
        if item.get("text"):
            out.append({"role": "user", "content": item["text"] + "\n\n" + QUEUED})
    return out


def md_image(path: str, alt: str) -> str:
    """Markdown showing a served file (relative to the page, so it works wherever the app is
    mounted).

    >>> md_image("/data/images/ab/c d.png", "[a.pdf p.1 fig.1]")
    '![a.pdf p.1 fig.1](gradio_api/file=/data/images/ab/c%20d.png)'
    """
    return f"![{alt.replace('[', '').replace(']', '')}](gradio_api/file={quote(path)})"


class _Run:
    """A conversation's questions waiting to be answered, whether one is being answered now, and
    the stop switch of the current answer."""

    def __init__(self):
        self.pending: deque[dict] = deque()
        self.busy = False
        self.stop = threading.Event()


# what the page injects once: a click on a citation link opens it in the page viewer
CITE_JS = """() => {
  if (window.mmragCites) return;
  window.mmragCites = true;
  document.addEventListener('click', (e) => {
    const a = e.target.closest ? e.target.closest('a[href*="#cite="]') : null;
    if (!a) return;
    e.preventDefault(); e.stopPropagation();
    window.mmragCite = a.getAttribute('href');
    const go = document.querySelector('#cite-go');
    if (go) go.click();
  }, true);
}"""


def _secret(data_dir: Path) -> str:
    """A key kept in data_dir that encrypts the browser id in the browser's storage; stable across
    restarts, so a browser finds its conversations again. Servers starting at once on one data_dir
    agree on it: each writes a candidate to its own temporary file and hard-links it to
    ``ui-secret``, which only the first link does (the file appears whole or not at all); all then
    read that one. Where the filesystem has no hard links (FAT, some network shares) the first to
    hold a lock on data_dir renames its candidate to ``ui-secret``, equally whole."""
    path = data_dir / "ui-secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".ui-secret-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another server's went in first: use that one
        except OSError:  # a filesystem without hard links (FAT, some network shares)
            # (an exclusive create let a server read the file between its creation and its write)
            folder = os.open(data_dir, os.O_RDONLY)
            try:
                fcntl.flock(folder, fcntl.LOCK_EX)
                if not path.exists():
                    os.replace(tmp, path)
            finally:
                os.close(folder)  # releases the lock
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.read_text().strip()


def build_ui(app) -> gr.Blocks:
    cfg = app.cfg
    max_mb = float(cfg["ui"]["max_upload_mb"])
    ingest_lock = threading.Lock()
    viewing = threading.BoundedSemaphore(8)  # page views at once: the queue's limit, which they skip
    answering = threading.BoundedSemaphore(8)  # answers streamed at once, all conversations together
    store = ConversationStore(Path(cfg["data_dir"]) / "conversations.sqlite3")
    live: dict[str, dict] = {}  # conversation id -> the conversation being answered (shared by its events)
    runs: dict[str, _Run] = {}  # conversation id -> its questions being answered (dropped when all are)
    runs_lock = threading.Lock()
    shown: dict[str, str] = {}  # page (Gradio session) -> the conversation it shows now (until it closes)

    def show(request, conv_id: str) -> None:
        session = getattr(request, "session_hash", None)
        if session:
            with runs_lock:
                shown[session] = conv_id

    def shown_conv(session: str | None, conv_id: str) -> str:
        """The conversation page ``session`` shows: the server's record of its last New chat /
        open / question (``shown``) over ``conv_id``, the page's own ``conv_state``, which an
        answer still streaming in another conversation can set back behind a New chat (its
        update computed before the click, applied after it); ``conv_id`` where the server has no
        record (no session)."""
        if not session:
            return conv_id
        with runs_lock:
            return shown.get(session, conv_id)

    def page_conv(request, conv_id: str) -> str:
        return shown_conv(getattr(request, "session_hash", None), conv_id)

    def conversation(owner: str, conv_id: str | None) -> dict | None:
        if not owner or not conv_id:
            return None
        with runs_lock:
            conv = live.get(conv_id)
            if conv is not None:
                return conv if conv.get("owner") == owner else None
        conv = store.load(owner, conv_id)
        if conv is not None:
            conv["owner"] = owner
        return conv

    def forget(conv_id: str, run: _Run) -> None:
        """Drop a conversation's run and live copy once it has nothing left to answer (under
        runs_lock); a run that replaced it meanwhile stays."""
        if runs.get(conv_id) is run:
            del runs[conv_id]
            live.pop(conv_id, None)

    def conv_choices(owner: str):
        return [(c["title"], c["id"]) for c in store.list(owner)] if owner else []

    def library_updates(scope=None) -> dict:
        rows = _library_rows(app)
        names = [r[0] for r in rows]
        kept = [s for s in (scope or []) if s in names]
        return {table: rows, choice: gr.update(choices=names, value=None), scope_box: gr.update(choices=names, value=kept)}

    def library_shown(scope, chosen):
        """The Library tab opened: its lists read again (another tab, the CLI or a script may have
        ingested or removed meanwhile), the user's choices kept where still valid."""
        names = [r[0] for r in _library_rows(app)]
        return library_updates(scope) | {choice: gr.update(choices=names, value=chosen if chosen in names else None)}

    def panels_reset() -> dict:
        return {gallery: [], gallery_keys: [], page_view: None, where: ""}

    # ---- conversations ---------------------------------------------------------------------------
    def owner_of(browser_id: str, request) -> str:
        """Whose conversations these are: the signed-in user when login is on, else the browser
        (a random id kept, encrypted, in its local storage); "" before the browser has one."""
        user = getattr(request, "username", None) if request is not None else None
        return f"user:{user}" if user else f"browser:{browser_id}" if browser_id else ""

    def on_load(browser_id, request: gr.Request):
        """The page's first event, normally: its latest conversation and the library lists. A
        question sent before it ran (a user faster than the page's load, a busy server) has already
        chosen the page's conversation; the load then leaves it alone and fills only the library
        lists (it once reset the page's conversation id behind the answer, so the answer's citation
        opened nothing: "not a source of this conversation")."""
        session = getattr(request, "session_hash", None)

        def claim(conv_id: str) -> bool:  # whether no other event of the page has chosen one meanwhile
            with runs_lock:
                if session and shown.get(session, "") != "":
                    return False
                if session:
                    shown[session] = conv_id
                return True

        owner = owner_of(browser_id, request)
        if not claim(""):  # a question came first: checked before reading the conversations
            return library_updates()
        if not owner:  # a browser that never sent anything: its id comes with its first question
            conv_id, out = "", {owner_state: gr.skip(), browser_state: gr.skip(), conv_state: "", chatbot: [],
                                conv_list: gr.update(choices=[], value=None)}
        else:
            convs = store.list(owner)
            current = conversation(owner, convs[0]["id"]) if convs else None
            conv_id = current["id"] if current else ""
            with runs_lock:
                run = runs.get(conv_id) if current else None
            out = {browser_state: browser_id, owner_state: owner, conv_state: conv_id,
                   conv_list: gr.update(choices=conv_choices(owner), value=conv_id or None),
                   chatbot: render_chat(current, list(run.pending) if run else ())}
        if not claim(conv_id):  # a question came while the conversations were read
            return library_updates()
        return out | panels_reset() | library_updates()

    def page_closed(request: gr.Request):
        """The page was closed or reloaded (Gradio's unload): forget which conversation it showed."""
        with runs_lock:
            shown.pop(getattr(request, "session_hash", None), None)

    def new_chat(owner, request: gr.Request):
        show(request, "")
        return {conv_state: "", chatbot: [], conv_list: gr.update(choices=conv_choices(owner), value=None)} | panels_reset()

    def open_chat(owner, conv_id, request: gr.Request):
        conv = conversation(owner, conv_id)
        if conv is None:
            return new_chat(owner, request)
        show(request, conv_id)
        with runs_lock:
            run = runs.get(conv_id)
        return {conv_state: conv_id, chatbot: render_chat(conv, list(run.pending) if run else ())} | panels_reset()

    def delete_chat(owner, conv_id, request: gr.Request):
        conv_id = page_conv(request, conv_id)
        if conv_id and store.delete(owner, conv_id):
            with runs_lock:  # one being answered stops, and is not written back
                conv, run = live.pop(conv_id, None), runs.get(conv_id)
                if conv is not None:
                    conv["deleted"] = True
                if run is not None:
                    run.pending.clear()
                    run.stop.set()
                    if not run.busy:
                        del runs[conv_id]
        return new_chat(owner, request)

    def save(owner: str, conv: dict) -> None:
        if not conv.get("deleted"):
            store.save(owner, conv)

    # ---- asking ------------------------------------------------------------------------------------
    def send(message, browser_id, conv_id, scope, request: gr.Request, progress=gr.Progress()):
        """Queue the message on its conversation; the first event of a conversation answers its
        queue until it is empty, the others only show their question queued."""
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [p for p in (_path(f) for f in message.get("files") or []) if p]
        if not text and not files:
            yield {box: gr.update(value=None)}
            return
        if not owner_of(browser_id, request):  # this browser's first question: it gets its id now
            browser_id = uuid.uuid4().hex
        owner = owner_of(browser_id, request)
        conv = conversation(owner, page_conv(request, conv_id))
        created = conv is None
        if created:
            conv = store.new()
            conv["owner"] = owner
            store.save(owner, conv)
        cid = conv["id"]
        show(request, cid)
        with runs_lock:  # one step with the worker's last check: a finishing worker never drops this run
            run = runs.setdefault(cid, _Run())
            live[cid] = conv
            run.pending.append({"text": text, "files": files, "scope": list(scope or [])})
            worker = not run.busy
            run.busy = True
        out = {box: gr.update(value=None), conv_state: cid, owner_state: owner, browser_state: browser_id,
               chatbot: render_chat(conv, list(run.pending)[1:] if worker else list(run.pending))}
        if created:
            out[conv_list] = gr.update(choices=conv_choices(owner), value=cid)
        yield out
        if not worker:
            return
        done = False
        was_here = [True]  # whether this event's last update was for the page's conversation
        try:
            while True:
                with runs_lock:
                    if not run.pending:  # answered all: nothing of the run is kept
                        run.busy, done = False, True
                        forget(cid, run)
                        break
                    item = run.pending.popleft()
                yield from answer(conv, run, owner, item, progress, getattr(request, "session_hash", None), was_here)
        finally:
            if not done:  # closed early (the page went away): the next send answers what is left
                with runs_lock:
                    run.busy = False
                    if not run.pending:
                        forget(cid, run)
            save(owner, conv)

    def shown_again(owner: str, conv_id: str) -> dict:
        """The page's update showing ``conv_id`` ("" for a new chat), as opening it would."""
        other = conversation(owner, conv_id)
        with runs_lock:
            other_run = runs.get(conv_id) if other is not None else None
            pending = list(other_run.pending) if other_run else []
        conv_id = other["id"] if other else ""
        return {conv_state: conv_id, chatbot: render_chat(other, pending),
                conv_list: gr.update(choices=conv_choices(owner), value=conv_id or None)} | panels_reset()

    def answer(conv, run, owner, item, progress, session, was_here):
        msgs = conv["messages"]
        pdfs, image, notes = sort_attachments(item["files"], max_mb)

        def view(more: dict | None = None) -> dict:
            """The update for the page: the chat and its panels only while the page still shows
            this conversation (the user may have opened another meanwhile). The first update after
            the page left shows the page's own conversation again: an update of this one computed
            just before the New chat (or open) and applied just after it had put this one back on
            the page, its id included, so the next question joined it."""
            with runs_lock:
                pending = list(run.pending)
            page_shows = shown_conv(session, conv["id"])
            here = page_shows == conv["id"]
            out = {chatbot: render_chat(conv, pending)} | (more or {})
            if here:  # the page's conversation is this one (whatever a late page load set meanwhile)
                out |= {conv_state: conv["id"], owner_state: owner}
            else:
                out = {k: v for k, v in out.items() if k not in (chatbot, gallery, gallery_keys, page_view, where)}
                if conv_list in out:  # the list gains the title, the selection stays the page's
                    out[conv_list] = gr.update(choices=conv_choices(owner))
                if was_here[0]:
                    out |= shown_again(owner, page_shows)
            was_here[0] = here
            return out or {chatbot: gr.skip()}  # never {}: Gradio takes an empty dict for one value and fails the event

        for note in notes:
            msgs.append({"role": "assistant", "kind": "note", "text": note})
        if pdfs:
            msgs.append({"role": "user", "kind": "note", "text": "Uploaded " + ", ".join(Path(p).name for p in pdfs)})
            yield view()
            with ingest_lock:
                results = ingest_files(app, pdfs, GradioProgress(progress))
            msgs.append({"role": "assistant", "kind": "note", "text": _summary(results)})
            save(owner, conv)
            yield view(library_updates(item["scope"]))
        text = item["text"]
        if not text and not image:
            save(owner, conv)
            yield view()
            return
        prior = model_history(msgs)
        if image:
            msgs.append({"role": "user", "kind": "image", "path": image, "name": Path(image).name})
        if text:
            msgs.append({"role": "user", "kind": "question", "text": text})
        names = {d["doc"] for d in app.library.list()}
        docs = [d for d in item["scope"] if d in names]
        if item["scope"] and not docs:
            msgs.append({"role": "assistant", "kind": "note",
                         "text": "The chosen documents are no longer in the library: searching all of them."})
        reply = {"role": "assistant", "kind": "answer", "text": "", "sources": ""}
        msgs.append(reply)
        run.stop = stop = threading.Event()
        events: queue.Queue = queue.Queue()

        def produce():
            stream = None
            try:
                stream = app.assistant.stream(text, history=prior, image=image, docs=docs or None)
                for event in stream:
                    events.put(event)
                    if stop.is_set():
                        break
            except ValueError as exc:  # an unreadable image, a malformed history
                events.put(("error", str(exc)))
            except Exception as exc:  # the chat keeps working; the message says what failed
                log.exception("answering failed")
                events.put(("error", f"answering failed: {exc}"))
            finally:
                if stream is not None:
                    stream.close()
                events.put(("end", None))

        final: dict = {}
        with answering:
            threading.Thread(target=produce, daemon=True, name="mmrag-answer").start()
            yield view({box: gr.update(stop_btn=True)})
            while True:
                try:
                    kind, value = events.get(timeout=0.2)
                except queue.Empty:
                    kind, value = None, None
                if stop.is_set():
                    reply["stopped"] = True
                    break
                if kind is None:
                    if was_here[0] and shown_conv(session, conv["id"]) != conv["id"]:
                        yield view()  # the page left while the model is slow to start: show the page's own
                    continue
                if kind == "end":
                    break
                if kind == "hits":
                    remember_sources(conv["citations"], value)
                    yield view(panels_reset() | {gallery: _gallery_items(value), gallery_keys: _gallery_keys(value)})
                elif kind == "token":
                    reply["text"] += value
                    yield view()
                elif kind == "error":
                    reply["text"] = value
                elif kind == "answer":
                    reply["text"] = value.text
                    reply["sources"] = _sources_md(value, text)
                    figs = [c for c in value.citations if c.image and c.figure]
                    if figs:
                        msgs.append({"role": "assistant", "kind": "figure", "path": figs[0].image, "key": figs[0].key})
                    hits = _cited_first(value)
                    remember_sources(conv["citations"], hits)
                    final = {gallery: _gallery_items(hits), gallery_keys: _gallery_keys(hits)}
        # the answer with its Sources links shows in the event's last update, after the save: a
        # citation followed as soon as its link appears must not race the answer's own updates
        save(owner, conv)
        yield view(final | {box: gr.update(stop_btn=False),
                            conv_list: gr.update(choices=conv_choices(owner), value=conv["id"])})

    def stop_answer(conv_id, request: gr.Request):
        conv_id = page_conv(request, conv_id)
        with runs_lock:
            run = runs.get(conv_id or "")
        if run is not None:
            run.stop.set()

    # ---- following a citation ----------------------------------------------------------------------
    def show_source(owner, conv_id, key):
        with viewing:
            return _show_source(owner, conv_id, key)

    def _show_source(owner, conv_id, key):
        conv = conversation(owner, conv_id)
        info = (conv or {}).get("citations", {}).get(key)
        if info is None:
            return None, f"{key}: not a source of this conversation"
        try:
            png = app.library.page_png(info["doc"], int(info["page"]), boxes=info.get("boxes") or [], dpi=PAGE_DPI)
        except Exception as exc:  # NotFound (no kept PDF), a broken file: say so, keep the chat
            log.warning("page view of %s failed: %s", key, exc)
            fallback = app.retriever.page_image(info["doc"], int(info["page"]))
            return fallback, source_md(info | {"boxes": []}) + f"\n\n_No highlighted page: {exc}_"
        import io

        from PIL import Image

        return Image.open(io.BytesIO(png)), source_md(info)

    def follow_link(owner, conv_id, href):
        return show_source(owner, conv_id, key_from_link(href))

    def select_figure(owner, conv_id, keys, evt: gr.SelectData):
        if not keys or evt.index is None or evt.index >= len(keys):
            return None, ""
        return show_source(owner, conv_id, keys[evt.index])

    # ---- library -----------------------------------------------------------------------------------
    def ingest_panel(files, scope, progress=gr.Progress()):
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        with ingest_lock:
            results = ingest_files(app, paths, GradioProgress(progress))
        return {status: _summary(results), uploads: None} | library_updates(scope)

    def ask_remove(name):
        if not name:
            return {status: "Choose a document to remove.", confirm_row: gr.update(visible=False)}
        return {confirm_md: f"Remove **{name}** and all its figures and passages from the library? "
                            "This cannot be undone.", confirm_row: gr.update(visible=True), status: ""}

    def cancel_remove():
        return gr.update(visible=False)

    def remove_doc(name, scope):
        msg = "Choose a document to remove."
        if name:
            try:
                app.library.remove(name)
                msg = f"Removed {name}."
            except Exception as exc:
                msg = str(exc)
        return {status: msg, confirm_row: gr.update(visible=False)} | library_updates(scope)

    # ---- the API for scripts -------------------------------------------------------------------------
    def api_ingest(files: list[gr.FileData]) -> list[dict]:
        """Ingest PDF files; returns one summary per file (name, status, message, pages, figures, chunks)."""
        paths = [f["path"] if isinstance(f, dict) else getattr(f, "path", f) for f in files or []]
        with ingest_lock:
            results = ingest_files(app, paths)
        return [{"doc": r.name, "status": r.status, "message": r.message, "pages": r.pages, "figures": r.figures,
                 "chunks": r.chunks} for r in results]

    def api_ask(question: str, history: list[dict] | None = None, image: gr.FileData | None = None) -> dict:
        """Answer a question; returns the same JSON as `mmrag ask --json`. `history`: earlier turns,
        [{"role": "user"|"assistant", "content": "..."}]; `image`: an image to search by, which the
        model sees with the question."""
        path = _path(image)
        if path:
            why = check_image(path, max_mb)
            if why:
                raise gr.Error(why)
        try:
            return app.assistant.ask(question or "", history=history or [], image=path).to_json()
        except ValueError as exc:  # a malformed history or an unreadable image
            raise gr.Error(str(exc)) from None

    private = {"api_visibility": "private"}
    with gr.Blocks(title="mmrag") as demo:
        gr.HTML("<style>#cite-row{display:none !important}</style>", padding=False)
        gr.Markdown("# mmrag\nAsk about the diagrams, charts and figures in your PDFs. "
                    "Attach PDFs to add them to the library, or an image to find figures like it. "
                    "Citation keys in answers open the cited page with the figure or passage highlighted.")
        browser_state = gr.BrowserState("", storage_key="mmrag-browser-id", secret=_secret(Path(cfg["data_dir"])))
        owner_state = gr.State("")
        conv_state = gr.State("")
        gallery_keys = gr.State([])
        with gr.Row(elem_id="cite-row"):
            cite_href = gr.Textbox(elem_id="cite-href", show_label=False, container=False)
            cite_go = gr.Button("open citation", elem_id="cite-go")
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=1, min_width=200):
                    new_btn = gr.Button("New chat", elem_id="new-chat")
                    conv_list = gr.Radio(label="Conversations", choices=[], elem_id="conversations")
                    del_btn = gr.Button("Delete this chat", variant="stop", size="sm", elem_id="delete-chat")
                    scope_box = gr.Dropdown(label="Ask about", info="documents to search (none chosen: all)",
                                            choices=[], value=[], multiselect=True, allow_custom_value=True,
                                            elem_id="scope")
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Chat", height=560, elem_id="chat", buttons=["copy"])
                    box = gr.MultimodalTextbox(placeholder="Ask about a figure, or attach PDFs / an image",
                                               file_count="multiple",  # any file: a wrong one gets a line, not a refusal
                                               elem_id="ask-box", show_label=False, stop_btn=False)
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Retrieved figures (cited first)", columns=3, height=220,
                                         elem_id="cited", buttons=["fullscreen"], allow_preview=False)
                    page_view = gr.Image(label="Cited page (highlighted)", interactive=False, elem_id="page-view",
                                         buttons=["fullscreen", "download"], height=560)
                    where = gr.Markdown(elem_id="source-info")
        with gr.Tab("Library") as library_tab:
            table = gr.Dataframe(headers=["document", "pages", "figures", "chunks", "ingested"],
                                 interactive=False, elem_id="library")
            uploads = gr.File(label="Add PDFs", file_count="multiple", file_types=[".pdf"])
            add = gr.Button("Ingest", variant="primary")
            status = gr.Markdown(elem_id="library-status")
            with gr.Row():
                choice = gr.Dropdown(label="Document", choices=[], elem_id="remove-choice")
                drop = gr.Button("Remove…", variant="stop", elem_id="remove")
            with gr.Row(visible=False, elem_id="confirm-remove") as confirm_row:
                confirm_md = gr.Markdown()
                yes = gr.Button("Yes, remove", variant="stop", elem_id="confirm-yes")
                no = gr.Button("Cancel", elem_id="confirm-no")

        panels = [gallery, gallery_keys, page_view, where]
        library_outs = [table, choice, scope_box]
        # Everything but answering and the Library's ingest skips the queue: one HTTP request brings
        # its result. A queued event's result comes on the page's shared event stream, which Gradio's
        # browser client (6.31) can lose when the event is sent the moment another queued event of
        # the page ends: the server closes the stream as the other ends, and if the page gets the new
        # event's id before the closing message it opens no new stream, so the result waits on the
        # server until some later queued event reopens one (a citation clicked as its answer ended
        # opened nothing). Left exposed: a question or an ingest sent at that very moment after an
        # answer or an ingest of the same page ends (docs/ARCHITECTURE.md, web chat).
        quick = {"queue": False, **private}
        demo.load(on_load, [browser_state], [browser_state, owner_state, conv_state, conv_list, chatbot] + panels
                  + library_outs, **quick)
        demo.load(None, None, None, js=CITE_JS, **private)
        demo.unload(page_closed)
        library_tab.select(library_shown, [scope_box, choice], library_outs, show_progress="hidden", **quick)
        box.submit(send, [box, browser_state, conv_state, scope_box],
                   [box, chatbot, conv_state, owner_state, browser_state, conv_list] + panels + library_outs,
                   trigger_mode="multiple", concurrency_limit=None, show_progress="minimal", **private)
        box.stop(stop_answer, [conv_state], None, **quick)
        new_btn.click(new_chat, [owner_state], [conv_state, chatbot, conv_list] + panels, **quick)
        chatbot.clear(new_chat, [owner_state], [conv_state, chatbot, conv_list] + panels, **quick)
        conv_list.input(open_chat, [owner_state, conv_list], [conv_state, chatbot, conv_list] + panels, **quick)
        del_btn.click(delete_chat, [owner_state, conv_state], [conv_state, chatbot, conv_list] + panels, **quick)
        cite_go.click(follow_link, [owner_state, conv_state, cite_href], [page_view, where],
                      js="(o, c, h) => [o, c, window.mmragCite || h]", **quick)
        gallery.select(select_figure, [owner_state, conv_state, gallery_keys], [page_view, where], **quick)
        add.click(ingest_panel, [uploads, scope_box], [status, uploads] + library_outs, concurrency_id="ingest",
                  concurrency_limit=1, **private)
        drop.click(ask_remove, [choice], [status, confirm_md, confirm_row], **quick)
        yes.click(remove_doc, [choice, scope_box], [status, confirm_row] + library_outs, **quick)
        no.click(cancel_remove, None, [confirm_row], **quick)
        gr.api(api_ingest, api_name="ingest", concurrency_id="ingest", concurrency_limit=1)
        gr.api(api_ask, api_name="ask", concurrency_limit=8)
    demo.conversations = store  # for tests and the server that mounts the app
    demo.ui_state = {"runs": runs, "live": live, "shown": shown}  # for tests: what the server holds per conversation/page
    return demo


def _gallery_hits(hits) -> list:
    return [h for h in hits if h.image and h.kind != "text"]


def _gallery_items(hits) -> list[tuple[str, str]]:
    return [(h.image, f"{h.key} {h.caption or h.label or h.kind}".strip()) for h in _gallery_hits(hits)]


def _gallery_keys(hits) -> list[str]:
    return [h.key for h in _gallery_hits(hits)]


def auth_from_env(cfg: dict):
    user = os.environ.get(cfg["ui"]["username_env"] or "")
    password = os.environ.get(cfg["ui"]["password_env"] or "")
    return (user, password) if user and password else None
