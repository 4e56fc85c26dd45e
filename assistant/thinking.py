"""A reasoning model's thinking, kept out of what the user reads.

Reasoning models (Qwen3, DeepSeek-R1, QwQ, gpt-oss ...) think before they answer. Servers hand
the thinking over in one of two ways: a separate field (vLLM's reasoning parser, Ollama's
``thinking``, llama.cpp's ``--reasoning-format``; litellm calls it ``reasoning_content``), which
mmrag never shows, or inline in the answer's text, which these functions remove. The user sees
the answer only, citations are parsed from the answer only, and a follow-up rewrite or a figure
description is the model's text after its thinking.

Where inline thinking is (one rule for the stream and the whole reply, :class:`ThinkFilter`):

- ``<think>`` (or ``<thinking>``) opens thinking only at the very start of the reply (after
  space); thinking lasts to its ``</think>``, or to the end when the reply ran out of tokens. A
  tag anywhere else is the answer's own text ("R1 wraps its reasoning in <think> tags").
- A ``</think>`` that nothing opened (DeepSeek-R1's and Qwen3-Thinking-2507's templates put the
  opening tag in the prompt) ends thinking only when it is the reply's first tag, ends its line
  (a line break or the reply's end follows it, as templates write it) and comes within the first
  ``HOLD_CHARS`` characters, a bound lifted once the model showed this style (``closes=True``).
- A stream is held back at its start until that is decided: until such a ``</think>``, the
  bound, or the end. A model whose reply was decided once keeps its style for the process
  (:class:`assistant.llm.LiteLLM`): one that closes without opening is then held until its
  ``</think>`` however long its thinking; one that did not is not held at all. A model whose name
  shows a family that never closes unopened thinking (:func:`known_style`) is not held from the
  first reply on.
"""

from __future__ import annotations

import re

OPEN = ("<think>", "<thinking>")
CLOSE = ("</think>", "</thinking>")
_TAG = re.compile(r"</?(think|thinking)>", re.I)
HOLD_CHARS = 4000  # a reply's start held back while it may be thinking closed by an unopened </think>


# Model families whose replies never close thinking they did not open: hosted APIs that hand
# thinking over apart, and vision models with no thinking template. Their first reply streams
# at once instead of being held (see :func:`known_style`).
NEVER_CLOSES = re.compile(
    r"^(anthropic|gemini)/|gpt-4|gpt-3\.5|chatgpt|claude|gemini|gemma|llava|moondream|minicpm-v"
    r"|qwen2(\.5)?-?vl|llama-?3\.2[^/]*vision|llama-?4|pixtral|mistral-(small|medium|large)|granite[^/]*vision"
    r"|internvl|idefics|smolvlm|molmo|paligemma|aya-vision|phi-?3\.5-vision|phi-?4-multimodal")
# what a reasoning model's name holds (DeepSeek-R1 and its distills, Qwen3-*-Thinking, QwQ, QVQ,
# Phi-4-reasoning, Skywork-R1V ...): such a model is never taken for one of the above
MAY_THINK = re.compile(r"(?<![a-z0-9])r1|think|reason|qwq|qvq")


def known_style(model: str | None) -> bool | None:
    """False when ``model`` (a litellm model name) is of a family whose replies never close
    thinking they did not open, so its replies need not be held back (:class:`ThinkFilter`'s
    ``closes``); None, not known, for any other name, a reasoning model's among them.

    >>> known_style("openai/gpt-4o"), known_style("ollama_chat/llava:13b"), known_style("anthropic/x")
    (False, False, False)
    >>> known_style("hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct"), known_style("ollama/llama3.2-vision")
    (False, False)
    >>> known_style("openai/test-vlm"), known_style("hosted_vllm/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    (None, None)
    >>> known_style("hosted_vllm/Qwen/Qwen3-VL-8B-Thinking"), known_style("openai/gemma3-r1"), known_style(None)
    (None, None, None)
    """
    name = (model or "").lower()
    if not name or MAY_THINK.search(name):
        return None
    return False if NEVER_CLOSES.search(name) else None


def strip_thinking(text: str, closes: bool | None = None) -> str:
    """The answer in a whole reply, by the rule in the module docstring (``closes``: the model's
    known style, True / False / None unknown). Leading and trailing space removed.

    >>> strip_thinking("<think>The user asks X.\\nLet me see.</think>\\n\\nWhat is X?")
    'What is X?'
    >>> strip_thinking("Okay, they want Y [a.pdf p.2].\\n</think>\\n\\nY is shown [a.pdf p.1].")
    'Y is shown [a.pdf p.1].'
    >>> strip_thinking("<think>still thinking when max_tokens ran out"), strip_thinking("A plain answer.")
    ('', 'A plain answer.')
    >>> strip_thinking("DeepSeek-R1 wraps its reasoning in <think> tags before answering [r1.pdf p.3].")
    'DeepSeek-R1 wraps its reasoning in <think> tags before answering [r1.pdf p.3].'
    >>> strip_thinking("R1 ends reasoning with </think> and then answers [r1.pdf p.3].")
    'R1 ends reasoning with </think> and then answers [r1.pdf p.3].'
    >>> long = "x" * 5000 + "\\n</think>\\nA."   # past the bound: kept, unless the model is known to close
    >>> strip_thinking(long) == long, strip_thinking(long, closes=True)
    (True, 'A.')
    """
    f = ThinkFilter(closes)
    return (f.feed(text or "") + f.close()).strip()


