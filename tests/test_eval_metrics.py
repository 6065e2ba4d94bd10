"""Ranking metrics against hand-computed values (the arithmetic is written out beside each)."""
import math

import numpy as np
import pytest

from lorasearch.eval.metrics import (
    aggregate,
    aggregate_by,
    average_precision_at_k,
    evaluate_scores,
    hit_at_k,
    ndcg_at_k,
    recall_at_k,
    reciprocal_rank,
)


def test_two_relevant_found_at_ranks_1_and_3():
    rels = [1, 0, 1, 0, 0]
    # DCG  = 1/log2(2) + 1/log2(4) = 1 + 0.5 = 1.5
    # IDCG = 1/log2(2) + 1/log2(3) = 1 + 0.63092975 = 1.63092975   (R = 2 ones)
    assert ndcg_at_k(rels, 10, n_relevant=2) == pytest.approx(1.5 / 1.63092975, abs=1e-8)
    assert ndcg_at_k(rels, 10, n_relevant=2) == pytest.approx(0.91972078, abs=1e-7)
    # AP@10 = (P@1·1 + P@3·1) / min(2, 10) = (1 + 2/3) / 2 = 0.8333…
    assert average_precision_at_k(rels, 10, 2) == pytest.approx(5 / 6)
    assert recall_at_k(rels, 10, 2) == 1.0
    assert hit_at_k(rels, 1, 2) == 1.0
    assert reciprocal_rank(rels, 2) == 1.0


def test_sparse_hits_with_more_relevant_in_gallery():
    rels = [0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1]  # the 11th is outside the top 10
    # DCG@10 = 1/log2(3) + 1/log2(11) = 0.63092975 + 0.28906483 = 0.91999458
    # IDCG@10 with R = 5: 1 + 0.63092975 + 0.5 + 0.43067656 + 0.38685281 = 2.94845912
    assert ndcg_at_k(rels, 10, n_relevant=5) == pytest.approx(0.91999458 / 2.94845912, abs=1e-8)
    # AP@10 = (P@2 + P@10) / min(5, 10) = (1/2 + 2/10) / 5 = 0.14
    assert average_precision_at_k(rels, 10, 5) == pytest.approx(0.14)
    # Recall@10 = 2 / 5
    assert recall_at_k(rels, 10, 5) == pytest.approx(0.4)
    assert hit_at_k(rels, 1, 5) == 0.0
    assert hit_at_k(rels, 2, 5) == 1.0
    assert reciprocal_rank(rels, 5) == 0.5


def test_more_relevant_than_k_caps_the_ideal_at_k():
    rels = [1] * 10
    # ideal = min(R=15, 10) ones, so a perfect top 10 scores 1; AP divides by min(15, 10) = 10
    assert ndcg_at_k(rels, 10, n_relevant=15) == pytest.approx(1.0)
    assert average_precision_at_k(rels, 10, 15) == pytest.approx(1.0)
    assert recall_at_k(rels, 10, 15) == pytest.approx(10 / 15)


def test_nothing_found():
    rels = [0] * 10
    assert ndcg_at_k(rels, 10, 3) == 0.0
    assert average_precision_at_k(rels, 10, 3) == 0.0
    assert recall_at_k(rels, 10, 3) == 0.0
    assert reciprocal_rank(rels, 3) == 0.0


def test_single_relevant_at_rank_2():
    # NDCG = (1/log2 3) / (1/log2 2) = 0.63092975 ; AP = P@2 / 1 = 0.5
    assert ndcg_at_k([0, 1], 10, 1) == pytest.approx(1 / math.log2(3))
    assert average_precision_at_k([0, 1], 10, 1) == pytest.approx(0.5)


def test_rejects_undefined_and_non_binary():
    with pytest.raises(ValueError):
        ndcg_at_k([0, 0], 10, 0)
    with pytest.raises(ValueError):
        ndcg_at_k([0.5, 1], 10, 2)
    with pytest.raises(ValueError):
        recall_at_k([1, 1, 1], 10, 2)


