"""Configuration: built-in defaults, overlaid by a YAML file, overlaid by environment variables.

The repository's ``config.yaml`` documents every key; ``tests/test_config.py`` checks that it
matches DEFAULTS so the two cannot drift apart.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "data_dir": "~/.local/share/mmrag",
    "ingest": {
        "chunk_size": 1000,
        "chunk_overlap": 150,
        "figure_dpi": 144,
        "page_dpi": 72,
        "ocr": "auto",
        "ocr_figures": True,
        "min_figure_side": 36,
        "max_file_mb": 200,
        "file_timeout_s": 3600,
    },
    "clip": {
        "model": "ViT-B-32",
        "pretrained": "laion2b_s34b_b79k",
        "device": "auto",
        "batch_size": 32,
    },
    "text_embedder": {
        "model": "all-MiniLM-L6-v2",
        "batch_size": 64,
    },
    "chroma": {
        "mode": "local",
        "path": None,
        "host": "localhost",
        "port": 8000,
        "ssl": False,
        "headers": {},
        "ef_search": 2000,
    },
    "retrieval": {
        "k": 10,
        "candidates": 50,
        "fusion": "score",
        "rrf_k": 60,
        "weights": {"clip": 1.0, "text": 1.0, "keyword": 1.0},
        "labels": ["chart", "diagram", "photo", "screenshot", "table", "equation", "map", "drawing"],
    },
    "llm": {
        "model": None,
        "api_base": None,
        "api_key_env": None,
        "vision": "auto",
        "temperature": 0.2,
        "max_tokens": 1024,
        "timeout_s": 60,
        "max_images": 4,
        "image_max_side": 1024,
        "max_passages": 6,
        "history_tokens": 3000,
    },
    "ui": {
        "host": "127.0.0.1",
        "port": 7860,
        "share": False,
        "username_env": "MMRAG_USERNAME",
        "password_env": "MMRAG_PASSWORD",
        "max_upload_mb": 200,
    },
}


def _merge(base: dict, over: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{where}' (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict) and key not in ("headers", "weights"):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}' must be a mapping")
            out[key] = _merge(base[key], value, where + ".")
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Defaults < YAML file (``path`` or $MMRAG_CONFIG) < $MMRAG_DATA_DIR."""
    path = path or os.environ.get("MMRAG_CONFIG")
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        cfg = _merge(cfg, data)
        cfg["_config_dir"] = str(p.resolve().parent)
    if os.environ.get("MMRAG_DATA_DIR"):
        cfg["data_dir"] = os.environ["MMRAG_DATA_DIR"]
    base = Path(cfg.pop("_config_dir", Path.cwd()))
    data_dir = Path(os.path.expanduser(cfg["data_dir"]))
    cfg["data_dir"] = str(data_dir if data_dir.is_absolute() else base / data_dir)
    return cfg
