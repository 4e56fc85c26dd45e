"""A reasoning model's thinking, kept out of what the user reads.

Reasoning models (Qwen3, DeepSeek-R1, QwQ, gpt-oss ...) think before they answer. Servers hand
the thinking over in one of two ways: a separate field (vLLM's reasoning parser, Ollama's
``thinking``, llama.cpp's ``--reasoning-format``; litellm calls it ``reasoning_content``), which
mmrag never shows, or inline in the answer's text as ``<think>…</think>`` (a server without a
reasoning parser, an older Ollama), which these functions remove. The user sees the answer only,
citations are parsed from the answer only, and a follow-up rewrite or a figure description is
the model's text after its thinking. mmrag does not show the thinking at all: the sources and
their keys are what an answer is checked against, and a long chain of thought streamed first
would push the answer below the fold.
"""

from __future__ import annotations

import re

OPEN = ("<think>", "<thinking>")
CLOSE = ("</think>", "</thinking>")
_BLOCK = re.compile(r"<(think|thinking)>.*?</\1>", re.S | re.I)
_OPEN = re.compile(r"<(think|thinking)>", re.I)
_CLOSE = re.compile(r"</(think|thinking)>", re.I)


def strip_thinking(text: str) -> str:
    """The answer in a reply: every ``<think>…</think>`` block removed; everything after an
    unclosed ``<think>`` is thinking (the reply ran out of tokens while thinking); everything
    before a ``</think>`` that no ``<think>`` opened is thinking too (templates that put the
    opening tag in the prompt, as DeepSeek-R1's does). Leading and trailing space removed.

    >>> strip_thinking("<think>The user asks X.\\nLet me see.</think>\\n\\nWhat is X?")
    'What is X?'
    >>> strip_thinking("Okay, they want Y. </think> Y is shown [a.pdf p.1].")
    'Y is shown [a.pdf p.1].'
    >>> strip_thinking("<think>still thinking when max_tokens ran out"), strip_thinking("A plain answer.")
    ('', 'A plain answer.')
    """
    text = _BLOCK.sub("", text or "")
    closes = list(_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    opened = _OPEN.search(text)
    if opened:
        text = text[: opened.start()]
    return text.strip()


class ThinkFilter:
    """Removes ``<think>…</think>`` from a streamed reply, piece by piece, whatever the pieces'
    boundaries (a tag may arrive as ``<th`` + ``ink>``): ``feed(piece)`` returns the text that
    can be shown now, ``close()`` what was held back at the end. ``thought`` is true once any
    thinking went by; ``shown`` once any visible non-space text was returned. Leading space
    after a thinking block is dropped. A ``</think>`` that nothing opened is passed through:
    :func:`strip_thinking` of the whole answer removes what came before it.

    >>> f = ThinkFilter()
    >>> [f.feed(p) for p in ["<th", "ink>plan: cite fig 1</thi", "nk>\\n\\nThe parser", " feeds it."]], f.close()
    (['', '', 'The parser', ' feeds it.'], '')
    >>> f.thought, f.shown
    (True, True)
    """

    def __init__(self):
        self.inside = False
        self.pending = ""  # text that may be the start of a tag
        self.thought = False
        self.shown = False
        self._after_think = False  # drop leading space right after a thinking block

    def feed(self, piece: str) -> str:
        text = self.pending + (piece or "")
        self.pending = ""
        out = []
        while text:
            tags = CLOSE if self.inside else OPEN
            lower = text.lower()
            hits = [(lower.find(t), t) for t in tags if lower.find(t) >= 0]
            if hits:
                at, tag = min(hits)
                if not self.inside:
                    out.append(text[:at])
                self.inside = not self.inside
                self.thought = True
                self._after_think = not self.inside
                text = text[at + len(tag):]
                continue
            keep = _partial_tag(lower, tags)  # a tag may be cut at the end of this piece
            body, self.pending = text[: len(text) - keep], text[len(text) - keep:]
            if not self.inside:
                out.append(body)
            break
        return self._visible("".join(out))

    def close(self) -> str:
        rest, self.pending = ("" if self.inside else self.pending), ""
        return self._visible(rest)

    def _visible(self, text: str) -> str:
        if self._after_think or not self.shown:
            text = text.lstrip()
            if text:
                self._after_think = False
        if text:
            self.shown = True
        return text


def _partial_tag(lower: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of ``lower`` that is a proper prefix of one of ``tags``.

    >>> _partial_tag("answer <thi", OPEN), _partial_tag("answer <", OPEN), _partial_tag("a > b", OPEN)
    (4, 1, 0)
    """
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(lower)), best, -1):
            if tag.startswith(lower[-n:]):
                best = n
                break
    return best
