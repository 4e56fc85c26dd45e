"""Hostile input: 200 corrupted, truncated and mutated real PDFs, plus PDFs with JavaScript,
embedded files, deeply nested objects and a decompression-bomb image. Ingest never crashes or
hangs, every file gets added or a clear reason, and the store holds only complete documents."""

import fcntl
import json
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pymupdf
import pytest
import yaml

from tests import pdfgen
from tests.conftest import ROOT, eval_pdf

N_MUTANTS = 200


def mutants(seeds: list[bytes], n: int, rng: random.Random):
    for i in range(n):
        data = bytearray(rng.choice(seeds))
        how = i % 5
        if how == 0:  # truncated
            data = data[: rng.randrange(16, len(data))]
        elif how == 1:  # random bytes flipped
            for _ in range(rng.randrange(1, 200)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif how == 2:  # a block cut out
            a = rng.randrange(len(data))
            del data[a:a + rng.randrange(1, 4000)]
        elif how == 3:  # a block duplicated elsewhere
            a = rng.randrange(len(data))
            b = rng.randrange(len(data))
            data[b:b] = data[a:a + rng.randrange(1, 4000)]
        else:  # the xref table and trailer mangled
            at = data.rfind(b"xref")
            if at > 0:
                data[at:at + 200] = bytes(rng.randrange(256) for _ in range(200))
        yield f"mutant{i:03d}.pdf", bytes(data)


def special_pdfs(tmp_path):
    out = []
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((72, 72), "A page with JavaScript and an attached file.")
    doc.embfile_add("payload.exe", b"MZ not really a program", filename="payload.exe")
    xref = doc.get_new_xref()
    doc.update_object(xref, "<< /Type /Action /S /JavaScript /JS (app.alert\\('hi'\\)) >>")
    doc.xref_set_key(doc.pdf_catalog(), "OpenAction", f"{xref} 0 R")
    doc.save(tmp_path / "javascript.pdf")
    out.append(tmp_path / "javascript.pdf")
    # deeply nested arrays in the page dictionary
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((72, 72), "Deep nesting.")
    data = doc.tobytes()
    at = data.find(b"/Contents")  # splice a 5000-deep array into the page dictionary
    (tmp_path / "nested.pdf").write_bytes(data[:at] + b"/Nested " + b"[" * 5000 + b"]" * 5000 + b" " + data[at:])
    out.append(tmp_path / "nested.pdf")
    # an image claiming 50000 x 50000 pixels that inflates from a few kB
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((72, 72), "A decompression bomb.")
    page.insert_image(pymupdf.Rect(100, 100, 300, 300), stream=pdfgen.png_bytes())
    img_xref = page.get_images()[0][0]
    bomb = zlib.compress(b"\x00" * (50_000 * 300), 9)
    doc.update_stream(img_xref, bomb, compress=False)
    doc.xref_set_key(img_xref, "Width", "50000")
    doc.xref_set_key(img_xref, "Height", "50000")
    doc.xref_set_key(img_xref, "Filter", "/FlateDecode")
    doc.xref_set_key(img_xref, "DecodeParms", "null")
    doc.xref_set_key(img_xref, "SMask", "null")
    doc.save(tmp_path / "bomb.pdf")
    out.append(tmp_path / "bomb.pdf")
    return out


@pytest.mark.slow
def test_hostile_pdfs_never_crash_or_hang(write_config, tmp_path):
    rng = random.Random(2026)
    small = pdfgen.figure_doc(tmp_path / "seed.pdf", pages=3).read_bytes()
    neato = pymupdf.open(eval_pdf("neatoguide.pdf"))
    cut = pymupdf.open()
    cut.insert_pdf(neato, from_page=0, to_page=2)
    seeds = [small, cut.tobytes()]
    folder = tmp_path / "hostile"
    folder.mkdir()
    for name, data in mutants(seeds, N_MUTANTS, rng):
        (folder / name).write_bytes(data)
    specials = special_pdfs(tmp_path)
    config = write_config(ingest={"file_timeout_s": 60, "ocr": "never"})
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "mmrag", "--config", str(config), "ingest", "--quiet", "--json",
                          str(folder), *map(str, specials)], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    elapsed = time.time() - t0
    assert out.returncode in (0, 1), out.stderr[-3000:]  # exited by itself: no signal, no crash
    results = json.loads(out.stdout)
    assert len(results) == N_MUTANTS + len(specials)
    for r in results:
        assert r["status"] in ("added", "partial", "unchanged", "failed")
        if r["status"] == "failed":
            assert r["message"].startswith(r["name"] + ": ") and len(r["message"].splitlines()) == 1
        if r["status"] == "partial":  # stored, minus items each named with its page and reason
            assert r["warnings"] and all(w.startswith("page ") for w in r["warnings"]), r
            assert "problem(s)" in r["message"]
    listed = json.loads(subprocess.run([sys.executable, "-m", "mmrag", "--config", str(config), "list", "--json"],
                                       cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    added = {r["sha256"] for r in results if r["status"] in ("added", "partial", "unchanged")}
    assert {d["sha256"] for d in listed} == added  # exactly the files that went in, all complete
    by_name = {r["name"]: r for r in results}
    assert by_name["javascript.pdf"]["status"] == "added"  # scripts and attachments ignored, text kept
    assert by_name["nested.pdf"]["status"] in ("added", "partial", "failed")
    assert by_name["bomb.pdf"]["status"] in ("added", "partial", "failed")
    print(f"{len(results)} hostile files in {elapsed:.0f} s: "
          f"{sum(r['status'] == 'failed' for r in results)} refused with a reason")


def test_per_file_time_limit_abandons_the_file_and_stores_nothing(make_cfg, clip, passages, tmp_path):
    from mmrag.wiring import build

    app = build(make_cfg(ingest={"file_timeout_s": 0}), clip=clip, passages=passages)
    [res] = app.library.ingest([pdfgen.figure_doc(tmp_path / "slow.pdf", pages=2)])
    assert res.status == "failed" and "took longer than ingest.file_timeout_s" in res.message
    assert app.library.list() == [] and app.library.store.list_docs(status=None) == []
    assert app.library.referenced_images() == set()


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` right now (Linux /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_page_over_the_time_or_memory_limit_is_stopped_within_the_page(write_config, tmp_path):
    """One command, four files: a page whose drawing never finishes (2**30 nested form XObjects,
    7 kB) and one whose text extraction grows by ~170 MB/s between two small good files. Each
    bad file fails alone, in the middle of its only page, with one line naming the file and the
    limit; nothing of it is stored; the good files are; the command ends in well under the hours
    the bad pages would run, and leaves no extraction process behind (one worker: killed and
    replaced)."""
    first = pdfgen.figure_doc(tmp_path / "first.pdf", pages=1)
    slow = pdfgen.nested_forms(tmp_path / "slow.pdf", depth=30)
    hungry = pdfgen.nested_forms(tmp_path / "hungry.pdf", depth=30, text=400)
    last = pdfgen.figure_doc(tmp_path / "last.pdf", pages=2)
    config = write_config(ingest={"file_timeout_s": 20, "file_memory_mb": 800, "workers": 1})
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "mmrag", "--config", str(config), "ingest", "--quiet", "--json",
                             str(first), str(slow), str(hungry), str(last)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    while proc.poll() is None and time.monotonic() - t0 < 300:
        seen |= _children(proc.pid)  # the extraction workers (and any replacement)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
        pytest.fail("the ingest did not end: a page was not stopped at its limit")
    out, err = proc.communicate()
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, err[-3000:]  # some files failed
    results = {r["name"]: r for r in json.loads(out)}
    assert {n: r["status"] for n, r in results.items()} == {"first.pdf": "added", "slow.pdf": "failed",
                                                          "hungry.pdf": "failed", "last.pdf": "added"}
    assert results["slow.pdf"]["message"] == ("slow.pdf: took longer than ingest.file_timeout_s (20 s), stopped on "
                                              "page 1; raise it for very long files")
    msg = results["hungry.pdf"]["message"]
    assert msg.startswith("hungry.pdf: page 1 needed more than ingest.file_memory_mb (800 MB") and "\n" not in msg
    assert f"skipping {msg}" in err
    listed = json.loads(subprocess.run([sys.executable, "-m", "mmrag", "--config", str(config), "list", "--json"],
                                       cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert sorted(d["doc"] for d in listed) == ["first.pdf", "last.pdf"]
    lock = open(Path(yaml.safe_load(config.read_text())["data_dir"]) / "write.lock")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free (BlockingIOError if anything still held it)
    assert len(seen) >= 2, seen  # the first worker was killed and replaced
    assert not [pid for pid in seen if _alive(pid)]
    assert elapsed < 200, elapsed  # the bad pages alone would run for hours
    print(f"two pages stopped at their limits; the command took {elapsed:.0f} s")


def test_oversized_files_are_refused_before_parsing(make_cfg, clip, passages, tmp_path):
    from mmrag.wiring import build

    app = build(make_cfg(ingest={"max_file_mb": 0.001}), clip=clip, passages=passages)
    [res] = app.library.ingest([pdfgen.figure_doc(tmp_path / "big.pdf", pages=2)])
    assert res.status == "failed" and "larger than ingest.max_file_mb" in res.message


@pytest.mark.slow
def test_ten_thousand_pages_stream_through_extraction(tmp_path):
    """A 10,000-page PDF goes through `mmrag inspect` page by page (peak RSS is printed; the
    memory figure itself belongs to the benchmarks)."""
    doc = pymupdf.open()
    for i in range(10_000):
        page = doc.new_page(width=300, height=300)
        page.insert_text((20, 40), f"Page {i + 1} of a very long manual.")
        if i % 500 == 0:
            page.draw_rect(pymupdf.Rect(50, 80, 250, 250))
            page.draw_line((50, 80), (250, 250))
            page.insert_text((50, 270), f"Figure {i // 500 + 1}: a box with a diagonal.")
    doc.save(tmp_path / "long.pdf")
    script = ("import json, resource, sys; from ingest.extract import inspect_pdf; from mmrag.config import DEFAULTS; "
              "out = inspect_pdf(sys.argv[1], DEFAULTS['ingest']); "
              "print(json.dumps({'pages': out['pages'], 'figures': len(out['figures']), 'chunks': out['chunks'], "
              "'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "long.pdf")], cwd=ROOT, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["pages"] == 10_000 and data["figures"] == 20 and data["chunks"] >= 10_000
    print(f"10,000 pages: peak RSS {data['rss_mb']} MB")
