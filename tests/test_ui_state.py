"""The web UI's server-side state: the browser-id secret is one per data folder even when servers
start at once."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path


def _secret_at(args: tuple[str, float]) -> str:
    from ui.app import _secret

    folder, start = args
    time.sleep(max(0.0, start - time.time()))
    try:
        return _secret(Path(folder))
    except Exception as exc:  # a server that fails to start counts as a disagreement
        return f"{type(exc).__name__}: {exc}"


def test_servers_starting_at_once_on_one_data_dir_share_one_secret(tmp_path):
    """Six servers starting at the same instant on a fresh data folder all use the secret that is
    in ui-secret (a server with another one could not read what the browsers stored with it), and
    none fails to start; later starts keep it."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(6) as pool:
        for trial in range(8):
            folder = tmp_path / f"data{trial}"
            start = time.time() + 0.3
            got = pool.map(_secret_at, [(str(folder), start)] * 6, chunksize=1)
            kept = (folder / "ui-secret").read_text().strip()
            assert len(kept) == 32 and got == [kept] * 6, (trial, kept, got)
            assert _secret_at((str(folder), 0.0)) == kept
            assert [p.name for p in folder.iterdir()] == ["ui-secret"]  # no temporary file left behind
