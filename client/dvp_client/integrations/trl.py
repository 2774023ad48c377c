"""TRL's ``GRPOTrainer`` on dvp-serve: rollouts from the service, the DVP objective in the loss.

Tested with trl 1.16 (``pip install 'dvp-serve[trl]'``); it overrides TRL internals
(``rollout_func``, ``_generate_and_score_completions``, ``_compute_loss``), so other
trl versions are refused at import. Importing this module imports trl; nothing else
in :mod:`dvp_client` does.

What :class:`DVPGRPOTrainer` changes, per generation:

1. weights: when the trainer's step moved since the last push (and before the first
   generation), the policy is saved under ``weights_dir`` (inside the server's
   ``--weights-root``) and loaded with ``POST /v1/weights``; ``policy_version`` must go
   up by one (tied embeddings written once; PEFT models refused);
2. rollouts (:class:`DVPRollout`, TRL's ``rollout_func``): TRL hands over each prompt
   ``num_generations`` times in a row; the service gets each prompt once with
   ``n = num_generations`` and one seed per generation (the same prompt sent g times
   with one seed would give g identical samples), at ``args.temperature``, up to
   ``args.max_completion_length`` tokens, under the pruning rule, with the safe sets;
   every rollout must carry the version just pushed;
3. each row keeps its :class:`dvp_schemas.Rollout` (token ids, engine log-probs, safe
   sets) in the batch, so the sets follow the row through TRL's shuffle and split;
   with ``num_iterations > 1`` (or a generation reused across optimizer steps) the
   pruned old log-probs are computed once per generation, before any update.

The loss (:meth:`DVPGRPOTrainer._compute_loss`): the rows' tensors from
:func:`~dvp_client.train.tensors.rollouts_to_tensors` (``position_ids`` from the real
tokens, as the engine counts them), the backbone's hidden states, the pruned log-probs
over the engine's replayed sets from the hidden states and the LM head
(:func:`~dvp_client.train.fused_head.pruned_logprobs_from_hidden`: no ``[B, T, V]``
logits; models with an LM-head bias or logit scaling fall back to the logits and
:func:`~dvp_client.train.objective.pruned_logprobs`), then
:func:`~dvp_client.train.losses.policy_loss` against the engine's masked log-probs,
divided by the gradient-accumulation steps. ``batch_metrics`` (mismatch, |S|, pruned
mass, IS weights) and the loss metrics go to TRL's own metric logging.

Not supported (refused with an error): ``use_vllm``, ``beta != 0`` (no reference-KL
term), PEFT adapters, loss types other than grpo / bnpo / dapo. One process only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import trl
from dvp_schemas import PruningRule, Rollout
from trl import GRPOTrainer

from .._client import Client
from ..batch import RolloutBatch
from ..train.fused_head import pruned_logprobs_from_hidden
from ..train.losses import Aggregation, PolicyLossConfig, policy_loss
from ..train.metrics import batch_metrics
from ..train.objective import PrunedLogprobs, pruned_logprobs
from ..train.tensors import RolloutTensors, rollouts_to_tensors
from ._weights import WeightPusher, check_pushable

__all__ = ["TESTED_TRL", "DVPGRPOTrainer", "DVPRollout"]

TESTED_TRL = ("1.16",)  # major.minor versions this integration was tested with
if ".".join(trl.__version__.split(".")[:2]) not in TESTED_TRL:
    raise ImportError(
        f"dvp_client.integrations.trl was tested with trl {', '.join(TESTED_TRL)}; "
        f"trl {trl.__version__} is installed (pip install 'dvp-serve[trl]')"
    )

# TRL loss_type -> our aggregation (grpo: per-sequence mean of token means)
_AGGREGATIONS = {
    "grpo": Aggregation.SEQ_MEAN_TOKEN_MEAN,
    "bnpo": Aggregation.TOKEN_MEAN,
    "dapo": Aggregation.TOKEN_MEAN,
}
_ROWS = "dvp_rollouts"  # per-row Rollout objects, a list TRL shuffles and splits with the rows
_OLD = "dvp_old_logprobs"  # [B, C] pruned old log-probs (num_iterations > 1)


class DVPRollout:
    """TRL ``rollout_func``: sample the prompts through dvp-serve under a pruning rule.

    Args:
        client: the service (one URL or several replicas).
        pruning: the DVP rule (:class:`PruningRule` or a dict such as ``{"min_p": 1e-3}``).
        stop: stop strings, if any.
        seed: base seed; generation k uses ``seed * 1_000_003 + k``.
    """

    def __init__(
        self,
        client: Client,
        pruning: PruningRule | dict[str, Any],
        *,
        stop: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.client = client
        self.pruning = pruning if isinstance(pruning, PruningRule) else PruningRule(**pruning)
        self.stop = list(stop) if stop else None
        self.seed = seed
        self.calls = 0
        self.last: RolloutBatch | None = None

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        """Rollouts for ``prompts`` (each repeated ``g = num_generations`` times in a row)."""
        g: int = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        if len(prompts) % g or any(prompts[i] != prompts[i - i % g] for i in range(len(prompts))):
            raise ValueError(
                f"expected each prompt {g} times in a row (TRL's RepeatSampler); got "
                f"{len(prompts)} prompts in another order"
            )
        if isinstance(trainer, DVPGRPOTrainer):
            trainer._dvp_sync_weights()
        batch = self.client.rollouts(
            prompts[::g],
            n=g,
            temperature=trainer.args.temperature,
            max_tokens=trainer.args.max_completion_length,
            stop=self.stop,
            seed=self.seed * 1_000_003 + self.calls,
            pruning=self.pruning,
            return_safe_token_ids=self.pruning.prunes,
        )
        self.calls += 1
        rows = sorted(batch.rollouts, key=lambda r: (r.prompt_index, r.sample_index))
        self.last = batch.model_copy(update={"rollouts": rows})
        return {
            "prompt_ids": [r.prompt_token_ids for r in rows],
            "completion_ids": [r.token_ids for r in rows],
            "logprobs": [r.masked_logprobs for r in rows],
        }


class DVPGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` that samples through dvp-serve and trains on the DVP objective.

    Args:
        model: a transformers causal LM (instance or name), the same architecture the
            server serves.
        reward_funcs: as for ``GRPOTrainer``.
        client: the service.
        pruning: the DVP rule, e.g. ``{"min_p": 1e-3}``.
        weights_dir: where pushed weights go; inside the server's ``--weights-root``.
        loss_config: :class:`PolicyLossConfig` (correction, clip, aggregation). Default:
            clip ``args.epsilon`` / ``args.epsilon_high``, aggregation from
            ``args.loss_type`` (grpo: seq-mean-token-mean; bnpo, dapo: token-mean), no
            rollout correction.
        push_weights: push the policy before each generation (turn off only to measure
            what a stale server does).
        stop: stop strings for sampling.
        **kwargs: ``args``, ``train_dataset``, ``processing_class``, ... for ``GRPOTrainer``.

    Attributes:
        last_dvp_step: the last loss call's :class:`RolloutTensors`, detached
            :class:`PrunedLogprobs` fields (``logprobs``, ``mask``) and loss, for inspection.
        policy_versions: the ``policy_version`` of each generation's rollouts.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any,
        *,
        client: Client,
        pruning: PruningRule | dict[str, Any],
        weights_dir: str | Any,
        loss_config: PolicyLossConfig | None = None,
        push_weights: bool = True,
        stop: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        check_pushable(model)
        if kwargs.get("peft_config") is not None:
            raise ValueError(
                "peft_config is not supported: the server loads whole checkpoints, not "
                "adapters; train the full model (or merge an adapter first)"
            )
        rollout = DVPRollout(
            client, pruning, stop=stop, seed=getattr(kwargs.get("args"), "seed", 0)
        )
        super().__init__(model=model, reward_funcs=reward_funcs, rollout_func=rollout, **kwargs)
        a: Any = self.args
        if a.use_vllm:
            raise ValueError("use_vllm must be False: dvp-serve samples the rollouts")
        if self.beta != 0.0:
            raise ValueError(f"beta must be 0 (no reference-KL term in the DVP loss), got {a.beta}")
        if loss_config is None:
            if a.loss_type not in _AGGREGATIONS:
                raise ValueError(
                    f"loss_type {a.loss_type!r} is not supported; use one of "
                    f"{sorted(_AGGREGATIONS)} or pass loss_config"
                )
            eps_high = a.epsilon_high if a.epsilon_high is not None else a.epsilon
            loss_config = PolicyLossConfig(
                eps_low=a.epsilon, eps_high=eps_high, aggregation=_AGGREGATIONS[a.loss_type]
            )
        self.dvp_rollout, self.dvp_loss_config = rollout, loss_config
        self.dvp_push_weights = push_weights
        self._dvp_pusher = WeightPusher(client, weights_dir)
        self._dvp_pushed_step: int | None = None
        self.policy_versions: list[int] = []
        self.last_dvp_step: dict[str, Any] | None = None

    # --- generation -------------------------------------------------------------------

    def _dvp_sync_weights(self) -> None:
        """Push the policy when the optimizer has stepped since the last push."""
        step = self.state.global_step
        if not self.dvp_push_weights or self._dvp_pushed_step == step:
            return
        model = self.accelerator.unwrap_model(self.model)
        self._dvp_pusher.push(model, f"step-{step:06d}")
        self._dvp_pushed_step = step

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        batch = self.dvp_rollout.last
        assert batch is not None
        rows = list(batch.rollouts)
        versions = {r.policy_version for r in rows}
        if self.dvp_push_weights and versions != {self._dvp_pusher.version}:
            raise RuntimeError(
                f"rollouts carry policy_version {sorted(versions)}, expected "
                f"{self._dvp_pusher.version} (the weights just pushed)"
            )
        self.policy_versions.append(max(versions))
        out[_ROWS] = rows
        args: Any = self.args
        if args.gradient_accumulation_steps % (args.steps_per_generation * self.num_iterations):
            out[_OLD] = self._dvp_old_logprobs(rows, out["completion_ids"].shape[1])
        return out

    @torch.no_grad()
    def _dvp_old_logprobs(self, rows: list[Rollout], width: int) -> torch.Tensor:
        """Pruned log-probs of the rows under the current weights, ``[B, width]``."""
        old = torch.zeros(len(rows), width, device=self.accelerator.device)
        size = self.args.per_device_train_batch_size
        for i in range(0, len(rows), size):
            t = self._dvp_tensors(rows[i : i + size])
            res = self._dvp_logprobs(self.model, t, t.loss_mask)
            old[i : i + size, : t.tokens.shape[1]] = res.logprobs
        return old

    # --- loss ---------------------------------------------------------------------------

    def _dvp_tensors(self, rows: list[Rollout]) -> RolloutTensors:
        batch = self.dvp_rollout.last
        assert batch is not None
        pad = getattr(self._tokenizer, "pad_token_id", None) or 0
        response = batch.model_copy(update={"rollouts": rows})
        return rollouts_to_tensors(response, device=self.accelerator.device, pad_id=pad)

    def _dvp_logprobs(self, model: Any, t: RolloutTensors, mask: torch.Tensor) -> PrunedLogprobs:
        """Trainer ``log pi_S(y)`` over the engine's sets (fused head when the model allows)."""
        inner = self.accelerator.unwrap_model(model)
        head = inner.get_output_embeddings()
        p, n = t.prompt_length, t.tokens.shape[1]
        kw = {"attention_mask": t.attention_mask, "position_ids": t.position_ids}
        if _plain_head(inner, head):
            hidden = inner.base_model(t.input_ids, use_cache=False, **kw).last_hidden_state
            return pruned_logprobs_from_hidden(
                hidden[:, p - 1 : p - 1 + n], head.weight, t.tokens, t.safe, mask=mask
            )
        logits = model(t.input_ids, logits_to_keep=n + 1, use_cache=False, **kw).logits
        return pruned_logprobs(t.completion_logits(logits), t.tokens, t.safe, mask=mask)

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        rows: list[Rollout] = inputs[_ROWS]
        t = self._dvp_tensors(rows)
        n = t.tokens.shape[1]
        trl_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            trl_mask = trl_mask * inputs["tool_mask"]
        mask = t.loss_mask & trl_mask[:, :n].bool()  # e.g. mask_truncated_completions
        if not torch.equal(inputs["completion_ids"][:, :n][t.loss_mask], t.tokens[t.loss_mask]):
            raise RuntimeError("the DVP rows no longer line up with TRL's completion_ids")
        res = self._dvp_logprobs(model, t, mask)
        old = inputs.get(_OLD)
        out = policy_loss(
            res.logprobs,
            inputs["advantages"],
            res.mask,
            old_logprobs=None if old is None else old[:, :n],
            engine_logprobs=t.engine_masked_logprobs,
            config=self.dvp_loss_config,
        )
        mode = "train" if model.training else "eval"
        metrics = {**batch_metrics(t, res), **out.metrics(prefix="dvp/policy/")}
        metrics["dvp/policy_version"] = float(t.policy_version.max())
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        self.last_dvp_step = {
            "tensors": t,
            "logprobs": res.logprobs.detach(),
            "mask": res.mask,
            "loss": out.loss.detach(),
        }
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1
        return out.loss / scale


def _plain_head(model: Any, head: Any) -> bool:
    """Whether logits are exactly ``hidden @ head.weight^T`` (no bias, scale or cap)."""
    cfg = model.config.get_text_config()
    scaled = any(
        getattr(cfg, name, None) not in (None, 1.0)
        for name in (
            "final_logit_softcapping",
            "logit_scale",
            "output_multiplier",
            "logits_scaling",
        )
    )
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not scaled
        and getattr(cfg, "lm_head_multiplier", None) in (None, 1.0)
    )
