"""The sparse min-p path (dvp_client.train.rule_sparse) against the dense rule and float64.

It must give the dense path's sets exactly, the same seeded tokens, and log-probs /
log-masses within float32 rounding of a float64 reference; the engine's rule step
must give the same outputs whichever path it takes.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from dvp_client.train import rule_sparse
from dvp_client.train.rule import safe_vocab
from dvp_client.train.rule_sparse import _nonzero, sparse_applies, sparse_safe_vocab
from dvp_schemas import PruningRule
from dvp_server.engines.base import EngineParams
from dvp_server.engines.torch import _rule_step
from dvp_server.engines.torch._rows import Row
from test_rule import ref_rule


def _logits(seed: int, n: int, v: int) -> torch.Tensor:
    """Peaked random logits (a few large, a long tail), like a trained model's."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=gen) * 3.0 + torch.rand(n, v, generator=gen).pow(20) * 12


def _params(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 99)
    temperature = 0.3 + 1.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    min_p = 10 ** (-6 * torch.rand(n, generator=gen, dtype=torch.float64))  # 1e-6 .. 1
    return temperature, min_p


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("n", "v"), [(1, 64), (7, 1000), (16, 4099), (5, 32768)])
def test_sparse_equals_dense_and_float64(seed: int, n: int, v: int) -> None:
    z = _logits(seed, n, v)
    t, rho = _params(seed, n)
    dense = safe_vocab(z, temperature=t, min_p=rho)
    sparse = sparse_safe_vocab(z, temperature=t, min_p=rho)
    assert torch.equal(sparse.ids, dense.mask.nonzero()[:, 1])  # the same sets, in order
    assert torch.equal(sparse.safe_sizes, dense.safe_sizes)
    for i in range(n):
        ref = ref_rule(z[i].numpy(), float(t[i]), float(rho[i]), None, 1.0)
        assert abs(float(sparse.log_z_full[i]) - ref["lse"]) < 1e-5 * max(1.0, abs(ref["lse"]))
        assert abs(float(sparse.safe_logmass[i]) - ref["logmass"]) < 1e-5
    gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]
    gens2 = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]
    for _ in range(20):  # the same seeded draws, step after step
        tokens = dense.sample(gens)
        assert torch.equal(sparse.sample(gens2), tokens)
        full_d, masked_d = dense.logprobs(tokens)
        full_s, masked_s = sparse.logprobs(tokens)
        assert torch.allclose(full_s, full_d, atol=1e-6, rtol=0)
        assert torch.allclose(masked_s, masked_d, atol=2e-6, rtol=0)
    outside = (~dense.mask).int().argmax(dim=-1)  # a token outside S where there is one
    has_outside = ~dense.mask.all(dim=-1)
    _, masked = sparse.logprobs(outside)
    assert torch.isinf(masked[has_outside]).all()


def test_sparse_sampling_frequencies_match_pi_s() -> None:
    """40k draws from one row: the chi-square test does not reject pi_S (p > 1e-3)."""
    from scipy import stats

    z = _logits(7, 1, 300)
    sparse = sparse_safe_vocab(z, temperature=0.8, min_p=0.01)
    gen = torch.Generator().manual_seed(5)
    draws = torch.cat([sparse.sample(gen) for _ in range(40_000)])
    ids = sparse.ids.numpy()
    probs = sparse.weights.double().numpy() / sparse.weights.double().sum().item()
    counts = np.array([(draws == i).sum().item() for i in ids])
    assert counts.sum() == 40_000  # nothing drawn outside S
    assert stats.chisquare(counts, probs * 40_000).pvalue > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "v", "density"), [(3, 64, 0.01), (9, 4096, 0.001), (4, 100, 0.3)])
def test_word_nonzero_equals_nonzero(seed: int, n: int, v: int, density: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, v, generator=gen) < density
    rows, cols = _nonzero(mask)
    ref_rows, ref_cols = mask.nonzero(as_tuple=True)
    assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)
    rows, cols = _nonzero(mask[:, 1:])  # not a multiple of 8: the plain path
    ref_rows, ref_cols = mask[:, 1:].nonzero(as_tuple=True)
    assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)


@pytest.mark.parametrize(
    ("t", "rho", "k", "q"),
    [(0.0, 0.1, 0, 1.0), (1.0, 0.0, 0, 1.0), (1.0, 0.1, 5, 1.0), (1.0, 0.1, 0, 0.9)],
)
def test_sparse_refuses_other_rules(t: float, rho: float, k: int, q: float) -> None:
    one = torch.ones(2, dtype=torch.float64)
    assert not sparse_applies(t * one, rho * one, torch.full((2,), k), q * one)
    if k == 0 and q == 1.0:
        with pytest.raises(ValueError, match="min_p > 0"):
            sparse_safe_vocab(torch.randn(2, 16), temperature=t, min_p=rho)
    assert sparse_applies(one, 0.1 * one, torch.zeros(2, dtype=torch.int64), one)


def _rows(n: int, loop: asyncio.AbstractEventLoop, rho: torch.Tensor) -> list[Row]:
    return [
        Row(f"r{i}", [1], EngineParams(temperature=0.5 + 0.1 * i, max_tokens=4, seed=i,
                                       rule=PruningRule(min_p=float(rho[i])),
                                       return_safe_token_ids=i % 2 == 0),
            loop, asyncio.Queue(), frozenset(), None)
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1])
def test_engine_rule_step_is_the_same_on_both_paths(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch engine's rule step: the sparse path (taken: min-p only) gives the dense
    path's tokens, sizes and ids, and its log-probs within 2e-6."""
    loop = asyncio.new_event_loop()
    try:
        z = _logits(seed, 6, 5000)
        _, rho = _params(seed, 6)
        calls: list[int] = []
        real = rule_sparse.sparse_safe_vocab

        def counted(*a: object, **k: object) -> rule_sparse.SparseSafeVocab:
            calls.append(1)
            return real(*a, **k)  # type: ignore[arg-type]

        monkeypatch.setattr(_rule_step, "sparse_safe_vocab", counted)
        fast = [_rule_step.rule_step(z, _rows(6, loop, rho)) for _ in range(3)]
        assert len(calls) == 3  # the sparse path ran
        monkeypatch.setattr(_rule_step, "sparse_applies", lambda *a: False)
        slow = [_rule_step.rule_step(z, _rows(6, loop, rho)) for _ in range(3)]
    finally:
        loop.close()
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.sizes, b.sizes)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-6, rtol=0)
        np.testing.assert_allclose(a.masked, b.masked, atol=2e-6, rtol=0)
        np.testing.assert_allclose(a.logmass, b.logmass, atol=2e-6, rtol=0)
        for ia, ib in zip(a.safe_ids, b.safe_ids, strict=True):
            assert (ia is None) == (ib is None)
            if ia is not None and ib is not None:
                assert ia.dtype == np.int32 and np.array_equal(ia, ib)
