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
from .prompt import (build_messages, clean_rewrite, estimate_image_tokens, estimate_tokens, fit_prompt,
                     image_data_url, normalize_history,
                     prompt_sources, prompt_tokens, rewrite_messages, standalone_question, trim_history)
from .records import Answer, Hit, cited_refs, split_citations
from .retrieve import Retriever

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
        error, parts, cut_note = None, [], None
        encoded: dict = {}  # each image encoded once per question, however often the prompt is fitted

        def encode(image, side):
            k = (id(image), os.fspath(image) if isinstance(image, (str, os.PathLike)) else None, side)
            if k not in encoded:
                encoded[k] = image_data_url(image, side)
            return encoded[k]

        history_need = sum(estimate_tokens(str(m.get("content", ""))) for m in turns)
        for attempt in (1, 2):
            pcfg = self._prompt_cfg(vision, user_image is not None)
            if vision and pcfg["max_images"] < self.cfg["llm"]["max_images"]:
                note = self._image_limit_note(pcfg["max_images"])
            try:
                messages, pcfg, cut, reply = self._fit(lambda c: build_messages(ask, hits, turns, c, vision, user_image,
                                                                         search_for, encode), pcfg, hits, vision,
                                                history_need)
                cut_note = cut  # this attempt's only: a refit's note replaces the first one's
                for token in self.llm.stream(messages, max_tokens=reply):
                    if not parts:
                        timings["first_token_ms"] = (time.perf_counter() - t0) * 1000
                    parts.append(token)
                    yield "token", token
                break
            except LLMError as exc:
                if attempt == 1 and exc.context and not parts and self.llm.context_said is None:
                    # the server said the model's context: fit the prompt to it and ask again
                    self.llm.context_said, said = exc.context
                    estimate = prompt_tokens(messages, estimate_image_tokens(pcfg["image_max_side"]))
                    self.llm.token_scale = max(1.0, (said or 0) / max(estimate, 1))
                    continue
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
        note = "; ".join(n for n in (note, cut_note) if n) or None
        text = "".join(parts).strip()  # the stream's thinking already removed (assistant.thinking)
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

    def _fit(self, build, pcfg: dict, hits: list[Hit], vision: bool,
             history_need: int | None = None) -> tuple[list[dict], dict, str | None, int | None]:
        """(messages, the settings they were built with, a note when sources or earlier turns had
        to be left out, the reply's max_tokens to send): the prompt fitted to the model's context
        (:meth:`LiteLLM.context_tokens`), the reply's ``max_tokens`` kept free (at most half of it),
        and ``max_tokens`` sent no larger than the context less the prompt (a server such as vLLM
        refuses a prompt plus max_tokens over its context); None: as configured."""
        context = self.llm.context_tokens() if self.llm.configured else None
        if not context:
            return build(pcfg), pcfg, None, None
        reply = min(int(pcfg.get("max_tokens") or 0), context // 2)
        messages, used, prompt = fit_prompt(build, pcfg, context - reply, estimate_image_tokens(pcfg["image_max_side"]),
                                            self.llm.token_scale, history_need)
        turns = min(pcfg["history_tokens"], history_need) if history_need is not None else pcfg["history_tokens"]
        cap = max(1, min(int(pcfg.get("max_tokens") or context), context - prompt))
        if used == dict(pcfg, history_tokens=turns):
            return messages, used, None, cap
        (v0, p0), (v1, p1) = prompt_sources(hits, pcfg), prompt_sources(hits, used)
        left = [f"{len(p1)} of {len(p0)} passages" if len(p1) < len(p0) else "",
                f"{len(v1)} of {len(v0)} figure images" if vision and len(v1) < len(v0) else "",
                "no earlier turns" if used["history_tokens"] == 0 and turns else
                "fewer earlier turns" if used["history_tokens"] < turns else ""]  # only when turns were dropped
        where = "llm.context_tokens" if self.cfg["llm"].get("context_tokens") else \
            "as the server said" if self.llm.context_said else "num_ctx" if self.llm.ollama else "litellm's model table"
        return messages, used, (f"the prompt was cut to fit {self.llm.model}'s context of {context} tokens ({where}): "
                                + ", ".join(x for x in left if x)), cap

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
