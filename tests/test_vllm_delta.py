"""The vLLM engine's DELTA outputs joined into chunks (``_vllm_steps.StepBuffer``), fast.

vLLM sends a rollout's first token, then every ``stream_interval`` tokens, then
the rest; a reader that falls behind gets merged outputs of any length. Whatever
the cut, the chunks must be the rollout's steps in order, ``flush`` at a time,
with every array row still belonging to its token.
"""

from __future__ import annotations

import numpy as np
import pytest
from dvp_server.engines.vllm._steps import StepBuffer, TopK

K = 5


def _steps(rng: np.random.Generator, t: int) -> tuple[np.ndarray, TopK]:
    ids = rng.integers(0, 1000, size=(t, K))
    tokens = ids[:, 0].copy()
    lps = rng.standard_normal((t, K)).astype(np.float32)
    return tokens, TopK(tokens.copy(), lps[:, 0].copy(), ids, lps)


def _chunks(pieces: list[int], flush: int, tokens: np.ndarray, top: TopK) -> list[np.ndarray]:
    """Feed ``pieces`` (lengths) as ``VllmEngine.generate`` does; the chunks' rows, in order."""
    buf, out, at = StepBuffer(), [], 0
    for i, n in enumerate(pieces):
        rows = slice(at, at + n)
        at += n
        buf.add(tokens[rows], TopK(*(getattr(top, f)[rows] for f in TopK.__dataclass_fields__)))
        out += buf.ready(flush, finished=i == len(pieces) - 1)
    assert buf.size == 0
    for tok, t in out:  # each chunk's top-K rows belong to its tokens
        np.testing.assert_array_equal(t.sampled, tok)
        assert len(t.sampled_lp) == len(t.ids) == len(t.lps) == len(tok)
    return [np.concatenate([tok[:, None], t.ids, t.lps.view(np.int32)], axis=1) for tok, t in out]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("total", [1, 15, 16, 17, 40, 64, 65])
def test_chunks_do_not_depend_on_how_vllm_cut_its_outputs(seed: int, total: int) -> None:
    rng = np.random.default_rng(seed)
    tokens, top = _steps(rng, total)
    flush = 16
    # what vLLM sends with stream_interval 16: 1, then 16s, then the rest
    regular = [1] + [16] * ((total - 1) // 16) + ([(total - 1) % 16] if (total - 1) % 16 else [])
    regular = [n for n in regular if n][:total]
    assert sum(regular) == total
    # a lagging reader: random merged lengths
    cuts = np.sort(rng.choice(np.arange(1, total), size=min(3, total - 1), replace=False))
    merged = np.diff(np.concatenate([[0], cuts, [total]])).tolist()
    # the reference: the whole rollout sliced into 16s (what CUMULATIVE gave)
    full = np.concatenate([tokens[:, None], top.ids, top.lps.view(np.int32)], axis=1)
    want = [full[i : i + flush] for i in range(0, total, flush)]
    for pieces in (regular, merged, [total]):
        got = _chunks(pieces, flush, tokens, top)
        assert [len(g) for g in got] == [len(w) for w in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_take_on_an_empty_buffer_raises() -> None:
    with pytest.raises(ValueError, match="no buffered steps"):
        StepBuffer().take(16)
