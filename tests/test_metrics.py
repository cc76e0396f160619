import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_lora import metrics
from pyro_lora.experiments import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Four binary examples away from bin edges: top-label confidences 0.95 (right), 0.85 (wrong),
# 0.65 (right), 0.55 (right).
PROBS = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.35, 0.65], [0.55, 0.45]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_accuracy_nll_brier_hand_case():
    assert metrics.accuracy(PROBS, LABELS) == pytest.approx(0.75)
    expected_nll = -(math.log(0.95) + math.log(0.15) + math.log(0.65) + math.log(0.55)) / 4
    assert metrics.nll(PROBS, LABELS) == pytest.approx(expected_nll, rel=1e-6)
    # Per example sum_c (p - onehot)^2: 2*0.05^2, 2*0.85^2, 2*0.35^2, 2*0.45^2.
    assert metrics.brier(PROBS, LABELS) == pytest.approx((0.005 + 1.445 + 0.245 + 0.405) / 4, rel=1e-6)


def test_ece_hand_case_and_num_bins():
    # 2 bins: all four in (0.5, 1]; acc 0.75 = mean conf 0.75 -> perfectly calibrated.
    assert metrics.ece(PROBS, LABELS, num_bins=2) == pytest.approx(0.0, abs=1e-7)
    # 5 bins: (0.8,1] {0.95 R, 0.85 W} gap |0.5-0.9|, (0.6,0.8] {0.65 R} gap 0.35, (0.4,0.6] {0.55 R} gap 0.45.
    assert metrics.ece(PROBS, LABELS, num_bins=5) == pytest.approx(0.5 * 0.4 + 0.25 * 0.35 + 0.25 * 0.45, rel=1e-6)
    # 15 bins (default): each example alone in its bin.
    assert metrics.ece(PROBS, LABELS) == pytest.approx((0.05 + 0.85 + 0.35 + 0.45) / 4, rel=1e-6)


def test_reliability_bins_right_closed_and_consistent_with_ece():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    labels = torch.tensor([0, 0, 1])
    bins = metrics.reliability_bins(probs, labels, num_bins=4)
    # Right-closed bins: 0.5 -> (0.25, 0.5], 0.75 -> (0.5, 0.75], 1.0 -> (0.75, 1].
    assert bins.counts.tolist() == [0, 1, 1, 1]
    assert bins.confidence.tolist() == [0.0, 0.5, 0.75, 1.0]
    assert bins.accuracy.tolist() == [0.0, 0.5, 1.0, 1.0]  # the tie [0.5, 0.5] earns half a hit
    assert metrics.ece(probs, labels, num_bins=4) == pytest.approx((0.0 + 0.25 + 0.0) / 3)


def test_a_float32_probability_on_a_bin_edge_lands_where_its_float64_twin_does():
    """float32's 0.6 is 0.60000002: binned in float64 it left the bin (8/15, 9/15] (ECE 0.12 against 0.52)."""
    probs, labels = [[0.6, 0.4], [0.64, 0.36]], [0, 1]
    for num_bins in (15, 10, 5, 3):
        f64 = metrics.reliability_bins(torch.tensor(probs, dtype=torch.float64), torch.tensor(labels), num_bins)
        f32 = metrics.reliability_bins(torch.tensor(probs, dtype=torch.float32), torch.tensor(labels), num_bins)
        assert f32.counts.tolist() == f64.counts.tolist()
    uniform = torch.full((4, 3), 1 / 3)  # float32's 1/3 is above 1/3: still in (4/15, 5/15]
    assert metrics.reliability_bins(uniform, torch.zeros(4, dtype=torch.long)).counts.nonzero().flatten().tolist() == [4]


def test_a_tie_at_the_top_earns_the_same_credit_whichever_class_holds_the_label():
    """Ties went to the lowest index: [0.5, 0.5] scored accuracy 1 with label 0 and 0 with label 1 (AURC 0 and 1)."""
    probs = torch.tensor([[0.5, 0.5]] * 4)
    for labels in (torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)):
        assert metrics.accuracy(probs, labels) == 0.5 and metrics.aurc(probs, labels) == 0.5
    three = torch.tensor([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]])
    assert metrics.accuracy(three, torch.tensor([1, 2])) == pytest.approx(0.25)


