"""The assistant: retrieve, prompt, stream the model's answer with citations. Never crashes on a
model failure: the sources still come back, with one line saying what failed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from .llm import LiteLLM, LLMError
from .prompt import build_messages
from .records import Answer, Hit, citations_for
from .retrieve import Retriever

log = logging.getLogger(__name__)


class Assistant:
    def __init__(self, retriever: Retriever, llm: LiteLLM, cfg: dict,
                 after_answer: Callable[[list[Hit]], object] | None = None):
        """``after_answer(hits)`` runs once the answer is out (on-demand figure descriptions);
        it must not block and its failures are only logged."""
        self.retriever = retriever
        self.llm = llm
        self.cfg = cfg
        self.after_answer = after_answer

    def stream(self, question: str, history: list[dict] | None = None, image=None, **filters) -> Iterator[tuple[str, object]]:
        """Events: ("hits", list[Hit]) once, ("token", str) many, ("answer", Answer) last."""
        t0 = time.perf_counter()
        hits = self.retriever.retrieve(question, image=image, **filters)
        timings = {"retrieval_ms": (time.perf_counter() - t0) * 1000}
        yield "hits", hits
        if not hits:
            text = "Nothing in the library matches this question." if self.retriever.store.list_docs() else \
                "The library is empty: ingest some PDFs first."
            timings["total_ms"] = (time.perf_counter() - t0) * 1000
            yield "answer", Answer(text, [], [], None, None, timings)
            return
        vision = self.llm.supports_vision() if self.llm.configured else False
        note = None if vision or not self.llm.configured else \
            f"{self.llm.model} has no vision support: it was given the figures' captions, text and descriptions, not the images"
        error, parts = None, []
        try:
            messages = build_messages(question or "Find material like the attached image.", hits, history or [],
                                      self.cfg["llm"], vision)
            for token in self.llm.stream(messages):
                if not parts:
                    timings["first_token_ms"] = (time.perf_counter() - t0) * 1000
                parts.append(token)
                yield "token", token
        except LLMError as exc:
            error = str(exc)
        text = "".join(parts)
        if error and not text:
            text = fallback_text(hits)
        timings["total_ms"] = (time.perf_counter() - t0) * 1000
        if self.after_answer:  # started once the answer is complete (callers may stop reading at it)
            try:
                self.after_answer(hits)
            except Exception:
                log.exception("after-answer work failed")
        yield "answer", Answer(text, citations_for(hits, text), hits, error, note, timings)

    def ask(self, question: str, history: list[dict] | None = None, image=None, **filters) -> Answer:
        for kind, value in self.stream(question, history, image, **filters):
            if kind == "answer":
                return value
        raise RuntimeError("unreachable")


def fallback_text(hits: list[Hit]) -> str:
    """What the user reads when no model could answer: the sources themselves."""
    lines = ["No answer from the language model; these are the most relevant sources:"]
    for h in hits[:8]:
        snippet = (h.caption or h.text or "").replace("\n", " ")[:160]
        lines.append(f"- {h.key} {h.kind}: {snippet}")
    return "\n".join(lines)
