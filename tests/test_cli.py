"""The scriptable interface: real `mmrag` invocations, their JSON, exit codes and config sources."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from mmrag.config import DEFAULTS, load_config
from mmrag.errors import ConfigError
from tests import pdfgen
from tests.conftest import ROOT, eval_pdf


def mmrag(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mmrag", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


def test_config_yaml_documents_exactly_the_defaults():
    assert yaml.safe_load((ROOT / "config.yaml").read_text()) == DEFAULTS


def test_unknown_config_key_is_a_clear_error(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("ingest:\n  chunk_sise: 10\n")
    with pytest.raises(ConfigError, match="unknown config key 'ingest.chunk_sise'"):
        load_config(bad)


@pytest.mark.parametrize("body, says", [
    ("retrieval:\n  fusion: rff\n", "retrieval.fusion' = 'rff' is not allowed: it should be 'score' or 'rrf'"),
    ("ingest:\n  chunk_size: lots\n", "ingest.chunk_size' = 'lots' is not allowed: it should be a valid integer"),
    ("ingest:\n  chunk_size: 0\n", "ingest.chunk_size' = 0 is not allowed: it should be greater than 0"),
    ("retrieval:\n  fusoin: rrf\n", "unknown config key 'retrieval.fusoin' (known: k, candidates, fusion,"),
    ("llm: gpt-4o\n", "config key 'llm' must be a mapping, not 'gpt-4o'"),
    ("clip:\n  precision: int8\n  runtime: torch\n",
     "clip.precision' = 'int8' is not allowed: int8 needs runtime: onnx (runtime: torch is the fp32 reference)"),
    ("text_embedder:\n  precision: fp16\n", "text_embedder.precision' = 'fp16' is not allowed: it should be 'fp32' or 'int8'"),
    ("chroma:\n  exact_scan: always\n", "chroma.exact_scan' = 'always' is not allowed: it should be 'auto' or 'off'"),
])
def test_a_bad_config_stops_every_command_with_one_line(tmp_path, body, says):
    bad = tmp_path / "c.yaml"
    bad.write_text(f"data_dir: {tmp_path / 'd'}\n" + body)
    out = mmrag("--config", bad, "list")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and says in out.stderr and str(bad) in out.stderr
    assert not (tmp_path / "d").exists()  # stopped before touching the library


def test_config_from_env_and_data_dir_override(tmp_path, monkeypatch):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data_dir: relative/data\n")
    monkeypatch.setenv("MMRAG_CONFIG", str(cfg_file))
    assert load_config()["data_dir"] == str(tmp_path / "relative" / "data")  # relative to the config file
    monkeypatch.setenv("MMRAG_DATA_DIR", str(tmp_path / "elsewhere"))
    assert load_config()["data_dir"] == str(tmp_path / "elsewhere")


def test_ingest_list_remove_json_and_exit_codes(write_config, tmp_path):
    config = write_config()
    good = pdfgen.figure_doc(tmp_path / "good.pdf", pages=2)
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n\x00\x01 not really")
    out = mmrag("--config", config, "ingest", "--quiet", good, tmp_path / "broken.pdf")
    assert out.returncode == 1  # something failed
    assert "skipping broken.pdf: corrupt PDF" in out.stderr
    assert "good.pdf: added, 2 pages" in out.stdout
    listed = json.loads(mmrag("--config", config, "list", "--json").stdout)
    assert listed == [{"doc": "good.pdf", "sha256": listed[0]["sha256"], "pages": 2, "figures": 3,
                       "chunks": listed[0]["chunks"]}]
    assert len(listed[0]["sha256"]) == 64 and listed[0]["chunks"] > 0
    again = mmrag("--config", config, "ingest", "--quiet", good)
    assert again.returncode == 0 and "already ingested" in again.stdout
    # the same through MMRAG_CONFIG
    assert json.loads(mmrag("list", "--json", env={"MMRAG_CONFIG": str(config)}).stdout) == listed
    assert mmrag("--config", config, "remove", "good.pdf").returncode == 0
    assert json.loads(mmrag("--config", config, "list", "--json").stdout) == []
    missing = mmrag("--config", config, "remove", "good.pdf")
    assert missing.returncode == 2 and "no ingested document named 'good.pdf'" in missing.stderr


def test_inspect_json_shape_on_a_real_pdf(tmp_path):
    out = mmrag("inspect", eval_pdf("neatoguide.pdf"), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"doc", "pages", "figures", "chunks", "warnings"} and data["warnings"] == []
    assert data["doc"] == "neatoguide.pdf" and data["pages"] == 11 and data["chunks"] > 10
    fig = data["figures"][0]
    assert set(fig) == {"page", "bbox", "kind", "caption"} and len(fig["bbox"]) == 4
    assert any(f["caption"].startswith("Figure 4: IMR Dependencies") for f in data["figures"])
    assert any(f["kind"] == "table" and f["page"] == 10 for f in data["figures"])  # ruled Table 1
    assert not list(tmp_path.iterdir())  # stored nothing


def test_missing_clip_weights_stop_with_the_fix(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "d"), "clip": {"pretrained": str(tmp_path / "w.pt")}}))
    out = mmrag("--config", config, "ingest", pdfgen.figure_doc(tmp_path / "a.pdf", pages=1))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "set clip.pretrained in config.yaml" in out.stderr


def test_list_and_remove_work_with_the_clip_checkpoint_gone(write_config, tiny_clip_files, tmp_path):
    """Listing and removing need no model: with the configured checkpoint deleted they still
    work; a search names the missing file and the fix."""
    import shutil

    ckpt = tmp_path / "clip.pt"
    shutil.copy(tiny_clip_files[1], ckpt)
    config = write_config(clip={"pretrained": str(ckpt)})
    assert mmrag("--config", config, "ingest", "--quiet", pdfgen.figure_doc(tmp_path / "a.pdf", pages=2),
                 pdfgen.figure_doc(tmp_path / "b.pdf", pages=1)).returncode == 0
    ckpt.unlink()
    out = mmrag("--config", config, "list", "--json")
    assert out.returncode == 0, out.stderr
    assert [(d["doc"], d["pages"]) for d in json.loads(out.stdout)] == [("a.pdf", 2), ("b.pdf", 1)]
    out = mmrag("--config", config, "search", "a figure")
    assert out.returncode == 2 and "set clip.pretrained in config.yaml" in out.stderr and str(ckpt) in out.stderr
    assert mmrag("--config", config, "remove", "a.pdf").returncode == 0
    assert [d["doc"] for d in json.loads(mmrag("--config", config, "list", "--json").stdout)] == ["b.pdf"]


def test_serve_starts_and_reads_the_exact_scans_of_a_large_library(write_config, tmp_path):
    """`mmrag serve`, the README's main job, as a user starts it: on a library whose collections
    are above chroma.ef_search it reads their exact scans at launch (before the first question),
    answers HTTP, and stops cleanly on SIGTERM."""
    import signal
    import time
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    config = write_config(chroma={"ef_search": 4}, ui={"port": port})
    doc = pdfgen.figure_doc(tmp_path / "figs.pdf", pages=6)  # 6 pages + their figures > 4 visual items
    assert mmrag("--config", config, "ingest", "--quiet", doc).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "mmrag", "-v", "--config", str(config), "serve"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, page = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    page = resp.status, resp.read().decode("utf-8", "replace")
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None, f"serve did not answer (exit {proc.poll()})"
        assert page[0] == 200 and "gradio" in page[1].lower()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f"chat UI and API on http://127.0.0.1:{port}/" in out
    assert "exact scan of the visual collection: reading" in err, err[-2000:]