def test_padded_classes_and_zero_probability_label():
    # A third class that does not exist for these examples has probability 0.
    probs = torch.tensor([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert math.isfinite(metrics.nll(probs, labels))
    assert metrics.nll(probs, labels) == pytest.approx((-math.log(0.7) - math.log(1e-12)) / 2)
    assert metrics.brier(probs, labels) == pytest.approx((0.3**2 + 0.3**2 + 1 + 1) / 2)


def test_summarize_and_numpy_input():
    row = metrics.summarize(PROBS.numpy(), LABELS.numpy(), num_bins=5)
    assert set(row) == {"accuracy", "ece", "nll", "brier"}
    assert row["ece"] == pytest.approx(100 * metrics.ece(PROBS, LABELS, num_bins=5))
    assert row["accuracy"] == pytest.approx(0.75)
    assert row["brier"] == pytest.approx(metrics.brier(PROBS, LABELS))


def _np_entropy(p):
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)


def test_entropies_match_numpy():
    rng = np.random.default_rng(0)
    sp = rng.dirichlet(np.ones(4), size=(5, 7))  # [S=5, N=7, C=4]
    sp[:, 0] = [0.5, 0.5, 0.0, 0.0]  # exact zeros: 0 log 0 must be 0, not nan
    pe = metrics.predictive_entropy(torch.as_tensor(sp))
    ee = metrics.expected_entropy(torch.as_tensor(sp))
    mi = metrics.mutual_information(torch.as_tensor(sp))
    assert pe.shape == ee.shape == mi.shape == (7,)
    np.testing.assert_allclose(pe.numpy(), _np_entropy(sp.mean(0)), rtol=1e-12)
    np.testing.assert_allclose(ee.numpy(), _np_entropy(sp).mean(0), rtol=1e-12)
    np.testing.assert_allclose(mi.numpy(), np.maximum(_np_entropy(sp.mean(0)) - _np_entropy(sp).mean(0), 0))
    assert pe[0] == pytest.approx(math.log(2))


def test_mutual_information_zero_when_samples_agree_positive_when_not():
    same = torch.tensor([0.1, 0.2, 0.7]).expand(3, 2, 3)  # [S=3, N=2, C=3], all samples identical
    assert torch.equal(metrics.mutual_information(same), torch.zeros(2, dtype=torch.float64))
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident samples, opposite classes
    assert metrics.expected_entropy(disagree).item() == 0.0
    assert metrics.mutual_information(disagree).item() == pytest.approx(math.log(2))
    assert metrics.mutual_information(torch.tensor([[[0.6, 0.4]], [[0.4, 0.6]]])).item() > 0


def test_auroc_hand_cases():
    assert metrics.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert metrics.auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert metrics.auroc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5
    # Pairs (out, in): (2,1) 1, (2,2) 1/2, (3,1) 1, (3,2) 1 -> 3.5 / 4.
    assert metrics.auroc([1.0, 2.0], [2.0, 3.0]) == pytest.approx(0.875)


def test_auroc_refuses_integers_float64_cannot_hold_beside_float_scores():
    """Integer scores past 2**53 beside float ones were cast to float64 and tied: 0.5 where every pair is ordered."""
    assert metrics.auroc([2**53 + 1], [2**53 + 2]) == 1.0  # integers only: ranked exactly
    with pytest.raises(ValueError, match="scores_in holds integers beyond 2\\*\\*53 while the other scores are floats"):
        metrics.auroc([2**53 + 1], [float(2**53)])
    assert metrics.auroc([1, 2, 3], [2.5, 3.5]) == pytest.approx(5 / 6)  # small integers beside floats: exact
    # unsigned 64-bit scores from 2**63 on wrapped negative as int64: 0.0 where every out-score is larger
    with pytest.raises(ValueError, match="scores_out holds unsigned 64-bit integers of 2\\*\\*63 or more"):
        metrics.auroc(np.array([1, 2, 3], dtype=np.uint64), np.array([2**63, 2**64 - 1], dtype=np.uint64))
    assert metrics.auroc(np.array([1, 2], dtype=np.uint64), np.array([2**63 - 1], dtype=np.uint64)) == 1.0


def test_auroc_matches_pairwise_count_with_ties():
    gen = torch.Generator().manual_seed(0)
    s_in = torch.randint(0, 5, (40,), generator=gen).double()
    s_out = torch.randint(1, 6, (30,), generator=gen).double()
    diff = s_out[None, :] - s_in[:, None]
    brute = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    assert metrics.auroc(s_in, s_out) == pytest.approx(brute, rel=1e-12)


def test_auroc_ties_entropies_of_rows_equal_but_for_their_order_and_negative_scores():
    """In-set rows [0.7, 0.1, 0.2] and shifted rows [0.7, 0.2, 0.1] have one entropy, computed 0.8018185525433373
    and ...372: the OOD AUROC was 0.0 where every pair ties (0.5). Negative scores tie alike."""
    in_rows = torch.tensor([[0.7, 0.1, 0.2]] * 4, dtype=torch.float64)
    out_rows = torch.tensor([[0.7, 0.2, 0.1]] * 3, dtype=torch.float64)
    h_in, h_out = metrics.predictive_entropy(in_rows[None]), metrics.predictive_entropy(out_rows[None])
    assert metrics.auroc(h_in, h_out) == 0.5 and metrics.auroc(-h_in, -h_out) == 0.5
    assert metrics.auroc(torch.tensor([-2.0, -1.0]), torch.tensor([-1.0, 0.0])) == pytest.approx(0.875)


def test_auroc_orders_near_uniform_rows_a_float32_step_apart():
    """Entropy is flat at its maximum (log C - 2 delta^2): two-class rows 0.5 + k 6e-8 differ by 1e-13 in it, which a
    relative 1e-12 tie tolerance chained into one group (OOD AUROC 0.5 where every shifted row is the more uniform:
    1.0; a compare run's mcdropout+ts reported 0.5 for 0.326)."""
    step = torch.finfo(torch.float32).eps / 2
    top_in = torch.tensor([0.5 + k * step for k in (5, 6, 7, 8, 9)], dtype=torch.float32)
    top_out = torch.tensor([0.5 + k * step for k in (1, 2, 3, 4)], dtype=torch.float32)
    rows_in, rows_out = (torch.stack([t, 1 - t], -1) for t in (top_in, top_out))
    h_in, h_out = metrics.predictive_entropy(rows_in[None]), metrics.predictive_entropy(rows_out[None])
    assert bool(h_out.min() > h_in.max())  # float64 entropies keep the order
    assert metrics.auroc(h_in, h_out) == 1.0 and metrics.auroc(h_out, h_in) == 0.0


def test_entropies_and_mutual_information_do_not_depend_on_the_order_of_entries_or_draws():
    """Bit-equal for a row's entries permuted and for the draws reordered: the AUROCs rank them with exact ties."""
    gen = torch.Generator().manual_seed(3)
    sp = torch.softmax(torch.randn(7, 50, 5, generator=gen, dtype=torch.float64) * 3, -1)
    shuffled = sp[torch.randperm(7, generator=gen)][..., torch.randperm(5, generator=gen)]
    for f in (metrics.predictive_entropy, metrics.expected_entropy, metrics.mutual_information):
        assert torch.equal(f(sp), f(shuffled))
    mi = metrics.mutual_information(sp)
    assert metrics.auroc(mi, metrics.mutual_information(shuffled)) == 0.5


def _quantile_bin(pooled, values, bins):
    """Each of ``values``' quantile bin among ``pooled``, placed by its mid-rank (the count below it plus half of its
    ties): equal values share a bin."""
    below, equal = (pooled[None, :] < values[:, None]).sum(1), (pooled[None, :] == values[:, None]).sum(1)
    return np.minimum(np.floor((below + equal / 2) / len(pooled) * bins), bins - 1)


def test_stratified_auroc_counts_pairs_within_bins():
    """Against a brute-force count over the pairs whose covariates fall in the same pooled-quantile bin, with ties in
    both scores and covariates (answer lengths are integers, lengths of many examples where a quantile falls)."""
    gen = np.random.default_rng(0)
    lengths = [(gen.integers(5, 25, 60), gen.integers(10, 40, 45)), (gen.integers(1, 4, 50), gen.integers(2, 5, 30))]
    for c_in, c_out in lengths:
        c_in, c_out = c_in.astype(float), c_out.astype(float)
        s_in, s_out = c_in + gen.integers(0, 4, len(c_in)), c_out + gen.integers(0, 5, len(c_out))  # mostly the length
        pooled = np.concatenate([c_in, c_out])
        for bins in (1, 2, 3, 5):
            same = _quantile_bin(pooled, c_in, bins)[:, None] == _quantile_bin(pooled, c_out, bins)[None, :]
            diff = s_out[None, :] - s_in[:, None]
            brute = (((diff > 0) + 0.5 * (diff == 0)) * same).sum() / same.sum()
            assert metrics.stratified_auroc(s_in, s_out, c_in, c_out, bins=bins) == pytest.approx(brute, rel=1e-12)
    assert metrics.stratified_auroc(s_in, s_out, c_in, c_out, bins=1) == pytest.approx(metrics.auroc(s_in, s_out), rel=1e-12)
    # a score that is the covariate alone separates the sets, and tells nothing within bins of one covariate value
    short, long = np.repeat([1.0, 2.0], [40, 10]), np.repeat([1.0, 2.0], [10, 40])
    assert metrics.auroc(short, long) == pytest.approx(0.8)
    assert metrics.stratified_auroc(short, long, short, long, bins=2) == 0.5
    # a quantile edge on a length put it in the next bin beside the next length: the plain AUROC (0.79 for 0.5), or
    # 1.0 for lengths that alone separate the sets
    for short, long, bins in (([1.0] * 5 + [2.0], [1.0] + [2.0] * 3, 2), ([1.0] * 8 + [2.0] * 2, [2.0] * 3 + [3.0] * 3, 3)):
        assert metrics.stratified_auroc(short, long, short, long, bins=bins) == 0.5
    with pytest.raises(ValueError, match="no covariate bin of 2 holds examples of both sets"):
        metrics.stratified_auroc([1.0] * 6, [2.0] * 4, [1.0] * 6, [2.0] * 4, bins=2)


def test_stratified_auroc_refuses_bad_input():
    with pytest.raises(ValueError, match="covariate_out must have one value per score"):
        metrics.stratified_auroc([1.0, 2.0], [1.0], [1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="covariate_in contains non-finite"):
        metrics.stratified_auroc([1.0], [1.0], [float("nan")], [1.0])
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        metrics.stratified_auroc([1.0], [1.0], [1.0], [1.0], bins=0)
    with pytest.raises(ValueError, match="scores_in contains non-finite"):
        metrics.stratified_auroc([float("inf")], [1.0], [1.0], [1.0])
    with pytest.raises(ValueError, match="no covariate bin of 2 holds examples of both sets"):
        metrics.stratified_auroc([1.0, 2.0], [1.0, 2.0], [1.0, 1.0], [9.0, 9.0], bins=2)


def test_risk_coverage_hand_case():
    # Sorted by confidence: 0.95 R, 0.85 W, 0.65 R, 0.55 R.
    cov, acc = metrics.risk_coverage(PROBS, LABELS)
    torch.testing.assert_close(cov, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(acc, torch.tensor([1.0, 0.5, 2 / 3, 0.75], dtype=torch.float64))
    assert metrics.accuracy_at_coverage(PROBS, LABELS, 0.25) == 1.0
    assert metrics.accuracy_at_coverage(PROBS, LABELS, 0.5) == 0.5
    assert metrics.accuracy_at_coverage(PROBS, LABELS, 1.0) == pytest.approx(metrics.accuracy(PROBS, LABELS))
    assert metrics.aurc(PROBS, LABELS) == pytest.approx((0 + 0.5 + 1 / 3 + 0.25) / 4)


def _ordered_accuracies(probs, labels):
    """The curve with ties broken by input order (stable sort): the old, order-dependent definition."""
    conf, pred = probs.double().max(-1)
    correct = (pred == labels).double()[torch.sort(conf, descending=True, stable=True).indices]
    return correct.cumsum(0) / torch.arange(1, len(conf) + 1, dtype=torch.float64)


def test_risk_coverage_averages_confidence_ties_hand_case():
    # two tie groups: 0.9 (both right), then 0.6 (one right, one wrong); the input order must not matter
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 0, 0])
    for order in ([0, 1, 2, 3], [1, 0, 2, 3], [3, 1, 2, 0]):
        p, y = probs[order], labels[order]
        _, acc = metrics.risk_coverage(p, y)
        # k = 3 keeps one of the 0.6 pair: 1/2 of a correct one on average
        torch.testing.assert_close(acc, torch.tensor([1.0, 1.0, 2.5 / 3, 0.75], dtype=torch.float64))
        assert metrics.aurc(p, y) == pytest.approx((0 + 0 + 1 / 6 + 1 / 4) / 4)  # 0.1042 (order gave 0.0625 or 0.1458)
        assert metrics.accuracy_at_coverage(p, y, 0.75) == pytest.approx(5 / 6)  # (order gave 1.0 or 0.667)
        assert metrics.accuracy_at_coverage(p, y, 0.5) == 1.0


def test_rounded_probabilities_of_one_top_value_tie_whatever_their_other_entries_sum_to_in_floats():
    """0.1 + 0.2 rounds to 0.30000000000000004 and 0.15 + 0.15 to 0.3: the two 0.7 rows were ordered by that rounding
    (accuracy at 1/3 coverage 0.0, AURC 0.611) where they tie (0.5; the mean over both orders, 0.444)."""
    labels = torch.tensor([0, 1, 0])
    probs = torch.tensor([[0.7, 0.1, 0.2], [0.7, 0.15, 0.15], [0.6, 0.4, 0.0]], dtype=torch.float64)
    by_order = [1 - (torch.tensor(h, dtype=torch.float64).cumsum(0) / torch.arange(1, 4)) for h in ([1, 0, 1], [0, 1, 1])]
    for order in ([0, 1, 2], [1, 0, 2]):
        assert metrics.accuracy_at_coverage(probs[order], labels[order], 1 / 3) == 0.5
        assert metrics.aurc(probs[order], labels[order]) == pytest.approx(float(torch.stack(by_order).mean()), abs=1e-12)


def test_a_chain_of_near_values_does_not_tie_its_far_apart_ends():
    """Ties were chained: each value within 1e-12 of the one before joined its group, so 4001 distinct float64
    uncertainties spaced by 0.9e-12 (ends 3.6e-9 apart) were one tie (AURC 0.500, accuracy at half coverage 0.500). A
    value joins its group's first only: groups of two here, which the strict order's metrics equal (0.154, 0.9995)."""
    n = 4001
    u = 0.3 * (1 + 0.9e-12 * torch.arange(n, dtype=torch.float64))
    probs = torch.stack([1 - u, u], 1)
    labels = (torch.arange(n) >= n // 2).long()  # the more confident half right
    strict = (labels == 0).double().cumsum(0) / torch.arange(1, n + 1)
    assert metrics.aurc(probs, labels) == pytest.approx(float((1 - strict).mean()), abs=1e-12)
    kept = math.floor(0.5 * n + 0.5)  # 2001 examples: 2000 right, 1 wrong
    assert metrics.accuracy_at_coverage(probs, labels, 0.5) == pytest.approx(float(strict[kept - 1]), abs=1e-12)
    groups, sizes = metrics._tie_groups(0.3 * (1 + torch.tensor([0.0, 0.9e-12, 1.8e-12], dtype=torch.float64)))
    assert groups.tolist() == [0, 0, 1] and sizes.tolist() == [2, 1]  # the third is 1.8e-12 from the group's first


def test_risk_coverage_is_the_expectation_over_orders_and_order_invariant():
    import itertools

    g = torch.Generator().manual_seed(0)
    # 7 examples, confidences on a coarse grid (saturated 1.0 included): several tie groups
    top = torch.tensor([1.0, 1.0, 0.8, 0.8, 0.8, 0.6, 1.0], dtype=torch.float64)
    probs = torch.stack([top, 1 - top], 1)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0])
    _, acc = metrics.risk_coverage(probs, labels)
    # the exact expectation: every order of the examples, ties broken by that order
    orders = [list(o) for o in itertools.permutations(range(7))]
    mean = torch.stack([_ordered_accuracies(probs[o], labels[o]) for o in orders]).mean(0)
    torch.testing.assert_close(acc, mean, rtol=0, atol=1e-12)
    # random permutations of a larger, tie-heavy set change nothing
    levels = torch.tensor([0.5, 0.7, 0.9, 1.0])
    top = levels[torch.randint(0, 4, (200,), generator=g)]
    probs = torch.stack([top, 1 - top], 1)
    labels = torch.randint(0, 2, (200,), generator=g)
    ref = metrics.risk_coverage(probs, labels)[1]
    for _ in range(5):
        perm = torch.randperm(200, generator=g)
        torch.testing.assert_close(metrics.risk_coverage(probs[perm], labels[perm])[1], ref, rtol=0, atol=1e-12)
        assert metrics.aurc(probs[perm], labels[perm]) == pytest.approx(metrics.aurc(probs, labels), abs=1e-12)
        for c in (0.1, 0.33, 0.5, 0.8):
            assert metrics.accuracy_at_coverage(probs[perm], labels[perm], c) == pytest.approx(
                metrics.accuracy_at_coverage(probs, labels, c), abs=1e-12)


