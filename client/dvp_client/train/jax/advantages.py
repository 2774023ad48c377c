"""Group-normalised advantages (GRPO) in JAX, the same as :mod:`dvp_client.train.advantages`.

For rollout i in group g (same prompt) with reward r_i (Shao et al. 2024,
"DeepSeekMath", arXiv:2402.03300)::

    A_i = (r_i - mean_g r) / (std_g r + eps)      (scale=True, GRPO)
    A_i =  r_i - mean_g r                         (scale=False, Dr. GRPO)

with the unbiased standard deviation (divide by n - 1). A group of one rollout
gets 0. Groups are any integer ids; the ``[B, B]`` same-group matrix keeps every
shape static, so this ``jit``s (B is the batch of rollouts: small).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

__all__ = ["group_advantages"]


def group_advantages(
    rewards: Array, group_ids: Array, *, scale: bool = True, eps: float = 1e-6
) -> Array:
    """Per-rollout advantages normalised within each group.

    Args:
        rewards: float ``[B]``.
        group_ids: integer ``[B]``, the group of each rollout (e.g. the prompt index).
        scale: divide by the group's standard deviation (GRPO); False centres only.
        eps: added to the standard deviation; > 0.

    Returns:
        float32 ``[B]`` (float64 for float64 rewards).

    Raises:
        ValueError: shapes, a non-integer ``group_ids``, or ``eps <= 0``.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got {list(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids must be {list(rewards.shape)}, got {list(group_ids.shape)}")
    if not jnp.issubdtype(group_ids.dtype, jnp.integer):
        raise ValueError(f"group_ids must be integers, got {group_ids.dtype}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    dt = jnp.float64 if rewards.dtype == jnp.float64 else jnp.float32
    r = rewards.astype(dt)
    same = (group_ids[:, None] == group_ids[None, :]).astype(dt)  # (B, B)
    count = jnp.sum(same, axis=-1)  # (B,)
    centred = r - (same @ r) / count
    out = centred
    if scale:
        var = (same @ (centred * centred)) / jnp.maximum(count - 1, 1)  # unbiased
        out = centred / (jnp.sqrt(var) + eps)
    return jnp.where(count > 1, out, 0.0)
