"""One HTTP server for the chat UI and the HTTP API: a FastAPI app holding the API routes
(``ui.api``: OpenAI-compatible ``/v1/...`` and JSON ``/api/...``) with the Gradio Blocks mounted
at ``/`` (``gr.mount_gradio_app``), served by uvicorn. Gradio's own login page guards the UI;
the API routes check the same credentials (HTTP Basic) or a bearer token themselves."""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from pathlib import Path

import gradio as gr
import uvicorn
from fastapi import FastAPI

from .api import api_auth, api_router, install_errors
from .app import auth_from_env, build_ui

log = logging.getLogger(__name__)


def create_app(app, demo: gr.Blocks | None = None) -> FastAPI:
    """The FastAPI app: API routes first, then the Gradio UI (``build_ui(app)`` unless ``demo``
    is given) mounted at ``/``, with the login from the environment (``ui.username_env`` /
    ``ui.password_env``) on both."""
    cfg = app.cfg
    server = FastAPI(title="mmrag", docs_url=None, redoc_url=None, openapi_url=None)
    auth = api_auth(cfg)
    server.include_router(api_router(app, auth))
    install_errors(server)
    demo = demo or build_ui(app)
    demo.queue(default_concurrency_limit=8)
    gr.mount_gradio_app(
        server, demo, path="/", server_name=cfg["ui"]["host"], server_port=int(cfg["ui"]["port"]),
        auth=ui_login(cfg, auth), max_file_size=f"{int(cfg['ui']['max_upload_mb'])}mb",
        allowed_paths=[str(Path(cfg["data_dir"]) / "images")], footer_links=["api"], ssr_mode=False)
    if auth is not None:
        auth.session = _ui_session(server)
    return server


def ui_login(cfg: dict, auth):
    """The web UI's login: the configured user and password; with only an API token set, any
    user name with the token as password (the UI is never open while the API is closed);
    None when neither is set."""
    login = auth_from_env(cfg)
    if login or auth is None or not auth.token:
        return login
    token = auth.token
    return lambda _user, password: hmac.compare_digest(password.encode(), token.encode())


def _ui_session(server: FastAPI):
    """A check that a request carries the mounted Gradio app's login cookie (a browser signed in
    to the UI), read from Gradio's own token table."""
    from starlette.routing import Mount

    mounted = [r.app for r in server.routes if isinstance(r, Mount) and hasattr(r.app, "tokens")]

    def signed_in(request) -> bool:
        for ui in mounted:
            cookie_id = getattr(ui, "cookie_id", "")
            token = request.cookies.get(f"access-token-{cookie_id}") or \
                request.cookies.get(f"access-token-unsecure-{cookie_id}")
            if token and ui.tokens.get(token):
                return True
        return False

    return signed_in


class Running:
    """A server started in a background thread (``launch(..., prevent_thread_lock=True)``)."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, url: str):
        self.server, self.thread, self.url = server, thread, url

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _uvicorn(app, quiet: bool) -> uvicorn.Server:
    cfg = app.cfg
    config = uvicorn.Config(create_app(app), host=cfg["ui"]["host"], port=int(cfg["ui"]["port"]),
                            log_level="warning" if quiet else "info", access_log=False,
                            timeout_graceful_shutdown=2, ws="none")
    return uvicorn.Server(config)


def _share(app, url: str) -> None:
    """``ui.share``: a public link through Gradio's tunnel (needs the internet); failing, say why."""
    from gradio import networking

    try:
        link = networking.setup_tunnel(app.cfg["ui"]["host"], int(app.cfg["ui"]["port"]), secrets.token_urlsafe(32),
                                       None, None)
        print(f"public link (ui.share): {link}", flush=True)
    except Exception as exc:  # no internet, tunnel service down: the local server still runs
        log.warning("ui.share: could not open a public link (%s); serving on %s only", exc, url)


def launch(app, prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve the UI and the API on ``ui.host``:``ui.port``. With ``prevent_thread_lock`` the
    server runs in a background thread and ``(Running, url)`` comes back once it accepts
    connections (``Running.close()`` stops it); otherwise this blocks until Ctrl-C."""
    cfg = app.cfg
    server = _uvicorn(app, quiet)
    host = cfg["ui"]["host"]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{cfg['ui']['port']}/"
    if not prevent_thread_lock:
        if not quiet:
            print(f"mmrag: chat UI and API on {url} (OpenAI-compatible API at {url}v1)", flush=True)
        if cfg["ui"]["share"]:
            threading.Timer(2.0, _share, (app, url)).start()
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn raises the stop signal (Ctrl-C, SIGTERM) again once shut down
            pass
        return None, url
    thread = threading.Thread(target=server.run, name="mmrag-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise OSError(f"the server did not start on {host}:{cfg['ui']['port']} (port in use?)")
        time.sleep(0.05)
    if cfg["ui"]["share"]:
        _share(app, url)
    return Running(server, thread, url), url


def serve(cfg: dict) -> None:
    from mmrag.wiring import build

    app = build(cfg)
    app.library.store.read_scans_now(wait=False)  # a large library's exact scans, read before the first question
    launch(app)
