"""The one place that builds the real embedders, store, library and assistant from config.
Tests call the same function, passing tiny real models where they want. Building loads no
model: each loads on its first use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from assistant.assistant import Assistant
from assistant.llm import LiteLLM
from assistant.retrieve import Retriever
from index.embedders import ClipEmbedder, SentenceEmbedder
from index.keyword import KeywordIndex
from index.settings import ClipSettings, TextEmbedderSettings
from index.store import Store, make_client

from .config import validate_config
from .describing import Describing
from .library import Library


@dataclass
class App:
    cfg: dict
    library: Library
    assistant: Assistant
    describing: Describing

    @property
    def retriever(self) -> Retriever:
        return self.assistant.retriever


def build_clip(c: ClipSettings) -> ClipEmbedder:
    return ClipEmbedder(c.model, c.pretrained, c.device, c.batch_size, c.runtime, precision=c.precision)


def build_passages(t: TextEmbedderSettings, device: str = "auto") -> SentenceEmbedder:
    return SentenceEmbedder(t.model, device, t.batch_size, t.runtime, precision=t.precision)


def build(cfg: dict, clip=None, passages=None, client=None, llm=None, check: bool = True,
          one_shot: bool = False) -> App:
    """The app from a config mapping (checked again here: ConfigError on a bad value). ``clip``,
    ``passages``, ``client`` and ``llm`` replace the configured ones (tests pass tiny real models).
    ``one_shot``: the process answers one question and exits (``mmrag search``/``ask``): it never
    reads an exact scan (``Store(read_scans=False)``)."""
    typed = validate_config(cfg)
    clip = clip or build_clip(typed.clip)
    passages = passages or build_passages(typed.text_embedder, typed.clip.device)
    # the identities are asked for on the first vector query or write: listing and removing
    # documents never compute them (no checkpoint hash, no weights needed)
    store = Store(client or make_client(typed.chroma, typed.data_dir), lambda: clip.identity,
                  lambda: passages.identity, check=check, ef_search=typed.chroma.ef_search,
                  generation=Path(typed.data_dir) / "generation", exact_scan=typed.chroma.exact_scan,
                  read_scans=not one_shot)
    keyword = KeywordIndex(Path(typed.data_dir) / "keyword")  # local even when Chroma is a server
    library = Library(cfg, store, clip, passages, keyword)
    library.describing = describing = Describing(cfg, library)
    retriever = Retriever(store, clip, passages, cfg, cfg["data_dir"], keyword, library.sync_keyword)
    assistant = Assistant(retriever, llm or LiteLLM(cfg["llm"]), cfg, after_answer=describing.after_answer)
    return App(cfg, library, assistant, describing)
