"""The web UI's server-side state: the browser-id secret is one per data folder even when servers
start at once; a long-running server keeps nothing per answered conversation or closed page."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest


def _secret_at(args: tuple[str, float]) -> str:
    from ui.app import _secret

    folder, start = args
    time.sleep(max(0.0, start - time.time()))
    try:
        return _secret(Path(folder))
    except Exception as exc:  # a server that fails to start counts as a disagreement
        return f"{type(exc).__name__}: {exc}"


def _no_hard_links(src, dst, **kw):
    import errno

    raise OSError(errno.EPERM, "Operation not permitted")  # what link(2) says on FAT


TRIALS = 20


@pytest.mark.parametrize("links", [True, False], ids=["hard links", "no hard links"])
def test_servers_starting_at_once_on_one_data_dir_share_one_secret(tmp_path, monkeypatch, links):
    """Six servers starting at the same instant on a fresh data folder all use the secret that is
    in ui-secret (a server with another one could not read what the browsers stored with it), and
    none fails to start; later starts keep it. Also where the filesystem has no hard links (FAT,
    some network shares; here link(2) fails as it does there, in the forked servers too): its
    fallback let a server read ui-secret created but not yet written, and start with an empty
    secret (in about half of the trials)."""
    import ui.app  # noqa: F401  (imported once, before the fork: every trial's servers start at once)

    if not links:
        monkeypatch.setattr(os, "link", _no_hard_links)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(6) as pool:
        for trial in range(TRIALS):
            folder = tmp_path / f"data{trial}"
            start = time.time() + 0.3
            got = pool.map(_secret_at, [(str(folder), start)] * 6, chunksize=1)
            kept = (folder / "ui-secret").read_text().strip()
            assert len(kept) == 32 and got == [kept] * 6, (trial, kept, got)
            assert _secret_at((str(folder), 0.0)) == kept
            assert [p.name for p in folder.iterdir()] == ["ui-secret"]  # no temporary file left behind


def _fn(demo, name: str):
    return next(f.fn for f in demo.fns.values() if f.name == name)


def test_the_server_keeps_nothing_of_answered_questions_or_closed_pages(make_cfg, clip, passages, llm):
    """A long-running server does not grow with the questions it answered or the pages it served:
    once a conversation's questions are answered its run state goes, and a page's entry goes when
    the page closes (Gradio's unload event)."""
    from types import SimpleNamespace

    from mmrag.wiring import build
    from ui.app import build_ui

    cfg = make_cfg(llm={"model": "openai/test-vlm", "api_base": llm.api_base, "vision": True, "timeout_s": 10},
                   describe={"mode": "off"})
    demo = build_ui(build(cfg, clip=clip, passages=passages))
    send, state = _fn(demo, "send"), demo.ui_state
    convs = set()
    for n in range(3):
        page = SimpleNamespace(session_hash=f"page-{n}", username=None)
        list(send({"text": f"question {n}", "files": []}, "browser-1", "", [], page, progress=None))
        conv = demo.conversations.list("browser:browser-1")[0]["id"]
        answer = demo.conversations.load("browser:browser-1", conv)["messages"][-1]
        assert answer["kind"] == "answer" and answer["text"], answer  # answered (the library is empty: it says so)
        convs.add(conv)
    assert len(convs) == 3 and state["runs"] == {} and state["live"] == {}
    assert set(state["shown"]) == {"page-0", "page-1", "page-2"}
    unload = next((f.fn for f in demo.fns.values() if any(t[1] == "unload" for t in f.targets)), None)
    assert unload is not None, "no unload event: a closed page's entry would stay"
    for n in range(3):
        unload(SimpleNamespace(session_hash=f"page-{n}", username=None))
    assert state["shown"] == {}

    # a page closed while its answer streams (Gradio closes the event's generator): nothing stays
    page = SimpleNamespace(session_hash="page-closed", username=None)
    events = send({"text": "a question whose page closes", "files": []}, "browser-1", "", [], page, progress=None)
    next(events)  # the question is queued and shown
    next(events)  # the answer has started
    events.close()
    assert state["runs"] == {} and state["live"] == {}


def _component(demo, kind: str, elem_id: str | None = None):
    import gradio as gr

    found = [b for b in demo.blocks.values() if isinstance(b, getattr(gr, kind))
             and (elem_id is None or b.elem_id == elem_id)]
    assert len(found) == 1, (kind, elem_id, found)
    return found[0]


def test_a_new_chat_stays_new_while_the_last_answer_still_streams(make_cfg, clip, passages, llm):
    """New chat clicked while an answer streams: an update of that answer computed before the
    click and applied after it used to put the old conversation back on the page, its id
    included, so the next question joined the old conversation (queued behind its answer)
    instead of starting its own. Here the page holds that stale id, as it did: the question
    still starts a new conversation, is answered there, and the old answer's next update shows
    the new chat again."""
    from types import SimpleNamespace

    from mmrag.wiring import build
    from ui.app import build_ui

    cfg = make_cfg(llm={"model": "openai/test-vlm", "api_base": llm.api_base, "vision": True, "timeout_s": 10},
                   describe={"mode": "off"})
    demo = build_ui(build(cfg, clip=clip, passages=passages))
    send, new_chat = _fn(demo, "send"), _fn(demo, "new_chat")
    chat = _component(demo, "Chatbot", "chat")
    owner, page = "browser:browser-1", SimpleNamespace(session_hash="page-1", username=None)
    conv_state = next(k for k, v in new_chat(owner, page).items() if type(k).__name__ == "State" and v == "")
    first = send({"text": "a long first question", "files": []}, "browser-1", "", [], page, progress=None)
    old = next(first)[conv_state]
    next(first)  # its answer has started
    new_chat(owner, page)
    stale = old  # what the page's conversation id was set back to by the late update
    second = send({"text": "a second question", "files": []}, "browser-1", stale, [], page, progress=None)
    updates = list(second)
    assert updates[0][conv_state] != old, "the question joined the conversation the page had left"
    new = updates[0][conv_state]
    msgs = demo.conversations.load(owner, new)["messages"]
    texts = [m.get("text") for m in msgs]
    assert texts[0] == "a second question" and "a long first question" not in texts, texts
    assert msgs[-1]["kind"] == "answer" and msgs[-1]["text"], msgs  # answered in its own conversation
    # the old answer's next update shows the page's conversation again, then leaves the page alone
    later = list(first)
    assert later[0].get(conv_state) == new, later[0]
    assert later[0][_component(demo, "Radio", "conversations")]["value"] == new  # selected in the list too
    shown = str(later[0][chat])
    assert "a second question" in shown and "a long first question" not in shown, shown
    assert all(chat not in u and conv_state not in u for u in later[1:])
    old_texts = [m.get("text") for m in demo.conversations.load(owner, old)["messages"]]
    assert old_texts[0] == "a long first question" and "a second question" not in old_texts
