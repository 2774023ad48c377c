"""GRPO in JAX over dvp-serve: rollouts over REST, the DVP objective, optax, weight pushes.

The same loop as ``examples/grpo.py`` with a trainer in another stack: no torch in
this process. The policy is a small JAX Llama forward (below) that loads the
safetensors the server serves; the objective is :mod:`dvp_client.train.jax`.
Task: few-shot one-digit addition (``"2+3=5\\n4+1=5\\n6+2=8\\n7+5="``), reward 1 when
the completion up to the newline is the sum. Each step:

1. ``--prompts`` problems x ``--n`` rollouts from the server (``Client.rollouts``),
   with DVP (``min_p = --min-p``, the safe sets returned) or without; every
   rollout's ``policy_version`` must be the last pushed one;
2. the batch as fixed-shape arrays (``rollouts_to_arrays``: completions padded to
   ``--max-tokens``, prompts left-padded to a multiple of 16, the sets as a bitmap),
   so the jitted step compiles once or twice per run;
3. one jitted step: the forward to the final hidden states, pruned log-probs from
   the hidden states and the LM head (``pruned_logprobs_from_hidden``, replay of the
   engine's sets), group advantages, ``policy_loss`` with the chosen correction
   against the engine's ``masked_logprobs``, gradient, optax AdamW (clip 1.0);
4. the weights written back as one safetensors file (the served names and dtypes)
   under ``--weights-dir`` and loaded with ``POST /v1/weights``; the version must
   rise by one.

Before the update the trainer's ``log pi_S(y)`` and the engine's are the same
function of the same weights: their largest difference per step is logged
(``abs_dlogp_max``; fp32 engine and trainer agree to ~1e-5), with K3 and reward,
to ``<out>/steps.csv``; ``<out>/summary.json`` also says whether torch was imported.

Run (two terminals, from the repository root)::

    mkdir -p /tmp/dvp-weights
    dvp-serve --engine torch --port 8000 --weights-root /tmp/dvp-weights
    python examples/jax_grpo.py --url http://127.0.0.1:8000 \\
        --weights-dir /tmp/dvp-weights/jax --steps 10 --min-p 1e-3 --out runs/jax
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from dvp_client import APIStatusError, Client
from dvp_client.train.jax import (
    Aggregation,
    Correction,
    PolicyLossConfig,
    RolloutArrays,
    batch_metrics,
    group_advantages,
    policy_loss,
    pruned_logprobs_from_hidden,
    rollouts_to_arrays,
)
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _addition import evaluate, reward, sample, write_csv

PROMPT_BUCKET = 16  # left-pad prompts to a multiple of this: few shapes for jit

Params = dict[str, Any]


def parity_reward(text: str | None, answer: int) -> float:
    """A smoke-test reward that varies within a group on any model: length parity."""
    return float(len(text or "") % 2)


# -- the model: a Llama forward in JAX over the served safetensors ------------------

LAYER_KEYS = {
    "ln1": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "ln2": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}


class Llama:
    """Config of a transformers Llama checkpoint (no biases, default RoPE)."""

    def __init__(self, config: dict[str, Any]) -> None:
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise SystemExit("this example's Llama has no attention / MLP biases")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise SystemExit(f"RoPE type {rope.get('rope_type')!r} is not implemented here")
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads", self.heads))
        self.head_dim = int(config.get("head_dim") or config["hidden_size"] // self.heads)
        self.eps = float(config["rms_norm_eps"])
        self.theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        self.tied = bool(config.get("tie_word_embeddings", False))


def load_params(model_dir: Path) -> tuple[Llama, Params, dict[str, np.dtype]]:
    """The served checkpoint as float32 JAX arrays, layers stacked for ``lax.scan``.

    Returns:
        The config, the params and the served tensor names with their dtypes.
    """
    cfg = Llama(json.loads((model_dir / "config.json").read_text()))
    flat: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        flat.update(load_file(str(f)))
    dtypes = {k: v.dtype for k, v in flat.items()}

    def f32(x: np.ndarray) -> jax.Array:
        return jnp.asarray(x, jnp.float32)

    layers = {
        short: f32(np.stack([flat[f"model.layers.{i}.{long}"] for i in range(cfg.layers)]))
        for short, long in LAYER_KEYS.items()
    }
    params: Params = {
        "embed": f32(flat["model.embed_tokens.weight"]),
        "norm": f32(flat["model.norm.weight"]),
        "layers": layers,
    }
    if not cfg.tied:
        params["lm_head"] = f32(flat["lm_head.weight"])
    return cfg, params, dtypes


def to_safetensors(
    cfg: Llama, params: Params, dtypes: dict[str, np.dtype]
) -> dict[str, np.ndarray]:
    """The params under the served names and dtypes (tied heads appear once)."""
    out = {
        "model.embed_tokens.weight": params["embed"],
        "model.norm.weight": params["norm"],
    }
    if "lm_head" in params:
        out["lm_head.weight"] = params["lm_head"]
    for short, long in LAYER_KEYS.items():
        for i in range(cfg.layers):
            out[f"model.layers.{i}.{long}"] = params["layers"][short][i]
    missing = set(dtypes) - set(out)
    if missing:
        raise SystemExit(
            f"the checkpoint has tensors this example does not train: {sorted(missing)[:3]}"
        )
    return {k: np.ascontiguousarray(np.asarray(out[k]).astype(dtypes[k])) for k in dtypes}


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """``w * x / sqrt(mean(x^2) + eps)`` over the last axis (float32)."""
    return w * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


def rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def hidden_states(
    cfg: Llama, params: Params, ids: jax.Array, attn: jax.Array, pos: jax.Array
) -> jax.Array:
    """Final hidden states (after the final norm), float32 ``[B, L, H]``.

    Args:
        ids, attn, pos: int ``[B, L]`` input ids, attention mask (1 = real token) and
            position ids (``cumsum(attn) - 1``; prompts are left-padded).
    """
    b, n = ids.shape
    hd, nh, nkv = cfg.head_dim, cfg.heads, cfg.kv_heads
    inv_freq = 1.0 / cfg.theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    freqs = pos.astype(jnp.float32)[..., None] * inv_freq  # (B, L, hd / 2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb)[:, :, None], jnp.sin(emb)[:, :, None]  # (B, L, 1, hd)
    causal = jnp.tril(jnp.ones((n, n), bool))
    allowed = causal[None, None] & attn.astype(bool)[:, None, None, :]  # (B, 1, L, L)
    neg = jnp.finfo(jnp.float32).min  # not -inf: left-pad rows see no key at all

    def layer(x: jax.Array, w: Params) -> tuple[jax.Array, None]:
        h = rms_norm(x, w["ln1"], cfg.eps)
        q = (h @ w["q"].T).reshape(b, n, nh, hd)
        k = (h @ w["k"].T).reshape(b, n, nkv, hd)
        v = (h @ w["v"].T).reshape(b, n, nkv, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = jnp.repeat(k, nh // nkv, axis=2), jnp.repeat(v, nh // nkv, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = jax.nn.softmax(jnp.where(allowed, scores, neg), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, nh * hd)
        x = x + o @ w["o"].T
        h = rms_norm(x, w["ln2"], cfg.eps)
        return x + (jax.nn.silu(h @ w["gate"].T) * (h @ w["up"].T)) @ w["down"].T, None

    x, _ = jax.lax.scan(layer, params["embed"][ids], params["layers"])
    return rms_norm(x, params["norm"], cfg.eps)


# -- the training step ---------------------------------------------------------------


def loss_fn(
    params: Params, cfg: Llama, loss_cfg: PolicyLossConfig, batch: dict[str, jax.Array]
) -> tuple[jax.Array, tuple[Any, Any]]:
    """The GRPO loss of one batch and, as aux, the pruned log-probs and loss outputs."""
    tokens = batch["tokens"]
    p = batch["input_ids"].shape[1] - tokens.shape[1]  # static: the padded prompt width
    hid = hidden_states(
        cfg, params, batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    )
    head = params["embed"] if cfg.tied else params["lm_head"]
    res = pruned_logprobs_from_hidden(
        hid[:, p - 1 : p - 1 + tokens.shape[1]],
        head,
        tokens,
        batch["safe_bitmap"],
        batch["temperature"],
        mask=batch["loss_mask"],
    )
    adv = group_advantages(batch["rewards"], batch["group_ids"])
    out = policy_loss(res.logprobs, adv, res.mask, engine_logprobs=batch["engine"], config=loss_cfg)
    return out.loss, (res, out)


@partial(jax.jit, static_argnums=(0, 1, 2))
def train_step(
    cfg: Llama,
    loss_cfg: PolicyLossConfig,
    opt: optax.GradientTransformation,
    params: Params,
    opt_state: Any,
    batch: dict[str, jax.Array],
) -> tuple[Params, Any, jax.Array, tuple[Any, Any], jax.Array]:
    """One update: ``(params, opt_state, loss, (pruned log-probs, loss output), grad norm)``."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, cfg, loss_cfg, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux, optax.global_norm(grads)


