"""Q-Score maths (paper eq. 2-4, SPEC sections 1, 3, 4): hand-worked values, errors, invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from models.scoring.qscore import (
    coverage,
    discriminative_mask,
    dominant_mask,
    q_score,
    q_score_parts,
    q_score_regularizer,
    regularizer_term,
)

# --- hand-worked cases ------------------------------------------------------------------------
#
# A: h = [0, 0, 0, 0, 2, 2, 4, 8]  (r = 8)
#    mu = 16 / 8 = 2
#    deviations: -2 -2 -2 -2 0 0 2 6, squares 4 4 4 4 0 0 4 36, sum 56, var = 56 / 8 = 7
#    sigma = sqrt(7) = 2.6458 (population std)
#    eps = 0.5: threshold 2 + 1.3229 = 3.3229 -> L = {6, 7}
#    eps = 1:   threshold 2 + 2.6458 = 4.6458 -> L = {7}
#    eps = 4:   threshold 2 + 10.583 = 12.583 -> L = {}
#    ||h||_1 = 16
H_A = [0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 4.0, 8.0]
#
# B: h = [-4, 0, 0, 0, 0, 0, 0, 4]  (negative entries count in the L1 norm)
#    mu = 0, squares 16 + 16 = 32, var = 32 / 8 = 4, sigma = 2
#    eps = 1: threshold 0 + 2 = 2 -> L = {7};  ||h||_1 = 8
H_B = [-4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]
#
# C: h = [1, 1, 1, 1, 1, 1, 5, 9]  (r = 8)
#    mu = 20 / 8 = 2.5
#    deviations -1.5 x6, 2.5, 6.5; squares 2.25 x6 = 13.5, 6.25, 42.25; sum 62, var = 7.75
#    sigma = sqrt(7.75) = 2.7839
#    eps = 0.5: threshold 2.5 + 1.3919 = 3.8919 -> L = {6, 7}
#    ||h||_1 = 20
H_C = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0, 9.0]


def _t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def _mask(r, idx):
    m = torch.zeros(r, dtype=torch.bool)
    m[list(idx)] = True
    return m


@pytest.mark.parametrize(
    ("h", "eps", "expected"),
    [
        (H_A, 0.5, {6, 7}),
        (H_A, 1.0, {7}),
        (H_A, 4.0, set()),
        (H_B, 1.0, {7}),
        (H_C, 0.5, {6, 7}),
        ([0.0] * 8, 0.0, set()),  # all zero: sigma 0, nothing is > mu
        ([3.0] * 8, 1.0, set()),  # constant: sigma 0, nothing is > mu
    ],
)
def test_dominant_mask_matches_hand_computation(h, eps, expected):
    mask = dominant_mask(_t([h]), eps)
    assert mask.dtype == torch.bool
    assert set(torch.nonzero(mask[0]).flatten().tolist()) == expected


def test_dominant_mask_uses_population_std():
    # h = [0, 0, 0, 4]: mu = 1, population var = (1+1+1+9)/4 = 3, sigma = 1.7321,
    # threshold at eps = 1.6: 1 + 2.7713 = 3.7713 < 4 -> dominant.
    # The sample std would be sqrt(12/3) = 2 -> threshold 4.2 > 4 -> not dominant.
    assert dominant_mask(_t([[0.0, 0.0, 0.0, 4.0]]), 1.6)[0].tolist() == [False, False, False, True]


@pytest.mark.parametrize("as_mask", [False, True], ids=["indices", "bool-mask"])
@pytest.mark.parametrize(
    ("h", "eps", "d", "expected"),
    [
        # A, eps 0.5, L = {6, 7}, D = {5, 6, 7}: L ∩ D = {6, 7}, Q = (4 + 8) / (2 * 16) = 0.375
        (H_A, 0.5, [5, 6, 7], 0.375),
        # A, eps 0.5, D = {7}: L ∩ D = {7}, Q = 8 / (1 * 16) = 0.5
        (H_A, 0.5, [7], 0.5),
        # A, eps 0.5, D = {0, 1, 2}: L ∩ D empty -> Q = 0
        (H_A, 0.5, [0, 1, 2], 0.0),
        # A, eps 1, L = {7}, D = {6, 7}: Q = 8 / (1 * 16) = 0.5 (6 is in D but not dominant)
        (H_A, 1.0, [6, 7], 0.5),
        # A, eps 4: L empty -> Q = 0 whatever D is
        (H_A, 4.0, list(range(8)), 0.0),
        # B, eps 1, L = {7}, D = {0, 7}: Q = 4 / (1 * 8) = 0.5  (|-4| counts in the norm)
        (H_B, 1.0, [0, 7], 0.5),
        # C, eps 0.5, L = {6, 7}, D = {6, 7}: Q = (5 + 9) / (2 * 20) = 0.35
        (H_C, 0.5, [6, 7], 0.35),
        # C, eps 0.5, D = {2, 7}: L ∩ D = {7}: Q = 9 / (1 * 20) = 0.45
        (H_C, 0.5, [2, 7], 0.45),
        # all-zero vector: ||h||_1 = 0 and L empty -> Q = 0
        ([0.0] * 8, 0.0, list(range(8)), 0.0),
    ],
)
def test_q_score_matches_hand_computation(h, eps, d, expected, as_mask):
    discriminative = _mask(8, d) if as_mask else torch.tensor(d)
    q = q_score(_t([h]), discriminative, eps)
    assert q.shape == (1,)
    assert q.dtype == torch.float64
    assert q.item() == pytest.approx(expected, abs=1e-12)


def test_q_score_batches_rows_independently():
    h = _t([H_A, H_B, H_C, [0.0] * 8])
    d = torch.tensor([5, 6, 7])
    # A: L(1) = {7} -> 8/16 = 0.5; B: {7} -> 4/8 = 0.5; C at eps 1: threshold 2.5 + 2.78 = 5.28
    # -> L = {7} -> 9/20 = 0.45; zero row -> 0.
    q = q_score(h, d, eps=1.0)
    assert q.tolist() == pytest.approx([0.5, 0.5, 0.45, 0.0], abs=1e-12)
    for i in range(4):
        assert q_score(h[i : i + 1], d, eps=1.0).item() == pytest.approx(q[i].item(), abs=1e-15)


def test_q_score_parts_components():
    parts = q_score_parts(_t([H_A, [0.0] * 8]), torch.tensor([5, 6, 7]), eps=0.5)
    assert parts.dominant[0].tolist() == [False] * 6 + [True, True]
    assert parts.active[0].tolist() == [False] * 6 + [True, True]
    assert not parts.active[1].any()
    # mean of {4, 8} = 6; L1 = 16; Q = 6 / 16 = 0.375
    assert parts.mean_active.tolist() == pytest.approx([6.0, 0.0])
    assert parts.l1_norm.tolist() == pytest.approx([16.0, 0.0])
    assert parts.q_score.tolist() == pytest.approx([0.375, 0.0])


def test_q_score_float32_matches_float64():
    h = _t([H_A, H_B, H_C])
    d = torch.tensor([2, 5, 6, 7])
    q64 = q_score(h, d, 0.5)
    q32 = q_score(h.float(), d, 0.5)
    assert q32.dtype == torch.float32
    assert torch.allclose(q32.double(), q64, atol=1e-7)


def test_coverage_hand_case():
    # A (eps 0.5) has L ∩ D = {6, 7} with D = {6, 7}; zero row and constant row have L empty.
    h = _t([H_A, [0.0] * 8, [3.0] * 8, H_C])
    assert coverage(h, torch.tensor([6, 7]), eps=0.5) == pytest.approx(0.5)
    assert coverage(h, torch.tensor([0, 1]), eps=0.5) == 0.0


# --- errors ---------------------------------------------------------------------------------


def test_q_score_rejects_non_tensor():
    with pytest.raises(TypeError, match=r"torch.Tensor of shape \(N, r\).*list"):
        q_score([[1.0, 2.0]], torch.tensor([0]))  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(8,), (2, 2, 8)])
def test_q_score_rejects_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"shape \(N, r\)"):
        q_score(torch.ones(shape), torch.tensor([0]))


def test_q_score_rejects_integer_representations():
    with pytest.raises(TypeError, match="floating-point.*int64"):
        q_score(torch.ones(2, 8, dtype=torch.int64), torch.tensor([0]))


@pytest.mark.parametrize("eps", [math.nan, math.inf])
def test_q_score_rejects_non_finite_eps(eps):
    with pytest.raises(ValueError, match="eps must be a finite number"):
        q_score(torch.ones(2, 8), torch.tensor([0]), eps)


@pytest.mark.parametrize(
    ("d", "match"),
    [
        (torch.tensor([0, 8]), r"lie in \[0, 8\).*max 8"),
        (torch.tensor([-1, 3]), r"lie in \[0, 8\).*min -1"),
        (torch.tensor([0.0, 1.0]), "integer tensor of feature indices.*float32"),
        (torch.tensor([[0, 1]]), r"integer tensor.*shape \(1, 2\)"),
        (
            torch.ones(7, dtype=torch.bool),
            r"boolean discriminative mask must have shape \(8,\), got \(7,\)",
        ),
    ],
)
def test_q_score_rejects_bad_discriminative(d, match):
    with pytest.raises(ValueError, match=match):
        q_score(torch.ones(2, 8), d)


def test_discriminative_mask_accepts_lists_and_empty():
    assert discriminative_mask([1, 3], 4).tolist() == [False, True, False, True]
    assert not discriminative_mask(torch.empty(0, dtype=torch.int64), 4).any()
    # an empty D means no sample has discriminative evidence
    assert q_score(_t([H_A]), torch.empty(0, dtype=torch.int64), 0.5).item() == 0.0


def test_coverage_rejects_empty_batch():
    with pytest.raises(ValueError, match="at least one sample"):
        coverage(torch.empty(0, 8), torch.tensor([0]))


# --- properties ----------------------------------------------------------------------------

# Dyadic values (integers / 8) keep sums exact, so rounding never decides a test.
_dyadic_rows = st.integers(min_value=1, max_value=12).flatmap(
    lambda n: st.integers(min_value=4, max_value=32).flatmap(
        lambda r: st.lists(
            st.lists(st.integers(min_value=0, max_value=800), min_size=r, max_size=r),
            min_size=n,
            max_size=n,
        )
    )
)
_eps = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])


def _h(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64) / 8.0


def _d_from(data, r: int) -> torch.Tensor:
    chosen = data.draw(st.lists(st.integers(0, r - 1), unique=True, max_size=r))
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def _margin(h: torch.Tensor, eps: float) -> float:
    """Smallest distance of any entry from its row's dominance threshold, relative to scale."""
    mu = h.mean(dim=1, keepdim=True)
    sigma = h.std(dim=1, unbiased=False, keepdim=True)
    scale = h.abs().max().clamp_min(1.0)
    return float(((h - (mu + eps * sigma)).abs() / scale).min())


