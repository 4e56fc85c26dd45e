"""Progress bars for the command line (``mmrag ingest``, ``mmrag eval``)."""

from __future__ import annotations

import sys


class BarProgress:
    """tqdm bars (files, pages) on stderr; silent when not ``enabled`` (no terminal, --quiet)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def file(self, name, index, total, pages):
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar:
            self.bar.close()
        self.bar = tqdm(total=pages, desc=f"[{index + 1}/{total}] {name}", unit="page", file=sys.stderr, leave=True)

    def page(self, done):
        if self.bar:
            self.bar.n = done
            self.bar.refresh()

    def close(self):
        if self.bar:
            self.bar.close()
