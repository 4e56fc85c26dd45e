"""ONNX Runtime serving for the encoders (``clip.runtime`` / ``text_embedder.runtime: onnx``).

A tower is exported with ``torch.onnx.export`` from the very weights the torch path loads, once,
into a cache folder named by a key that holds the weights' hash and the export options
(:func:`cache_root`, :func:`cached_build`): a changed checkpoint gets a new folder, an unreadable
folder is rebuilt, and a folder appears only complete (built under a temporary name, then
renamed). Each graph is checked against the torch model on a fixed probe set (texts,
figure-like images: :func:`probe_images`) and the cosines written to the folder's ``meta.json``.

Every tower serves fp32 by default. ``precision: int8`` (``clip.precision``,
``text_embedder.precision``; opt-in) adds an int8 dynamically quantised copy of each fp32 graph
(:func:`int8_graph`) in a folder of its own, named by the fp32 folder's key plus ``-int8``: the
fp32 graphs are shared (switching precision back and forth exports nothing again, and never serves
the other precision's graph). Its ``meta.json`` records, per graph, which file serves and the
probe cosine of the int8 vectors to the fp32 graph's: a graph whose int8 copy falls below
:data:`MIN_COSINE` on any probe serves fp32 (the embedder logs a warning saying so on every load).

What int8 trades: the image tower ran 52.8 vs 20.4 img/s (model only, batch 32, 2 cores), the
CLIP text tower ~2.5× faster; it kept cosine ≥ 0.999 on the probes and still changed the top 10
of near-tied items: on the tests' random-weight CLIP (10th and 11th scores ~4e-4 apart) the image
tower's int8 vectors moved figures in or out of the top 10 for 25 of the 48 eval-dev questions,
the text tower's reordered near-ties for 15 (one across rank 10);
MiniLM's int8 cosine was 0.977, so the passage model always falls back to fp32
(docs/BENCHMARKS.md). That is why fp32 is the default and int8 is the user's informed choice.

Only ``index/embedders.py`` uses this module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EXPORT_VERSION = 4  # in meta.json: a folder exported by other code is rebuilt; raise it when the graphs change
MIN_COSINE = 0.99  # int8 is kept only when every probe vector is at least this close to fp32
OPSET = 18

PROBE_TEXTS = [
    "horizontal bar chart comparing the sizes of the planets from Mercury to Neptune",
    "four-petal rose curve r = cos(2θ) filled in beige on a circular polar grid",
    "Figure 3: Block diagram of the amplifier with feedback network",
    "Table 2. Results on the validation set (accuracy, %)",
    "What does the schematic of the voltage divider show?",
    "How do I set the axis labels of a 3D surface plot?",
    "screenshot of the preferences dialog with the Units tab selected",
    "scanned page with a handwritten table of measurements",
    "Fig. 7 Scatter plot of residuals against fitted values, with a lowess line",
    "a photo of the circuit board, top view",
    "Which command draws the arrow between two boxes in the flowchart?",
    "contour map of the pressure field, isobars every 4 hPa",
    "The default line width is 0.8 points; use `set linewidth` to change it for every curve that "
    "follows. Markers are drawn at each data point unless `nomarker` is given.",
    "Equation (12): the energy of the system is the sum of the kinetic and potential terms, "
    "E = ½mv² + mgh, where h is measured from the reference level.",
    "In this chapter we describe how to install the package on Linux, macOS and Windows, how to "
    "configure the search paths, and how to run the first example from the command line. " * 6,
    "x",
]


def probe_images() -> list:
    """Eight figure-like RGB images drawn with PIL (bar chart, line plot, table, diagram, scanned
    text, photo-like noise, a thin banner and a tall strip): deterministic."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(7)
    out = []
    img = Image.new("RGB", (480, 320), "white")  # bar chart
    d = ImageDraw.Draw(img)
    for i, h in enumerate([120, 200, 90, 260, 170]):
        d.rectangle([40 + i * 85, 300 - h, 100 + i * 85, 300], fill=(230, 180, 40), outline="black")
        d.text((50 + i * 85, 305), f"Q{i + 1}", fill="black")
    d.line([30, 300, 470, 300], fill="black", width=2)
    out.append(img)
    img = Image.new("RGB", (400, 300), "white")  # line plot
    d = ImageDraw.Draw(img)
    xs = np.linspace(0, 6.28, 100)
    d.line([(20 + 360 * x / 6.28, 150 - 100 * np.sin(x)) for x in xs], fill=(20, 60, 200), width=3)
    d.line([(20 + 360 * x / 6.28, 150 - 60 * np.cos(2 * x)) for x in xs], fill=(200, 30, 30), width=2)
    d.text((30, 20), "sin(x), cos(2x)", fill="black")
    out.append(img)
    img = Image.new("RGB", (500, 260), "white")  # table
    d = ImageDraw.Draw(img)
    for r in range(6):
        for c in range(4):
            d.rectangle([10 + c * 120, 10 + r * 40, 130 + c * 120, 50 + r * 40], outline="black")
            d.text((20 + c * 120, 22 + r * 40), f"{r * 4 + c:.2f}" if r else f"col {c}", fill="black")
    out.append(img)
    img = Image.new("RGB", (420, 300), (250, 250, 245))  # block diagram
    d = ImageDraw.Draw(img)
    for x, y, t in [(20, 120, "input"), (160, 40, "filter"), (160, 200, "gain"), (300, 120, "output")]:
        d.rounded_rectangle([x, y, x + 100, y + 50], 8, outline=(0, 0, 120), width=2, fill=(220, 230, 255))
        d.text((x + 20, y + 18), t, fill="black")
    d.line([120, 145, 160, 65], fill="black", width=2)
    d.line([120, 145, 160, 225], fill="black", width=2)
    d.line([260, 65, 300, 145], fill="black", width=2)
    out.append(img)
    img = Image.new("L", (360, 480), 235)  # scanned text
    d = ImageDraw.Draw(img)
    for line in range(24):
        d.text((20, 15 + line * 19), "lorem ipsum dolor sit amet " * 2, fill=30)
    out.append(img.filter(ImageFilter.GaussianBlur(0.8)).convert("RGB"))
    base = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)  # photo-like: smooth colour fields
    out.append(Image.fromarray(base).resize((320, 240), Image.BICUBIC).filter(ImageFilter.GaussianBlur(3)))
    img = Image.new("RGB", (900, 60), "white")  # thin banner
    ImageDraw.Draw(img).text((10, 20), "Chapter 4 - Plotting functions and data", fill="black")
    out.append(img)
    img = Image.new("RGB", (80, 600), (30, 30, 30))  # tall strip
    ImageDraw.Draw(img).line([40, 0, 40, 600], fill=(255, 200, 0), width=6)
    out.append(img)
    return out


