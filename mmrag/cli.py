"""`mmrag` command line. Results go to stdout, progress and errors to stderr; the only place that exits."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from index.records import FIGURE_KINDS  # noqa: E402

from .config import load_config  # noqa: E402
from .errors import USER_ERRORS, MMRagError  # noqa: E402
from .progress import BarProgress  # noqa: E402

log = logging.getLogger("mmrag")


_DATA_DIR = ["the data dir"]  # named in storage-fault messages once the config is read


def _app(args, check=True, one_shot=False):
    from .wiring import build

    cfg = load_config(args.config)
    _DATA_DIR[0] = cfg["data_dir"]
    return build(cfg, check=check, one_shot=one_shot)


def _walk_pdfs(folder: Path) -> list[Path]:
    """Files under ``folder`` whose name ends in ``.pdf`` in any case, sorted. Folders linked in
    by symlink are walked too (each real folder once, so a link loop ends); macOS's AppleDouble
    companions (``._report.pdf``, metadata left on shared drives, not PDFs) are left out."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [Path(root) / f for f in files if f.lower().endswith(".pdf") and not f.startswith("._")
                  and (Path(root) / f).is_file()]
    return sorted(found)


def _pdfs(paths: list[str]) -> list[tuple[Path, str]]:
    """The files to ingest, each with its document name. A folder is walked for files ending in
    ``.pdf`` in any case (``SCAN0001.PDF``), into linked folders too (``_walk_pdfs``), each named
    by its path relative to that folder (``2023/report.pdf``); a file given by itself is named by
    its base name, lengthened by its parent folders only when two files given by themselves
    share a base name (both are kept)."""
    out: list[tuple[Path, str]] = []
    singles: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += [(f, f.relative_to(p).as_posix()) for f in _walk_pdfs(p)]
        else:
            singles.append(p)
    out += list(zip(singles, _short_names(singles)))
    return out


