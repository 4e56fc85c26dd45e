import atexit
import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# exported ONNX models of the test session (the tiny CLIP, MiniLM): made once per run, shared by the
# CLI subprocesses, never left in the user's cache
if "MMRAG_MODEL_CACHE" not in os.environ:
    os.environ["MMRAG_MODEL_CACHE"] = tempfile.mkdtemp(prefix="mmrag-test-models-")
    atexit.register(shutil.rmtree, os.environ["MMRAG_MODEL_CACHE"], True)

from mmrag.config import DEFAULTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT.parent / "shared" / "eval-dev"
PDFS = EVAL / "pdfs"


@pytest.fixture(scope="session")
def tiny_clip_files(tmp_path_factory):
    from mmrag.devtools import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def clip(tiny_clip_files):
    from index.embedders import ClipEmbedder

    cfg, ckpt = tiny_clip_files
    return ClipEmbedder(str(cfg), str(ckpt), "cpu", 32)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_lock_taken(data_dir) -> bool:
    """Whether some process or thread holds the library's write lock (``data_dir/write.lock``)
    right now: a non-blocking try that lets go at once."""
    import fcntl

    lock_path = Path(data_dir) / "write.lock"
    if not lock_path.exists():
        return False
    with open(lock_path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@pytest.fixture(scope="module")
def llm():
    """The local LLM test server (OpenAI-compatible and Ollama), one per test module."""
    from tests.llm_server import LLMServer

    with LLMServer() as s:
        yield s


@pytest.fixture(scope="session")
def passages():
    from index.embedders import SentenceEmbedder

    return SentenceEmbedder("all-MiniLM-L6-v2", "cpu")


@pytest.fixture
def make_cfg(tmp_path, tiny_clip_files):
    """Config for a fresh data dir with the tiny CLIP checkpoint; keyword overrides per section."""

    def make(data_dir=None, **sections):
        cfg = copy.deepcopy(DEFAULTS)
        cfg["data_dir"] = str(data_dir or tmp_path / "data")
        cfg["clip"].update(model=str(tiny_clip_files[0]), pretrained=str(tiny_clip_files[1]), device="cpu")
        for section, values in sections.items():
            cfg[section].update(values)
        return cfg

    return make


@pytest.fixture
def cfg(make_cfg):
    return make_cfg()


@pytest.fixture
def app(cfg, clip, passages):
    from mmrag.wiring import build

    return build(cfg, clip=clip, passages=passages)


@pytest.fixture
def write_config(tmp_path, tiny_clip_files):
    """A config.yaml on disk (for CLI tests) using the tiny CLIP checkpoint."""
    import yaml

    def write(data_dir=None, **sections):
        body = {"data_dir": str(data_dir or tmp_path / "data"),
                "clip": {"model": str(tiny_clip_files[0]), "pretrained": str(tiny_clip_files[1]), "device": "cpu"}}
        for section, values in sections.items():
            body.setdefault(section, {}).update(values)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(body))
        return path

    return write


@pytest.fixture(scope="session")
def eval_dev(tmp_path_factory, tiny_clip_files):
    """`mmrag eval` over the whole eval-dev corpus (about ten minutes on 2 cores), run once per
    test session in a subprocess with ``--reuse``, so its index stays in ``data_dir`` for the
    other tests that need the real corpus (tests/test_eval.py scores it, tests/test_encoders.py
    checks the encoders' top-10 on it): the corpus is ingested once per session.

    Returns config (its config.yaml), data_dir, run (the --run-out file) and the finished
    process (returncode, stdout: the JSON report, stderr)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    import yaml

    root = tmp_path_factory.mktemp("eval-dev")
    body = {"data_dir": str(root / "data"),
            "clip": {"model": str(tiny_clip_files[0]), "pretrained": str(tiny_clip_files[1]), "device": "cpu"}}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(body))
    run = root / "run.jsonl"
    done = subprocess.run([sys.executable, "-m", "mmrag", "--config", str(config), "eval", "--corpus", str(EVAL),
                           "--json", "--quiet", "--reuse", "--run-out", str(run)], cwd=ROOT, capture_output=True,
                          text=True)
    return SimpleNamespace(config=config, data_dir=root / "data", run=run, process=done)


def eval_pdf(name: str) -> Path:
    path = PDFS / name
    if not path.exists():
        pytest.fail(f"the eval corpus is missing: {path} (CI copies shared/ beside the clone)")
    return path
