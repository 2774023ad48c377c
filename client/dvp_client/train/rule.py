"""The safe-vocabulary rule in torch: one implementation for engine and trainer.

For one decoding step with logits ``z`` (vocabulary V), temperature ``T`` and the
rule (``min_p`` = rho, ``top_k`` = k, ``top_p`` = q), in vLLM's sampler order:

1. scaled logits ``u = z / T``; ``p = softmax(u)``.  ``T = 0`` (any ``T < 1e-5``,
   as in vLLM) is greedy:
   ``u = z`` (reported log-probs are then those at T = 1) and ``S = {argmax z}``.
2. min-p: keep v with ``p_v >= rho * max(p)``, computed as ``u_v - max(u) >= log(rho)``
   (rho = 0 keeps all).
3. top-k: of those, keep the k largest; ties with the k-th value are kept, as in
   vLLM (k = 0 / None: no cap).
4. top-p: of those, renormalised, keep the smallest prefix by descending probability
   whose mass reaches q, i.e. token v stays iff the mass strictly before it is < q;
   the most probable token always stays (q = 1: no cut).
5. ``log pi_S(v) = u_v - logsumexp_{w in S} u_w`` for v in S, and
   ``log Z_S = logsumexp_S u - logsumexp_V u`` (the safe log-mass, <= 0).

Everything is computed in float32 whatever the logits' dtype: a bf16
``log_softmax`` has a rounding floor of ~2e-3 for p > 0.99, larger than the
engine/trainer mismatch that DVP is about. Parameters may differ per row
(a batch mixes requests), so each is a scalar or a ``(N,)`` tensor.

Reference: docs/protocol.md (the same formulas, with test vectors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RuleParams", "SafeVocab", "safe_mask", "safe_vocab"]

Scalar = float | int

#: Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``).
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class RuleParams:
    """Per-row rule parameters, all shaped ``(N,)``.

    Attributes:
        temperature: float32; 0 marks a greedy row.
        min_p: float32 in [0, 1].
        top_k: int64; 0 means no cap.
        top_p: float32 in (0, 1].
    """

    temperature: Tensor
    min_p: Tensor
    top_k: Tensor
    top_p: Tensor

    @classmethod
    def make(
        cls,
        n: int,
        *,
        temperature: Scalar | Tensor = 1.0,
        min_p: Scalar | Tensor = 0.0,
        top_k: int | Tensor | None = None,
        top_p: Scalar | Tensor = 1.0,
        device: torch.device | str | None = None,
    ) -> RuleParams:
        """Broadcast scalars or ``(N,)`` tensors to per-row tensors, validating values.

        Raises:
            ValueError: a value is outside its range, or a tensor is not ``(N,)``.
        """

        def col(name: str, v: Scalar | Tensor | None, dtype: torch.dtype, default: float) -> Tensor:
            if v is None:
                v = default
            t = torch.as_tensor(v, dtype=dtype, device=device)
            if t.dim() == 0:
                t = t.expand(n)
            if t.shape != (n,):
                raise ValueError(f"{name} must be a scalar or shaped ({n},), got {tuple(t.shape)}")
            return t

        # Floats are checked in float64, then stored in float32 (see _to_f32).
        p = cls(
            temperature=col("temperature", temperature, torch.float64, 1.0),
            min_p=col("min_p", min_p, torch.float64, 0.0),
            top_k=col("top_k", top_k, torch.int64, 0),
            top_p=col("top_p", top_p, torch.float64, 1.0),
        )
        checks = [
            ("temperature", p.temperature >= 0, ">= 0"),
            ("min_p", (p.min_p >= 0) & (p.min_p <= 1), "in [0, 1]"),
            ("top_k", p.top_k >= 0, ">= 0"),
            ("top_p", (p.top_p > 0) & (p.top_p <= 1), "in (0, 1]"),
        ]
        for name, ok, rng in checks:
            if not bool(ok.all()):
                bad = getattr(p, name)[~ok][0].item()
                raise ValueError(f"{name} must be {rng}, got {bad:.6g}")
        return p._to_f32()

    def _to_f32(self) -> RuleParams:
        """float32 parameters with the two edge cases that float32 cannot hold made
        explicit: a temperature below ``GREEDY_EPS`` is greedy (0), as in vLLM's
        sampler (``_SAMPLING_EPS``; 1/T would overflow), and a positive top_p below
        float32's smallest normal keeps one token (it would round to 0)."""
        tiny = torch.finfo(torch.float32).tiny
        temperature = torch.where(self.temperature < GREEDY_EPS, 0.0, self.temperature)
        return RuleParams(
            temperature=temperature.float(),
            min_p=self.min_p.float(),
            top_k=self.top_k,
            top_p=self.top_p.clamp(min=tiny).float(),
        )


