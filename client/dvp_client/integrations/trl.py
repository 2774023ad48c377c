"""TRL's ``GRPOTrainer`` on dvp-serve: rollouts from the service, the DVP objective in the loss.

Tested with trl 1.16 (``pip install 'dvp-serve[trl]'``); it overrides TRL internals
(``rollout_func``, ``_generate_and_score_completions``, ``_compute_loss``), so other
trl versions are refused at import. Importing this module imports trl; nothing else
in :mod:`dvp_client` does.

What :class:`DVPGRPOTrainer` changes, per generation:

1. weights: when the trainer's step moved since the last push (and before the first
   generation), the policy is saved under ``weights_dir`` (inside the server's
   ``--weights-root``) and loaded with ``POST /v1/weights``; ``policy_version`` must go
   up by one (tied embeddings written once; with ``peft_config`` or a PEFT model, the
   LoRA adapter alone, or the merged model with ``sync="merged"``). With several
   processes only the main one saves and pushes; the others wait for it and receive
   the new version;
2. rollouts (:class:`DVPRollout`, TRL's ``rollout_func``): TRL hands over each prompt
   ``num_generations`` times in a row (with several processes a group may be split
   between two of them); each run of ``k`` equal prompts is sent once with ``n = k``
   and one seed per generation (the same prompt sent k times with one seed would give
   k identical samples), the seed folding in the process index, at
   ``args.temperature``, up to ``args.max_completion_length`` tokens, under the pruning
   rule, with the safe sets; every rollout must carry the version just pushed;
3. each row keeps its :class:`dvp_schemas.Rollout` (token ids, engine log-probs, safe
   sets) in the batch, so the sets follow the row through TRL's shuffle and split;
   with ``num_iterations > 1`` (or a generation reused across optimizer steps) the
   pruned old log-probs are computed once per generation, before any update.

The loss (:meth:`DVPGRPOTrainer._compute_loss`): the rows' tensors from
:func:`~dvp_client.train.tensors.rollouts_to_tensors` (``position_ids`` from the real
tokens, as the engine counts them), the backbone's hidden states (the forward goes
through the DDP wrapper, so gradients are all-reduced, under the mixed precision the
config asks for: TRL's ``bf16`` defaults to True, set ``bf16=False`` for an fp32
trainer), the pruned log-probs over the engine's
replayed sets from the hidden states and the LM head
(:func:`~dvp_client.train.fused_head.pruned_logprobs_from_hidden`: no ``[B, T, V]``
logits; models with an LM-head bias or logit scaling fall back to the logits and
:func:`~dvp_client.train.objective.pruned_logprobs`), then
:func:`~dvp_client.train.losses.policy_loss` against the engine's masked log-probs,
divided by the gradient-accumulation steps. ``batch_metrics`` (mismatch, |S|, pruned
mass, IS weights) and the loss metrics go to TRL's own metric logging.

Processes: one, or several in plain data parallelism (DDP: ``accelerate launch
--num_processes N``, or ``torchrun --nproc_per_node N``); tested with two CPU processes
(DeepSpeed ZeRO-1/2 is not refused but untested).

Not supported (refused with an error): ``use_vllm``, ``beta != 0`` (no reference-KL
term), adapters loaded into a plain transformers model, loss types other than
grpo / bnpo / dapo, sharded parameters (FSDP, DeepSpeed ZeRO-3: the push saves the
main process's full model).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from dvp_schemas import PruningRule, Rollout, Usage

with warnings.catch_warnings():
    # TRL warns at import when the installed vLLM is outside the range its own vLLM
    # path supports; this integration never uses that path (rollouts come from the
    # service), so the warning says nothing about it.
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM", category=UserWarning)
    import trl
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
        seed: base seed; each request's seed is derived from (seed, process index,
            call, request), see :meth:`__call__`.
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
        """Rollouts for ``prompts``, one row per prompt, in the prompts' order.

        A run of ``k`` identical consecutive prompts (a GRPO group, or the part of one
        that fell to this process) is sent once with ``n = k``; runs go to one request
        per (run length, repeat of the same prompt), so no request holds a prompt twice.
        Each request's seed folds in the base seed, the process index, the call and the
        request, so no two requests (on any process) share a seed.
        """
        if isinstance(trainer, DVPGRPOTrainer):
            trainer._dvp_sync_weights()
        process = int(getattr(getattr(trainer, "accelerator", None), "process_index", 0))
        runs = _runs(prompts)  # (first position, length) per run
        requests: dict[tuple[int, int], list[int]] = {}  # (length, repeat) -> run indices
        repeats: dict[str, int] = {}
        for i, (start, length) in enumerate(runs):
            key = repr(prompts[start])
            repeats[key] = repeats.get(key, -1) + 1
            requests.setdefault((length, repeats[key]), []).append(i)
        rows: list[Rollout | None] = [None] * len(prompts)
        batches: list[RolloutBatch] = []
        for k, ((length, _), members) in enumerate(sorted(requests.items())):
            batch = self.client.rollouts(
                [prompts[runs[i][0]] for i in members],
                n=length,
                temperature=trainer.args.temperature,
                max_tokens=trainer.args.max_completion_length,
                stop=self.stop,
                seed=_request_seed(self.seed, process, self.calls, k),
                pruning=self.pruning,
                return_safe_token_ids=self.pruning.prunes,
            )
            batches.append(batch)
            for r in batch.rollouts:
                run = members[r.prompt_index]
                rows[runs[run][0] + r.sample_index] = r.model_copy(update={"prompt_index": run})
        self.calls += 1
        if any(r is None for r in rows):
            raise RuntimeError("the service returned fewer rollouts than requested")
        done = [r for r in rows if r is not None]
        self.last = batches[0].model_copy(update={"rollouts": done, "usage": _total_usage(batches)})
        return {
            "prompt_ids": [r.prompt_token_ids for r in done],
            "completion_ids": [r.token_ids for r in done],
            "logprobs": [r.masked_logprobs for r in done],
        }


def _runs(prompts: Sequence[Any]) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of equal consecutive prompts."""
    runs: list[tuple[int, int]] = []
    for i, p in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _request_seed(seed: int, process: int, call: int, request: int) -> int:
    """A 63-bit request seed from (base seed, process index, call, request in the call)."""
    state = np.random.SeedSequence([seed, process, call, request]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def _total_usage(batches: Sequence[RolloutBatch]) -> Usage:
    return Usage(
        prompt_tokens=sum(b.usage.prompt_tokens for b in batches),
        completion_tokens=sum(b.usage.completion_tokens for b in batches),
        total_tokens=sum(b.usage.total_tokens for b in batches),
    )


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
        sync: with a PEFT model (or ``peft_config``): ``"adapter"`` pushes the LoRA
            adapter alone (the server serves it on its base weights), ``"merged"`` the
            merged weights as a full checkpoint (servers without adapters).
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
        sync: str = "adapter",
        **kwargs: Any,
    ) -> None:
        check_pushable(model)
        rollout = DVPRollout(
            client, pruning, stop=stop, seed=getattr(kwargs.get("args"), "seed", 0)
        )
        super().__init__(model=model, reward_funcs=reward_funcs, rollout_func=rollout, **kwargs)
        a: Any = self.args
        if a.use_vllm:
            raise ValueError("use_vllm must be False: dvp-serve samples the rollouts")
        if self.beta != 0.0:
            raise ValueError(f"beta must be 0 (no reference-KL term in the DVP loss), got {a.beta}")
        _check_parallelism(self)
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
        self._dvp_pusher = WeightPusher(client, weights_dir, sync)
        self._dvp_pushed_step: int | None = None
        self.policy_versions: list[int] = []
        self.last_dvp_step: dict[str, Any] | None = None

    # --- generation -------------------------------------------------------------------

    def _dvp_sync_weights(self) -> None:
        """Push the policy when the optimizer has stepped since the last push.

        With several processes the main one saves and pushes; every process waits for
        it and learns the new version (so each checks its own rollouts against it).
        """
        step = self.state.global_step
        if not self.dvp_push_weights or self._dvp_pushed_step == step:
            return
        acc = self.accelerator
        error = None
        if acc.is_main_process:
            try:
                self._dvp_pusher.push(acc.unwrap_model(self.model), f"step-{step:06d}")
            except Exception as err:  # tell the other processes before raising
                if acc.num_processes == 1:
                    raise
                error = err
        if acc.num_processes > 1:
            acc.wait_for_everyone()
            shared: list[Any] = [self._dvp_pusher.version, None if error is None else repr(error)]
            broadcast_object_list(shared, from_process=0)
            if error is not None:
                raise error
            if shared[1] is not None:
                raise RuntimeError(f"the main process failed to push weights: {shared[1]}")
            self._dvp_pusher.version = int(shared[0])
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
            # Through ``model`` (the DDP wrapper when there is one, so the gradients
            # are all-reduced; accelerate's mixed precision as configured) with one
            # position of logits; the hidden states come from a hook on the backbone.
            got: list[torch.Tensor] = []
            backbone = _backbone(inner)
            hook = backbone.register_forward_hook(lambda _m, _a, o: got.append(o[0]))
            try:
                model(t.input_ids, logits_to_keep=1, use_cache=False, **kw)
            finally:
                hook.remove()
            hidden = got[-1]
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


def _check_parallelism(trainer: GRPOTrainer) -> None:
    """Refuse sharded parameters: the main process pushes the full weights alone."""
    if trainer.is_fsdp_enabled:
        raise ValueError(
            "FSDP is not supported: the main process saves and pushes the full weights, "
            "and FSDP shards them across processes. Use plain data parallelism (accelerate "
            "launch --num_processes N without an FSDP config, or torchrun --nproc_per_node N)."
        )
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        raise ValueError(
            "DeepSpeed ZeRO-3 is not supported: the main process saves and pushes the full "
            "weights, and ZeRO-3 shards them across processes. Use plain data parallelism "
            "(accelerate launch --num_processes N without a DeepSpeed config, or torchrun "
            "--nproc_per_node N)."
        )


def _backbone(model: Any) -> Any:
    """The transformer under the LM head (a ``PeftModel``'s: that of its base model)."""
    get_base = getattr(model, "get_base_model", None)
    return (get_base() if callable(get_base) else model).base_model


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
