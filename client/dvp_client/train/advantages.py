"""Group-normalised advantages (GRPO) from per-rollout rewards.

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300) samples a group of
rollouts per prompt and uses the group as the baseline. For rollout i in group
g with reward r_i::

    A_i = (r_i - mean_g r) / (std_g r + eps)      (scale=True, GRPO)
    A_i =  r_i - mean_g r                         (scale=False, Dr. GRPO)

``std_g`` is the unbiased sample standard deviation (``torch.std``, as verl and
TRL use). A group of one rollout has no baseline: its advantage is 0 (verl
instead returns the raw reward there).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_advantages"]


def group_advantages(
    rewards: Tensor, group_ids: Tensor, *, scale: bool = True, eps: float = 1e-6
) -> Tensor:
    """Per-rollout advantages normalised within each group.

    Args:
        rewards: ``[B]`` float rewards.
        group_ids: ``[B]`` integer group of each rollout (e.g. ``RolloutTensors.group_ids``,
            the prompt index); groups may have different sizes and any ids.
        scale: divide by the group's standard deviation (GRPO); False centres only.
        eps: added to the standard deviation; > 0.

    Returns:
        float32 (float64 for float64 rewards) ``[B]``.

    Raises:
        ValueError: shapes, a non-integer ``group_ids``, a non-finite reward
            (message gives its index), or ``eps <= 0``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got {list(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids must be {list(rewards.shape)} like rewards, got {list(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    r = rewards.double()
    bad = ~torch.isfinite(r)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"rewards[{i}] is not finite: {float(rewards[i])}")
    _, inv = torch.unique(group_ids, return_inverse=True)  # (B,) dense group index
    g = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.bincount(inv, minlength=g).double()  # (G,)
    mean = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / count
    centred = r - mean[inv]
    out = centred
    if scale:
        ss = torch.zeros_like(mean).index_add_(0, inv, centred * centred)
        std = torch.sqrt(ss / (count - 1).clamp(min=1))  # unbiased
        out = centred / (std[inv] + eps)
    out = torch.where(count[inv] > 1, out, 0.0)
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return out.to(dtype)