def left_pad(a: RolloutArrays, multiple: int, pad_id: int) -> RolloutArrays:
    """Left-pad the prompts of ``a`` to a multiple of ``multiple`` columns."""
    extra = -a.prompt_length % multiple
    if extra == 0:
        return a

    def pad(x: np.ndarray, fill: int) -> np.ndarray:
        return np.pad(x, ((0, 0), (extra, 0)), constant_values=fill)

    return replace(
        a,
        input_ids=pad(a.input_ids, pad_id),
        attention_mask=pad(a.attention_mask, 0),
        position_ids=pad(a.position_ids, 0),
        prompt_length=a.prompt_length + extra,
    )


def device_batch(a: RolloutArrays, rewards: np.ndarray) -> dict[str, jax.Array]:
    if a.safe_bitmap is None:
        raise SystemExit("the rollouts carry no safe sets: ask for return_safe_token_ids")
    return {
        "input_ids": jnp.asarray(a.input_ids),
        "attention_mask": jnp.asarray(a.attention_mask),
        "position_ids": jnp.asarray(a.position_ids),
        "tokens": jnp.asarray(a.tokens),
        "loss_mask": jnp.asarray(a.loss_mask),
        "safe_bitmap": jnp.asarray(a.safe_bitmap),
        "engine": jnp.asarray(a.engine_masked_logprobs),
        "temperature": jnp.asarray(a.temperature, jnp.float32),
        "rewards": jnp.asarray(rewards, jnp.float32),
        "group_ids": jnp.asarray(a.group_ids),
    }