@settings(max_examples=200, deadline=None)
@given(rows=_dyadic_rows, eps=_eps, data=st.data())
def test_q_score_is_in_unit_interval_for_nonnegative_h(rows, eps, data):
    h = _h(rows)
    d = _d_from(data, h.shape[1])
    q = q_score(h, d, eps)
    assert q.shape == (h.shape[0],)
    assert bool((q >= 0).all()) and bool((q <= 1 + 1e-12).all())
    # Q is 0 exactly where L ∩ D is empty or the row is all zero
    parts = q_score_parts(h, d, eps)
    empty = ~parts.active.any(dim=1) | (h.abs().sum(dim=1) == 0)
    assert bool((q[empty] == 0).all())
    assert bool((q[~empty] > 0).all())


@settings(max_examples=200, deadline=None)
@given(rows=_dyadic_rows, eps=_eps, power=st.integers(-10, 10), data=st.data())
def test_q_score_is_exactly_invariant_to_power_of_two_scaling(rows, eps, power, data):
    h = _h(rows)
    d = _d_from(data, h.shape[1])
    scaled = h * (2.0**power)
    assert torch.equal(dominant_mask(scaled, eps), dominant_mask(h, eps))
    assert torch.equal(q_score(scaled, d, eps), q_score(h, d, eps))


