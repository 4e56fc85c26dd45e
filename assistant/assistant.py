"""The assistant: retrieve, prompt, stream the model's answer with citations. Never crashes on a
model failure: the sources still come back, with one line saying what failed."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

from PIL import Image, UnidentifiedImageError

from . import images as imaging
from .llm import LiteLLM, LLMError
from .prompt import (build_messages, clean_rewrite, normalize_history, prompt_sources, rewrite_messages,
                     standalone_question, trim_history)
from .records import Answer, Hit, cited_refs, split_citations
from .retrieve import Retriever
from .thinking import strip_thinking

log = logging.getLogger(__name__)
MAX_PRIOR_FIGURES = 8  # figures cited earlier in the conversation kept as candidates


def open_image(image) -> Image.Image | None:
    """A question's image (a PIL image or a file path) as RGB on white. Raises ValueError with one
    line for a file that is missing or not an image."""
    if image is None or isinstance(image, Image.Image):
        return None if image is None else imaging.flatten(image)
    try:
        with Image.open(image) as im:
            return imaging.flatten(im)
    except FileNotFoundError:
        raise ValueError(f"image {os.fspath(image)}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image {os.path.basename(os.fspath(image))}: not a readable image ({exc})") from None


class Assistant:
    def __init__(self, retriever: Retriever, llm: LiteLLM, cfg: dict,
                 after_answer: Callable[[list[Hit]], object] | None = None):
        """``after_answer(hits)`` runs once the answer is out (on-demand figure descriptions);
        it must not block and its failures are only logged."""
        self.retriever = retriever
        self.llm = llm
        self.cfg = cfg
        self.after_answer = after_answer

    def standalone(self, question: str, history: list[dict]) -> str:
        """The question retrieval searches for: with earlier turns, a follow-up rewritten to stand
        alone, by the configured model (a short non-streaming call) or, without one or when it
        fails, from the earlier turns' text (:func:`standalone_question`)."""
        turns = trim_history(history, self.cfg["llm"]["history_tokens"])
        if not question.strip() or not any(m["role"] == "user" for m in turns):
            return question
        if self.llm.configured:
            try:
                rewritten = clean_rewrite(self.llm.complete(rewrite_messages(question, turns), max_tokens=150,
                                                            timeout=20), question)
                if rewritten:
                    return rewritten
            except LLMError as exc:
                log.warning("rewriting the follow-up failed, using the earlier turns' words: %s", exc)
        return standalone_question(question, turns)

    def stream(self, question: str, history: list | None = None, image=None, show_image: bool = True,
               **filters) -> Iterator[tuple[str, object]]:
        """Events: ("hits", list[Hit]) once, ("token", str) many, ("answer", Answer) last.

        ``history``: earlier turns, ``[{"role": "user"|"assistant", "content": ...}]`` (content a
        string or a list of parts, as Gradio and OpenAI give it); ``image``: the user's image (a
        PIL image or a path), used to search and, with ``show_image``, shown to the model as the
        user's own (not with ``mmrag ask --like``, whose image is a stored figure); ``filters``: as
        :meth:`Retriever.retrieve`. Raises ValueError for a malformed history or unreadable image."""
        t0 = time.perf_counter()
        turns = normalize_history(history)
        query_image = open_image(image)
        user_image = query_image if show_image else None
        search_for = self.standalone(question, turns)
        timings = {"rewrite_ms": (time.perf_counter() - t0) * 1000} if search_for != question else {}
        prior = [ref for m in reversed(trim_history(turns, self.cfg["llm"]["history_tokens"]))
                 if m["role"] == "assistant" for ref in cited_refs(m["content"])]
        t1 = time.perf_counter()
        hits = self.retriever.retrieve(search_for, image=query_image, prior=list(dict.fromkeys(prior))[:MAX_PRIOR_FIGURES],
                                       **filters)
        timings["retrieval_ms"] = (time.perf_counter() - t1) * 1000
        yield "hits", hits
        if not hits:
            text = "Nothing in the library matches this question." if self.retriever.store.list_docs() else \
                "The library is empty: ingest some PDFs first."
            timings["total_ms"] = (time.perf_counter() - t0) * 1000
            yield "answer", Answer(text, [], [], None, None, timings, search_for)
            return
        vision = self.llm.supports_vision() if self.llm.configured else False
        note = None
        if self.llm.configured and not vision:
            note = self._no_vision_note(user_image is not None)
        ask = question or ("What does the attached image show? Find material like it." if user_image is not None
                           else "Find material like the given figure.")
        error, parts = None, []
        for attempt in (1, 2):
            pcfg = self._prompt_cfg(vision, user_image is not None)
            if vision and pcfg["max_images"] < self.cfg["llm"]["max_images"]:
                note = self._image_limit_note(pcfg["max_images"])
            try:
                messages = build_messages(ask, hits, turns, pcfg, vision, user_image, search_for)
                for token in self.llm.stream(messages):
                    if not parts:
                        timings["first_token_ms"] = (time.perf_counter() - t0) * 1000
                    parts.append(token)
                    yield "token", token
                break
            except LLMError as exc:
                if attempt == 1 and vision and exc.image_limit and not parts:
                    self.llm.image_limit = exc.image_limit  # vLLM's --limit-mm-per-prompt: send that many
                    continue
                if attempt == 1 and vision and (exc.images_rejected or exc.image_limit == 0) and not parts:
                    self.llm.images_rejected = exc.detail or str(exc)
                    vision = False
                    note = self._no_vision_note(user_image is not None)
                    continue
                error = str(exc)
                break
        text = strip_thinking("".join(parts))  # what a </think> that nothing opened came after goes too
        if error and not text:
            text = fallback_text(hits)
        timings["total_ms"] = (time.perf_counter() - t0) * 1000
        if self.after_answer:  # started once the answer is complete (callers may stop reading at it)
            try:
                self.after_answer(hits)
            except Exception:
                log.exception("after-answer work failed")
        cited, retrieved = split_citations(hits, text)
        if not cited and text and not error:  # the model cited no key: the sources it was given stand
            visual, passages = prompt_sources(hits, pcfg)
            cited, retrieved = split_citations(hits, " ".join(h.key for h in passages + visual))
            note = "; ".join(n for n in (note, "the answer cites no source by key: listed are the sources it was given")
                             if n)
        yield "answer", Answer(text, cited, hits, error, note, timings, search_for, retrieved)

    def _prompt_cfg(self, vision: bool, user_image: bool) -> dict:
        """The ``llm`` settings the prompt is built with: at most as many figure images as the
        server said it takes per request (the user's own image counts as one)."""
        pcfg = dict(self.cfg["llm"])
        if vision and self.llm.image_limit is not None:
            pcfg["max_images"] = max(0, min(pcfg["max_images"], self.llm.image_limit - int(user_image)))
        return pcfg

    def _image_limit_note(self, sent: int) -> str:
        return (f"{self.llm.model} takes at most {self.llm.image_limit} image(s) per request (the server's "
                f"--limit-mm-per-prompt): it was shown {sent} figure image(s), not {self.cfg['llm']['max_images']}")

    def _no_vision_note(self, user_image: bool) -> str:
        model = self.llm.model
        if self.llm.images_rejected is not None:
            why = f"{model} rejected the images ({self.llm.images_rejected})"
        else:
            why = f"{model} has no vision support"
        return why + ": it was given the figures' captions, text and descriptions, not the images" + \
            (", and could not see your image" if user_image else "")

    def ask(self, question: str, history: list | None = None, image=None, show_image: bool = True,
            **filters) -> Answer:
        for kind, value in self.stream(question, history, image, show_image, **filters):
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