def test_evaluate_scores_excludes_invalid_pairs_and_undefined_queries():
    scores = np.array([[0.9, 0.8, 0.7, 0.1],
                       [0.9, 0.8, 0.7, 0.1],
                       [0.5, 0.5, 0.5, 0.5]])
    relevant = np.array([[0, 1, 0, 1],
                         [0, 1, 0, 1],
                         [1, 0, 0, 0]], dtype=bool)
    valid = np.array([[1, 1, 1, 1],
                      [0, 1, 1, 1],      # item 0 (a different family) is not ranked at all
                      [0, 1, 1, 1]], dtype=bool)  # its only relevant item is invalid
    per_q = evaluate_scores(scores, relevant, valid, k=10)
    # query 0: ranking 0,1,2,3 → rels [0,1,0,1], R=2
    #   DCG = 1/log2 3 + 1/log2 5 = 0.63092975 + 0.43067656 = 1.06160631 ; IDCG = 1.63092975
    assert per_q[0]["ndcg@10"] == pytest.approx(1.06160631 / 1.63092975, abs=1e-8)
    #   AP = (1/2 + 2/4) / 2 = 0.5
    assert per_q[0]["map@10"] == pytest.approx(0.5)
    # query 1: ranking 1,2,3 → rels [1,0,1]: DCG = 1 + 1/log2 4 = 1.5, AP = (1 + 2/3)/2
    assert per_q[1]["ndcg@10"] == pytest.approx(1.5 / 1.63092975, abs=1e-8)
    assert per_q[1]["map@10"] == pytest.approx(5 / 6)
    assert per_q[1]["hit@1"] == 1.0
    assert per_q[2] is None
    agg = aggregate(per_q)
    assert agg["n"] == 2 and agg["n_undefined"] == 1
    assert agg["map@10"] == pytest.approx((0.5 + 5 / 6) / 2)
    by = aggregate_by(per_q, ["a", "b", "b"])
    assert by["a"]["hit@1"] == 0.0 and by["b"]["hit@1"] == 1.0 and by["b"]["n_undefined"] == 1


def test_ties_count_against_the_method():
    # equal scores: the relevant item is ranked after the non-relevant one, whatever the input order
    for rel in ([[False, True]], [[True, False]]):
        per_q = evaluate_scores(np.array([[0.5, 0.5]]), np.array(rel))
        assert per_q[0]["hit@1"] == 0.0 and per_q[0]["mrr"] == 0.5
    # a constant-score method gets the worst ranking: 2 relevant of 4 land at ranks 3 and 4
    per_q = evaluate_scores(np.zeros((1, 4)), np.array([[True, True, False, False]]))
    # DCG = 1/log2 4 + 1/log2 5 = 0.5 + 0.43067656 ; IDCG = 1.63092975
    assert per_q[0]["ndcg@10"] == pytest.approx(0.93067656 / 1.63092975)


def test_chance_metrics_match_exhaustive_average():
    # N = 5 items, R = 2 relevant: average every metric over all C(5,2) = 10 placements
    from itertools import combinations

    from lorasearch.eval.metrics import chance_metrics, query_metrics

    rows = []
    for pos in combinations(range(5), 2):
        rels = [1 if i in pos else 0 for i in range(5)]
        rows.append(query_metrics(rels, 2, k=3))
    exp = {key: np.mean([r[key] for r in rows]) for key in rows[0]}
    got = chance_metrics(2, 5, k=3)
    for key in exp:
        assert got[key] == pytest.approx(exp[key]), key
    # by hand: Hit@1 = 2/5; Recall@3 = 3/5; MRR = 0.4·1 + 0.3·1/2 + 0.2·1/3 + 0.1·1/4 = 0.64167
    assert got["hit@1"] == pytest.approx(0.4) and got["recall@3"] == pytest.approx(0.6)
    assert got["mrr"] == pytest.approx(0.4 + 0.15 + 0.2 / 3 + 0.025)
