"""The vision-language model, through litellm. Streams text; maps every failure to one clear line."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator


class LLMError(Exception):
    """The model could not answer; str() says why in one line (never with the API key)."""


def _litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
    import litellm

    litellm.suppress_debug_info = True
    return litellm


class LiteLLM:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.model = cfg.get("model")  # litellm itself is imported on the first call (seconds)

    @property
    def configured(self) -> bool:
        return bool(self.model)

    def supports_vision(self) -> bool:
        forced = self.cfg.get("vision", "auto")
        if forced in (True, False):
            return forced
        try:
            return bool(_litellm().supports_vision(model=self.model))
        except Exception:
            return False

    def _key(self) -> str | None:
        env = self.cfg.get("api_key_env")
        if not env:
            return None
        key = os.environ.get(env)
        if not key:
            raise LLMError(f"the environment variable {env} (llm.api_key_env) is not set")
        return key

    def stream(self, messages: list[dict]) -> Iterator[str]:
        if not self.configured:
            raise LLMError("no language model configured: set llm.model in config.yaml")
        litellm = _litellm()
        key = self._key()
        if key is None and self.cfg.get("api_base"):
            key = "unused"  # local OpenAI-compatible servers need none, but the client insists on one
        try:
            response = litellm.completion(
                model=self.model, messages=messages, stream=True, api_base=self.cfg.get("api_base"), api_key=key,
                temperature=self.cfg.get("temperature"), max_tokens=self.cfg.get("max_tokens"),
                timeout=self.cfg.get("timeout_s"), num_retries=0)
            for chunk in response:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    yield delta
        except LLMError:
            raise
        except Exception as exc:
            raise LLMError(describe_failure(exc, self.model, key)) from None


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
    text = mask_secret(str(exc), key)  # mask first: a cut could leave part of the key unmasked
    detail = text.splitlines()[0][:200] if text.strip() else ""
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