# -- the service side ------------------------------------------------------------------


class WeightPusher:
    """Writes the params as one safetensors file and loads it into the server."""

    def __init__(
        self, client: Client, weights_dir: Path, cfg: Llama, dtypes: dict[str, np.dtype]
    ) -> None:
        self.client, self.weights_dir, self.cfg, self.dtypes = (
            client,
            weights_dir.resolve(),
            cfg,
            dtypes,
        )
        self.version = int(client.request("GET", "/v1/weights")["policy_version"])
        self._last: Path | None = None

    def push(self, params: Params, step: int) -> float:
        """Save, ``POST /v1/weights``, check the version bump; returns the seconds taken."""
        t0 = time.perf_counter()
        target = self.weights_dir / f"step-{step:05d}"
        target.mkdir(parents=True, exist_ok=True)
        save_file(to_safetensors(self.cfg, params, self.dtypes), str(target / "model.safetensors"))
        try:
            (reply,) = self.client.update_weights(target)
        except APIStatusError as err:
            raise SystemExit(
                f"pushing weights failed ({err.status_code}): {err}. Start dvp-serve with "
                f"--weights-root set to {self.weights_dir} or a directory above it."
            ) from err
        if reply.policy_version != self.version + 1:
            raise SystemExit(f"policy_version went {self.version} -> {reply.policy_version}")
        self.version = reply.policy_version
        if self._last is not None:
            shutil.rmtree(self._last, ignore_errors=True)
        self._last = target
        return time.perf_counter() - t0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="smollm2", help="the served model (smollm2 or a directory)")
    p.add_argument(
        "--weights-dir", type=Path, required=True, help="inside the server's --weights-root"
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=8, help="problems per step")
    p.add_argument("--n", type=int, default=8, help="rollouts per problem (the GRPO group)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dvp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--min-p", type=float, default=1e-3, help="DVP rho")
    p.add_argument("--correction", default="none", choices=[c.value for c in Correction])
    p.add_argument(
        "--aggregation", default="seq-mean-token-mean", choices=[a.value for a in Aggregation]
    )
    p.add_argument("--cap", type=float, default=2.0, help="TIS/MIS cap C")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument(
        "--reward",
        default="exact",
        choices=["exact", "parity"],
        help="exact: the sum; parity: completion length parity (smoke tests)",
    )
    p.add_argument("--eval-every", type=int, default=5, help="0: no greedy eval")
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("jax-grpo-out"))
    args = p.parse_args(argv)
    if args.dvp and not 0 < args.min_p <= 1:
        p.error(f"--min-p must be in (0, 1] with --dvp, got {args.min_p}")
    return args


