"""Reliability: deletes and replacements that survive kill -9, several processes on one library,
missing files and storage faults, bounded work. Real CLI subprocesses on real PDFs, real Chroma."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmrag.wiring import build
from tests import pdfgen
from tests.conftest import ROOT, write_lock_taken


def cli(config, *args, **kw):
    return [sys.executable, "-m", "mmrag", "--config", str(config), *args]


def run_cli(config, *args, check=True, env=None):
    out = subprocess.run(cli(config, *args), cwd=ROOT, capture_output=True, text=True, env=env)
    if check:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


def on_disk(data_dir: Path) -> dict:
    """What is in the index files right now, read by a fresh Chroma client (no cached state):
    every document record with its status and how many items of it each collection holds."""
    import chromadb
    from chromadb.api.shared_system_client import SharedSystemClient
    from chromadb.config import Settings

    path = str(data_dir / "chroma")
    SharedSystemClient._identifier_to_system.pop(path, None)
    SharedSystemClient._identifier_to_refcount.pop(path, None)
    client = chromadb.PersistentClient(path=path, settings=Settings(anonymized_telemetry=False))
    docs = client.get_collection("mmrag_docs").get(include=["metadatas"])
    out = {}
    for sha, meta in zip(docs["ids"], docs["metadatas"]):
        counts = tuple(len(client.get_collection(c).get(where={"doc_sha": sha}, include=[])["ids"])
                       for c in ("mmrag_visual", "mmrag_text"))
        out[sha] = {"doc": meta["doc"], "status": meta["status"], "items": counts}
    return out


def wait_for_lock(proc, data_dir: Path) -> None:
    """Return once ``proc`` holds the library's write lock (or has exited)."""
    while proc.poll() is None and not write_lock_taken(data_dir):
        time.sleep(0.005)


def lock_held(proc, data_dir: Path) -> float:
    """Seconds from ``proc`` taking the library's write lock to releasing it (or exiting)."""
    wait_for_lock(proc, data_dir)
    t0 = time.monotonic()
    while proc.poll() is None and write_lock_taken(data_dir):
        time.sleep(0.002)
    return time.monotonic() - t0


def kill_while_writing(proc, data_dir: Path, delay: float) -> str:
    """Wait until ``proc`` holds the library's write lock, then kill -9 it ``delay`` s later.
    Returns 'killed' or 'finished' (it was done before the kill)."""
    wait_for_lock(proc, data_dir)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed"
    proc.wait()
    return "finished"


