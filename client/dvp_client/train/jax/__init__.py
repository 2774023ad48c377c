"""The trainer side of dvp-serve in JAX (optional extra ``dvp-serve[jax]``: jax, optax).

The same objective as the torch modules of :mod:`dvp_client.train`, as pure functions
of arrays (``jit``- and ``grad``-able, float32 math for any input dtype), with no
torch import anywhere:

- :mod:`.rule`: the safe-vocabulary rule (min-p, top-k, top-p in vLLM's order);
- :mod:`.sets`: a ``RolloutBatch`` as padded arrays, the engine's sets replayed as a
  fixed-shape bitmap ``uint8 [B, T, ceil(V / 8)]``;
- :mod:`.logprobs`: ``log pi_S(y)``, ``log p(y)``, ``log Z_S`` (replay and
  recompute) with an analytic ``custom_vjp``, chunked over steps;
- :mod:`.fused`: the same from hidden states and the LM head, tiled over V;
- :mod:`.losses`, :mod:`.advantages`, :mod:`.metrics`: the PPO/GRPO loss with every
  rollout correction, group advantages, the mismatch metrics.

Formulas and test vectors: docs/protocol.md; usage: docs/jax.md.
"""

from .advantages import group_advantages
from .fused import pruned_logprobs_from_hidden
from .logprobs import PrunedLogprobs, bitmap_contains, bitmap_sizes, pruned_logprobs
from .losses import Aggregation, Correction, PolicyLossConfig, PolicyLossOutput, policy_loss
from .metrics import batch_metrics, mismatch_metrics
from .rule import RuleArrays, SafeVocab, safe_mask, safe_vocab
from .sets import RolloutArrays, mask_to_bitmap, rollouts_to_arrays, unpack_bitmap

__all__ = [
    "Aggregation",
    "Correction",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "PrunedLogprobs",
    "RolloutArrays",
    "RuleArrays",
    "SafeVocab",
    "batch_metrics",
    "bitmap_contains",
    "bitmap_sizes",
    "group_advantages",
    "mask_to_bitmap",
    "mismatch_metrics",
    "policy_loss",
    "pruned_logprobs",
    "pruned_logprobs_from_hidden",
    "rollouts_to_arrays",
    "safe_mask",
    "safe_vocab",
    "unpack_bitmap",
]
