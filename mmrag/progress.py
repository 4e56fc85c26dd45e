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

    def described(self, done, total):
        """Figure descriptions: a bar of its own (it follows the files' bars)."""
        if not self.enabled:
            return
        from tqdm import tqdm

        if getattr(self, "_dbar", None) is None:
            if self.bar:
                self.bar.close()
                self.bar = None
            self._dbar = tqdm(total=total, desc="describing figures", unit="fig", file=sys.stderr, leave=True)
        self._dbar.total = total
        self._dbar.n = done
        self._dbar.refresh()

    def close(self):
        if self.bar:
            self.bar.close()
        if getattr(self, "_dbar", None) is not None:
            self._dbar.close()
            self._dbar = None