def test_risk_coverage_without_ties_is_the_plain_cumulative_accuracy():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(300, 4, generator=g, dtype=torch.float64), -1)
    labels = torch.randint(0, 4, (300,), generator=g)
    assert len(torch.unique(probs.max(-1).values)) == 300
    assert torch.equal(metrics.risk_coverage(probs, labels)[1], _ordered_accuracies(probs, labels))
    assert metrics.aurc(probs, labels) == float((1 - _ordered_accuracies(probs, labels)).mean())


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "empty"),
        (torch.full((3, 2), 0.5), torch.tensor([0, 1]), "shape mismatch"),
        (torch.full((2,), 0.5), torch.tensor([0, 1]), r"\[N, C\]"),
        (torch.full((2, 2), 0.5), torch.tensor([0, 2]), "out of range"),
        (torch.full((2, 2), 0.5), torch.tensor([-1, 0]), "out of range"),
        (torch.tensor([[0.5, float("nan")], [0.5, 0.5]]), torch.tensor([0, 1]), "non-finite"),
        (torch.tensor([[0.5, float("inf")], [0.5, 0.5]]), torch.tensor([0, 1]), "non-finite"),
        (torch.full((2, 2), 0.5), torch.tensor([0.0, 1.0]), "integer"),
    ],
)
def test_bad_inputs_raise(probs, labels, match):
    for fn in (metrics.accuracy, metrics.ece, metrics.nll, metrics.brier, metrics.summarize, metrics.risk_coverage):
        with pytest.raises(ValueError, match=match):
            fn(probs, labels)


