"""The ranking core on hand-computed cases: score fusion and reciprocal rank fusion."""

import pytest

from assistant.retrieve import rrf, score_fusion


def approx_ranking(got, want):
    assert [u for u, _ in got] == [u for u, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want])


def test_score_fusion_min_max_normalises_each_signal_and_weights_it():
    scored = {"clip": [("a", 0.9), ("b", 0.5), ("c", 0.1)], "keyword": [("c", 8.0), ("b", 4.0)]}
    # clip: a 1, b (0.5-0.1)/0.8 = 0.5, c 0; keyword: c 1, b 0 (b is keyword's worst, not absent)
    approx_ranking(score_fusion(scored, {"clip": 1, "keyword": 2}), [("c", 2.0), ("a", 1.0), ("b", 0.5)])
    approx_ranking(score_fusion(scored, {"clip": 1, "keyword": 1}), [("a", 1.0), ("c", 1.0), ("b", 0.5)])


def test_score_fusion_ties_keep_first_appearance():
    scored = {"clip": [("a", 0.9), ("b", 0.5), ("c", 0.1)], "keyword": [("c", 8.0), ("b", 4.0)]}
    # keyword weight 0.5: a 1, b 0.5 + 0, c 0 + 0.5 -> b and c tie at 0.5; b appeared first (in clip)
    approx_ranking(score_fusion(scored, {"clip": 1, "keyword": 0.5}), [("a", 1.0), ("b", 0.5), ("c", 0.5)])
    # the same tie with the signals in the other order: c now appears first
    swapped = {"keyword": scored["keyword"], "clip": scored["clip"]}
    approx_ranking(score_fusion(swapped, {"clip": 1, "keyword": 0.5}), [("a", 1.0), ("c", 0.5), ("b", 0.5)])


def test_score_fusion_missing_and_degenerate_signals():
    # an empty signal adds nothing; a one-unit signal gives its unit 1; equal scores give each 1
    approx_ranking(score_fusion({"clip": [], "text": [("x", 0.3)]}, {"clip": 1, "text": 1}), [("x", 1.0)])
    approx_ranking(score_fusion({"text": [("x", 0.3), ("y", 0.3)]}, {"text": 2}), [("x", 2.0), ("y", 2.0)])
    # a unit only one signal returned gets 0 from the others: a strong single signal can still win
    scored = {"text": [("p", 0.8), ("q", 0.6)], "keyword": [("q", 3.0), ("r", 1.0)]}
    approx_ranking(score_fusion(scored, {"text": 1, "keyword": 1}), [("p", 1.0), ("q", 1.0), ("r", 0.0)])
    # weight 0 silences a signal without dropping what it found
    approx_ranking(score_fusion(scored, {"text": 1, "keyword": 0}), [("p", 1.0), ("q", 0.0), ("r", 0.0)])
    assert score_fusion({}, {"text": 1}) == []


def test_rrf_by_hand():
    rankings = {"clip": ["a", "b"], "keyword": ["b", "c"]}
    approx_ranking(rrf(rankings, {"clip": 1, "keyword": 1}, k=60),
                   [("b", 1 / 62 + 1 / 61), ("a", 1 / 61), ("c", 1 / 62)])
    approx_ranking(rrf(rankings, {"clip": 1, "keyword": 2}, k=60),
                   [("b", 1 / 62 + 2 / 61), ("c", 2 / 62), ("a", 1 / 61)])
    # k shifts every rank: with k = 0, rank 1 is worth 1 and rank 2 a half
    approx_ranking(rrf(rankings, {"clip": 1, "keyword": 1}, k=0), [("b", 1.5), ("a", 1.0), ("c", 0.5)])


def test_rrf_ties_and_missing_signals():
    # equal ranks in two signals: the first signal's unit comes first
    approx_ranking(rrf({"x": ["a"], "y": ["b"]}, {"x": 1, "y": 1}, k=60), [("a", 1 / 61), ("b", 1 / 61)])
    approx_ranking(rrf({"y": ["b"], "x": ["a"]}, {"x": 1, "y": 1}, k=60), [("b", 1 / 61), ("a", 1 / 61)])
    # a signal with nothing (no question words matched, say) changes nothing
    approx_ranking(rrf({"text": ["a", "b"], "keyword": []}, {"text": 1, "keyword": 1}, k=60),
                   [("a", 1 / 61), ("b", 1 / 62)])
    assert rrf({}, {}, k=60) == []
