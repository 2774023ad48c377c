"""A minimal but real GRPO loop on dvp-serve: rollouts over REST, the DVP objective, weight pushes.

Task: few-shot one-digit addition, generated here (``"2+3=5\\n4+1=5\\n6+2=8\\n7+5="``);
the reward is 1 when the completion (up to the newline) is exactly the sum, else 0.
Each step:

1. sample ``--prompts`` problems and ``--n`` rollouts each from the running server
   (``Client.rollouts``), with DVP (``pruning.min_p = --min-p``, safe sets returned)
   or without; every rollout's ``policy_version`` must be the last pushed version;
2. group-normalised advantages (``dvp_client.train.advantages.group_advantages``);
3. the trainer's fp32 recomputation: teacher-forced logits of the policy, then
   ``dvp_client.train.objective.pruned_logprobs`` in replay mode (the engine's sets; the
   whole vocabulary without DVP), ``dvp_client.train.losses.policy_loss`` with the chosen
   rollout correction against the engine's ``masked_logprobs``; AdamW step (with
   ``--minibatches M``, M steps on slices of whole groups, against the trainer's own
   log-probs from before the first: the PPO ratio moves and clipping acts);
4. every ``--push-every`` steps, save the policy as safetensors under ``--weights-dir``
   (inside the server's ``--weights-root``) and ``POST /v1/weights``; the reply's
   ``policy_version`` must be the previous one plus one. With ``--lora-rank r`` a peft
   LoRA adapter is trained instead, and pushed alone (its folder: the server serves it
   on its base weights) or merged (``--lora-sync merged``).

The initial weights are pushed before step 1, so a server reused from an earlier
run starts from the same weights as the trainer. Per step it logs reward,
mismatch metrics (``dvp_client.train.metrics.batch_metrics``) and ``|log ratio|``
quantiles to ``<out>/steps.csv`` and plots them to ``<out>/steps.png``; every
``--eval-every`` steps it measures greedy accuracy on a fixed held-out set
(temperature 0, no pruning: the same yardstick with DVP on or off).

Run (two terminals, from the repository root)::

    mkdir -p /tmp/dvp-weights
    dvp-serve --engine torch --dtype bfloat16 --port 8000 --weights-root /tmp/dvp-weights
    python examples/grpo.py --url http://127.0.0.1:8000 --weights-dir /tmp/dvp-weights/run \\
        --steps 20 --dvp --min-p 1e-3 --out runs/dvp
    python examples/grpo.py --plot runs/dvp/steps.csv runs/nodvp/steps.csv --out runs/cmp.png
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from dvp_client import APIStatusError, Client, RolloutBatch
from dvp_client.train.advantages import group_advantages
from dvp_client.train.losses import Aggregation, Correction, PolicyLossConfig, policy_loss
from dvp_client.train.metrics import batch_metrics
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.tensors import RolloutTensors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _addition import evaluate, reward, sample, write_csv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="smollm2", help="the served model (smollm2 or a directory)")
    p.add_argument(
        "--weights-dir",
        type=Path,
        help="where pushed weights go; inside the server's --weights-root",
    )
    p.add_argument("--steps", type=int, default=20)
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
        "--train-layers",
        type=int,
        default=0,
        help="train only the last K decoder layers and the final norm (0: all)",
    )
    p.add_argument(
        "--minibatches",
        type=int,
        default=1,
        help="AdamW steps per batch, each on a slice of whole groups (1: one on-policy step)",
    )
    p.add_argument("--push-every", type=int, default=1)
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="train a LoRA adapter of this rank on every linear (peft) instead of the weights",
    )
    p.add_argument(
        "--lora-sync",
        default="adapter",
        choices=["adapter", "merged"],
        help="with --lora-rank: push the adapter alone, or the merged model",
    )
    p.add_argument("--eval-every", type=int, default=5, help="0: no greedy eval")
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("grpo-out"))
    p.add_argument("--plot", nargs="+", type=Path, help="only plot these steps.csv files to --out")
    args = p.parse_args(argv)
    if args.plot is None and args.weights_dir is None:
        p.error("--weights-dir is required (a directory inside the server's --weights-root)")
    if args.minibatches < 1 or (args.plot is None and args.minibatches > args.prompts):
        p.error(f"--minibatches must be in 1..--prompts, got {args.minibatches}")
    if args.dvp and not 0 < args.min_p <= 1:
        p.error(f"--min-p must be in (0, 1] with --dvp, got {args.min_p}")
    return args


def load_policy(spec: str, train_layers: int, seed: int, lora_rank: int = 0) -> tuple[Any, Path]:
    """The trainer's fp32 copy of the served weights (resolved as dvp-serve resolves them);
    with ``lora_rank``, a peft LoRA model on every linear (alpha = 2 r, no dropout)."""
    from dvp_server.model_store import resolve_model  # the same files the server loaded
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model_dir = resolve_model(spec)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets)
        model = get_peft_model(model, config)
    model.train()
    if train_layers > 0 and lora_rank == 0:
        model.requires_grad_(False)
        for layer in model.model.layers[-train_layers:]:
            layer.requires_grad_(True)
        model.model.norm.requires_grad_(True)
    return model, model_dir


class WeightPusher:
    """Saves the policy as one safetensors file and loads it into the server.

    The file holds exactly the tensor names of the served checkpoint (tied weights
    appear once, as in the checkpoint), so the server's checks pass.
    """

    def __init__(
        self,
        client: Client,
        model_dir: Path,
        weights_dir: Path,
        sync: str = "adapter",
        on_inflight: str | None = None,
    ) -> None:
        from safetensors import safe_open

        self.client, self.weights_dir, self.sync = client, weights_dir.resolve(), sync
        self.on_inflight = on_inflight  # None: the server's policy
        self.names: list[str] = []
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(f), "pt") as handle:
                self.names += list(handle.keys())
        self.version = int(client.request("GET", "/v1/weights")["policy_version"])
        self._last: Path | None = None

    def push(self, model: Any, step: int) -> float:
        """Save, ``POST /v1/weights``, check the version bump; returns the seconds taken."""
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        target = self.weights_dir / f"step-{step:05d}"
        target.mkdir(parents=True, exist_ok=True)
        lora = hasattr(model, "peft_config")
        if lora and self.sync == "adapter":  # adapter_config.json + adapter_model.safetensors
            model.save_pretrained(str(target))
        else:
            from dvp_client.integrations._weights import merged_tensors

            state = merged_tensors(model) if lora else model.state_dict()
            save_file(
                {k: state[k].detach().contiguous() for k in self.names},
                str(target / "model.safetensors"),
            )
        try:
            (reply,) = self.client.update_weights(  # one server: one reply
                target,
                on_inflight=self.on_inflight,  # type: ignore[arg-type]
            )
        except APIStatusError as err:
            raise SystemExit(
                f"pushing weights failed ({err.status_code}): {err}. Start dvp-serve with "
                f"--weights-root set to {self.weights_dir} or a directory above it."
            ) from err
        if reply.policy_version != self.version + 1:
            raise SystemExit(f"policy_version went {self.version} -> {reply.policy_version}")
        self.version = reply.policy_version
        if self._last is not None:
            shutil.rmtree(self._last, ignore_errors=True)  # the server has copied it
        self._last = target
        return time.perf_counter() - t0


def completion_logits(model: Any, bt: RolloutTensors) -> torch.Tensor:
    """Teacher-forced fp32 logits predicting each completion step, ``[B, T, V]``."""
    t = bt.tokens.shape[1]
    out = model(
        input_ids=bt.input_ids,
        attention_mask=bt.attention_mask,
        position_ids=bt.position_ids,
        logits_to_keep=t + 1,
    )
    return out.logits[:, :t]


def train_step(
    model: Any,
    opt: torch.optim.Optimizer,
    bt: RolloutTensors,
    rewards: torch.Tensor,
    cfg: PolicyLossConfig,
) -> dict[str, float]:
    """One GRPO update on one batch; returns the step's metrics."""
    adv = group_advantages(rewards, bt.group_ids)  # (B,)
    res = pruned_logprobs(completion_logits(model, bt), bt.tokens, bt.safe, mask=bt.loss_mask)
    out = policy_loss(
        res.logprobs, adv, res.mask, engine_logprobs=bt.engine_masked_logprobs, config=cfg
    )
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    m = batch_metrics(bt, res, quantiles=(0.001, 0.5, 0.999))
    d = (res.logprobs.detach() - bt.engine_masked_logprobs)[res.mask].abs().double()
    q = torch.quantile(d, torch.tensor([0.5, 0.99, 1.0], dtype=d.dtype)).tolist()
    return {
        **out.metrics(prefix=""),
        "grad_norm": float(grad_norm),
        "k3": m["mismatch/k3_pruned"],
        "abs_dlogp_mean": m["mismatch/abs_dlogp_mean_pruned"],
        "abs_logratio_p50": q[0],
        "abs_logratio_p99": q[1],
        "abs_logratio_max": q[2],
        "is_weight_q0.001": m["is_weight/q0.001"],
        "is_weight_q0.999": m["is_weight/q0.999"],
        "safe_size_mean": m["dvp/safe_size_mean"],
        "pruned_mass": m.get("dvp/pruned_mass_engine", math.nan),
        "tokens": m["mismatch/tokens"],
    }