NOT_PROBS = (r"probs rows must be probability vectors \(non-negative, summing to 1 within .*\); got values from .* "
             r"pass softmax\(logits\), not logits")


def _probs_metrics():
    return (metrics.accuracy, metrics.ece, metrics.nll, metrics.brier, metrics.summarize, metrics.reliability_bins,
            metrics.risk_coverage, metrics.aurc, lambda p, y: metrics.accuracy_at_coverage(p, y, 0.5))


def test_logits_and_unnormalised_rows_are_refused():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(50, 4, generator=gen)
    labels = torch.randint(0, 4, (50,), generator=gen)
    scores = logits.exp()  # non-negative, but not normalised
    off = torch.tensor([[0.6, 0.3], [0.5, 0.5]])  # one row sums to 0.9
    for bad in (logits, scores, off):
        y = labels[: len(bad)] % bad.shape[1]
        for fn in _probs_metrics():
            with pytest.raises(ValueError, match=NOT_PROBS):
                fn(bad, y)
    with pytest.raises(ValueError, match=r"row sums from 0.9 to 1: "):
        metrics.nll(off, torch.tensor([0, 1]))
    # a bfloat16 softmax cast to float32 was told to pass softmax(logits), not logits: it is one, rounded
    rounded = torch.randn(45, 2, generator=gen).softmax(-1).bfloat16()
    metrics.ece(rounded, labels[:45] % 2)  # in its own dtype: its rounding allowed
    with pytest.raises(ValueError, match=r"they look like probabilities rounded in a narrower dtype \(a bfloat16 or "
                                         r"float16 softmax cast to torch.float32\): pass them in that dtype, or renormalise"):
        metrics.ece(rounded.float(), labels[:45] % 2)
    # 1 minus the others in float64 (-2.2e-16) was told to pass softmax(logits): the row is one, its rounding below 0
    with pytest.raises(ValueError, match=r"their negative entries are rounding error \(a probability computed as 1 minus "
                                         r"the others\?\): clamp them at 0 and renormalise"):
        metrics.nll(torch.tensor([[1.0, 1 - 1.0000000000000002]], dtype=torch.float64), torch.tensor([0]))
    for fn in (metrics.predictive_entropy, metrics.expected_entropy, metrics.mutual_information):
        with pytest.raises(ValueError, match="sample_probs rows must be probability vectors"):
            fn(logits.reshape(5, 10, 4))


