"""Configuration: typed, validated sections (pydantic), overlaid by a YAML file, overlaid by
environment variables.

The models below are the one source of defaults; ``DEFAULTS`` is derived from them. The
repository's ``config.yaml`` documents every key; ``tests/test_cli.py`` checks that it equals
DEFAULTS so the two cannot drift apart. A wrong file stops with one line naming the key, the
value and what is allowed (``ConfigError``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from index.settings import ChromaSettings, ClipSettings, Section, TextEmbedderSettings

from .errors import ConfigError


class IngestSettings(Section):
    chunk_size: int = Field(1000, gt=0)  # characters
    chunk_overlap: int = Field(150, ge=0)  # characters
    figure_dpi: int = Field(144, gt=0)
    page_dpi: int = Field(72, gt=0)
    ocr: Literal["auto", "never"] = "auto"
    ocr_figures: bool = True
    min_figure_side: float = Field(36, ge=0)  # points
    max_file_mb: float = Field(200, gt=0)
    file_timeout_s: float = Field(3600, ge=0)
    file_memory_mb: float = Field(2048, gt=0)  # resident memory of one extraction worker
    workers: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"  # extraction processes; auto: one per core

    @model_validator(mode="after")
    def _overlap_below_size(self):
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_size "
                             f"({self.chunk_size})")
        return self


class Weights(Section):
    clip: float = Field(1.0, ge=0)
    text: float = Field(1.0, ge=0)
    keyword: float = Field(1.0, ge=0)
    history: float = Field(1.0, ge=0)  # figures cited earlier in the conversation (follow-ups)


class RetrievalSettings(Section):
    k: int = Field(10, gt=0)
    candidates: int = Field(50, gt=0)
    fusion: Literal["score", "rrf"] = "score"
    rrf_k: float = Field(60, ge=0)
    weights: Weights = Field(default_factory=Weights)
    labels: list[str] = Field(default_factory=lambda: [
        "chart", "diagram", "photo", "screenshot", "table", "equation", "map", "drawing"])


class LLMSettings(Section):
    model: str | None = None
    api_base: str | None = None
    api_key_env: str | None = None
    vision: Literal["auto", True, False] = "auto"
    temperature: float = Field(0.2, ge=0)
    max_tokens: int = Field(1024, gt=0)
    timeout_s: float = Field(60, gt=0)
    max_images: int = Field(4, ge=0)
    image_max_side: int = Field(1024, gt=0)
    max_passages: int = Field(6, ge=0)
    history_tokens: int = Field(3000, ge=0)
    context_tokens: int | None = Field(None, ge=512)  # the model's context window; null: asked or learnt


class DescribeSettings(Section):
    """Figure descriptions by a vision model (see README "Figure descriptions")."""

    # ingest: every figure as it is ingested; on_demand: the top figure hits of a question, after
    # the answer; off: never (``mmrag describe`` still works). Nothing happens without a model.
    mode: Literal["ingest", "on_demand", "off"] = "on_demand"
    model: str | None = None  # default: llm.model (and then llm.api_base, llm.api_key_env)
    api_base: str | None = None  # used only when describe.model is set
    api_key_env: str | None = None  # used only when describe.model is set
    max_per_file: int = Field(200, ge=0)  # ingest mode: figures described per file at most
    concurrency: int = Field(4, gt=0)  # describing calls in flight at once
    timeout_s: float = Field(60, gt=0)  # per call; a call that takes longer is given up (retried later)
    on_demand_figures: int = Field(3, ge=0)  # on_demand: top figure hits described after an answer
    image_max_side: int = Field(1024, gt=0)  # pixels; the figure is scaled down before sending
    max_tokens: int = Field(400, gt=0)  # length limit of one description


class UISettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=0, le=65535)
    share: bool = False
    username_env: str | None = "MMRAG_USERNAME"
    password_env: str | None = "MMRAG_PASSWORD"
    api_token_env: str | None = "MMRAG_API_TOKEN"
    max_upload_mb: float = Field(200, gt=0)


class Config(Section):
    data_dir: str = "~/.local/share/mmrag"
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    clip: ClipSettings = Field(default_factory=ClipSettings)
    text_embedder: TextEmbedderSettings = Field(default_factory=TextEmbedderSettings)
    chroma: ChromaSettings = Field(default_factory=ChromaSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    describe: DescribeSettings = Field(default_factory=DescribeSettings)
    ui: UISettings = Field(default_factory=UISettings)


DEFAULTS: dict[str, Any] = Config().model_dump()


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The settings class found by following ``loc`` (field names) down from Config."""
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def describe(err: ValidationError) -> str:
    """One line for the first problem in a validation error: the key, the value, what is allowed."""
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if isinstance(p, str))
    key = ".".join(loc)
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    if e["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = f" (known: {', '.join(parent.model_fields)})" if parent else ""
        return f"unknown config key '{key}'{known}{more}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "model_type" or (e["type"] == "dict_type" and _model_at(loc)):
        return f"config key '{key or '(top level)'}' must be a mapping, not {e['input']!r}{more}"
    allowed = msg.replace("Input should be", "it should be", 1)
    if isinstance(e.get("input"), dict) or "input" not in e:
        return f"config key '{key}': {allowed}{more}"
    return f"config key '{key}' = {e['input']!r} is not allowed: {allowed}{more}"


def validate_config(data: dict) -> Config:
    """A typed Config from a (partial) mapping; ConfigError with one line when something is wrong."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


def load_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Defaults < YAML file (``path`` or $MMRAG_CONFIG) < $MMRAG_DATA_DIR. Returns the validated
    config as plain data (``Config.model_dump()``), ``data_dir`` made absolute (relative paths are
    relative to the config file)."""
    path = path or os.environ.get("MMRAG_CONFIG")
    data: dict = {}
    base = Path.cwd()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        base = p.resolve().parent
        try:
            cfg = Config.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{p}: {describe(exc)}") from None
    else:
        cfg = Config()
    if os.environ.get("MMRAG_DATA_DIR"):
        cfg.data_dir = os.environ["MMRAG_DATA_DIR"]
    data_dir = Path(os.path.expanduser(cfg.data_dir))
    cfg.data_dir = str(data_dir if data_dir.is_absolute() else base / data_dir)
    return cfg.model_dump()