def test_kill_9_during_remove_and_replacement_leaves_whole_or_gone(make_cfg, write_config, clip, passages,
                                                                  tmp_path):
    """Repeated kill -9 at random moments of a replacement (a changed file ingested again) and
    of `remove`: afterwards `doc.pdf` is visible whole (all its items) or not at all, never twice,
    and a final ingest brings it back."""
    rng = random.Random(18)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    v1 = pdfgen.figure_doc(tmp_path / "v1" / "doc.pdf", pages=8)
    v2 = pdfgen.figure_doc(tmp_path / "v2" / "doc.pdf", pages=10)
    # the whole versions: item counts of each in a clean library
    ref = build(make_cfg(data_dir=tmp_path / "ref"), clip=clip, passages=passages)
    ref.library.ingest([v1])
    ref.library.ingest([v2])  # replaces v1
    whole = {}
    assert len(on_disk(tmp_path / "ref")) == 1
    ref2 = build(make_cfg(data_dir=tmp_path / "ref1"), clip=clip, passages=passages)
    ref2.library.ingest([v1])
    for info in (on_disk(tmp_path / "ref"), on_disk(tmp_path / "ref1")):
        for sha, d in info.items():
            whole[sha] = d["items"]
    assert len(whole) == 2

    data = tmp_path / "crashy"
    config = write_config(data_dir=data)
    doc = tmp_path / "doc.pdf"
    doc.write_bytes(v1.read_bytes())
    proc = subprocess.Popen(cli(config, "ingest", "--quiet", str(doc)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_lock(proc, data)
    t0 = time.monotonic()  # the lock is held from here: how long an ingest writes
    proc.wait()
    window = time.monotonic() - t0
    assert proc.returncode == 0

    def check() -> str | None:
        """The visible state is whole or gone; returns the visible sha (None when gone)."""
        state = on_disk(data)
        visible = [(sha, d) for sha, d in state.items() if d["status"] == "complete"]
        assert len(visible) <= 1, state  # never two versions at once
        for sha, d in visible:
            assert d["items"] == whole[sha], f"a visible document lost items: {state}"
        return visible[0][0] if visible else None

    outcomes = []
    for cycle in range(3):  # replacements: ingest the other version, kill at a random moment
        current = check()
        other = v2 if current == file_sha(v1) else v1
        doc.write_bytes(other.read_bytes())
        proc = subprocess.Popen(cli(config, "ingest", "--quiet", str(doc)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        outcomes.append(kill_while_writing(proc, data, rng.uniform(0.2, 1.0) * window))
        check()
    lib = build(make_cfg(data_dir=data), clip=clip, passages=passages).library
    removing = None  # how long a remove holds the lock, measured on the first (a fixed 0-0.6 s
    for cycle in range(4):  # landed after the remove, in the process's exit, on this machine)
        if check() is None:
            lib.ingest([doc])
            assert check() is not None
        proc = subprocess.Popen(cli(config, "remove", "doc.pdf"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if removing is None:
            removing = lock_held(proc, data)
            assert proc.wait() == 0 and check() is None
            continue
        outcomes.append(kill_while_writing(proc, data, rng.uniform(0.0, 1.0) * removing))
        check()
    assert "killed" in outcomes
    # and at the worst step, where a random kill rarely lands: the old version's (or the removed
    # document's) items deleted, its record not yet
    crash = dict(os.environ, MMRAG_FAILPOINT="purge:items")
    if check() is None:
        lib.ingest([doc])
    current = check()
    doc.write_bytes((v2 if current == file_sha(v1) else v1).read_bytes())
    assert subprocess.run(cli(config, "ingest", "--quiet", str(doc)), cwd=ROOT, env=crash,
                          capture_output=True).returncode == -signal.SIGKILL
    assert check() == file_sha(doc)  # the new version, whole; the old one hidden
    run_cli(config, "ingest", "--quiet", str(doc))  # finishes removing the old one
    assert list(on_disk(data)) == [file_sha(doc)]
    assert subprocess.run(cli(config, "remove", "doc.pdf"), cwd=ROOT, env=crash,
                          capture_output=True).returncode == -signal.SIGKILL
    assert check() is None  # gone, not listed with its items missing
    assert json.loads(run_cli(config, "list", "--json").stdout) == []
    # a final ingest finishes whatever was interrupted and brings the current file back whole
    out = run_cli(config, "ingest", "--quiet", "--json", str(doc))
    [res] = json.loads(out.stdout)
    assert res["status"] in ("added", "replaced", "unchanged")
    state = on_disk(data)
    assert [d["status"] for d in state.values()] == ["complete"]
    assert check() == file_sha(doc)
    listed = json.loads(run_cli(config, "list", "--json").stdout)
    assert [d["doc"] for d in listed] == ["doc.pdf"]
    final = build(make_cfg(data_dir=data), clip=clip, passages=passages).library
    files = {str(p.relative_to(data)) for p in (data / "images").glob("*/*")}
    assert files == final.referenced_images()  # no orphan images, none missing
    print(f"kill cycles: {outcomes}")


def file_sha(path: Path) -> str:
    from ingest.extract import file_sha256

    return file_sha256(path)


def test_a_running_app_sees_other_processes_remove_ingest_and_reindex(make_cfg, write_config, clip, passages,
                                                                       tmp_path):
    """One App object (what `mmrag serve` holds) keeps answering correctly while CLI processes
    remove, ingest and reindex on the same data dir."""
    data = tmp_path / "shared"
    app = build(make_cfg(data_dir=data), clip=clip, passages=passages)
    a = pdfgen.figure_doc(tmp_path / "a.pdf", pages=2)
    b = pdfgen.figure_doc(tmp_path / "b.pdf", pages=1)
    c = pdfgen.figure_doc(tmp_path / "c.pdf", pages=3)
    app.library.ingest([a, b])
    assert {h.doc for h in app.retriever.retrieve("parser renderer", k=10)} == {"a.pdf", "b.pdf"}
    config = write_config(data_dir=data)
    run_cli(config, "remove", "a.pdf")
    assert [d["doc"] for d in app.library.list()] == ["b.pdf"]
    assert {h.doc for h in app.retriever.retrieve("parser renderer", k=10)} == {"b.pdf"}
    run_cli(config, "ingest", "--quiet", str(c))
    assert [d["doc"] for d in app.library.list()] == ["b.pdf", "c.pdf"]
    assert {h.doc for h in app.retriever.retrieve("parser renderer", k=20)} == {"b.pdf", "c.pdf"}
    run_cli(config, "reindex")  # swaps in new collections
    hits = app.retriever.retrieve("parser renderer", k=20)
    assert {h.doc for h in hits} == {"b.pdf", "c.pdf"}
    assert app.assistant.ask("parser renderer").citations
    # and this process's own writes still work, and the CLI sees them
    app.library.remove("b.pdf")
    listed = json.loads(run_cli(config, "list", "--json").stdout)
    assert [d["doc"] for d in listed] == ["c.pdf"]


def test_sigterm_mid_ingest_rolls_back_like_ctrl_c(write_config, tmp_path):
    data = tmp_path / "data"
    config = write_config(data_dir=data)
    pdf = pdfgen.figure_doc(tmp_path / "long.pdf", pages=40)
    proc = subprocess.Popen(cli(config, "ingest", "--quiet", str(pdf)), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_lock(proc, data)
    while proc.poll() is None and not list((data / "images").glob("*/*.png")):
        time.sleep(0.01)  # until the ingest has written something
    assert proc.poll() is None, "the ingest finished before the signal: make the document longer"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: nothing of the file in progress was kept" in err, err[-2000:]
    assert on_disk(data) == {}  # rolled back by the process itself, not left for the next writer
    assert not list((data / "images").glob("*/*"))


def test_a_missing_image_file_skips_that_item_and_doctor_repairs(make_cfg, clip, passages, tmp_path):
    """An image file deleted by hand: search, ask (vision model over real HTTP) and reindex go on
    without that item; `doctor` reports it and `doctor --repair` drops it."""
    from tests.llm_server import LLMServer

    with LLMServer() as server:
        cfg = make_cfg(llm={"model": "openai/test-vlm", "api_base": server.api_base, "vision": True,
                            "timeout_s": 5, "max_images": 8})
        app = build(cfg, clip=clip, passages=passages)
        app.library.ingest([pdfgen.figure_doc(tmp_path / "m.pdf", pages=3)])
        assert app.library.doctor() == []
        before = app.retriever.retrieve("parser renderer", k=20)
        figures = [h for h in before if h.image and h.kind != "page"]
        gone = figures[0]
        Path(gone.image).unlink()
        after = app.retriever.retrieve("parser renderer", k=20)
        assert after and all(h.image is None or Path(h.image).is_file() for h in after)
        assert gone.id not in {h.id for h in after}
        answer = app.assistant.ask("what does the parser feed?")
        assert answer.error is None and answer.citations and server.images()
        report = app.library.doctor()
        assert report and all("is missing" in line for line in report)
        assert Path(gone.image).name in report[0]
        done = app.library.reindex()  # goes on, and drops what it cannot re-embed
        assert done["missing_images"] == len(report) and done["visual"] > 0
        assert app.library.doctor() == []
        # doctor --repair does the same without a reindex
        page = next(h for h in after if h.kind == "page")
        Path(page.image).unlink()
        assert app.library.doctor()
        app.library.doctor(repair=True)
        assert app.library.doctor() == []
        assert app.retriever.retrieve("parser renderer", k=5)


def _mount(*args):
    out = subprocess.run(["mount", *args], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"this test makes real storage faults with mount (needs root): {out.stderr.strip()}")


def test_storage_faults_are_one_line_and_reads_go_on(make_cfg, write_config, clip, passages, tmp_path):
    """Real faults: a damaged and an emptied index database, the data dir on a read-only bind
    mount (root ignores chmod), and a full disk (a 2 MB tmpfs). Each gets one line saying what is
    wrong and what to do; read-only and full still list and search; nothing half-written shows."""
    import shutil

    good = tmp_path / "good"
    app = build(make_cfg(data_dir=good), clip=clip, passages=passages)
    app.library.ingest([pdfgen.figure_doc(tmp_path / "m.pdf", pages=1)])

    def variant(name):
        shutil.copytree(good, tmp_path / name)
        return write_config(data_dir=tmp_path / name).rename(tmp_path / f"{name}.yaml")

    def one_line(out, *words):
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        [line] = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
        assert all(w in line for w in words), line

    damaged = variant("damaged")
    (tmp_path / "damaged" / "chroma" / "chroma.sqlite3").write_bytes(os.urandom(64 * 1024))
    one_line(run_cli(damaged, "list", check=False), "is damaged", "restore", "from a backup")
    emptied = variant("emptied")
    (tmp_path / "emptied" / "chroma" / "chroma.sqlite3").write_bytes(b"")
    one_line(run_cli(emptied, "list", check=False), "is empty (0 bytes)", "image file(s) remain", "Restore")

    ro_config = write_config(data_dir=tmp_path / "ro").rename(tmp_path / "ro.yaml")
    (tmp_path / "ro").mkdir()
    _mount("--bind", str(good), str(tmp_path / "ro"))
    try:
        _mount("-o", "remount,ro,bind", str(tmp_path / "ro"))
        found = json.loads(run_cli(ro_config, "search", "parser renderer", "--json").stdout)
        assert found and found[0]["doc"] == "m.pdf"
        one_line(run_cli(ro_config, "remove", "m.pdf", check=False), "is read-only", "need write access")
    finally:
        subprocess.run(["umount", str(tmp_path / "ro")], check=True)

    full = tmp_path / "full"
    full.mkdir()
    _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(full))
    try:
        shutil.copytree(good, full / "data")
        config = write_config(data_dir=full / "data").rename(tmp_path / "full.yaml")
        big = pdfgen.figure_doc(tmp_path / "big.pdf", pages=40)
        out = run_cli(config, "ingest", "--quiet", str(big), check=False)
        one_line(out, "is full", "free some space")
        found = json.loads(run_cli(config, "search", "parser renderer", "--json").stdout)
        assert {h["doc"] for h in found} == {"m.pdf"}  # reads go on; the half-written big.pdf is not shown
    finally:
        subprocess.run(["umount", str(full)], check=True)