@settings(max_examples=200, deadline=None)
@given(rows=_dyadic_rows, eps=_eps, c=st.floats(1e-3, 1e3), data=st.data())
def test_q_score_is_invariant_to_positive_scaling(rows, eps, c, data):
    h = _h(rows)
    d = _d_from(data, h.shape[1])
    # Where an entry sits within rounding of the threshold, the masks may legitimately differ.
    assume(_margin(h, eps) > 1e-9)
    scaled = h * c
    assert torch.equal(dominant_mask(scaled, eps), dominant_mask(h, eps))
    assert torch.allclose(q_score(scaled, d, eps), q_score(h, d, eps), rtol=1e-10, atol=1e-14)


@settings(max_examples=200, deadline=None)
@given(rows=_dyadic_rows, eps=_eps, data=st.data())
def test_q_score_is_equivariant_under_feature_permutation(rows, eps, data):
    h = _h(rows)
    r = h.shape[1]
    d = _d_from(data, r)
    assume(_margin(h, eps) > 1e-9)
    perm = torch.tensor(data.draw(st.permutations(list(range(r)))))
    # new feature k is old feature perm[k]; D moves with its features
    h_perm = h[:, perm]
    d_mask = discriminative_mask(d, r)
    d_perm_mask = d_mask[perm]
    d_perm_idx = torch.nonzero(d_perm_mask).flatten()
    assert torch.equal(dominant_mask(h_perm, eps), dominant_mask(h, eps)[:, perm])
    q = q_score(h, d, eps)
    assert torch.allclose(q_score(h_perm, d_perm_mask, eps), q, rtol=1e-12, atol=0)
    assert torch.allclose(q_score(h_perm, d_perm_idx, eps), q, rtol=1e-12, atol=0)