def train_minibatches(
    model: Any,
    opt: torch.optim.Optimizer,
    batch: RolloutBatch,
    rewards: torch.Tensor,
    cfg: PolicyLossConfig,
    minibatches: int,
) -> dict[str, float]:
    """Several AdamW steps on one batch: ``minibatches`` slices of whole GRPO groups.

    The PPO "old" log-probs are the trainer's own before the first step (one no-grad
    forward over the batch, safe sets replayed), so the first slice has ratio 1 and the
    later ones move and get clipped; the rollout correction compares that "old" with the
    engine. The step's mismatch metrics are those of the "old" forward.
    """
    bt = batch.to_torch(pad_id=0)
    adv = group_advantages(rewards, bt.group_ids)  # (B,)
    with torch.no_grad():
        old = pruned_logprobs(completion_logits(model, bt), bt.tokens, bt.safe, mask=bt.loss_mask)
    groups = sorted({r.prompt_index for r in batch.rollouts})
    per = -(-len(groups) // minibatches)  # ceil
    stats: dict[str, list[float]] = {}
    for i in range(0, len(groups), per):
        keep = set(groups[i : i + per])
        rows = [j for j, r in enumerate(batch.rollouts) if r.prompt_index in keep]
        sub = batch.model_copy(update={"rollouts": [batch.rollouts[j] for j in rows]})
        st = sub.to_torch(pad_id=0)
        t = st.tokens.shape[1]  # <= the batch's: completions are right-padded
        res = pruned_logprobs(completion_logits(model, st), st.tokens, st.safe, mask=st.loss_mask)
        out = policy_loss(
            res.logprobs,
            adv[rows],
            res.mask,
            old_logprobs=old.logprobs[rows, :t],
            engine_logprobs=st.engine_masked_logprobs,
            config=cfg,
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for key, v in {**out.metrics(prefix=""), "grad_norm": float(grad_norm)}.items():
            stats.setdefault(key, []).append(v)
    m = batch_metrics(bt, old, quantiles=(0.001, 0.5, 0.999))
    d = (old.logprobs - bt.engine_masked_logprobs)[old.mask].abs().double()
    q = torch.quantile(d, torch.tensor([0.5, 0.99, 1.0], dtype=d.dtype)).tolist()
    return {
        **{key: sum(v) / len(v) for key, v in stats.items()},
        "k3": m["mismatch/k3_pruned"],
        "abs_dlogp_mean": m["mismatch/abs_dlogp_mean_pruned"],
        "abs_logratio_p50": q[0],
        "abs_logratio_p99": q[1],
        "abs_logratio_max": q[2],
        "is_weight_q0.001": m["is_weight/q0.001"],
        "is_weight_q0.999": m["is_weight/q0.999"],
        "safe_size_mean": m["dvp/safe_size_mean"],
        "pruned_mass": m.get("dvp/pruned_mass_engine", math.nan),
        "tokens": m["mismatch/tokens"],
    }


def check_versions(batch: RolloutBatch, expected: int) -> None:
    """Every rollout must come from the weights pushed last."""
    got = {r.policy_version for r in batch.rollouts}
    if got != {expected}:
        raise SystemExit(f"rollouts carry policy_version {sorted(got)}, expected {expected}")


PLOTTED = (
    ("reward_mean", "reward (sampled)", False),
    ("eval_acc", "greedy accuracy (held out)", False),
    ("k3", "K3 KL, trainer vs engine", True),
    ("abs_logratio_p99", "|log ratio| p99 (dashed: max)", True),
)


def _line(
    ax: Any, rows: list[dict[str, str]], key: str, style: str, color: str, label: str | None
) -> None:
    """Plot column ``key`` against ``step`` (rows where it is empty are skipped)."""
    pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in ("", None)]
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, style, ms=3, lw=1, color=color, label=label)