def cache_root() -> Path:
    """Where exported models live: ``$MMRAG_MODEL_CACHE``, else ``$XDG_CACHE_HOME/mmrag/onnx``
    (``~/.cache/mmrag/onnx``). One cache serves every library on the machine: entries are keyed by
    the weights' hash, so nothing is exported twice and nothing stale is reused."""
    if os.environ.get("MMRAG_MODEL_CACHE"):
        return Path(os.environ["MMRAG_MODEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmrag" / "onnx"


def read_meta(folder: Path) -> dict | None:
    """The folder's ``meta.json`` when it and every file it names are there; else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("export_version") != EXPORT_VERSION:
            return None
        if all((folder / f).is_file() and (folder / f).stat().st_size > 0 for f in meta.get("files", [])):
            return meta
    except (OSError, ValueError, AttributeError):
        pass
    return None


def cached_build(root: Path, key: str, build: Callable[[Path], dict], rebuild: bool = False) -> tuple[Path, dict]:
    """``root/key`` and its meta, building it first when absent, incomplete or ``rebuild``.

    ``build(folder)`` writes the model files into an empty temporary folder and returns the meta
    (with ``files``: the names it wrote); the folder is renamed into place only once complete, so
    a crash mid-export leaves no half cache. The folder's name ends in ``-v`` and
    :data:`EXPORT_VERSION`, so installs of two versions sharing a cache keep a folder each
    instead of rebuilding each other's. Raises whatever ``build`` raises, or OSError."""
    key = f"{key}-v{EXPORT_VERSION}"
    final = root / key
    meta = None if rebuild else read_meta(final)
    if meta is not None:
        return final, meta
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = dict(build(tmp), export_version=EXPORT_VERSION)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # corrupt or being replaced: move it aside first (rename is atomic)
            old = root / f".{key}.old-{uuid.uuid4().hex[:8]}"
            try:
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            except FileNotFoundError:
                pass
        try:
            tmp.rename(final)
        except OSError:  # another process renamed its complete copy in first: use that one
            if read_meta(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            meta = read_meta(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final, meta


def threads() -> int:
    """Intra-op threads: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def session(path: Path, cuda: bool = False, intra_threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` with every graph optimisation on, ``intra_threads``
    intra-op threads (default: one per usable core), on CUDA when asked and available (CPU
    otherwise).

    Sessions for one question's text use one thread: a ~15-token input is hundreds of small ops,
    and each parallel region waits for every thread, so on 2 cores shared with ingest workers or
    another request 2 threads were slower (CLIP text 41 vs 35 ms, MiniLM 19 vs 9 ms p50 under
    load); it also leaves a core to the other encoder, which the retriever runs at the same time.

    The loaded weights then move to 2 MB pages on a background thread (``index/hugepages.py``):
    a question streams all of a text tower's weights, and the CLIP text tower took 22.1 instead
    of 24.0 ms p50 on them (identical vectors)."""
    import onnxruntime as ort

    from . import hugepages

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = intra_threads or threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    made = ort.InferenceSession(str(path), so, providers=providers)
    hugepages.collapse_in_background()
    return made


def export(module, args: tuple, path: Path, input_names: list[str], dynamic_shapes: dict) -> None:
    """``torch.onnx.export`` (the dynamo exporter: it keeps sequence lengths symbolic, which the
    TorchScript one does not through ``nn.MultiheadAttention``), weights inside the one file."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(module, args, str(path), dynamo=True, external_data=False, input_names=input_names,
                          output_names=["vectors"], dynamic_shapes=dynamic_shapes, opset_version=OPSET,
                          verbose=False)


def quantize(src: Path, dst: Path) -> None:
    """int8 dynamic quantisation of the weights of MatMul/Gemm (activations quantised per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("root").setLevel(logging.ERROR)  # "consider pre-processing" advice, not an error
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"])


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest row-wise cosine similarity of two (n, d) arrays.

    >>> round(min_cosine(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[2.0, 0.0], [1.0, 1.0]])), 4)
    0.7071
    """
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(1).min())


def check_fp32_export(folder: Path, run: Callable[[Path], np.ndarray], reference: np.ndarray,
                     fp32: str = "model.onnx") -> dict:
    """Check the exported fp32 graph ``folder/fp32`` against the torch ``reference`` vectors (they
    must agree to 1e-4: anything less is an export bug, raised as RuntimeError). Returns the meta
    entries: ``file`` (the graph that serves), ``files``, ``fp32_min_cosine``. An int8 copy is made
    separately, only when asked for (:func:`int8_graph`)."""
    got = run(folder / fp32)
    fp32_cos = min_cosine(got, reference)
    if fp32_cos < 1 - 1e-4:
        raise RuntimeError(f"the exported graph does not reproduce the torch model (cosine {fp32_cos:.5f})")
    return {"file": fp32, "files": [fp32], "fp32_min_cosine": round(fp32_cos, 6)}


def int8_graph(src: Path, out: Path, name: str, run: Callable[[Path], np.ndarray]) -> dict:
    """Quantise the fp32 graph ``src`` to int8 as ``out/name`` (:func:`quantize`) and keep it when
    ``run`` on it gives probe vectors with cosine ≥ :data:`MIN_COSINE` to ``run`` on ``src`` for
    every probe (``run(path)``: the probe set's (n, d) vectors through the graph at ``path``).

    Returns the meta entry: ``serves`` (``"int8"`` or ``"fp32"``), ``file`` (``name``, or None
    when fp32 serves), ``files``, ``int8_min_cosine`` (None when quantisation failed) and ``why``
    (None, or the reason fp32 serves, in words). Never raises for a graph that cannot be
    quantised: fp32 then serves."""
    reference = run(src)
    try:
        quantize(src, out / name)
        cos = min_cosine(run(out / name), reference)
    except Exception as exc:  # quantisation is an optimisation: fp32 serves when it fails
        (out / name).unlink(missing_ok=True)
        return {"serves": "fp32", "file": None, "files": [], "int8_min_cosine": None,
                "why": f"int8 quantisation failed ({type(exc).__name__}: {str(exc)[:200]})"}
    if cos >= MIN_COSINE:
        return {"serves": "int8", "file": name, "files": [name], "int8_min_cosine": round(cos, 6), "why": None}
    (out / name).unlink()
    return {"serves": "fp32", "file": None, "files": [], "int8_min_cosine": round(cos, 6),
            "why": f"the int8 graph's cosine to fp32 is {cos:.4f} < {MIN_COSINE} on the probe set"}
