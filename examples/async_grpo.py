"""Asynchronous GRPO on dvp-serve (PipelineRL-style): rollouts never wait for the trainer.

``examples/grpo.py`` alternates: sample, train, push, sample... Here sampling never
stops. ``--actors`` threads keep rollout requests in flight against the server all
the time and queue the finished batches; the trainer takes the next batch, steps,
and pushes its weights with ``on_inflight="keep"``: the server swaps them between
two decode steps and the rollouts in flight continue with the new weights. Nothing
is drained, so a batch can hold tokens of several versions, and each token says so
(``Rollout.version_spans`` -> ``to_torch()``'s ``token_policy_versions`` /
``token_kv_versions``, ``[B, T]``).

Per step the trainer knows, for every token, how many versions behind its own
weights it is: ``behind = trainer_version - min(policy_version, kv_version)`` (a
token whose keys / values are older counts as that old). Tokens more than
``--max-staleness`` behind get no gradient; the rest use the engine's per-token
log-probs for the correction (``--correction``, token TIS by default), as in the
synchronous loop (``PolicyLossConfig.max_staleness``). Logged per step
(``dvp_client.train.staleness.staleness_metrics``): versions in the batch, staleness
mean / max, tokens dropped, and the trainer-vs-engine K3 of the tokens 0 versions
behind (same weights, same KV: the fp32 floor on an fp32 engine) and 1 behind.

Run (two terminals, from the repository root)::

    mkdir -p /tmp/dvp-weights
    dvp-serve --engine torch --port 8000 --weights-root /tmp/dvp-weights \\
        --weights-update-policy keep
    python examples/async_grpo.py --url http://127.0.0.1:8000 \\
        --weights-dir /tmp/dvp-weights/async --steps 20 --out runs/async
"""

from __future__ import annotations

import argparse
import queue
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from dvp_client import Client, RolloutBatch
from dvp_client.train.advantages import group_advantages
from dvp_client.train.losses import Aggregation, Correction, PolicyLossConfig, policy_loss
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.staleness import staleness_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _addition import STOP, problem, reward, write_csv
from grpo import WeightPusher, completion_logits, load_policy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="smollm2", help="the served model (smollm2 or a directory)")
    p.add_argument("--weights-dir", type=Path, required=True, help="inside --weights-root")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=8, help="problems per batch")
    p.add_argument("--n", type=int, default=8, help="rollouts per problem (the GRPO group)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--min-p", type=float, default=1e-3, help="DVP rho (0: no pruning)")
    p.add_argument("--correction", default="token-tis", choices=[c.value for c in Correction])
    p.add_argument("--cap", type=float, default=2.0, help="TIS/MIS cap C")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--train-layers", type=int, default=0, help="train only the last k layers")
    p.add_argument("--actors", type=int, default=2, help="rollout requests kept in flight")
    p.add_argument("--queue", type=int, default=2, help="finished batches waiting at most")
    p.add_argument(
        "--max-staleness", type=int, default=2, help="tokens further behind get no gradient"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("async-grpo-out"))
    return p.parse_args(argv)


class Actors:
    """Threads that keep rollout requests in flight and queue the finished batches."""

    def __init__(self, client: Client, args: argparse.Namespace) -> None:
        self.client, self.args = client, args
        self.batches: queue.Queue[tuple[RolloutBatch, list[int]]] = queue.Queue(args.queue)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self._count = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(args.actors)]

    def __enter__(self) -> Actors:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        while True:  # unblock actors waiting on a full queue
            try:
                self.batches.get_nowait()
            except queue.Empty:
                break
        for t in self.threads:
            t.join(timeout=600)

    def next_batch(self) -> tuple[RolloutBatch, list[int]]:
        while True:
            if self.errors:
                raise RuntimeError("a rollout actor failed") from self.errors[0]
            try:
                return self.batches.get(timeout=1.0)
            except queue.Empty:
                continue

    def _run(self) -> None:
        a = self.args
        while not self.stop.is_set():
            with self._lock:
                self._count += 1
                k = self._count
            rng = random.Random(a.seed * 1_000_003 + k)
            probs = [problem(rng) for _ in range(a.prompts)]
            try:
                batch = self.client.rollouts(
                    [q for q, _ in probs],
                    n=a.n,
                    max_tokens=a.max_tokens,
                    stop=[STOP],
                    seed=a.seed * 1_000_003 + k,
                    pruning={"min_p": a.min_p},
                    return_safe_token_ids=a.min_p > 0,
                )
            except BaseException as exc:  # the trainer sees it and stops
                self.errors.append(exc)
                return
            while not self.stop.is_set():
                try:
                    self.batches.put((batch, [ans for _, ans in probs]), timeout=1.0)
                    break
                except queue.Full:
                    continue