def plot(csvs: list[Path], out: Path) -> None:
    """Plot reward, eval accuracy, K3 and |log ratio| quantiles of one or more runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.3))
    for i, path in enumerate(csvs):
        rows = list(csv.DictReader(path.open()))
        label = rows[0]["run"] if rows else path.parent.name
        for ax, (key, title, log) in zip(axes, PLOTTED, strict=True):
            _line(ax, rows, key, "o-", f"C{i}", label)
            if key == "abs_logratio_p99":
                _line(ax, rows, "abs_logratio_max", "--", f"C{i}", None)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.set_yscale("log" if log else "linear")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The training loop; returns the logged rows."""
    name = f"dvp rho={args.min_p:g}" if args.dvp else "no dvp"
    name += f", {args.correction}"
    args.out.mkdir(parents=True, exist_ok=True)
    model, model_dir = load_policy(args.model, args.train_layers, args.seed, args.lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    cfg = PolicyLossConfig(correction=args.correction, aggregation=args.aggregation, cap=args.cap)
    rows: list[dict[str, Any]] = []
    with Client(args.url, api_key=args.api_key, timeout=1800) as client:
        pusher = WeightPusher(client, model_dir, args.weights_dir, args.lora_sync)
        pusher.push(model, 0)  # the server starts from the trainer's weights
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            acc = (
                evaluate(client, args) if args.eval_every and step % args.eval_every == 1 else None
            )
            batch, answers = sample(client, args, step)
            check_versions(batch, pusher.version)
            t1 = time.perf_counter()
            rewards = torch.tensor(
                [reward(r.text, answers[r.prompt_index]) for r in batch.rollouts]
            )
            if args.minibatches > 1:
                metrics = train_minibatches(model, opt, batch, rewards, cfg, args.minibatches)
            else:
                metrics = train_step(model, opt, batch.to_torch(pad_id=0), rewards, cfg)
            t2 = time.perf_counter()
            push_s = pusher.push(model, step) if step % args.push_every == 0 else 0.0
            row = {
                "run": name,
                "step": step,
                "policy_version": batch.rollouts[0].policy_version,
                "reward_mean": float(rewards.mean()),
                "eval_acc": "" if acc is None else acc,
                **metrics,
                "rollout_s": t1 - t0,
                "train_s": t2 - t1,
                "push_s": push_s,
            }
            rows.append(row)
            print(
                f"step {step:3d} v{row['policy_version']} reward {row['reward_mean']:.3f} "
                f"eval {'-' if acc is None else f'{acc:.3f}'} k3 {row['k3']:.2e} "
                f"|d| p99 {row['abs_logratio_p99']:.3f} max {row['abs_logratio_max']:.3f} "
                f"loss {row['loss']:+.4f} ({t1 - t0:.0f}+{t2 - t1:.0f}+{push_s:.0f} s)",
                flush=True,
            )
            write_csv(rows, args.out / "steps.csv")
        if args.eval_every:
            final = evaluate(client, args)
            rows.append({"run": name, "step": args.steps + 1, "eval_acc": final})
            print(f"final greedy accuracy {final:.3f}", flush=True)
    write_csv(rows, args.out / "steps.csv")
    plot([args.out / "steps.csv"], args.out / "steps.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        plot(args.plot, args.out if args.out.suffix == ".png" else args.out / "compare.png")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