def resolve(spec: str) -> Path:
    """The served model's directory, resolved as dvp-serve resolves it (no torch)."""
    from dvp_server.model_store import resolve_model

    return resolve_model(spec)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The training loop; returns the logged rows."""
    args.out.mkdir(parents=True, exist_ok=True)
    cfg, params, dtypes = load_params(resolve(args.model))
    vocab = int(params["embed"].shape[0])
    loss_cfg = PolicyLossConfig(
        correction=args.correction, aggregation=args.aggregation, cap=args.cap
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=0.0))
    opt_state = opt.init(params)
    score = parity_reward if args.reward == "parity" else reward
    name = (f"jax, dvp rho={args.min_p:g}" if args.dvp else "jax, no dvp") + f", {args.correction}"
    rows: list[dict[str, Any]] = []
    with Client(args.url, api_key=args.api_key, timeout=1800) as client:
        pusher = WeightPusher(client, args.weights_dir, cfg, dtypes)
        pusher.push(params, 0)  # the server starts from the trainer's weights
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            every = args.eval_every
            acc = evaluate(client, args) if every and step % every == 1 % every else None
            batch, answers = sample(client, args, step)
            versions = {r.policy_version for r in batch.rollouts}
            if versions != {pusher.version}:
                raise SystemExit(
                    f"rollouts carry policy_version {sorted(versions)}, expected {pusher.version}"
                )
            rewards = np.array([score(r.text, answers[r.prompt_index]) for r in batch.rollouts])
            arrays = rollouts_to_arrays(batch, vocab_size=vocab, pad_steps_to=args.max_tokens)
            arrays = left_pad(arrays, PROMPT_BUCKET, pad_id=0)
            t1 = time.perf_counter()
            params, opt_state, loss, (res, out), gnorm = train_step(
                cfg, loss_cfg, opt, params, opt_state, device_batch(arrays, rewards)
            )
            m = batch_metrics(arrays, res, quantiles=(0.001, 0.5, 0.999))
            d = np.abs(np.asarray(res.logprobs) - arrays.engine_masked_logprobs)[
                np.asarray(res.mask)
            ]
            t2 = time.perf_counter()
            push_s = pusher.push(params, step)
            row = {
                "run": name,
                "step": step,
                "policy_version": batch.rollouts[0].policy_version,
                "reward_mean": float(rewards.mean()),
                "eval_acc": "" if acc is None else acc,
                **out.metrics(np.asarray(res.mask), prefix=""),
                "grad_norm": float(gnorm),
                "k3": m["mismatch/k3_pruned"],
                "abs_dlogp_mean": m["mismatch/abs_dlogp_mean_pruned"],
                "abs_dlogp_max": float(d.max()) if d.size else math.nan,
                "safe_size_mean": m["dvp/safe_size_mean"],
                "pruned_mass": m["dvp/pruned_mass_engine"],
                "tokens": m["mismatch/tokens"],
                "rollout_s": t1 - t0,
                "train_s": t2 - t1,
                "push_s": push_s,
            }
            rows.append(row)
            print(
                f"step {step:3d} v{row['policy_version']} reward {row['reward_mean']:.3f} "
                f"eval {'-' if acc is None else f'{acc:.3f}'} k3 {row['k3']:.2e} "
                f"|d| max {row['abs_dlogp_max']:.2e} loss {float(loss):+.4f} "
                f"({t1 - t0:.0f}+{t2 - t1:.0f}+{push_s:.0f} s)",
                flush=True,
            )
            write_csv(rows, args.out / "steps.csv")
        if args.eval_every:
            final = evaluate(client, args)
            rows.append({"run": name, "step": args.steps + 1, "eval_acc": final})
            print(f"final greedy accuracy {final:.3f}", flush=True)
    write_csv(rows, args.out / "steps.csv")
    summary = {
        "run": name,
        "steps": args.steps,
        "final_policy_version": pusher.version,
        "torch_imported": "torch" in sys.modules,
        "jax_backend": jax.default_backend(),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
