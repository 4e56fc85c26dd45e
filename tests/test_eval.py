"""`mmrag eval` on the whole eval-dev corpus (about ten minutes on 2 cores): the bars of the
ingest, assistant and evaluation issues, checked on every CI run. The run is the session's
``eval_dev`` fixture (tests/conftest.py), whose index tests/test_encoders.py reuses."""

import json

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_eval_dev_scores(eval_dev):
    out, run = eval_dev.process, eval_dev.run
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    (ROOT / "bench-out").mkdir(exist_ok=True)
    (ROOT / "bench-out" / "eval-dev.json").write_text(json.dumps(r, indent=2))
    assert r["failed"] == [] and r["queries"] == 48
    assert r["extraction"]["recall"] >= 0.9
    # the fused ranking is at least as good as the best single signal, at both levels, on every metric
    for level in ("page", "figure"):
        fused = r["ablation"]["fused"][level]
        for metric in ("recall@1", "recall@5", "mrr@10", "ndcg@5"):
            best = max(r["ablation"][s][level][metric] for s in ("clip", "text", "keyword"))
            assert fused[metric] >= best, (level, metric, fused[metric], best)
    assert r["page"]["recall@5"] >= 0.85 and r["figure"]["recall@5"] >= 0.85
    assert len(run.read_text().splitlines()) == 48

