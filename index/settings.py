"""Typed settings of the index layer: the ``clip``, ``text_embedder`` and ``chroma`` sections of the
config. The app's config (``mmrag/config.py``) is built from these; their defaults are the only
defaults. Unknown keys are refused (``extra="forbid"``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

DEFAULT_EF_SEARCH = 2000
DEFAULT_EXACT_SCAN = "auto"


class Section(BaseModel):
    """A config section: unknown keys refused, values checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _int8_needs_onnx(value: str, info: ValidationInfo) -> str:
    """``precision`` int8 is an ONNX Runtime graph: with ``runtime: torch`` it is refused."""
    if value == "int8" and info.data.get("runtime") == "torch":
        raise ValueError("int8 needs runtime: onnx (runtime: torch is the fp32 reference); use fp32 or set "
                         "runtime: onnx")
    return value


class ClipSettings(Section):
    model: str = "ViT-B-32"  # open_clip model name, or the path of a JSON open_clip model config
    pretrained: str | None = "laion2b_s34b_b79k"  # pretrained tag, or the path of a local checkpoint
    device: str = "auto"  # auto (CUDA when present, else CPU), cpu, mps, cuda, cuda:N
    batch_size: int = Field(32, gt=0)
    runtime: Literal["torch", "onnx"] = "onnx"  # onnx: ONNX Runtime export of these weights; torch: fp32 reference
    # fp32: exact; int8: dynamically quantised ONNX graphs (onnx only), faster, near-ties may reorder
    precision: Literal["fp32", "int8"] = "fp32"
    _precision = field_validator("precision")(_int8_needs_onnx)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("it should be auto, cpu, mps, cuda or cuda:N")
        return value


class TextEmbedderSettings(Section):
    model: str = "all-MiniLM-L6-v2"  # sentence-transformers model name or local folder
    batch_size: int = Field(64, gt=0)
    runtime: Literal["torch", "onnx"] = "onnx"  # onnx: ONNX Runtime export; torch: sentence-transformers
    precision: Literal["fp32", "int8"] = "fp32"  # as clip.precision (int8 falls back to fp32 below the probe check)
    _precision = field_validator("precision")(_int8_needs_onnx)


class ChromaSettings(Section):
    mode: Literal["local", "server"] = "local"
    path: str | None = None  # local mode: database folder (default DATA_DIR/chroma)
    host: str = "localhost"
    port: int = Field(8000, ge=1, le=65535)
    ssl: bool = False
    headers: dict[str, str] = Field(default_factory=dict)
    ef_search: int = Field(DEFAULT_EF_SEARCH, gt=0)  # HNSW search breadth
    # auto: above ef_search items (where HNSW is approximate), local mode, search an exact scan
    # kept in memory (arrays of ~205 MB per 100k figures/pages, ~154 MB per 100k passages; the
    # process grew ~730 MB at 100k of each); off: HNSW only
    exact_scan: Literal["auto", "off"] = DEFAULT_EXACT_SCAN
