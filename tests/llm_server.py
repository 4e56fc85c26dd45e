"""A small model server for tests, speaking two APIs over real HTTP:

- OpenAI's (``POST /v1/chat/completions``, streamed or not), as litellm's ``openai/NAME`` with
  ``api_base`` calls it;
- Ollama's (``POST /api/generate`` for litellm's ``ollama/NAME``, ``POST /api/chat`` for
  ``ollama_chat/NAME``, newline-delimited JSON; ``POST /api/show`` lists ``capabilities``).

It records every request, streams a scripted reply (``{cite}`` becomes the first source key it was
sent, ``{fig}`` the first figure's), answers non-streamed calls (the follow-up rewrite) with ``rewrite``, and can be told to fail
(401, 429, 500, stall past the client's timeout, or refuse image parts with a 400); ``token_delay``
streams slowly.

Figure-description requests (the describing prompt's system message) are answered apart: each
gets a description holding a made-up word no document contains (``describe_word(n)``), recorded
in ``describes`` with its request; ``describe_mode`` (ok | 500 | stall) and ``describe_delay``
(seconds) make the describer fail or slow without touching answers."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

REJECT_IMAGES = "Invalid content type. image_url is only supported by certain models."


class LLMServer:
    def __init__(self):
        self.requests: list[dict] = []
        self.mode = "ok"  # ok | 401 | 429 | 500 | stall | reject_images
        self.reply = "The diagram shows the parser feeding the renderer {cite}."
        self.error_message = "scripted failure {code}"  # what a failing reply says ({code} filled in)
        self.describes: list[dict] = []  # {"body", "reply"} per description request, in arrival order
        self.describe_mode = "ok"  # ok | 500 | stall | reasoning (the description in reasoning_content, content null)
        self.describe_delay = 0.0
        self.describe_refusals: list[str] = []  # what description requests were refused with (``template``)
        self.describe_thinking = ""  # put before each description's text (a reasoning model's thinking)
        self._lock = threading.Lock()
        self.rewrite: str | None = None  # reply to non-streamed calls; None: repeat the last question
        self.token_delay = 0.0  # seconds between streamed pieces (a slow model, for stop tests)
        self.capabilities: list[str] | None = ["completion", "vision"]  # what /api/show lists
        # a reasoning model: ``pieces`` are the exact streamed content chunks (instead of ``reply``
        # cut at spaces; tags may be split across them), ``reasoning`` chunks go first in the
        # server's separate field (OpenAI-compatible: ``reasoning_content``, as vLLM's reasoning
        # parser and llama.cpp send it; Ollama: ``message.thinking``), also in non-streamed replies
        self.pieces: list[str] | None = None
        self.reasoning: list[str] = []
        # how a reply ended (OpenAI API, streamed and not): "stop", or "length" for one cut by
        # max_tokens; ``pieces == []`` with ``reasoning`` is a reply whose content never came (null),
        # all of it in the reasoning field, as vLLM's reasoning parser sends Qwen3's with thinking off
        self.finish_reason = "stop"
        self.reasoning_field = "reasoning_content"  # or "reasoning", as vLLM names it since 0.10
        # vLLM's refusals (OpenAI API only), a 400 as vLLM words it: ``image_limit`` images per
        # request at most (--limit-mm-per-prompt); ``template`` "mistral" (roles must alternate
        # user/assistant, starting with user; no empty answer) or "gemma" (alternate, no system role)
        self.image_limit: int | None = None
        self.template: str | None = None
        # context windows, prompts counted by ``prompt_tokens``: ``max_context`` (OpenAI API) refuses
        # a prompt plus max_tokens over it with vLLM's 400; Ollama runs a request with its
        # ``options.num_ctx``, else ``ollama_num_ctx`` (its default), and cuts a longer prompt from
        # its start, silently, as Ollama does (``truncated`` set in the request's record)
        self.max_context: int | None = None
        self.ollama_num_ctx = 2048
        self.show_status = 200  # /api/show's status: 500 fails it (an Ollama still starting, a proxy in front)
        self.show_parameters = ""  # /api/show "parameters" (a Modelfile's, e.g. "num_ctx 4096")
        self.context_length = 8192  # /api/show model_info "test.context_length"
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def _json(self, code: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._json(200, {"object": "list", "data": [{"id": "test-vlm", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.rstrip("/").endswith("/api/show"):
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    if server.show_status != 200:
                        return self._json(server.show_status, {"error": "scripted /api/show failure"})
                    info = {"modelfile": "", "details": {"family": "test"}, "parameters": server.show_parameters,
                            "model_info": {"test.context_length": server.context_length}}
                    if server.capabilities is not None:
                        info["capabilities"] = server.capabilities
                    return self._json(200, info)
                if server.is_describe(body):
                    refusal = server.refusal(body)
                    if refusal:
                        server.describe_refusals.append(refusal)
                        return self._json(400, {"object": "error", "message": refusal, "type": "BadRequestError",
                                                "param": None, "code": 400})
                    return self.describe(body)
                server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                        "body": body})
                ollama = self.path.startswith("/api/")
                if ollama:
                    num_ctx = (body.get("options") or {}).get("num_ctx") or server.ollama_num_ctx
                    server.requests[-1]["truncated"] = server.prompt_tokens(body) > num_ctx
                refusal = None if ollama else server.refusal(body)
                if refusal:
                    return self._json(400, {"object": "error", "message": refusal, "type": "BadRequestError",
                                            "param": None, "code": 400})
                if server.mode in ("401", "429", "500") or (server.mode == "reject_images" and server.has_images(body)):
                    code = 400 if server.mode == "reject_images" else int(server.mode)
                    msg = REJECT_IMAGES if code == 400 else server.error_message.format(code=code)
                    return self._json(code, {"error": msg} if ollama else
                                      {"error": {"message": msg, "type": "invalid_request_error", "code": code}})
                if server.mode == "stall":
                    time.sleep(5)
                thinking = "".join(server.reasoning)
                if not body.get("stream"):
                    text = server.rewrite if server.rewrite is not None else server.last_question(body)
                    message = {"role": "assistant", "content": None if server.pieces == [] else text}
                    if thinking:
                        message["thinking" if ollama else server.reasoning_field] = thinking
                    return self._json(200, {"model": body.get("model"), "created_at": "2026-01-01T00:00:00Z",
                                            "response": text, "done": True, "done_reason": "stop"} if self.path == "/api/generate" else
                                      {"model": body.get("model"), "created_at": "2026-01-01T00:00:00Z",
                                       "message": message, "done": True, "done_reason": "stop"} if ollama else
                                      {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                       "choices": [{"index": 0, "message": message,
                                                    "finish_reason": server.finish_reason}],
                                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
                fill = dict(cite=server.first_key(body), fig=server.first_key(body, figure=True))
                if server.pieces is not None:
                    pieces = [p.format(**fill) for p in server.pieces]
                else:
                    words = server.reply.format(**fill).split(" ")
                    pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
                pieces = [(True, p.format(**fill)) for p in server.reasoning] + [(False, p) for p in pieces]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson" if ollama else "text/event-stream")
                self.end_headers()
                for reasoning, piece in pieces:
                    if self.path == "/api/generate":
                        line = {"model": body["model"], "created_at": "2026-01-01T00:00:00Z", "done": False,
                                **({"response": "", "thinking": piece} if reasoning else {"response": piece})}
                    elif ollama:
                        line = {"model": body["model"], "created_at": "2026-01-01T00:00:00Z", "done": False,
                                "message": {"role": "assistant", **({"content": "", "thinking": piece} if reasoning
                                                                     else {"content": piece})}}
                    else:
                        delta = {"content": None, server.reasoning_field: piece} if reasoning else {"content": piece}
                        line = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                                "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                    self.wfile.write((json.dumps(line) + "\n").encode() if ollama else f"data: {json.dumps(line)}\n\n".encode())
                    self.wfile.flush()
                    if server.token_delay:
                        time.sleep(server.token_delay)
                if ollama:
                    end = {"model": body["model"], "created_at": "2026-01-01T00:00:00Z", "done": True,
                           "done_reason": "stop", "prompt_eval_count": 10, "eval_count": len(pieces),
                           "total_duration": 1, "load_duration": 1, "prompt_eval_duration": 1, "eval_duration": 1}
                    end.update({"response": ""} if self.path == "/api/generate" else
                               {"message": {"role": "assistant", "content": ""}})
                    self.wfile.write((json.dumps(end) + "\n").encode())
                else:
                    end = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "delta": {}, "finish_reason": server.finish_reason}]}
                    self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())

            def describe(self, body):
                with server._lock:
                    n = len(server.describes)
                    record = {"body": body, "reply": None}
                    server.describes.append(record)
                if server.describe_mode == "stall":
                    time.sleep(5)
                time.sleep(server.describe_delay)
                if server.describe_mode == "500":
                    self.send_response(500)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "scripted failure 500", "type": "test", "code": 500}}')
                    return
                text = f"A vector diagram with two boxes; it shows the {server.describe_word(n)} component."
                record["reply"] = text
                text = server.describe_thinking + text
                message = {"role": "assistant", "content": text}
                if server.describe_mode == "reasoning":
                    message = {"role": "assistant", "content": None, server.reasoning_field: text}
                out = {"id": "d", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "message": message, "finish_reason": server.finish_reason}],
                       "usage": {"prompt_tokens": 700 + n, "completion_tokens": 20, "total_tokens": 720 + n}}
                if self.path.startswith("/api/chat"):  # ollama_chat/NAME, not streamed
                    out = {"model": body["model"], "created_at": "2025-01-01T00:00:00Z", "done": True,
                           "done_reason": "stop", "message": {"role": "assistant", "content": text},
                           "prompt_eval_count": 700 + n, "eval_count": 20}
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def refusal(self, body: dict) -> str | None:
        """What vLLM would answer with a 400 for this request, if anything (see ``image_limit``
        and ``template``)."""
        asked = self.prompt_tokens(body) + int(body.get("max_tokens") or 0)
        if self.max_context is not None and asked > self.max_context:
            return (f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                    f"{asked} tokens ({self.prompt_tokens(body)} in the messages, {body.get('max_tokens') or 0} in "
                    f"the completion). Please reduce the length of the messages or completion.")
        if self.image_limit is not None and len(self.image_data(body)) > self.image_limit:
            return f"At most {self.image_limit} image(s) may be provided in one request."
        msgs = body.get("messages", [])
        if self.template == "gemma" and any(m["role"] == "system" for m in msgs):
            return "System role not supported"
        if self.template in ("gemma", "mistral"):
            roles = [m["role"] for m in msgs if m["role"] != "system"]
            if any(r != ("user", "assistant")[i % 2] for i, r in enumerate(roles)) or \
                    any(m["role"] == "system" for m in msgs[1:]):
                return "Conversation roles must alternate user/assistant/user/assistant/..."
        if self.template == "mistral" and any(m["role"] == "assistant" and not m.get("content") for m in msgs):
            return "Assistant message must have either content or tool_calls, but not both."  # mistral_common
        return None

    @classmethod
    def prompt_tokens(cls, body: dict) -> int:
        """A request's prompt tokens as this server counts them: 4 characters of text a token, one
        per 28×28 pixels of an image, 4 per message."""
        text = sum(len(t) for _, t in cls.texts(body)) // 4 + 4 * len(body.get("messages") or [1])
        pixels = 0
        for data in cls.image_data(body):
            with Image.open(io.BytesIO(data)) as im:
                pixels += im.size[0] * im.size[1]
        return text + pixels // 784

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @staticmethod
    def is_describe(body: dict) -> bool:
        if not body.get("messages"):
            return False
        first = body["messages"][0]["content"]  # the system message, or the first user turn it was folded into
        text = first if isinstance(first, str) else next((p.get("text", "") for p in first if p.get("type") == "text"), "")
        return text.startswith("You describe figures")

    @staticmethod
    def describe_word(n: int) -> str:
        """The made-up word in the n-th description (0-based): ``zorb0quux``, ``zorb1quux`` ..."""
        return f"zorb{n}quux"

    @staticmethod
    def prompt_text(body: dict) -> str:
        """All text parts of a request's last message."""
        content = body["messages"][-1]["content"]
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)

    @property
    def ollama_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def texts(body: dict) -> list[tuple[str, str]]:
        """(role, text) of every text a request carries, in order, whichever API it used."""
        if "prompt" in body:
            return [("user", body["prompt"])]
        out = []
        for m in body.get("messages", []):
            c = m.get("content")
            if isinstance(c, str):
                out.append((m["role"], c))
            elif isinstance(c, list):
                out += [(m["role"], p.get("text", "")) for p in c if p.get("type") == "text"]
        return out

    @classmethod
    def first_key(cls, body: dict, figure: bool = False) -> str:
        """The first source key in the request's last message (with ``figure``, the first figure's)."""
        text = "".join(t for _, t in cls.texts({**body, "messages": body.get("messages", [])[-1:]}))
        keys = re.findall(r'<source key="(\[[^"]+\])"', text)
        keys = [k for k in keys if " fig." in k] if figure else keys
        return keys[0] if keys else ""

    @classmethod
    def last_question(cls, body: dict) -> str:
        text = cls.texts(body)[-1][1] if cls.texts(body) else ""
        return text.rsplit("Last question:", 1)[-1].replace("Standalone question:", "").strip()

    @staticmethod
    def image_data(body: dict) -> list[bytes]:
        """The raw bytes of every image a request carries, in order (OpenAI data URLs or Ollama's
        base64 ``images`` lists)."""
        out = [base64.b64decode(b) for b in body.get("images") or []]
        for m in body.get("messages", []):
            out += [base64.b64decode(b) for b in m.get("images") or []]
            if isinstance(m.get("content"), list):
                for p in m["content"]:
                    if p.get("type") == "image_url":
                        url = p["image_url"]["url"] if isinstance(p["image_url"], dict) else p["image_url"]
                        out.append(base64.b64decode(url.split(",", 1)[1]))
        return out

    @classmethod
    def has_images(cls, body: dict) -> bool:
        return bool(cls.image_data(body))

    def answers(self) -> list[dict]:
        """The streamed (answering) requests, oldest first: not the rewrites, not /api/show."""
        return [r for r in self.requests if r["body"].get("stream")]

    def images(self, i: int = -1, body: dict | None = None) -> list[Image.Image]:
        """The images of answering request ``i`` (or of ``body``), decoded."""
        return [Image.open(io.BytesIO(b)) for b in self.image_data(body or self.answers()[i]["body"])]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