def _short_names(files: list[Path]) -> list[str]:
    """Base names, lengthened by parent folders only where two files would share one:
    ``_short_names([Path("a/2023/r.pdf"), Path("b/2024/r.pdf"), Path("x.pdf")]) == ["2023/r.pdf", "2024/r.pdf", "x.pdf"]``."""
    parts = [p.resolve().parts for p in files]
    depth = [1] * len(files)
    while True:
        names = ["/".join(ps[-d:]) for ps, d in zip(parts, depth)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return names
        for i in clash:
            depth[i] += 1


def cmd_ingest(args) -> int:
    app = _app(args)
    progress = BarProgress(sys.stderr.isatty() and not args.quiet)
    try:
        files = _pdfs(args.paths)
        results = app.library.ingest([f for f, _ in files], progress=progress, names=[n for _, n in files])
        if _STOPPED[0]:  # the file in progress was rolled back; say so like Ctrl-C
            raise KeyboardInterrupt
    finally:
        progress.close()
    for r in results:  # with --json, stdout carries the JSON alone
        failed = r.status == "failed"
        print(("skipping " if failed else "") + r.message, file=sys.stderr if failed or args.json else sys.stdout)
        for line in r.warnings if not args.quiet else ():
            print(f"  warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_list(args) -> int:
    app = _app(args)
    docs = app.library.list()
    if args.json:
        print(json.dumps([{k: d[k] for k in ("doc", "sha256", "pages", "figures", "chunks")} for d in docs], indent=2))
    elif not docs:
        print("the library is empty: `mmrag ingest FILE.pdf` adds documents")
    else:
        for d in docs:
            print(f"{d['doc']}  {d['pages']} pages  {d['figures']} figures  {d['chunks']} chunks  {d['sha256'][:12]}")
    return 0


def cmd_remove(args) -> int:
    app = _app(args)
    for doc in args.docs:
        found = app.library.remove(doc)
        print(f"removed {found['doc']} ({found['sha256'][:12]})")
    return 0


def cmd_inspect(args) -> int:
    from ingest.extract import inspect_pdf

    cfg = load_config(args.config)
    status = 0
    for path, name in _pdfs(args.paths):
        try:
            out = inspect_pdf(path, cfg["ingest"], name=name)
        except USER_ERRORS as exc:
            print(f"skipping {exc}", file=sys.stderr)
            status = 1
            continue
        out.pop("sha256", None)
        if args.json:
            print(json.dumps(out))
        else:
            print(f"{out['doc']}: {out['pages']} pages, {out['chunks']} chunks, {len(out['figures'])} figures")
            for f in out["figures"]:
                print(f"  p.{f['page']} {f['kind']:6} {[round(v) for v in f['bbox']]} {f['caption'][:70]}")
            for line in out["warnings"]:
                print(f"  warning: {line}", file=sys.stderr)
    return status


def _print_hits(hits, as_json: bool) -> None:
    if as_json:
        print(json.dumps([h.to_json() for h in hits], indent=2))
        return
    if not hits:
        print("no results")
    for i, h in enumerate(hits, 1):
        snippet = (h.text or "").replace("\n", " ")[:100]
        print(f"{i:2}. {h.score:.4f}  {h.doc} p.{h.page}  {h.kind:6} {snippet}")
        if h.image and h.kind != "text":
            print(f"      {h.image}")


def _filters(args) -> dict:
    kinds = None
    if args.kind:
        kinds = {"figure": list(FIGURE_KINDS)}.get(args.kind, [args.kind])
    return {"kinds": kinds, "docs": args.doc or None, "labels": args.label or None}


def _query_image(app, args):
    from index.embedders import load_image

    if getattr(args, "image", None):
        if not Path(args.image).is_file():
            raise MMRagError(f"--image: no such file {args.image}")
        return load_image(args.image)
    if getattr(args, "like", None):
        found = app.library.store.get_visual([args.like])
        if not found:
            raise MMRagError(f"--like: no stored figure or page with id {args.like}")
        return load_image(app.library.images.path(found[0].image))
    return None


def cmd_search(args) -> int:
    app = _app(args, one_shot=True)
    image = _query_image(app, args)
    if not args.query and image is None:
        raise MMRagError("give a query, --image FILE or --like ID")
    hits = app.retriever.retrieve(args.query or "", k=args.k, image=image, **_filters(args))
    _print_hits(hits, args.json)
    return 0


def load_history(path: str) -> list[dict]:
    """Earlier turns for ``mmrag ask --history FILE.json``: a JSON list of
    ``{"role": "user"|"assistant", "content": "..."}``. Raises MMRagError saying what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise MMRagError(f"--history: no such file {path}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MMRagError(f"--history {p.name}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise MMRagError(f"--history {p.name}: expected a JSON list of {{\"role\": ..., \"content\": ...}} "
                         f"messages, got {type(data).__name__}")
    for i, m in enumerate(data, 1):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise MMRagError(f"--history {p.name}: message {i} must be an object with \"role\": \"user\" or "
                             f"\"assistant\"")
        if not isinstance(m.get("content"), (str, list)):
            raise MMRagError(f"--history {p.name}: message {i} has no text \"content\"")
    return data


def cmd_ask(args) -> int:
    history = load_history(args.history) if args.history else []  # checked before any model loads
    if args.image and not Path(args.image).is_file():
        raise MMRagError(f"--image: no such file {args.image}")
    app = _app(args, one_shot=True)
    if args.image:
        image, show = args.image, True  # searched by, and shown to the model as the user's image
    else:
        image, show = _query_image(app, args), False  # --like: a stored figure, searched by only
    answer = None
    try:
        for kind, value in app.assistant.stream(args.question, history=history, image=image, show_image=show,
                                                **_filters(args)):
            if kind == "token" and not args.json:
                print(value, end="", flush=True)
            elif kind == "answer":
                answer = value
    except ValueError as exc:  # a malformed history message or an unreadable image
        raise MMRagError(str(exc)) from None
    if args.json:
        print(json.dumps(answer.to_json(), indent=2), flush=True)
    else:
        if answer.error:
            print(answer.text)
            print(f"\n! {answer.error}", file=sys.stderr)
        print()
        if answer.standalone and answer.standalone != args.question:
            print(f"searched for: {answer.standalone}")
        if answer.note:
            print(f"note: {answer.note}")
        for c in answer.citations:
            print(f"  {c.key} score {c.score:.4f}" + (f"  {c.image}" if c.image else ""))
        if answer.retrieved:
            print(f"  (also retrieved, not cited: {', '.join(c.key for c in answer.retrieved[:8])})")
        sys.stdout.flush()
    app.describing.wait(timeout=float(app.cfg["describe"]["timeout_s"]) + 5)  # on-demand descriptions
    return 0


def cmd_describe(args) -> int:
    app = _app(args)
    d = app.describing
    if not d.enabled:
        raise MMRagError("no describing model configured: set describe.model (or llm.model) in config.yaml")
    if args.docs:
        for doc in args.docs:
            app.library.find(doc)  # a one-line error for a name that is not there
    figs = d.undescribed(args.docs or None)
    bar = None
    if sys.stderr.isatty() and not args.quiet and figs:
        from tqdm import tqdm

        bar = tqdm(total=len(figs), desc=f"describing figures with {d.describer.model}", unit="fig", file=sys.stderr)

    def progress(done, total):
        if bar:
            bar.total = total
            bar.n = done
            bar.refresh()
    try:
        stats = d.describe(figs, progress=progress, limit=args.limit)
    finally:
        if bar:
            bar.close()
    left = len(d.undescribed(args.docs or None))
    if args.json:
        print(json.dumps(dict(stats.to_json(), undescribed=left), indent=2))
    else:
        print(f"described {stats.described} figures ({stats.reused} already described elsewhere), "
              f"{stats.failed} failed, {left} not described yet; "
              f"tokens: {stats.prompt_tokens} in, {stats.completion_tokens} out")
        for e in stats.errors[:3]:
            print(f"  {e}", file=sys.stderr)
    return 1 if stats.failed and not stats.described and not stats.reused else 0


def cmd_reindex(args) -> int:
    app = _app(args, check=False)
    done = app.library.reindex()
    print(f"re-embedded {done.get('visual', 0)} images and {done.get('text', 0)} texts")
    if done.get("missing_images"):
        print(f"dropped {done['missing_images']} figure(s)/page(s) whose image file is missing; ingest their PDFs "
              "again to get them back", file=sys.stderr)
    if done.get("without_pdf"):
        print(f"{done['without_pdf']} document(s) have no kept original PDF (ingested before mmrag kept them); "
              "re-ingest them to enable page views", file=sys.stderr)
    return 0


def cmd_doctor(args) -> int:
    app = _app(args, check=False)
    lines = app.library.doctor(repair=args.repair)
    for line in lines:
        print(line)
    if not lines:
        print("the library is consistent")
    elif args.repair:
        print(f"repaired: {len(lines)} finding(s) fixed (items whose image was gone were dropped; ingest their "
              "PDFs again to get them back)")
    else:
        print("run `mmrag doctor --repair` to fix these")
    return 1 if lines and not args.repair else 0


def cmd_duplicates(args) -> int:
    from index.similar import near_duplicates

    app = _app(args)
    groups = near_duplicates(app.library.store, args.threshold)
    if args.json:
        print(json.dumps(groups, indent=2))
    for g in groups if not args.json else []:
        print(" ~ ".join(f"{m['doc']} p.{m['page']} ({m['id']})" for m in g))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import run_eval

    cfg = load_config(args.config)
    report = run_eval(cfg, Path(args.corpus), Path(args.queries) if args.queries else None,
                      run_out=Path(args.run_out) if args.run_out else None, quiet=args.quiet,
                      reuse=args.reuse)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from .evaluate import format_report

        print(format_report(report))
    return 0


def cmd_serve(args) -> int:
    from ui.server import serve

    cfg = load_config(args.config)
    if args.host:
        cfg["ui"]["host"] = args.host
    if args.port:
        cfg["ui"]["port"] = args.port
    serve(cfg)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmrag", description="Ask questions about the figures in your PDFs.")
    p.add_argument("--config", help="config file (default: $MMRAG_CONFIG, else built-in defaults)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--config", default=argparse.SUPPRESS, help="config file")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("ingest", cmd_ingest, "add PDFs (files or folders) to the library")
    sp.add_argument("paths", nargs="+")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.add_argument("--json", action="store_true")
    sp = add("list", cmd_list, "list ingested documents")
    sp.add_argument("--json", action="store_true")
    sp = add("remove", cmd_remove, "remove documents (by file name or sha256)")
    sp.add_argument("docs", nargs="+")
    sp = add("inspect", cmd_inspect, "show what extraction finds in PDFs, storing nothing")
    sp.add_argument("paths", nargs="+")
    sp.add_argument("--json", action="store_true")
    for name, fn, help in (("search", cmd_search, "retrieval only, no LLM"), ("ask", cmd_ask, "answer a question")):
        sp = add(name, fn, help)
        sp.add_argument("query" if name == "search" else "question", nargs="?" if name == "search" else None, default="")
        sp.add_argument("-k", type=int, default=None, help="how many results")
        sp.add_argument("--kind", choices=["figure", "raster", "vector", "table", "page", "text"])
        sp.add_argument("--doc", action="append", help="only this document (repeatable)")
        sp.add_argument("--label", action="append", help="only figures with this zero-shot label (repeatable)")
        sp.add_argument("--image", help="search by an image file" + ("" if name == "search" else
                                                                        "; the model sees it too"))
        sp.add_argument("--like", help="search by a stored figure or page id ('more like this')")
        sp.add_argument("--json", action="store_true")
    sp = add("describe", cmd_describe, "describe figures with the vision model (those not described yet)")
    sp.add_argument("docs", nargs="*", help="only these documents (names or sha256s); default: all")
    sp.add_argument("--limit", type=int, default=None, help="ask the model for at most this many figures")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true")
    sub.choices["ask"].add_argument("--history", metavar="FILE.json",
                                    help='earlier turns: a JSON list of {"role": "user"|"assistant", "content": "..."}')
    add("reindex", cmd_reindex, "re-embed stored images and texts with the configured models")
    sp = add("doctor", cmd_doctor, "check the library (interrupted work, missing or stray image files)")
    sp.add_argument("--repair", action="store_true", help="fix what it finds")
    sp = add("duplicates", cmd_duplicates, "groups of near-duplicate figures")
    sp.add_argument("--threshold", type=float, default=0.95)
    sp.add_argument("--json", action="store_true")
    sp = add("eval", cmd_eval, "retrieval and extraction scores on a labelled corpus")
    sp.add_argument("--corpus", required=True, help="folder with pdfs/ and queries.jsonl")
    sp.add_argument("--queries", help="queries file (default CORPUS/queries.jsonl)")
    sp.add_argument("--run-out", help="write ranked results per query as JSON lines")
    sp.add_argument("--reuse", action="store_true", help="reuse the index in data_dir instead of a temporary one")
    sp.add_argument("-q", "--quiet", action="store_true")
    sp.add_argument("--json", action="store_true")
    sp = add("serve", cmd_serve, "start the chat UI")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    return p


_STOPPED = [0]  # the signal that interrupted this command, if any


def _interrupt_on_sigterm() -> None:
    """SIGTERM (a service stop, `kill`) behaves like Ctrl-C: the ingest in progress rolls back
    what it wrote and the command says so, instead of dying silently."""
    import signal

    def handler(signum, frame):
        _STOPPED[0] = signum  # raised inside a PyMuPDF callback, the interrupt arrives wrapped
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _interrupt_on_sigterm()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a full disk, a read-only or damaged index: one line, not a traceback
        from index.errors import explain_storage_error

        fault = explain_storage_error(exc, _DATA_DIR[0])
        if fault is None:
            raise
        print(f"error: {fault}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing of the file in progress was kept; run the command again to finish",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
