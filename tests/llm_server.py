"""A small OpenAI-compatible chat server for tests: records each request, streams a scripted reply,
and can be told to fail (401, 429, 500, or to stall past the client's timeout).

Figure-description requests (the describing prompt's system message) are answered apart: each
gets a description holding a made-up word no document contains (``describe_word(n)``), recorded
in ``describes`` with its request; ``describe_mode`` (ok | 500 | stall) and ``describe_delay``
(seconds) make the describer fail or slow without touching answers."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


class LLMServer:
    def __init__(self):
        self.requests: list[dict] = []
        self.mode = "ok"  # ok | 401 | 429 | 500 | stall
        self.reply = "The diagram shows the parser feeding the renderer {cite}."
        self.error_message = "scripted failure {code}"  # what a failing reply says ({code} filled in)
        self.describes: list[dict] = []  # {"body", "reply"} per description request, in arrival order
        self.describe_mode = "ok"  # ok | 500 | stall
        self.describe_delay = 0.0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if server.is_describe(body):
                    return self.describe(body)
                server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                        "body": body})
                if server.mode in ("401", "429", "500"):
                    code = int(server.mode)
                    err = json.dumps({"error": {"message": server.error_message.format(code=code), "type": "test",
                                                 "code": code}})
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(err.encode())
                    return
                if server.mode == "stall":
                    time.sleep(5)
                text = server.reply.format(cite=server.first_key(body))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                words = text.split(" ")
                for i, w in enumerate(words):
                    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "delta": {"content": w + (" " if i < len(words) - 1 else "")},
                                          "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                end = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
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
                out = {"id": "d", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 700 + n, "completion_tokens": 20, "total_tokens": 720 + n}}
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @staticmethod
    def is_describe(body: dict) -> bool:
        first = body["messages"][0]
        return first["role"] == "system" and str(first["content"]).startswith("You describe figures")

    @staticmethod
    def describe_word(n: int) -> str:
        """The made-up word in the n-th description (0-based): ``zorb0quux``, ``zorb1quux`` ..."""
        return f"zorb{n}quux"

    @staticmethod
    def prompt_text(body: dict) -> str:
        """All text parts of a request's last message."""
        content = body["messages"][-1]["content"]
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)

    @staticmethod
    def first_key(body: dict) -> str:
        text = "".join(p.get("text", "") for m in body["messages"] if isinstance(m["content"], list)
                       for p in m["content"] if p.get("type") == "text")
        start = text.find('key="[')
        return text[start + 5:text.find('"', start + 5)] if start >= 0 else ""

    def images(self, i: int = -1, body: dict | None = None) -> list[Image.Image]:
        """The images of request ``i`` (or of ``body``), decoded from their data URLs."""
        out = []
        for m in (body or self.requests[i]["body"])["messages"]:
            if isinstance(m["content"], list):
                for p in m["content"]:
                    if p.get("type") == "image_url":
                        b64 = p["image_url"]["url"].split(",", 1)[1]
                        out.append(Image.open(io.BytesIO(base64.b64decode(b64))))
        return out

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