def test_probability_rows_pass_with_missing_choices_and_half_precision():
    # zeros for missing choices are probability vectors; values unchanged by the check
    probs = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.0, 0.8], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 1])
    assert metrics.nll(probs, labels) == pytest.approx((-math.log(0.7) - math.log(0.8) - math.log(1e-12)) / 3)
    assert metrics.accuracy(probs, labels) == pytest.approx(2 / 3)
    # float32 rounding (a row 5e-5 off) passes; 1e-3 off does not
    assert metrics.accuracy(torch.tensor([[0.50005, 0.5]]), torch.tensor([0])) == 1.0
    with pytest.raises(ValueError, match=r"row sums from 1.001 to 1.001: they look like probabilities rounded"):
        metrics.accuracy(torch.tensor([[0.501, 0.5]]), torch.tensor([0]))
    # rows 2% off are no rounding, and rows already in a 16-bit dtype cannot be passed "in that dtype"
    for bad in (torch.tensor([[0.49, 0.49], [0.3, 0.67]]), torch.tensor([[0.49, 0.49]]).bfloat16()):
        with pytest.raises(ValueError, match=r"pass softmax\(logits\), not logits"):
            metrics.nll(bad, torch.tensor([0] * len(bad)))
    # half precision: softmax rows off by up to ~3e-4 (float16) / ~3e-3 (bfloat16), scored as given
    gen = torch.Generator().manual_seed(1)
    logits, y = 4 * torch.randn(500, 5, generator=gen), torch.randint(0, 5, (500,), generator=gen)
    for dtype in (torch.float16, torch.bfloat16):
        half = torch.softmax(logits.to(dtype), -1)
        assert (half.double().sum(-1) - 1).abs().max() > 1e-4  # beyond the float32 tolerance
        row = metrics.summarize(half, y)
        p_true = half.double().gather(1, y[:, None]).squeeze(1)
        assert row["nll"] == pytest.approx(float(-p_true.clamp(min=1e-12).log().mean()), rel=1e-12)
        assert metrics.mutual_information(half.reshape(5, 100, 5)).shape == (100,)