def train_step(
    model: Any,
    opt: torch.optim.Optimizer,
    batch: RolloutBatch,
    answers: list[int],
    version: int,
    args: argparse.Namespace,
    cfg: PolicyLossConfig,
) -> dict[str, Any]:
    """One GRPO update on a batch that may span versions; returns the step's metrics."""
    bt = batch.to_torch(pad_id=0)
    assert bt.token_policy_versions is not None and bt.token_kv_versions is not None
    rewards = torch.tensor([reward(r.text, answers[r.prompt_index]) for r in batch.rollouts])
    adv = group_advantages(rewards, bt.group_ids)  # (B,)
    res = pruned_logprobs(completion_logits(model, bt), bt.tokens, bt.safe, mask=bt.loss_mask)
    versions = {
        "token_policy_versions": bt.token_policy_versions,
        "token_kv_versions": bt.token_kv_versions,
        "trainer_version": version,
    }
    out = policy_loss(
        res.logprobs, adv, res.mask, engine_logprobs=bt.engine_masked_logprobs, config=cfg,
        **versions,
    )  # fmt: skip
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    st = staleness_metrics(
        res.mask,
        bt.engine_masked_logprobs,
        res.logprobs.detach(),
        **versions,  # type: ignore[arg-type]
    )
    pv = bt.token_policy_versions[res.mask].tolist()
    kv = bt.token_kv_versions[res.mask].tolist()
    return {
        "versions": sorted({int(v) for v in pv}),
        "kv_versions": sorted({int(v) for v in kv}),
        "spanning_rollouts": sum(len(r.version_spans or []) > 1 for r in batch.rollouts),
        "behind_mean": st["staleness/behind_mean"],
        "behind_max": int(st["staleness/behind_max"]),
        "tokens": int(res.mask.sum()),
        "tokens_dropped": int(out.stale.sum()),
        "k3_same_version": st["staleness/k3_behind_0"],
        "k3_behind_1": st["staleness/k3_behind_1"],
        "reward_mean": float(rewards.mean()),
        "loss": float(out.loss),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The asynchronous loop; returns the logged rows."""
    args.out.mkdir(parents=True, exist_ok=True)
    model, model_dir = load_policy(args.model, args.train_layers, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    cfg = PolicyLossConfig(
        correction=args.correction,
        aggregation=Aggregation.TOKEN_MEAN,
        cap=args.cap,
        max_staleness=args.max_staleness,
    )
    rows: list[dict[str, Any]] = []
    with Client(args.url, api_key=args.api_key, timeout=1800) as client:
        pusher = WeightPusher(client, model_dir, args.weights_dir, on_inflight="keep")
        pusher.push(model, 0)  # the server starts from the trainer's weights
        with Actors(client, args) as actors:
            for step in range(1, args.steps + 1):
                t0 = time.perf_counter()
                batch, answers = actors.next_batch()
                t1 = time.perf_counter()
                m = train_step(model, opt, batch, answers, pusher.version, args, cfg)
                t2 = time.perf_counter()
                push_s = pusher.push(model, step)
                row = {"step": step, "trainer_version": pusher.version - 1, **m}
                row.update(wait_s=t1 - t0, train_s=t2 - t1, push_s=push_s)
                rows.append(row)
                print(
                    f"step {step:3d} trainer v{row['trainer_version']} batch versions "
                    f"{m['versions']} (kv {m['kv_versions']}, {m['spanning_rollouts']} spanning) "
                    f"behind {m['behind_mean']:.2f}/{m['behind_max']} dropped "
                    f"{m['tokens_dropped']}/{m['tokens']} k3 same {m['k3_same_version']:.1e} "
                    f"behind-1 {m['k3_behind_1']:.1e} reward {m['reward_mean']:.3f} "
                    f"(wait {t1 - t0:.1f} s, train {t2 - t1:.1f} s, push {push_s:.1f} s)",
                    flush=True,
                )
                write_csv(rows, args.out / "steps.csv")
    return rows


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