class ThinkFilter:
    """Removes a reasoning model's inline thinking from a streamed reply, piece by piece, whatever
    the pieces' boundaries (a tag may arrive as ``<th`` + ``ink>``), by the module docstring's
    rule: ``feed(piece)`` returns the text that can be shown now, ``close()`` what was held back
    at the end. ``thought`` is true once any thinking went by; ``shown`` once any visible
    non-space text was returned; ``closes`` (once decided) whether the reply closed thinking it
    did not open, None while undecided. Leading space after thinking is dropped.

    >>> f = ThinkFilter()
    >>> [f.feed(p) for p in ["<th", "ink>plan: cite fig 1</thi", "nk>\\n\\nThe parser", " feeds it."]], f.close()
    (['', '', 'The parser', ' feeds it.'], '')
    >>> f.thought, f.shown, f.closes
    (True, True, False)
    >>> f = ThinkFilter()   # DeepSeek-R1: its template opened <think>; nothing streams before </think>
    >>> [f.feed(p) for p in ["Okay, the user", " asks.\\n</th", "ink>\\n\\nIt feeds", " it."]], f.closes
    (['', '', 'It feeds', ' it.'], True)
    """

    def __init__(self, closes: bool | None = None):
        self.style = closes  # what the model was seen to do before (None: not known)
        self.state = "start"  # start | inside | held | answer
        self.pending = ""
        self.thought = False
        self.shown = False
        self.closes: bool | None = None
        self._after_think = False

    def feed(self, piece: str) -> str:
        self.pending += piece or ""
        return self._visible(self._step(final=False))

    def close(self) -> str:
        return self._visible(self._step(final=True))

    def _step(self, final: bool) -> str:
        text = self.pending
        if self.state == "answer":
            self.pending = ""
            return text
        if self.state == "start":
            lead = text.lstrip().lower()
            if not lead:
                if final:
                    self.pending, self.closes = "", False
                return ""
            if lead.startswith(OPEN):
                tag = next(t for t in OPEN if lead.startswith(t))
                self.state, self.thought = "inside", True
                self.pending = text.lstrip()[len(tag):]
                text = self.pending
            elif any(t.startswith(lead) for t in OPEN) and not final:
                return ""  # may still become an opening tag
            else:
                self.state = "held" if self.style is not False else "answer"
                if self.state == "answer":
                    self.closes = False
                    return self._step(final)
        if self.state == "inside":
            found = _TAG.search(text)
            while found and not found.group(0).startswith("</"):
                found = _TAG.search(text, found.end())
            if found:
                self.state, self._after_think, self.pending = "answer", True, text[found.end():]
                if self.closes is None:
                    self.closes = False
                return self._step(final)
            keep = 0 if final else _partial_tag(text.lower(), CLOSE)
            self.pending = "" if final else text[len(text) - keep:]
            return ""
        # held: a </think> nothing opened may come
        bound = None if self.style else HOLD_CHARS
        found = _TAG.search(text)
        if found and not found.group(0).startswith("</"):
            return self._release()  # the first tag opens: the answer's own text
        if found and (bound is None or found.start() <= bound):
            rest = text[found.end():].lstrip(" \t")
            if not rest and not final:
                return ""  # what follows the tag decides
            if not rest or rest[0] in "\r\n":
                self.state, self.thought, self.closes, self._after_think = "answer", True, True, True
                self.pending = text[found.end():]
                return self._step(final)
            return self._release()
        if final or (bound is not None and len(text) > bound + len(CLOSE[-1])):
            return self._release()
        return ""

    def _release(self) -> str:
        self.state, self.closes = "answer", False
        return self._step(False)

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


def answer_in_reasoning(reasoning: str, content_seen: bool, finish_reason: str | None) -> str:
    """The answer a server handed over in its reasoning field, or "" when that field holds real
    thinking (which is never shown).

    vLLM's reasoning parsers (``deepseek_r1``; ``qwen3`` in some versions) count everything a
    model writes before a ``</think>`` as reasoning. A reply with no ``</think>`` at all, because
    thinking was switched off (Qwen3 with ``enable_thinking: false``, whose template closes the
    thinking in the prompt) or the template opens none, comes back whole as ``reasoning_content``
    with ``content`` null and ``finish_reason`` "stop" (vllm#17349, #19222, #19839, #40816). A
    reply whose thinking was cut by ``max_tokens`` looks the same but for its finish reason. So
    the reasoning text is the answer only when all of these hold:

    - ``finish_reason`` is "stop": the model ended its turn itself; "length" (cut by max_tokens)
      or an unknown reason is a reply that stopped mid-thought;
    - ``content_seen`` is false: no content arrived at all, not even the blank line a model
      writes after its ``</think>`` (a parser sends it as content), which would mean the thinking
      closed and no answer followed;
    - the reasoning text holds no closing tag of its own.

    Inline tags at its start are removed as in :func:`strip_thinking`.

    >>> answer_in_reasoning("The parser feeds the renderer [m.pdf p.2].", False, "stop")
    'The parser feeds the renderer [m.pdf p.2].'
    >>> answer_in_reasoning("The user asks about the parser. Let me", False, "length")   # cut while thinking
    ''
    >>> answer_in_reasoning("The user asks about the parser.", True, "stop")   # closed, then nothing
    ''
    >>> answer_in_reasoning("The user asks.\\n</think>", False, "stop"), answer_in_reasoning("A.", False, None)
    ('', '')
    """
    if finish_reason != "stop" or content_seen or not (reasoning or "").strip():
        return ""
    if any(t in reasoning.lower() for t in CLOSE):
        return ""
    return strip_thinking(reasoning, closes=False)
