"""The vision-language model, through litellm. Streams text; maps every failure to one clear line.

Whether the model is sent images (``llm.vision: auto``) is decided once per process:
- Ollama (``ollama/``, ``ollama_chat/``): the server's own model info (``POST /api/show``) lists
  the model's capabilities; images go unless that list lacks "vision". A server that does not say
  (older Ollama, unreachable) counts as unknown.
- Any other model litellm knows (its model table): images go when its entry says it supports
  vision; a known model without that flag (``gpt-3.5-turbo``, ``deepseek/deepseek-chat``) gets the
  figures' captions and text instead.
- A model litellm does not know (``openai/NAME`` or ``hosted_vllm/NAME`` behind ``api_base``, a
  new hosted model): images go. If the server then rejects them, the question is asked again once
  without images, and from then on this process sends none to it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.request
from collections.abc import Callable, Iterator

from .prompt import fold_system
from .thinking import ThinkFilter, answer_in_reasoning, known_style

log = logging.getLogger(__name__)
OLLAMA_PROVIDERS = ("ollama", "ollama_chat")
OLLAMA_DEFAULT_BASE = "http://localhost:11434"


class LLMError(Exception):
    """The model could not answer; str() says why in one line (never with the API key).

    ``images_rejected`` is true when the server refused the request's image parts;
    ``image_limit`` is the number of images per request the server said it accepts (vLLM's
    ``--limit-mm-per-prompt``), None when it said none; ``detail`` holds the server's own words
    (one line, at most 200 characters)."""

    def __init__(self, message: str, images_rejected: bool = False, detail: str = "",
                 image_limit: int | None = None):
        super().__init__(message)
        self.images_rejected = images_rejected
        self.detail = detail
        self.image_limit = image_limit
        self.context: tuple[int, int | None] | None = None  # (context tokens, prompt tokens) a server said


def _litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def provider_of(model: str) -> str:
    """The litellm provider prefix of a model name ("" for bare names such as ``gpt-4o``).

    >>> provider_of("ollama/llava:13b"), provider_of("openai/my-vlm"), provider_of("gpt-4o-mini")
    ('ollama', 'openai', '')
    """
    return model.split("/", 1)[0] if "/" in model else ""


def vision_from_capabilities(capabilities: list[str] | None) -> bool:
    """Ollama's answer: images unless its capability list is known and lacks "vision".

    >>> vision_from_capabilities(["completion", "vision"]), vision_from_capabilities(["completion"])
    (True, False)
    >>> vision_from_capabilities(None)   # the server did not say: send images
    True
    """
    return True if capabilities is None else "vision" in capabilities


def vision_from_model_info(info: dict | None) -> bool:
    """litellm's answer: a model it does not know (``None``) gets images; a known one gets them
    only when its entry says ``supports_vision``.

    >>> vision_from_model_info(None), vision_from_model_info({"supports_vision": True})
    (True, True)
    >>> vision_from_model_info({"supports_vision": None}), vision_from_model_info({"supports_vision": False})
    (False, False)
    """
    return True if info is None else info.get("supports_vision") is True


IMAGE_WORDS = re.compile(r"image|vision|multi-?modal|picture|visual", re.I)


def rejects_images(status: int | None, message: str) -> bool:
    """Whether a failed call looks like the server refusing image input (and so is worth one
    retry without images): a client error (400, 415, 422) or a server error (500) naming images.

    >>> rejects_images(400, "Invalid content type. image_url is only supported by certain models.")
    True
    >>> rejects_images(400, "The model `llama3` is not a multimodal model")
    True
    >>> rejects_images(500, "this model is missing data required for image input")
    True
    >>> rejects_images(400, "This model's maximum context length is 8192 tokens")
    False
    >>> rejects_images(401, "bad key for the vision API")
    False
    """
    return status in (400, 415, 422, 500) and bool(IMAGE_WORDS.search(message or ""))


IMAGE_LIMIT = re.compile(r"at most (\d+) image|\bimage[\"']?\s*[=:]\s*(\d+)[^.]*limit-mm-per-prompt", re.I)


def image_limit(message: str) -> int | None:
    """How many images per request a server that refused more says it accepts (vLLM's
    ``--limit-mm-per-prompt``, whose default is 1 image), or None when the message says no number.

    >>> image_limit("At most 1 image(s) may be provided in one request.")
    1
    >>> image_limit("You set image=2 (or defaulted to 1) in `--limit-mm-per-prompt`, but passed 3 image items")
    2
    >>> image_limit('You set or defaulted to {"image": 3} in `--limit-mm-per-prompt`, but passed 5 image items')
    3
    >>> image_limit("image_url is only supported by certain models") is None
    True
    """
    found = IMAGE_LIMIT.search(message or "")
    return int(found.group(1) or found.group(2)) if found else None


SYSTEM_REFUSED = re.compile(r"system role|system message[s]? (are|is) not|role ['\"]?system['\"]? (is )?not", re.I)


def rejects_system(status: int | None, message: str) -> bool:
    """Whether a failed call is a chat template refusing the system role (Gemma's on vLLM), and
    so worth one retry with the system text in the first user message.

    >>> rejects_system(400, "System role not supported"), rejects_system(400, "Conversation roles must alternate")
    (True, False)
    """
    return status in (400, 422, 500) and bool(SYSTEM_REFUSED.search(message or ""))


CONTEXT_LIMIT = re.compile(r"maximum context length is (\d+) tokens|\bn_ctx\W+(\d+)|context length of only (\d+)",
                           re.I)
PROMPT_TOKENS = re.compile(r"\((\d+) in the messages|has (\d+) input tokens|n_prompt_tokens\W+(\d+)", re.I)


def context_limit(status: int | None, message: str) -> tuple[int, int | None] | None:
    """(the model's context in tokens, the prompt's tokens when said) from a server refusing a
    prompt too long for it: vLLM, llama.cpp (``exceed_context_size_error``), LM Studio; None for
    any other failure.

    >>> context_limit(400, "This model's maximum context length is 4096 tokens. However, you requested 6120 "
    ...                    "tokens (5096 in the messages, 1024 in the completion). Please reduce the length")
    (4096, 5096)
    >>> context_limit(400, '{"code":400,"message":"the request exceeds the available context size, try increasing '
    ...                    'it","type":"exceed_context_size_error","n_prompt_tokens":5210,"n_ctx":4096}')
    (4096, 5210)
    >>> context_limit(401, "maximum context length is 4096 tokens") is None
    True
    """
    if status not in (400, 413, 422, 500):
        return None
    found = CONTEXT_LIMIT.search(message or "")
    if not found:
        return None
    said = PROMPT_TOKENS.search(message)
    return int(next(g for g in found.groups() if g)), int(next(g for g in said.groups() if g)) if said else None


OLLAMA_DEFAULT_CONTEXT = 8192  # num_ctx mmrag asks Ollama for when neither llm.context_tokens nor the model says


def ollama_context(info: dict | None) -> int:
    """The context (``num_ctx``) to ask Ollama for: the model's own ``num_ctx`` parameter
    (Modelfile) when it sets one, else ``OLLAMA_DEFAULT_CONTEXT`` or the model's trained context
    (``model_info`` ``*.context_length``) when smaller. Ollama's own default (2048 or 4096 tokens,
    by version) would cut a prompt with a few figures from its start, silently.

    >>> ollama_context({"parameters": "stop <end>\\nnum_ctx                        32768", "model_info": {}})
    32768
    >>> ollama_context({"model_info": {"llama.context_length": 4096}}), ollama_context(None)
    (4096, 8192)
    """
    info = info or {}
    found = re.search(r"^\s*num_ctx\s+(\d+)", str(info.get("parameters") or ""), re.M)
    if found:
        return int(found.group(1))
    trained = [int(v) for k, v in (info.get("model_info") or {}).items()
               if k.endswith(".context_length") and isinstance(v, int) and v > 0]
    return min([OLLAMA_DEFAULT_CONTEXT] + trained)


def call_options(model: str | None, context: int | None) -> dict:
    """The options every call to ``model`` sends, answers and figure descriptions alike: for
    Ollama, ``num_ctx`` = ``context`` (the same on every call, so that Ollama neither cuts a prompt
    from its start at its own default nor reloads the model for a new context size, ollama#9977;
    it overrides the server's OLLAMA_CONTEXT_LENGTH); nothing for other servers.

    >>> call_options("ollama_chat/qwen2.5vl", 8192), call_options("openai/vlm", 8192)
    ({'num_ctx': 8192}, {})
    """
    return {"num_ctx": int(context)} if provider_of(model or "") in OLLAMA_PROVIDERS and context else {}


SHOW_RETRY_S = 60.0  # a failed /api/show is asked again after this long


def ollama_show(api_base: str | None, model: str, timeout: float = 5.0) -> dict | None:
    """What an Ollama server says about a model (``POST /api/show``: ``capabilities``,
    ``parameters``, ``model_info``); None when it cannot be asked."""
    base = (api_base or os.environ.get("OLLAMA_API_BASE") or OLLAMA_DEFAULT_BASE).rstrip("/")
    for suffix in ("/api/generate", "/api/chat", "/api", "/v1"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    name = model.split("/", 1)[1] if "/" in model else model
    req = urllib.request.Request(base + "/api/show", data=json.dumps({"model": name, "name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            info = json.loads(resp.read())
    except Exception:
        return None
    return info if isinstance(info, dict) else None


def ollama_capabilities(info: dict | None) -> list[str] | None:
    """The capabilities an Ollama server lists for a model (from :func:`ollama_show`), e.g.
    ``["completion", "vision"]``; None when it does not say.

    >>> ollama_capabilities({"capabilities": ["completion", "vision"]}), ollama_capabilities({})
    (['completion', 'vision'], None)
    """
    caps = (info or {}).get("capabilities")
    return [str(c) for c in caps] if isinstance(caps, list) else None


class LiteLLM:
    """One configured model (``cfg`` is the ``llm`` config section). ``stream`` yields text;
    ``complete`` returns a short reply; both raise LLMError. ``clock`` (seconds, monotonic) times
    the retry of a failed Ollama ``/api/show`` (after ``SHOW_RETRY_S``)."""

    def __init__(self, cfg: dict, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.model = cfg.get("model")  # litellm itself is imported on the first call (seconds)
        self._vision: bool | None = None  # decided on first use (vision: auto)
        self.images_rejected: str | None = None  # what the server said when it refused images
        self.image_limit: int | None = None  # images per request the server accepts, once it said so
        self.system_rejected: str | None = None  # what the server said when its template refused the system role
        self.context_said: int | None = None  # the context a server said the model has, on refusing a prompt
        self.token_scale = 1.0  # the server's prompt tokens / mmrag's estimate, learnt from such a refusal
        # whether replies close thinking they did not open (R1's template): known from the name
        # for some families, else learnt from the first reply
        self.closes_thinking: bool | None = known_style(self.model)
        self.answered_in_reasoning = False  # a reply came whole in the reasoning field (logged once)
        self._show: dict | None | bool = False  # Ollama's /api/show answer, asked once (False: not yet)
        self._show_at = 0.0
        self._clock = clock

    @property
    def configured(self) -> bool:
        return bool(self.model)

    def supports_vision(self) -> bool:
        """Whether to send images: forced by ``llm.vision: true/false``, else decided as the
        module docstring says (asked once, then remembered)."""
        forced = self.cfg.get("vision", "auto")
        if forced in (True, False):
            return forced
        if self.images_rejected is not None:
            return False
        if self._vision is None:
            self._vision = self._detect_vision()
        return self._vision

    @property
    def ollama(self) -> bool:
        return provider_of(self.model or "") in OLLAMA_PROVIDERS

    def _ollama_info(self) -> dict | None:
        # asked once; a failure (None) is asked again after SHOW_RETRY_S, not kept for the process
        if self._show is False or (self._show is None and self._clock() - self._show_at > SHOW_RETRY_S):
            self._show, self._show_at = ollama_show(self.cfg.get("api_base"), self.model), self._clock()
        return self._show or None

    def context_tokens(self) -> int | None:
        """The model's context window in tokens, prompt and reply together: ``llm.context_tokens``
        when set, else what a server said on refusing a longer prompt, else for Ollama the
        ``num_ctx`` mmrag asks for (:func:`ollama_context`), else litellm's model table; None
        when unknown (the prompt is then not cut until a server refuses it)."""
        if self.cfg.get("context_tokens"):
            return int(self.cfg["context_tokens"])
        if self.context_said:
            return self.context_said
        if not self.configured:
            return None
        if self.ollama:
            return ollama_context(self._ollama_info())
        try:
            info = _litellm().get_model_info(model=self.model)
        except Exception:
            return None
        n = info.get("max_input_tokens")  # (its max_tokens is often the reply's limit, not the context)
        return int(n) if n else None

    def _detect_vision(self) -> bool:
        if self.ollama:
            return vision_from_capabilities(ollama_capabilities(self._ollama_info()))
        try:
            info = _litellm().get_model_info(model=self.model)
        except Exception:  # not in litellm's table
            info = None
        return vision_from_model_info(info)

    def _key(self) -> str | None:
        env = self.cfg.get("api_key_env")
        if not env:
            return None
        key = os.environ.get(env)
        if not key:
            raise LLMError(f"the environment variable {env} (llm.api_key_env) is not set")
        return key

    def _call_key(self) -> str | None:
        if not self.configured:
            raise LLMError("no language model configured: set llm.model in config.yaml")
        key = self._key()
        if key is None and self.cfg.get("api_base"):
            key = "unused"  # local OpenAI-compatible servers need none, but the client insists on one
        return key

    def _call(self, key: str | None, messages: list[dict], stream: bool, **overrides):
        args = dict(model=self.model, messages=messages, stream=stream, api_base=self.cfg.get("api_base"),
                    api_key=key, temperature=self.cfg.get("temperature"), max_tokens=self.cfg.get("max_tokens"),
                    timeout=self.cfg.get("timeout_s"), num_retries=0)
        args.update(call_options(self.model, self.context_tokens()))  # Ollama: num_ctx, on every call
        args.update(overrides)
        return _litellm().completion(**args)

    def stream(self, messages: list[dict], max_tokens: int | None = None) -> Iterator[str]:
        """The reply's text, piece by piece, without a reasoning model's thinking (a separate
        reasoning field is never shown; inline ``<think>…</think>`` is removed, see
        :mod:`assistant.thinking`). A reply whose server put all of it in the reasoning field and
        ended it itself (vLLM's reasoning parser with thinking off,
        :func:`assistant.thinking.answer_in_reasoning`) is the answer, yielded whole at the end.
        Raises LLMError (``images_rejected`` set when the server refused the image parts; a reply
        that was all thinking, or empty, is an error too)."""
        key = self._call_key()  # known before the call, so that its failure is masked
        for attempt in (1, 2):
            think, sent = ThinkFilter(self.closes_thinking), self._roles(messages)
            reasoning, content_seen, finish = [], False, None
            try:
                response = self._call(key, sent, stream=True,
                                      **({"max_tokens": max_tokens} if max_tokens else {}))
                for chunk in response:
                    choice = chunk.choices[0] if chunk.choices else None
                    finish = getattr(choice, "finish_reason", None) or finish
                    delta = getattr(choice, "delta", None)
                    if delta is None:
                        continue
                    if getattr(delta, "reasoning_content", None):
                        reasoning.append(delta.reasoning_content)  # kept, never shown, unless it is the answer
                    content_seen = content_seen or bool(delta.content)
                    visible = think.feed(delta.content or "")
                    if visible:
                        yield visible
                rest = think.close()
                if think.closes is not None:  # the model's style, kept for the process
                    self.closes_thinking = think.closes
                if rest:
                    yield rest
                break
            except LLMError:
                raise
            except Exception as exc:
                if attempt == 1 and not think.shown and self._system_refused(exc, sent):
                    continue
                raise self._error(exc, key, sent) from None
        if not think.shown and not think.thought and reasoning_may_hold_answer(self.model):
            answer = answer_in_reasoning("".join(reasoning), content_seen, finish)
            if answer:  # vLLM's reasoning parser put the whole answer in the reasoning field
                self._answer_in_reasoning()
                yield answer
                return
        if not think.shown and (reasoning or think.thought):
            raise LLMError(f"LLM {self.model}: the model only thought and gave no answer "
                           + ("(its reply ran out of llm.max_tokens while thinking)" if finish == "length" else
                              "(its reply may have run out of llm.max_tokens while thinking)"))
        if not think.shown:  # a stream that ended with no text (or only spaces): no answer, say so
            raise LLMError(f"LLM {self.model}: the model answered nothing (an empty reply)")

    def complete(self, messages: list[dict], max_tokens: int = 200, timeout: float | None = None) -> str:
        """A short non-streaming reply (e.g. a rewritten question), a reasoning model's thinking
        removed. Raises LLMError."""
        key = self._call_key()
        timeout = min(float(self.cfg.get("timeout_s") or 60), timeout or 60)
        for attempt in (1, 2):
            sent = self._roles(messages)
            try:
                response = self._call(key, sent, stream=False, max_tokens=max_tokens, timeout=timeout)
                think = ThinkFilter(self.closes_thinking)
                text = think.feed(response.choices[0].message.content or "") + think.close()
                if think.closes is not None:
                    self.closes_thinking = think.closes
                if not text.strip() and not think.thought:
                    text = reply_in_reasoning(response, self.model)
                    if text:
                        self._answer_in_reasoning()
                return text.strip()
            except Exception as exc:
                if attempt == 1 and self._system_refused(exc, sent):
                    continue
                raise self._error(exc, key, sent) from None
        raise AssertionError("unreachable")

    def _answer_in_reasoning(self) -> None:
        if not self.answered_in_reasoning:
            log.warning("%s: the server sent the whole reply as reasoning, with no answer text, and ended it "
                        "itself (vLLM's reasoning parser with thinking switched off?); it is used as the answer",
                        self.model)
        self.answered_in_reasoning = True

    def _roles(self, messages: list[dict]) -> list[dict]:
        """The messages as this server's chat template takes them: the system text in the first
        user message once the server refused the system role."""
        return fold_system(messages) if self.system_rejected is not None else messages

    def _system_refused(self, exc: Exception, sent: list[dict]) -> bool:
        """Whether ``exc`` is the template refusing the system role of ``sent`` (then remembered:
        from now on the system text goes into the first user message)."""
        if not sent or sent[0].get("role") != "system" or not rejects_system(getattr(exc, "status_code", None), str(exc)):
            return False
        self.system_rejected = one_line(str(exc))
        return True

    def _error(self, exc: Exception, key: str | None, messages: list[dict]) -> LLMError:
        detail = one_line(str(exc), key)
        had_images = any(isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
                         for m in messages)
        status = getattr(exc, "status_code", None)
        limit = image_limit(str(exc)) if had_images and status in (400, 413, 422, 500) else None
        context = context_limit(status, str(exc))
        err = LLMError(describe_failure(exc, self.model, key),
                       had_images and limit is None and context is None and rejects_images(status, str(exc)),
                       detail, limit)
        err.context = context
        return err


def reasoning_may_hold_answer(model: str) -> bool:
    """Whether a reply that came all in the reasoning field may be the answer misfiled
    (:func:`assistant.thinking.answer_in_reasoning`): not from Ollama, whose parser files as
    thinking only what the model writes inside its thinking tags and drops the whitespace after
    ``</think>``, so a thinking-only reply there is real thinking that stopped.

    >>> reasoning_may_hold_answer("hosted_vllm/Qwen/Qwen3-8B"), reasoning_may_hold_answer("ollama_chat/qwen3")
    (True, False)
    """
    return provider_of(model or "") not in OLLAMA_PROVIDERS


def reply_in_reasoning(response, model: str) -> str:
    """The answer of a non-streamed litellm ``response`` of ``model`` whose text came in its
    reasoning field (:func:`assistant.thinking.answer_in_reasoning`), else ""."""
    if not reasoning_may_hold_answer(model):
        return ""
    choice = response.choices[0] if getattr(response, "choices", None) else None
    message = getattr(choice, "message", None)
    if message is None:
        return ""
    return answer_in_reasoning(getattr(message, "reasoning_content", None) or "", bool(message.content),
                               getattr(choice, "finish_reason", None))


def one_line(text: str, key: str | None = None, limit: int = 200) -> str:
    """The first line of a message, shortened, with the API key masked.

    >>> one_line("bad request: sk-123 is wrong\\nmore", "sk-123")
    'bad request: *** is wrong'
    """
    text = mask_secret(text or "", key)  # mask first: a cut could leave part of the key unmasked
    return text.splitlines()[0][:limit] if text.strip() else ""


def describe_failure(exc: Exception, model: str, key: str | None) -> str:
    litellm = _litellm()
    ex = litellm.exceptions
    kinds = [
        (ex.AuthenticationError, "the model provider refused the API key"),
        (ex.RateLimitError, "the model provider is rate-limiting requests; try again shortly"),
        (ex.Timeout, "the model did not answer in time (llm.timeout_s)"),
        (ex.APIConnectionError, "the model server cannot be reached (check llm.api_base and the network)"),
        (ex.NotFoundError, "the model server does not know this model (check llm.model)"),
        (ex.BadRequestError, "the model server rejected the request"),
        (ex.ServiceUnavailableError, "the model server is unavailable"),
        (ex.InternalServerError, "the model server failed"),
    ]
    if "connection error" in str(exc).lower() and not isinstance(exc, ex.Timeout):
        kinds.insert(0, (type(exc), "the model server cannot be reached (check llm.api_base and the network)"))
    for cls, text in kinds:
        if isinstance(exc, cls):
            why = text
            break
    else:
        why = f"the model call failed ({type(exc).__name__})"
    detail = one_line(str(exc), key)
    return f"LLM {model}: {why}" + (f" — {detail}" if detail else "")


def mask_secret(text: str, secret: str | None, min_prefix: int = 6) -> str:
    """``text`` with ``secret`` and every prefix of it of ``min_prefix``+ characters replaced by
    ``***`` (a provider may echo a truncated key). Always mask before cutting a message: a cut can
    split the key so the plain replace no longer finds it.

    >>> mask_secret("bad key sk-abcdef123456 and sk-ab… and sk-abcdef1…", "sk-abcdef123456")
    'bad key *** and sk-ab… and ***…'
    """
    if not secret:
        return text
    if len(secret) < min_prefix:
        return text.replace(secret, "***")
    pattern = "|".join(re.escape(secret[:n]) for n in range(len(secret), min_prefix - 1, -1))
    return re.sub(pattern, "***", text)
