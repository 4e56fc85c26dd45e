"""Metric code against hand-computed cases (eval-dev README definitions)."""

import math

import pytest

from mmrag import metrics as M


def test_recall_and_mrr_by_hand():
    flags = [False, False, True, False]
    assert M.recall_at(flags, 1) == 0 and M.recall_at(flags, 5) == 1
    assert M.mrr_at(flags, 10) == pytest.approx(1 / 3)
    assert M.mrr_at([False] * 10 + [True], 10) == 0  # beyond 10 counts nothing


def test_no_hits_score_zero_not_skipped():
    assert M.score([], 1) == {"recall@1": 0.0, "recall@5": 0.0, "mrr@10": 0.0, "ndcg@5": 0.0}
    assert M.mean([M.score([], 1), M.score([True], 1)])["recall@1"] == 0.5


def test_ndcg_with_several_relevant_pages():
    # relevant at ranks 1 and 3, three relevant pages: DCG = 1 + 1/2; IDCG = 1 + 1/log2(3) + 1/2
    got = M.ndcg_at([True, False, True], n_relevant=3, k=5)
    assert got == pytest.approx((1 + 0.5) / (1 + 1 / math.log2(3) + 0.5))
    assert M.ndcg_at([True], 1) == 1.0


def test_page_level_dedups_pages_keeping_first_occurrence():
    q = {"doc": "a.pdf", "pages": [3, 7]}
    results = [{"doc": "a.pdf", "page": 1}, {"doc": "a.pdf", "page": 1}, {"doc": "b.pdf", "page": 3},
               {"doc": "a.pdf", "page": 7}, {"doc": "a.pdf", "page": 3}]
    assert M.page_flags(results, q) == [False, False, True, True]
    assert M.score(M.page_flags(results, q), 2)["mrr@10"] == pytest.approx(1 / 3)


def test_ties_keep_rank_order():
    # two results on the same relevant page: only the first counts (dedup), rank 1
    q = {"doc": "a.pdf", "pages": [2]}
    assert M.page_flags([{"doc": "a.pdf", "page": 2}] * 2, q) == [True]


def test_figure_level_counts_only_the_first_hit_and_ignores_pages():
    q = {"doc": "a.pdf", "pages": [5], "bbox": [100, 100, 300, 300]}
    results = [
        {"doc": "a.pdf", "page": 5, "kind": "page", "bbox": None},  # a page image: not a figure
        {"doc": "a.pdf", "page": 5, "kind": "vector", "bbox": [0, 0, 590, 830]},  # >= 80% of the page
        {"doc": "a.pdf", "page": 5, "kind": "vector", "bbox": [400, 400, 500, 500]},  # miss
        {"doc": "a.pdf", "page": 5, "kind": "raster", "bbox": [90, 90, 310, 310]},  # hit
        {"doc": "a.pdf", "page": 5, "kind": "raster", "bbox": [100, 100, 300, 300]},  # second hit: not relevant
    ]
    flags = M.figure_flags(results, q, {("a.pdf", 5): 595 * 842})
    assert flags == [False, True, False]
    assert M.score(flags, 1)["mrr@10"] == 0.5


def test_box_hit_by_iou_or_centre():
    target = [100, 100, 200, 200]
    assert M.box_hit([100, 100, 200, 200], target)
    assert M.box_hit([0, 0, 160, 160], target)  # contains the centre (150, 150), IoU small
    assert not M.box_hit([160, 160, 400, 400], target)  # IoU 0.03, centre outside
    assert M.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)


# ---- boundaries: each fails when its constant moves by one step ---------------------------------
def test_recall_counts_exactly_the_first_k():
    assert M.recall_at([False, True], 1) == 0.0 and M.recall_at([False, True], 2) == 1.0
    fifth, sixth = [False] * 4 + [True], [False] * 5 + [True]
    assert M.recall_at(fifth, 5) == 1.0 and M.recall_at(sixth, 5) == 0.0
    # the report's R@1 and R@5 read exactly ranks 1 and 1-5
    assert M.score([False, True], 1)["recall@1"] == 0.0 and M.score([True], 1)["recall@1"] == 1.0
    assert M.score(fifth, 1)["recall@5"] == 1.0 and M.score(sixth, 1)["recall@5"] == 0.0


def test_mrr_counts_exactly_the_first_ten():
    assert M.score([False] * 9 + [True], 1)["mrr@10"] == pytest.approx(0.1)
    assert M.score([False] * 10 + [True], 1)["mrr@10"] == 0.0


def test_ndcg_ideal_ranking_is_cut_at_k_and_at_the_relevant_count():
    # more relevant pages than k: five hits in the top five is a perfect ranking
    assert M.ndcg_at([True] * 5, n_relevant=9, k=5) == pytest.approx(1.0)
    # one relevant page found at rank 2: DCG 1/log2(3) against an ideal of 1 (not of five hits)
    assert M.ndcg_at([False, True], n_relevant=1, k=5) == pytest.approx(1 / math.log2(3))
    # two relevant, found at ranks 1 and 6: rank 6 is beyond k and earns nothing
    assert M.ndcg_at([True, False, False, False, False, True], n_relevant=2, k=5) == pytest.approx(
        1 / (1 + 1 / math.log2(3)))
    assert M.score([True, False, True], 3)["ndcg@5"] == pytest.approx((1 + 0.5) / (1 + 1 / math.log2(3) + 0.5))


def test_box_hit_threshold_is_iou_0_3_inclusive():
    target = [0, 0, 10, 10]  # centre (5, 5): neither region below contains it
    assert M.iou([7, 0, 10, 10], target) == pytest.approx(0.3)
    assert M.box_hit([7, 0, 10, 10], target)  # IoU exactly 0.3 counts
    assert M.iou([7.1, 0, 10, 10], target) == pytest.approx(0.29)
    assert not M.box_hit([7.1, 0, 10, 10], target)  # 0.29 does not
    assert not M.box_hit([5.5, 0, 35.5, 10], target)  # IoU 45/300 = 0.15 and centre outside


def test_figure_level_uses_the_same_threshold():
    q = {"doc": "a.pdf", "pages": [1], "bbox": [0, 0, 10, 10]}
    hit = {"doc": "a.pdf", "page": 1, "kind": "vector", "bbox": [7, 0, 10, 10]}
    miss = {"doc": "a.pdf", "page": 1, "kind": "vector", "bbox": [7.1, 0, 10, 10]}
    assert M.figure_flags([miss, hit], q) == [False, True]
    assert M.score(M.figure_flags([miss, hit], q), 1)["recall@1"] == 0.0