def test_bad_arguments_raise():
    for bad in (0, True, 2.5, "5"):  # True was taken as one bin: ECE |mean conf - acc| over everything
        with pytest.raises(ValueError, match="num_bins must be a positive integer"):
            metrics.ece(PROBS, LABELS, num_bins=bad)
    assert metrics.ece(PROBS, LABELS, num_bins=np.int64(2)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="coverage"):
        metrics.accuracy_at_coverage(PROBS, LABELS, 0.0)
    with pytest.raises(ValueError, match="empty"):
        metrics.auroc([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.auroc([float("nan")], [1.0])
    with pytest.raises(ValueError, match=r"\[S, N, C\]"):
        metrics.mutual_information(PROBS)
    with pytest.raises(ValueError, match="empty"):
        metrics.predictive_entropy(torch.zeros(0, 3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.expected_entropy(torch.full((2, 1, 2), float("nan")))


def _assert_png_alone(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind


def _random_probs(n, c, seed, sharpness):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharpness * torch.randn(n, c, generator=gen), dim=-1)
    return probs, torch.randint(0, c, (n,), generator=gen)


def test_reliability_diagram_png(tmp_path):
    probs, labels = _random_probs(200, 4, 0, 3.0)
    out = plots.reliability_diagram(probs, labels, tmp_path / "sub" / "rel.png", num_bins=10, title="MAP")
    _assert_png_alone(out)


def test_reliability_grid_png(tmp_path):
    sharpness = {"map": 4.0, "mfvi": 1.0, "laplace": 2.0, "tfb": 0.5}
    results = {name: _random_probs(100, 3, i, s) for i, (name, s) in enumerate(sharpness.items())}
    _assert_png_alone(plots.reliability_grid(results, tmp_path / "grid.png"))
    with pytest.raises(ValueError, match="empty"):
        plots.reliability_grid({}, tmp_path / "none.png")


def test_metric_scatter_png(tmp_path):
    rows = [
        {"guide": "map", "accuracy": 0.81, "accuracy_std": 0.01, "ece": 9.9, "ece_std": 0.5, "nll": 0.46, "nll_std": 0.02},
        {"guide": "mfvi", "accuracy": 0.80, "accuracy_std": 0.02, "ece": 3.1, "ece_std": 0.4, "nll": 0.38, "nll_std": 0.01},
        {"guide": "laplace", "accuracy": 0.82, "ece": 3.5, "nll": 0.39},  # no stds: no error bars
    ]
    _assert_png_alone(plots.metric_scatter(rows, tmp_path / "scatter.png"))
    with pytest.raises(ValueError, match="lacks keys"):
        plots.metric_scatter([{"guide": "x", "accuracy": 0.5}], tmp_path / "bad.png")


def test_save_png_failure_leaves_no_temp_file(tmp_path):
    class Broken:
        def savefig(self, f, **kwargs):
            f.write(b"partial")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        plots.save_png(Broken(), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_importing_plots_does_not_import_matplotlib():
    code = "import sys, pyro_lora.experiments.plots; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_accuracy_at_coverage_rounds_half_up_whatever_n():
    """round() rounds half to even: at 0.5 it kept 2 of 5 examples but 4 of 7."""
    for n, kept in ((5, 3), (7, 4), (3, 2)):
        probs = torch.tensor([[1.0 - i / (2 * n), i / (2 * n)] for i in range(n)])  # confidence falls with the row
        labels = torch.tensor([0] * (kept - 1) + [1] * (n - kept + 1))  # the `kept`-th most confident is wrong
        assert metrics.accuracy_at_coverage(probs, labels, 0.5) == pytest.approx((kept - 1) / kept)


def test_accuracy_at_coverage_rounds_the_decimal_coverage_not_its_binary_float():
    """0.7 * 45 is 31.499999999999996 in floats: half up of 31.5 keeps 32 examples, not 31."""
    conf = torch.linspace(0.99, 0.55, 45, dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.zeros(45, dtype=torch.long)
    labels[31] = 1  # the 32nd most confident is wrong
    assert metrics.accuracy_at_coverage(probs, labels, 0.7) == pytest.approx(31 / 32)
    assert metrics.accuracy_at_coverage(probs, labels, 0.35) == pytest.approx(1.0)  # 15.75 -> 16, all right


def test_python_lists_are_scored_in_float64_as_numpy_arrays_are():
    """torch.as_tensor(list) makes float32, which tied 0.30000001 with 0.3 and 0.99999999 with 0.99999998."""
    assert metrics.auroc([0.30000001, 0.5], [0.3]) == 0.0 == metrics.auroc(np.array([0.30000001, 0.5]), np.array([0.3]))
    p, y = [[0.99999999, 1e-8], [0.99999998, 2e-8], [0.9, 0.1]], [0, 1, 0]
    assert metrics.aurc(p, y) == pytest.approx(metrics.aurc(np.array(p), np.array(y))) == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)  # risks of the 1, 2, 3 most confident
    assert metrics.accuracy_at_coverage(p, y, 1 / 3) == 1.0


def test_complex_values_are_refused():
    with pytest.raises(ValueError, match="probs must be real"):
        metrics.ece(torch.tensor([[1.0 + 0j, 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="scores_out must be real"):
        metrics.auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3 + 1j]))


def test_a_bfloat16_row_three_percent_short_of_one_is_refused():
    """Rounding moves a bfloat16 row's sum by about 3e-3; a row summing to 0.96875 was accepted (ECE 3.1)."""
    short = torch.tensor([[0.96875, 0.0], [0.0, 0.96875]], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="probability vectors"):
        metrics.ece(short, torch.tensor([0, 1]))


@pytest.mark.parametrize("coverage", [0.7, np.float32(0.7), torch.tensor(0.7), np.float64(0.7)])
def test_accuracy_at_coverage_reads_the_coverage_at_its_own_precision(coverage):
    """A float32 0.7 is 0.699999988 in float64: 45 rows kept 31 examples, not 32."""
    conf = torch.linspace(0.99, 0.55, 45, dtype=torch.float64)
    labels = torch.zeros(45, dtype=torch.long)
    labels[31] = 1
    assert metrics.accuracy_at_coverage(torch.stack([conf, 1 - conf], 1), labels, coverage) == pytest.approx(31 / 32)


@pytest.mark.parametrize("coverage", [True, 0, 1.5, float("nan"), "0.5"])
def test_accuracy_at_coverage_refuses_what_is_no_fraction(coverage):
    with pytest.raises(ValueError, match="coverage must be"):
        metrics.accuracy_at_coverage(PROBS, LABELS, coverage)


@pytest.mark.parametrize("scores", [[np.complex128(1 + 1j), np.complex128(2)], [1 + 1j, 2.0], [torch.tensor(1 + 1j)]])
def test_complex_scores_in_lists_are_refused_by_name(scores):
    with pytest.raises(ValueError, match="scores_in must be real"):
        metrics.auroc(scores, [3.0, 4.0])


@pytest.mark.parametrize("scores", [["0.1", "0.5"], [torch.tensor([0.1]), torch.tensor(0.5)], [object(), 0.5]])
def test_scores_that_are_no_array_of_numbers_are_refused_by_name(scores):
    with pytest.raises(ValueError, match="scores_in must be"):  # strings were parsed ("0.1" read as 0.1)
        metrics.auroc(scores, [0.3, 0.9])


def test_sparse_or_meta_probabilities_and_a_huge_bin_count_are_refused_by_name():
    """A sparse tensor raised 'Could not run aten::ne.Scalar', a meta one 'Tensor.item() cannot be called'; 10**9 bins
    allocated three 8 GB tensors (10**12 ran out of memory)."""
    probs, labels = torch.tensor([[0.2, 0.8], [0.6, 0.4]]), torch.tensor([1, 0])
    for bad, match in ((probs.to_sparse(), "of layout torch.sparse_coo"), (probs.to("meta"), "on the meta device")):
        for metric in (metrics.nll, metrics.ece, metrics.accuracy):
            with pytest.raises(ValueError, match=f"probs must be a dense tensor with values, got one {match}"):
                metric(bad, labels)
            with pytest.raises(ValueError, match=f"labels must be a dense tensor with values, got one {match}"):
                metric(probs, labels.to_sparse() if "sparse" in match else labels.to("meta"))
    with pytest.raises(ValueError, match="num_bins must be at most 1,000,000 .* got 1,000,000,000"):
        metrics.ece(probs, labels, num_bins=10**9)
    assert metrics.ece(probs, labels, num_bins=10**6) == pytest.approx(0.3, abs=1e-6)  # |0.8 - 1| / 2 + |0.6 - 0| / 2


def test_object_arrays_of_numbers_are_scored_as_their_lists_are():
    from decimal import Decimal

    values = [0.1, Decimal("0.5")]
    assert metrics.auroc(np.array(values, dtype=object), [0.3, 0.9]) == metrics.auroc(values, [0.3, 0.9]) == 0.75


def test_string_labels_and_a_coverage_of_several_values_are_refused_by_name():
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        metrics.nll(PROBS, ["0", "1", "1", "1"][: len(LABELS)])
    with pytest.raises(ValueError, match="coverage must be"):
        metrics.accuracy_at_coverage(PROBS, LABELS, torch.tensor([0.7]))


def test_longdouble_arrays_and_lists_of_tensors_that_require_grad_are_scored_or_refused_by_name():
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.longdouble)
    assert metrics.nll(probs, [0, 1]) == pytest.approx(metrics.nll(probs.astype(np.float64), [0, 1]))
    scores = [torch.tensor(0.1, requires_grad=True), torch.tensor(0.5, requires_grad=True)]
    with pytest.raises(ValueError, match="scores_in must be an array of numbers"):
        metrics.auroc(scores, [0.3, 0.9])


def test_float32_rows_in_a_list_are_binned_as_the_same_rows_in_an_array():
    """A list of float32 rows was cast to float64 first: 0.6 in float32 (0.60000002) fell into the bin above the one
    float32 edges give it, ECE 0.475 for the array's 0.075."""
    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.55, 0.45], [0.55, 0.45]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    expected = metrics.ece(probs, labels)
    assert expected == pytest.approx(0.075, abs=1e-6)
    assert metrics.ece(list(probs), labels) == expected
    assert metrics.ece(list(torch.from_numpy(probs)), labels) == expected
    rows = [[0.6, 0.4], [0.6, 0.4], [0.55, 0.45], [0.55, 0.45]]  # Python floats: float64, as in a float64 array
    assert metrics.ece(rows, labels) == metrics.ece(np.array(rows), labels)


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
def test_8_bit_float_probabilities_are_refused(dtype):
    """Their tolerance, 2 eps, let rows summing to 0.5 pass as probability vectors (NLL 1.04 of unnormalised rows)."""
    probs = torch.tensor([[0.5, 0.0], [0.25, 0.25]]).to(dtype)
    with pytest.raises(ValueError, match="8-bit float rounds a probability"):
        metrics.nll(probs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="8-bit float rounds a probability"):
        metrics.mutual_information(torch.stack([probs, probs]))


def test_integer_scores_beyond_float64_precision_and_wide_unsigned_labels_are_read_exactly():
    """Integer scores went through float64, tying 2**53 with 2**53 + 1 (AUROC 0.5 for 3.5 / 6); a uint64 label
    2**64 - 1 wrapped to -1 in the refusal."""
    s_in, s_out = torch.tensor([2**53, 2**53 + 1, 3]), torch.tensor([2**53 + 1, 5])
    # pairs (out, in): (2**53+1: 1, 1/2, 1), (5: 0, 0, 1) -> 3.5 / 6
    assert metrics.auroc(s_in, s_out) == pytest.approx(3.5 / 6, rel=1e-12)
    assert metrics.stratified_auroc(s_in, s_out, [1, 1, 1], [1, 1]) == pytest.approx(3.5 / 6, rel=1e-12)
    for labels in (torch.tensor([0, 2**64 - 1], dtype=torch.uint64), np.array([0, 2**64 - 1], dtype=np.uint64)):
        with pytest.raises(ValueError, match=f"got max {2**64 - 1}"):
            metrics.nll(torch.tensor([[0.7, 0.3], [0.2, 0.8]]), labels)
    assert metrics.nll(torch.tensor([[0.7, 0.3], [0.2, 0.8]]), torch.tensor([0, 1], dtype=torch.uint64)) == \
        pytest.approx(-(math.log(0.7) + math.log(0.8)) / 2)


def test_a_bfloat16_coverage_is_read_as_the_decimal_written_for_it():
    """numpy has no bfloat16: the coverage failed with "Got unsupported ScalarType BFloat16"."""
    probs = torch.softmax(torch.randn(45, 2, generator=torch.Generator().manual_seed(0)), -1)
    labels = torch.arange(45) % 2
    assert metrics.accuracy_at_coverage(probs, labels, torch.tensor(0.7, dtype=torch.bfloat16)) == \
        metrics.accuracy_at_coverage(probs, labels, 0.7)  # 0.7 * 45 = 31.5 -> 32; bfloat16's 0.69921875 would give 31


def _saturated(seed, n=872, scale=12.0):
    """Binary float32 probabilities, as predict returns them, of an over-confident model: |logit difference| drawn
    Exp(mean ``scale``), right more often the larger it is; about a quarter of the confidences round to exactly 1.0.
    Returns probs [n, 2], labels [n], the exact margins [n] (float64) and whether each prediction is right [n]."""
    g = torch.Generator().manual_seed(seed)
    margin = torch.empty(n, dtype=torch.float64).exponential_(1 / scale, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    right = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(margin / (scale / 3))
    logits = torch.zeros(n, 2, dtype=torch.float64)
    logits[torch.arange(n), torch.where(right, labels, 1 - labels)] = margin
    return logits.softmax(-1).float(), labels, margin, right


def test_saturated_float32_confidences_are_ranked_by_their_margin_not_tied_at_one():
    """202 of 872 float32 confidences are exactly 1.0: they were tied (AURC 0.0568) where the small entries still
    hold their margins (1e-9, 3e-12, ...); the reference ranks the examples by their exact margins (0.0563)."""
    probs, labels, margin, right = _saturated(0)
    assert int((probs.max(-1).values == 1).sum()) == 202 and float(margin.max()) < 87  # no entry below float32's normals
    by_margin = right.double()[torch.argsort(margin, descending=True)]
    accuracies = by_margin.cumsum(0) / torch.arange(1, 873)
    assert metrics.aurc(probs, labels) == pytest.approx(float((1 - accuracies).mean()), abs=1e-12)  # 0.0563
    assert metrics.accuracy_at_coverage(probs, labels, 0.5) == pytest.approx(float(accuracies[435]), abs=1e-12)
    torch.testing.assert_close(metrics.risk_coverage(probs, labels)[1], accuracies, rtol=0, atol=1e-12)


def test_a_temperature_keeps_the_selective_prediction_scores_of_two_classes():
    """apply_temperature (the temperature and +ts rows) rebuilds rows in float64 from both entries, so the saturated
    float32 ties of the plain row were ordered there: AURC 0.0568 plain against 0.0563 at T = 1.3."""
    from pyro_lora.calibration import apply_temperature

    for seed, scale in ((0, 12.0), (1, 25.0)):  # 25: margins beyond 103 nats, one-hot in float32, tie in both
        probs, labels, _, _ = _saturated(seed, scale=scale)
        plain = [metrics.aurc(probs, labels), *(metrics.accuracy_at_coverage(probs, labels, c) for c in (0.5, 0.8))]
        for t in (0.5, 1.0001, 1.3, 3.0, 20.0):
            scaled = apply_temperature(probs, t)
            assert [metrics.aurc(scaled, labels), *(metrics.accuracy_at_coverage(scaled, labels, c) for c in (0.5, 0.8))] == plain
        # rows that sum to 1 only within float32's rounding rank as their renormalised twins: a float64 copy ranks alike
        renormalised = probs.double() / probs.double().sum(-1, keepdim=True)
        assert metrics.aurc(renormalised, labels) == plain[0]


def test_the_verdict_finds_a_temperature_no_better_on_aurc_than_the_map_it_scales():
    """Three seeds of an over-confident binary MAP saturated at 1.0: temperature scaling was named best on AURC
    (0.050 against the MAP's 0.061) though a temperature cannot reorder two-class confidences."""
    import io

    from pyro_lora.calibration import apply_temperature
    from pyro_lora.experiments.scoring import prediction_arrays, score
    from pyro_lora.experiments.verdict import verdict
    from pyro_lora.predictive import Prediction

    rows = []
    for seed in range(3):
        probs, labels, _, _ = _saturated(seed, scale=25.0)
        for guide, setting, p in (("map", "no validation data", probs),
                                  ("temperature", "validation-tuned", apply_temperature(probs, 1.3))):
            # as compare saves them: through the npz
            saved = io.BytesIO()
            np.savez(saved, **prediction_arrays(Prediction(probs=p, labels=labels), "sst2", seed, point_estimate=True))
            saved.seek(0)
            with np.load(saved) as arrays:
                p, y = (torch.from_numpy(arrays[f"sst2__seed{seed}__{k}"]) for k in ("probs", "labels"))
            rows.append({"guide": guide, "setting": setting, "dataset": "sst2", "seed": seed,
                         **score(Prediction(probs=p, labels=y), point_estimate=True)})
        map_row, ts_row = rows[-2:]
        assert [ts_row[k] for k in ("aurc", "accuracy_at_50", "accuracy_at_80")] == \
            [map_row[k] for k in ("aurc", "accuracy_at_50", "accuracy_at_80")]
    assert "AURC: map, temperature (" in verdict(rows, "sst2")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_confidences_are_binned_as_the_values_they_are(dtype):
    """Bin edges rounded to bfloat16 moved (14/15 is 0.93359375 there): a confidence above 14/15 fell into the bin
    below, ECE 15.82 for the 22.46 of the same values in float32."""
    from fractions import Fraction

    # each value is the dtype's own rounding of an edge k/15 above 1/2 that rounds up: just above k/15, in the bin above
    up = [v for k in range(8, 15) if Fraction(float(v := torch.tensor(k / 15, dtype=dtype))) > Fraction(k, 15)]
    assert len(up) >= 2  # bfloat16: 14/15 among them
    conf = torch.stack(up)
    probs = torch.stack([conf, 1 - conf], -1)
    labels = torch.zeros(len(up), dtype=torch.long)
    expected = [0] * 15
    for v in up:  # right-closed bins ((k-1)/15, k/15] of the exact value
        expected[math.ceil(Fraction(float(v)) * 15) - 1] += 1
    assert metrics.reliability_bins(probs, labels).counts.tolist() == expected
    assert metrics.ece(probs, labels) == metrics.ece(probs.float(), labels) == metrics.ece(probs.double(), labels)
    if dtype == torch.bfloat16:  # the adversary's case: ten right at 0.93359375, ten at 0.8828125 half right
        conf = torch.tensor([0.93359375] * 10 + [0.8828125] * 10, dtype=dtype)
        labels = torch.tensor([0] * 15 + [1] * 5)
        assert metrics.ece(torch.stack([conf, 1 - conf], -1), labels) == pytest.approx(
            0.5 * (1 - 0.93359375) + 0.5 * (0.8828125 - 0.5), abs=1e-12)  # 0.2246


def test_half_precision_rows_are_allowed_their_rounding_and_no_more():
    """The tolerance was 2 eps (bfloat16: 0.0156), 8 times a rounded softmax's error: a bfloat16 row summing to 0.986
    was scored as given (NLL 1.2344 for the renormalised row's 1.2206). Rounding moves a sum by eps / 2, an average
    of rounded rows rounded again by eps: that is the tolerance now."""
    short = {torch.bfloat16: [[0.6953125, 0.291015625]], torch.float16: [[0.5, 0.4985]]}  # 1.4% and 0.15% short
    for dtype, row in short.items():
        with pytest.raises(ValueError, match="probability vectors"):
            metrics.nll(torch.tensor(row, dtype=dtype), torch.tensor([1]))
    # what the library's predictives give (float32 softmaxes and their averages) in half precision passes
    gen = torch.Generator().manual_seed(0)
    for c in (2, 5, 50):
        samples = torch.softmax(6 * torch.randn(8, 400, c, generator=gen), -1)  # [S, N, C] as keep_samples keeps them
        labels = torch.randint(0, c, (400,), generator=gen)
        for dtype in (torch.float16, torch.bfloat16):
            for probs in (samples.mean(0).to(dtype), samples.to(dtype).mean(0)):
                metrics.summarize(probs, labels)
                metrics.aurc(probs, labels)
            metrics.mutual_information(samples.to(dtype))


def test_a_float16_softmax_over_a_large_vocabulary_is_a_probability_vector():
    """Entries below float16's smallest normal round by an absolute step (6e-8), not by half an eps of their value: a
    uniform softmax over Llama 3's 128256 tokens rounded to float16 sums to 1.0015, and was refused as logits."""
    from pyro_lora.calibration import apply_temperature

    probs = torch.zeros(2, 128256).softmax(-1).half()
    assert float(probs.double().sum(-1).max()) - 1 > torch.finfo(torch.float16).eps  # the case: beyond one eps
    assert metrics.nll(probs, torch.tensor([0, 5])) == pytest.approx(math.log(128256), rel=2e-3)
    apply_temperature(probs, 2.0)  # read as probabilities (a softmax of any temperature is uniform again)


def test_a_tiny_tolerance_or_temperature_ends_and_stays_finite():
    """tol=1e-17 never ended the search (the bracket cannot narrow below float spacing); T = 1e-320 sent every entry of
    a row to -inf and returned nan probabilities; return_info="False" returned the TemperatureFit."""
    from pyro_lora.calibration import apply_temperature, fit_temperature

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    assert fit_temperature(logits, labels, tol=1e-17) == pytest.approx(fit_temperature(logits, labels, tol=1e-9), rel=1e-6)
    probs = logits.softmax(-1)
    with pytest.warns(UserWarning, match="sharpens"):
        assert torch.equal(apply_temperature(probs, 1e-320), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]],
                                                                           dtype=torch.float64))
    with pytest.raises(ValueError, match="^return_info must be True or False"):
        fit_temperature(logits, labels, return_info="False")


def test_the_verdict_refuses_a_repeated_row_and_a_seed_that_is_no_integer():
    """Rows of a rerun joined to the first run's: the verdict kept the last of two laplace seed-0 rows without a word
    (laplace went from beating temperature scaling to not); a seed "0" beside 1 failed as a bare TypeError."""
    from pyro_lora.experiments.verdict import verdict

    def row(guide, seed, ece, nll):
        return dict(guide=guide, seed=seed, dataset="d", accuracy=0.8, ece=ece, nll=nll, aurc=0.1)

    rows = [r for s in range(3) for r in (row("map", s, 10.0, 0.6), row("temperature", s, 5.0, 0.5),
                                          row("laplace", s, 4.0 - 0.1 * s, 0.45 - 0.001 * s))]
    assert "laplace" in verdict(rows, "d")
    with pytest.raises(ValueError, match=r"the rows hold the row of \('laplace', 'd', 0\) twice"):
        verdict(rows + [row("laplace", 0, 9.0, 0.9)], "d")
    with pytest.raises(ValueError, match=r"the row of 'map' on 'd' has seed '0': a seed is an integer"):
        verdict([{**rows[0], "seed": "0"}, *rows[1:]], "d")
    assert verdict([{**r, "seed": np.int64(r["seed"])} for r in rows], "d") == verdict(rows, "d")
