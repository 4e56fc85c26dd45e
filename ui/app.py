"""Gradio app: a streaming multimodal chat (questions, PDFs to ingest, images to search by), the
cited figures in a gallery, a library panel, and named API endpoints (`ingest`, `ask`) for scripts."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import gradio as gr

from mmrag.library import IngestResult, Progress

log = logging.getLogger(__name__)
IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
UPLOADED, INGESTED = "Uploaded ", "Ingested:\n"  # the chat's own upload/ingest messages, not conversation


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
    return "\n".join(f"- {r.message}" for r in results) or "nothing to ingest"


def _library_rows(app) -> list[list]:
    import datetime

    rows = []
    for d in app.library.list():
        when = datetime.datetime.fromtimestamp(d["ingested_at"]).strftime("%Y-%m-%d %H:%M") if d.get("ingested_at") else ""
        rows.append([d["doc"], d["pages"], d["figures"], d["chunks"], when])
    return rows


def _gallery(hits) -> list[tuple[str, str]]:
    return [(h.image, f"{h.key} {h.caption or h.label or h.kind}".strip()) for h in hits if h.image and h.kind != "text"]


def figure_md(h) -> str:
    """What the UI shows beside a selected figure: key, caption, place, label and its description
    by the vision model (when it has one)."""
    md = f"**{h.key}** {h.caption}\n\n{h.doc} p.{h.page}" + (f" · {h.label}" if h.label else "")
    if h.description:
        md += f"\n\n**Description** (vision model): {h.description}"
    return md


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


def _conversation(history: list) -> list:
    """The chat's turns without its upload/ingest messages (their content left in Gradio's shape)."""
    from assistant.prompt import message_text

    out = []
    for m in history:
        text = message_text(m.get("content")) if isinstance(m, dict) else ""
        if (m.get("role") == "user" and text.startswith(UPLOADED)) or \
                (m.get("role") == "assistant" and text.startswith(INGESTED)):
            continue
        out.append(m)
    return out


def build_ui(app) -> gr.Blocks:
    cfg = app.cfg
    ingest_lock = threading.Lock()

    def chat(message, history, progress=gr.Progress()):
        history = list(history or [])
        prior = _conversation(history)  # earlier turns, in whatever shape Gradio delivers them
        text = (message or {}).get("text", "").strip()
        files = [_path(f) for f in (message or {}).get("files", [])]
        pdfs = [f for f in files if f.lower().endswith(".pdf")]
        images = [f for f in files if f.lower().endswith(IMAGE_TYPES)]
        other = [f for f in files if f not in pdfs and f not in images]
        if pdfs or other:
            history.append({"role": "user", "content": UPLOADED + ", ".join(Path(f).name for f in pdfs + other)})
            results = ingest_files(app, pdfs + other, GradioProgress(progress))
            history.append({"role": "assistant", "content": INGESTED + _summary(results)})
            yield history, gr.skip(), []
        if not text and not images:
            yield history, gr.skip(), gr.skip()
            return
        image = None
        if images:
            why = _check_upload(images[0], float(cfg["ui"]["max_upload_mb"]), IMAGE_TYPES)
            if why:
                history.append({"role": "assistant", "content": why})
                yield history, gr.skip(), gr.skip()
                return
            image = images[0]
            history.append({"role": "user", "content": {"path": images[0]}})
        if text:
            history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": ""})
        hits = []
        try:
            for kind, value in app.assistant.stream(text, history=prior, image=image):
                if kind == "hits":
                    hits = value
                    yield history, gr.skip(), _gallery(hits)
                elif kind == "token":
                    history[-1]["content"] += value
                    yield history, gr.skip(), gr.skip()
                else:
                    answer = value
                    sources = _sources_md(answer, text)
                    history[-1]["content"] = answer.text + ("\n\n" + sources if sources else "")
                    figs = [c for c in answer.citations if c.image and c.figure]
                    if figs:
                        history.append({"role": "assistant", "content": {"path": figs[0].image, "alt_text": figs[0].key}})
                    hits = _cited_first(answer)
                    yield history, hits, _gallery(hits)
        except ValueError as exc:  # an unreadable image
            history[-1]["content"] = str(exc)
            yield history, gr.skip(), gr.skip()

    def select_figure(hits, evt: gr.SelectData):
        shown = [h for h in (hits or []) if h.image and h.kind != "text"]
        if not shown or evt.index is None or evt.index >= len(shown):
            return None, None, ""
        h = shown[evt.index]
        page = app.retriever.page_image(h.doc, h.page)
        return h.image, page, figure_md(h)

    def ingest_panel(files, progress=gr.Progress()):
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        with ingest_lock:
            results = ingest_files(app, paths, GradioProgress(progress))
        return _summary(results), _library_rows(app), gr.update(choices=[r[0] for r in _library_rows(app)])

    def remove_doc(name):
        if not name:
            return "choose a document", _library_rows(app), gr.update()
        try:
            app.library.remove(name)
            msg = f"removed {name}"
        except Exception as exc:
            msg = str(exc)
        rows = _library_rows(app)
        return msg, rows, gr.update(choices=[r[0] for r in rows], value=None)

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
            why = _check_upload(path, float(cfg["ui"]["max_upload_mb"]), IMAGE_TYPES)
            if why:
                raise gr.Error(why)
        try:
            return app.assistant.ask(question or "", history=history or [], image=path).to_json()
        except ValueError as exc:  # a malformed history or an unreadable image
            raise gr.Error(str(exc)) from None

    with gr.Blocks(title="mmrag") as demo:
        gr.Markdown("# mmrag\nAsk about the diagrams, charts and figures in your PDFs. "
                    "Attach PDFs to add them to the library, or an image to find figures like it.")
        hits_state = gr.State([])
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Chat", height=520, elem_id="chat")
                    box = gr.MultimodalTextbox(placeholder="Ask about a figure, or attach PDFs / an image",
                                               file_types=[".pdf", "image"], file_count="multiple",
                                               elem_id="ask-box", show_label=False)
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Cited figures", columns=2, height=300, elem_id="cited")
                    big = gr.Image(label="Figure", interactive=False, elem_id="figure-large")
                    page = gr.Image(label="Its page", interactive=False, elem_id="figure-page")
                    where = gr.Markdown()
            box.submit(chat, [box, chatbot], [chatbot, hits_state, gallery], concurrency_limit=8,
                       concurrency_id="chat", api_visibility="private").then(lambda: None, None, box)
            gallery.select(select_figure, [hits_state], [big, page, where], api_visibility="private")
        with gr.Tab("Library"):
            table = gr.Dataframe(headers=["document", "pages", "figures", "chunks", "ingested"],
                                 value=lambda: _library_rows(app), interactive=False, elem_id="library")
            uploads = gr.File(label="Add PDFs", file_count="multiple", file_types=[".pdf"])
            add = gr.Button("Ingest", variant="primary")
            status = gr.Markdown()
            with gr.Row():
                choice = gr.Dropdown(label="Document", choices=[r[0] for r in _library_rows(app)])
                drop = gr.Button("Remove", variant="stop")
            add.click(ingest_panel, [uploads], [status, table, choice], concurrency_id="ingest",
                      concurrency_limit=1, api_visibility="private")
            drop.click(remove_doc, [choice], [status, table, choice], api_visibility="private")
        gr.api(api_ingest, api_name="ingest", concurrency_id="ingest", concurrency_limit=1)
        gr.api(api_ask, api_name="ask", concurrency_limit=8)
    return demo


def auth_from_env(cfg: dict):
    user = os.environ.get(cfg["ui"]["username_env"] or "")
    password = os.environ.get(cfg["ui"]["password_env"] or "")
    return (user, password) if user and password else None


def launch(app, prevent_thread_lock: bool = False, quiet: bool = False):
    cfg = app.cfg
    demo = build_ui(app)
    demo.queue(default_concurrency_limit=8)
    return demo, demo.launch(
        server_name=cfg["ui"]["host"], server_port=int(cfg["ui"]["port"]), share=bool(cfg["ui"]["share"]),
        auth=auth_from_env(cfg), max_file_size=f"{int(cfg['ui']['max_upload_mb'])}mb",
        allowed_paths=[str(Path(cfg["data_dir"]) / "images")], prevent_thread_lock=prevent_thread_lock,
        quiet=quiet, footer_links=["api"])


def serve(cfg: dict) -> None:
    from mmrag.wiring import build

    launch(build(cfg))
