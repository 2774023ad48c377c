"""The vLLM engine's DELTA outputs joined into chunks (``_steps.StepBuffer``), fast.

vLLM sends a rollout's first token, then every ``stream_interval`` tokens, then
the rest; a reader that falls behind gets merged outputs of any length. Whatever
the cut, the chunks must be the rollout's steps in order, ``flush`` at a time,
with every token's masked log-prob and step record still belonging to it.
"""

from __future__ import annotations

import numpy as np
import pytest
from dvp_server.engines.vllm._steps import StepBuffer, Steps


def _steps(rng: np.random.Generator, t: int) -> Steps:
    tokens = rng.integers(0, 1000, size=t)
    masked = -rng.random(t).astype(np.float32)
    records = [
        ("k", s, int(rng.integers(1, 50)), float(-rng.random()), None, None, 0) for s in range(t)
    ]
    return Steps(tokens, masked, records)


def _rows(steps: Steps, rows: slice) -> Steps:
    return Steps(steps.tokens[rows], steps.masked[rows], steps.records[rows])


def _chunks(pieces: list[int], flush: int, steps: Steps) -> list[np.ndarray]:
    """Feed ``pieces`` (lengths) as ``VllmEngine.generate`` does; the chunks' rows, in order."""
    buf, out, at = StepBuffer(), [], 0
    for i, n in enumerate(pieces):
        buf.add(_rows(steps, slice(at, at + n)))
        at += n
        out += buf.ready(flush, finished=i == len(pieces) - 1)
    assert buf.size == 0
    for chunk in out:  # each chunk's records and log-probs belong to its tokens
        assert len(chunk.tokens) == len(chunk.masked) == len(chunk.records)
    return [
        np.stack([c.tokens, c.masked.view(np.int32), np.array([r[1] for r in c.records])], axis=1)
        for c in out
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("total", [1, 15, 16, 17, 40, 64, 65])
def test_chunks_do_not_depend_on_how_vllm_cut_its_outputs(seed: int, total: int) -> None:
    rng = np.random.default_rng(seed)
    steps = _steps(rng, total)
    flush = 16
    # what vLLM sends with stream_interval 16: 1, then 16s, then the rest
    regular = [1] + [16] * ((total - 1) // 16) + ([(total - 1) % 16] if (total - 1) % 16 else [])
    regular = [n for n in regular if n][:total]
    assert sum(regular) == total
    # a lagging reader: random merged lengths
    cuts = np.sort(rng.choice(np.arange(1, total), size=min(3, total - 1), replace=False))
    merged = np.diff(np.concatenate([[0], cuts, [total]])).tolist()
    # the reference: the whole rollout sliced into 16s
    full = np.stack([steps.tokens, steps.masked.view(np.int32), np.arange(total)], axis=1)
    want = [full[i : i + flush] for i in range(0, total, flush)]
    for pieces in (regular, merged, [total]):
        got = _chunks(pieces, flush, steps)
        assert [len(g) for g in got] == [len(w) for w in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_take_on_an_empty_buffer_raises() -> None:
    with pytest.raises(ValueError, match="no buffered steps"):
        StepBuffer().take(16)