def _scale(logits: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(u, greedy)``: float32 scaled logits ``(N, V)`` and the greedy rows ``(N,)``."""
    greedy = temperature == 0
    u = logits.float()  # fp32 upcast: see module docstring
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    if bool((t != 1).any()):
        u = u / t.unsqueeze(-1)  # (N, V) / (N, 1)
    return u, greedy


def _rule_mask(
    u: Tensor, params: RuleParams, greedy: Tensor, u_max: Tensor | None = None
) -> Tensor:
    """Steps 2-4 of the rule on scaled float32 logits ``u`` ``(N, V)``; bool ``(N, V)``.

    ``u_max`` (``(N, 1)``, the row maxima) may be passed when the caller has it.
    """
    v = u.shape[1]
    if u_max is None:
        u_max = u.max(dim=-1, keepdim=True).values  # (N, 1)
    mask = _min_p_keep(u - u_max, params.min_p)
    # 3. top-k: keep values >= the k-th largest of the kept ones (ties kept, as vLLM).
    k = params.top_k
    if bool((k > 0).any()):
        kmax = int(min(int(k.max()), v))
        masked_u = u.masked_fill(~mask, -math.inf)
        top_vals = masked_u.topk(kmax, dim=-1, sorted=True).values  # (N, kmax)
        idx = (k.clamp(min=1, max=kmax) - 1).unsqueeze(-1)  # (N, 1)
        kth = top_vals.gather(-1, idx)  # (N, 1)
        kth = torch.where((k > 0).unsqueeze(-1), kth, torch.full_like(kth, -math.inf))
        mask &= masked_u >= kth
    # 4. top-p over the renormalised survivors, rows with q < 1 only.
    rows = (params.top_p < 1).nonzero().squeeze(-1)
    if rows.numel() > 0:
        mask[rows] = _top_p_rows(u[rows], mask[rows], params.top_p[rows])
    if bool(greedy.any()):
        one_hot = torch.zeros_like(mask)
        one_hot.scatter_(-1, u.argmax(dim=-1, keepdim=True), True)
        mask = torch.where(greedy.unsqueeze(-1), one_hot, mask)
    return mask


def _min_p_keep(shifted: Tensor, min_p: Tensor) -> Tensor:
    """Step 2, min-p in log space: ``p_v >= rho * p_max  <=>  u_v - u_max >= log(rho)``.

    Args:
        shifted: float32 ``(N, V)``, ``u - max(u)`` per row (exactly this subtraction:
            the sparse path in ``rule_sparse.py`` must keep the same tokens).
        min_p: float32 ``(N,)``; 0 keeps everything (``log 0 = -inf``).

    Returns:
        bool ``(N, V)``.
    """
    return shifted >= torch.log(min_p).unsqueeze(-1)


def _top_p_rows(u: Tensor, mask: Tensor, q: Tensor) -> Tensor:
    """Top-p cut of rows ``u`` ``(R, V)`` already restricted by ``mask``; returns the new mask."""
    masked_u = u.masked_fill(~mask, -math.inf)
    width = int(mask.sum(dim=-1).max())  # only the survivors need sorting
    vals, order = masked_u.topk(width, dim=-1, sorted=True)  # (R, width), descending
    probs = torch.softmax(vals, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
    keep_sorted = before < q.unsqueeze(-1)
    keep_sorted[:, 0] = True
    keep_sorted &= torch.isfinite(vals)
    out = torch.zeros_like(mask)
    out.scatter_(-1, order, keep_sorted)
    return out


def _uniforms(n: int, generators: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    """The sampler's draws: one float64 uniform per row ``(N,)``, from one generator for
    the batch or one per row (both samplers take them from here: same seeds, same draws).

    Raises:
        ValueError: a generator list whose length is not ``n``.
    """
    if generators is None or isinstance(generators, torch.Generator):
        return torch.rand(n, generator=generators, dtype=torch.float64)
    if len(generators) != n:
        raise ValueError(f"need {n} generators, got {len(generators)}")
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])


class _LogMass:
    """``safe_logmass`` for a result holding both normalisers (float32 ``(N,)`` each)."""

    log_z_full: Tensor
    log_z_safe: Tensor

    @property
    def safe_logmass(self) -> Tensor:
        """``log Z_S`` per row, float32 ``(N,)``; 0 when nothing is pruned."""
        return self.log_z_safe - self.log_z_full


@dataclass(frozen=True)
class SafeVocab(_LogMass):
    """The rule applied to a batch of steps.

    Attributes:
        scaled: float32 ``(N, V)`` scaled logits ``u`` (``z`` for greedy rows).
        mask: bool ``(N, V)``, the safe sets S.
        log_z_full: float32 ``(N,)``, ``logsumexp_V u``.
        log_z_safe: float32 ``(N,)``, ``logsumexp_S u``.
        weights: float32 ``(N, V)``, unnormalised pi_S: ``exp(u - max u)`` on S,
            0 elsewhere (the sampler draws from it).
    """

    scaled: Tensor
    mask: Tensor
    log_z_full: Tensor
    log_z_safe: Tensor
    weights: Tensor

    @property
    def safe_sizes(self) -> Tensor:
        """``|S|`` per row, int64 ``(N,)``."""
        return self.mask.sum(dim=-1)

    def logprobs(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Full and masked log-probs of ``tokens`` (int64 ``(N,)``).

        Returns:
            ``(log p(y), log pi_S(y))``, float32 ``(N,)`` each; the masked one is
            ``-inf`` where ``y`` is not in S.
        """
        if tokens.dtype != torch.int64:
            raise TypeError(f"tokens must be int64, got {tokens.dtype}")
        y = tokens.unsqueeze(-1)  # (N, 1)
        u_y = self.scaled.gather(-1, y).squeeze(-1)
        in_s = self.mask.gather(-1, y).squeeze(-1)
        full = u_y - self.log_z_full
        masked = torch.where(in_s, u_y - self.log_z_safe, torch.full_like(u_y, -math.inf))
        return full, masked

    def sample(
        self, generators: torch.Generator | Sequence[torch.Generator] | None = None
    ) -> Tensor:
        """Draw one token per row from ``pi_S`` by inverse CDF; int64 ``(N,)``.

        Args:
            generators: one generator for the batch, or one per row (per-row
                generators make a row's draws independent of its batch mates).

        The CDF is accumulated in float64 so tail tokens keep their mass; only a
        token with positive mass in S can be drawn.
        """
        n, v = self.mask.shape
        uni = _uniforms(n, generators).to(self.mask.device)
        # pi_S in float32 (relative error ~1e-7 per token), accumulated in float64 in
        # two levels (blocks, then within the chosen block) so that no tail token's
        # mass is absorbed by rounding and no full-vocabulary float64 copy is made.
        probs = self.weights
        nb = -(-v // _BLOCK)
        if nb * _BLOCK != v:
            probs = torch.nn.functional.pad(probs, (0, nb * _BLOCK - v))
        blocks = probs.view(n, nb, _BLOCK)
        block_cdf = torch.cumsum(blocks.sum(-1, dtype=torch.float64), dim=-1)  # (N, nb)
        target = uni * block_cdf[:, -1]  # (N,)
        b = _search_last_positive(block_cdf, target)  # (N,)
        below = torch.where(
            b > 0, block_cdf.gather(-1, (b - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0
        )
        rows = torch.arange(n, device=probs.device)
        inner_cdf = torch.cumsum(blocks[rows, b].double(), dim=-1)  # (N, BLOCK)
        j = _search_last_positive(inner_cdf, target - below)
        return b * _BLOCK + j


_BLOCK = 256


def _search_last_positive(cdf: Tensor, target: Tensor) -> Tensor:
    """First index i with ``cdf[i] > target`` per row, clamped to the last index where
    ``cdf`` increases (rounding can put target at the very end). cdf: float64 ``(N, M)``."""
    idx = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    steps = torch.diff(cdf, dim=-1, prepend=torch.zeros_like(cdf[:, :1])) > 0
    last = (cdf.shape[1] - 1) - steps.flip(-1).int().argmax(dim=-1)
    return torch.minimum(idx, last)


def safe_vocab(
    logits: Tensor,
    *,
    temperature: Scalar | Tensor = 1.0,
    min_p: Scalar | Tensor = 0.0,
    top_k: int | Tensor | None = None,
    top_p: Scalar | Tensor = 1.0,
) -> SafeVocab:
    """Apply the rule to logits ``(N, V)`` (any float dtype); see the module docstring.

    Args:
        logits: ``(N, V)`` raw logits of N steps.
        temperature, min_p, top_k, top_p: scalars or ``(N,)`` tensors.

    Returns:
        A :class:`SafeVocab` with float32 scaled logits, the mask and the two
        normalisers.

    Raises:
        ValueError: bad shapes or parameter values.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    params = RuleParams.make(
        logits.shape[0],
        temperature=temperature,
        min_p=min_p,
        top_k=top_k,
        top_p=top_p,
        device=logits.device,
    )
    u, greedy = _scale(logits, params.temperature)
    u_max = u.max(dim=-1, keepdim=True).values  # (N, 1)
    mask = _rule_mask(u, params, greedy, u_max)
    # One exp serves both normalisers and the sampler. The row maximum is always in
    # S (min-p, top-k and top-p all keep the argmax), so sum_S exp(u - max) >= 1 and
    # neither log underflows: this is logsumexp, computed once.
    weights = torch.exp(u - u_max)  # (N, V) in [0, 1]
    log_z_full = u_max.squeeze(-1) + torch.log(weights.sum(dim=-1))
    weights.masked_fill_(~mask, 0.0)
    log_z_safe = u_max.squeeze(-1) + torch.log(weights.sum(dim=-1))
    return SafeVocab(
        scaled=u, mask=mask, log_z_full=log_z_full, log_z_safe=log_z_safe, weights=weights
    )


def safe_mask(
    logits: Tensor,
    *,
    temperature: Scalar | Tensor = 1.0,
    min_p: Scalar | Tensor = 0.0,
    top_k: int | Tensor | None = None,
    top_p: Scalar | Tensor = 1.0,
) -> Tensor:
    """The safe sets only: bool ``(..., V)`` for logits ``(..., V)``.

    Leading dimensions are flattened into rows; per-row parameters must then be
    scalars or match the flattened row count.
    """
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])
    params = RuleParams.make(
        flat.shape[0],
        temperature=temperature,
        min_p=min_p,
        top_k=top_k,
        top_p=top_p,
        device=logits.device,
    )
    u, greedy = _scale(flat, params.temperature)
    return _rule_mask(u, params, greedy).reshape(shape)
