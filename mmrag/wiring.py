"""The one place that builds the real embedders, store, library and assistant from config.
Tests call the same function, passing tiny real models where they want."""

from __future__ import annotations

from dataclasses import dataclass

from assistant.assistant import Assistant
from assistant.llm import LiteLLM
from assistant.retrieve import Retriever
from index.embedders import ClipEmbedder, SentenceEmbedder
from index.store import Store, make_client

from .library import Library


@dataclass
class App:
    cfg: dict
    library: Library
    assistant: Assistant

    @property
    def retriever(self) -> Retriever:
        return self.assistant.retriever


def build_clip(cfg: dict) -> ClipEmbedder:
    c = cfg["clip"]
    return ClipEmbedder(c["model"], c["pretrained"], c["device"], int(c["batch_size"]))


def build_passages(cfg: dict) -> SentenceEmbedder:
    t = cfg["text_embedder"]
    return SentenceEmbedder(t["model"], cfg["clip"]["device"], int(t["batch_size"]))


def build(cfg: dict, clip=None, passages=None, client=None, llm=None, check: bool = True) -> App:
    clip = clip or build_clip(cfg)
    passages = passages or build_passages(cfg)
    store = Store(client or make_client(cfg), clip.identity, passages.identity, check=check,
                  ef_search=int(cfg["chroma"]["ef_search"]))
    library = Library(cfg, store, clip, passages)
    retriever = Retriever(store, clip, passages, cfg, cfg["data_dir"])
    assistant = Assistant(retriever, llm or LiteLLM(cfg["llm"]), cfg)
    return App(cfg, library, assistant)