@settings(max_examples=100, deadline=None)
@given(rows=_dyadic_rows, eps=_eps, data=st.data())
def test_indices_and_mask_give_identical_scores(rows, eps, data):
    h = _h(rows)
    d = _d_from(data, h.shape[1])
    assert torch.equal(q_score(h, d, eps), q_score(h, discriminative_mask(d, h.shape[1]), eps))


# --- gradients and the regulariser (paper eq. 4) -------------------------------------------


def _grad_batch() -> torch.Tensor:
    rows = [
        H_A,  # Q = 0.375 at eps 0.5 with D = {5, 6, 7}
        [0.0] * 8,  # all zero: Q = 0, ||h||_1 = 0
        [3.0] * 8,  # constant: L empty, Q = 0
        [9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # L = {0}, not in D: Q = 0
        H_C,
    ]
    return _t(rows).requires_grad_(True)


def test_q_score_gradient_is_finite_including_zero_rows():
    h = _grad_batch()
    q = q_score(h, torch.tensor([5, 6, 7]), eps=0.5)
    assert q.tolist()[1:4] == [0.0, 0.0, 0.0]
    q.sum().backward()
    assert h.grad is not None
    assert bool(torch.isfinite(h.grad).all())
    # rows defined as Q = 0 carry no gradient
    assert bool((h.grad[1:4] == 0).all())
    # row A: Q = (h6 + h7) / (2 * sum h); dQ/dh7 = 1/(2*16) - 12/(2*16^2) = 0.03125 - 0.0234375
    assert h.grad[0, 7].item() == pytest.approx(1 / 32 - 12 / 512)
    # a non-dominant entry only enters through the norm: dQ/dh4 = -12 / (2 * 16^2)
    assert h.grad[0, 4].item() == pytest.approx(-12 / 512)
    # at h = 0 the norm's subgradient is 0 (torch's sign(0) = 0)
    assert h.grad[0, 0].item() == 0.0


def test_q_score_regularizer_gradient_is_finite_and_raises_low_q():
    h = _grad_batch()
    term = q_score_regularizer(h, torch.tensor([5, 6, 7]), alpha=0.4, eps=0.5)
    # Q = [0.375, 0, 0, 0, 0.35] (C at eps 0.5, D = {5,6,7}: L ∩ D = {6, 7} -> 14/40 = 0.35)
    # all five are below 0.4: term = -(0.375 + 0.35) / 5
    assert term.item() == pytest.approx(-(0.375 + 0.35) / 5)
    term.backward()
    assert bool(torch.isfinite(h.grad).all())
    # descending the term raises the dominant discriminative value: its gradient is negative
    assert h.grad[0, 7].item() < 0


def test_regularizer_term_hand_case():
    q = torch.tensor([0.1, 0.5, 0.2], requires_grad=True)
    term = regularizer_term(q, alpha=0.3)
    # samples below 0.3: 0.1 and 0.2 -> -(0.1 + 0.2) / 2
    assert term.item() == pytest.approx(-0.15)
    term.backward()
    assert q.grad.tolist() == pytest.approx([-0.5, 0.0, -0.5])


def test_regularizer_term_is_zero_with_zero_grad_when_nothing_is_low():
    q = torch.tensor([0.4, 0.5, 0.9], requires_grad=True)
    term = regularizer_term(q, alpha=0.3)
    assert term.item() == 0.0
    term.backward()
    assert q.grad is not None
    assert q.grad.tolist() == [0.0, 0.0, 0.0]


def test_regularizer_term_at_alpha_is_not_low():
    # the flag is strict: Q < alpha
    q = torch.tensor([0.3, 0.3])
    assert regularizer_term(q, alpha=0.3).item() == 0.0


def test_q_score_gradient_matches_finite_differences():
    torch.manual_seed(0)
    # sparse-ish (a few large entries) and away from 0, where the L1 norm has a kink
    h = torch.rand(4, 16, dtype=torch.float64) ** 4 + 0.01
    d = torch.arange(0, 16, 2)
    assert coverage(h, d, 1.0) > 0

    def f(x):
        return q_score(x, d, 1.0).sum()

    assert torch.autograd.gradcheck(f, (h.clone().requires_grad_(True),), eps=1e-7, atol=1e-6)


def test_q_score_matches_numpy_reference_on_random_data():
    rng = np.random.default_rng(1)
    h = rng.exponential(size=(50, 64)) ** 2
    d = np.sort(rng.choice(64, size=20, replace=False))
    q = q_score(torch.from_numpy(h), torch.from_numpy(d), 2.0).numpy()
    # independent loop-by-loop implementation of eq. 2 and 3
    for i in range(50):
        row = h[i]
        thr = row.mean() + 2.0 * row.std()  # numpy std is the population std
        active = [j for j in d if row[j] > thr]
        expected = 0.0 if not active else sum(row[j] for j in active) / (len(active) * np.abs(row).sum())
        assert q[i] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_float64_statistics_are_not_rounded_to_float32():
    # h = [1, 1, 1, 1 + 1e-10]: mu = 1 + 0.25e-10, sigma = sqrt(3)/4 * 1e-10 = 0.433e-10,
    # eps 1: threshold 1 + 0.683e-10 < 1 + 1e-10 -> feature 3 is dominant. Rounded to float32,
    # all four entries are 1.0 and nothing would be.
    h = torch.tensor([[1.0, 1.0, 1.0, 1.0 + 1e-10]], dtype=torch.float64)
    assert dominant_mask(h, 1.0)[0].tolist() == [False, False, False, True]
    # Q = (1 + 1e-10) / (4 + 1e-10) = 0.25 (to 1e-10)
    assert q_score(h, torch.tensor([3]), 1.0).item() == pytest.approx(0.25, abs=1e-9)
    assert not dominant_mask(h.float(), 1.0).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_masks_match_float32(dtype):
    h = torch.tensor([H_A, H_C], dtype=dtype)  # exactly representable in both
    assert torch.equal(dominant_mask(h, 0.5), dominant_mask(h.float(), 0.5))
    q = q_score(h, torch.tensor([5, 6, 7]), 0.5)
    assert q.dtype == dtype
    assert q.float().tolist() == pytest.approx([0.375, 0.35], abs=2e-3)
