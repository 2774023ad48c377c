"""The issue-27 study runner: GRPO on SmolLM2 with FP8 / fp32 engines, sync or stale-1.

The plan (task, arms, outcomes, tests) is ``docs/study/plan.md``; this script only
executes it. Every run is one (arm, seed); a run whose folder holds ``done.json`` is
skipped, a run folder without it is deleted and the run starts again, so the runner
can be killed and restarted at any time. Runs go seed-major (seed 0 of every arm,
then seed 1, ...) so complete paired sets finish first.

It starts one ``dvp-serve`` per engine configuration it needs (FP8 for training the
FP8 arms; fp32 for the fp32 arm and for every evaluation) and keeps them for the
whole session; they are stopped when the runner exits.

Usage (repository root; set PYTHONPATH to the checkout's client/server/schemas)::

    nice -n 19 python docs/study/run.py                      # the whole study
    python docs/study/run.py --tiny --results /tmp/tiny      # a minutes-long check
    python docs/study/run.py --arms fp8-stale1-none --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import gzip
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from dvp_client import Client, RolloutBatch  # noqa: E402
from dvp_client.train.advantages import group_advantages  # noqa: E402
from dvp_client.train.losses import PolicyLossConfig, policy_loss  # noqa: E402
from dvp_client.train.objective import pruned_logprobs  # noqa: E402
from dvp_client.versions import rollout_versions  # noqa: E402
from grpo import WeightPusher, completion_logits, load_policy  # noqa: E402

# ---------------------------------------------------------------- task (plan section 2)

QUESTION = "What is {a}+{b}? Work it out step by step, then give the answer."
PROBLEMS = [(a, b) for a in range(1, 10) for b in range(1, 10)]


def held_out(a: int, b: int) -> bool:
    return (9 * (a - 1) + (b - 1)) % 3 == 0


HELD_OUT = [p for p in PROBLEMS if held_out(*p)]  # 27, never trained on
TRAIN = [p for p in PROBLEMS if not held_out(*p)]  # 54


def messages(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTION.format(a=a, b=b)}]


def reward(text: str | None, answer: int) -> float:
    """1 if the last integer in the completion is the answer."""
    nums = re.findall(r"-?\d+", text or "")
    return 1.0 if nums and int(nums[-1]) == answer else 0.0


# ---------------------------------------------------------------- arms (plan section 4)


@dataclass(frozen=True)
class Arm:
    name: str
    engine: str  # "fp8" | "fp32"
    stale: int  # 0 | 1
    rho: float
    correction: str


ARMS = [
    Arm("fp32-sync-none", "fp32", 0, 0.0, "none"),
    Arm("fp8-sync-none", "fp8", 0, 0.0, "none"),
    Arm("fp8-stale1-none", "fp8", 1, 0.0, "none"),
    Arm("fp8-stale1-tis", "fp8", 1, 0.0, "token-tis"),
    Arm("fp8-stale1-dvp1e-2", "fp8", 1, 1e-2, "none"),
    Arm("fp8-stale1-dvp1e-3", "fp8", 1, 1e-3, "none"),
    Arm("fp8-stale1-dvp1e-2-tis", "fp8", 1, 1e-2, "token-tis"),
    Arm("fp8-stale1-icepop", "fp8", 1, 0.0, "icepop"),
]
ARM_BY_NAME = {a.name: a for a in ARMS}
TOKEN_LOG_STEPS = (2, 15, 30)

# ---------------------------------------------------------------- servers


class Servers:
    """One dvp-serve per engine configuration, started on first use, stopped at exit."""

    def __init__(self, weights_root: Path, logs: Path, port: int) -> None:
        self.weights_root, self.logs = weights_root, logs
        self.PORTS = {"fp8": port, "fp32": port + 1}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, engine: str) -> str:
        port = self.PORTS[engine]
        url = f"http://127.0.0.1:{port}"
        if self._ready(url):
            return url
        if engine in self.procs and self.procs[engine].poll() is None:
            self._wait(url, engine)
            return url
        cmd = [
            str(Path(sys.executable).parent / "dvp-serve"),
            "--engine", "torch", "--dtype", "float32", "--threads", "1",
            "--port", str(port), "--max-batch", "64",
            "--weights-root", str(self.weights_root),
            "--weights-update-policy", "keep",
        ]  # fmt: skip
        if engine == "fp8":
            cmd += ["--quantize", "fp8"]
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"server-{engine}.log").open("ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.procs[engine] = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        print(f"started {engine} server pid {self.procs[engine].pid}: {' '.join(cmd)}", flush=True)
        self._wait(url, engine)
        return url

    @staticmethod
    def _ready(url: str) -> bool:
        import httpx

        try:
            return httpx.get(url + "/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait(self, url: str, engine: str) -> None:
        t0 = time.time()
        while not self._ready(url):
            proc = self.procs.get(engine)
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"{engine} server exited with {proc.returncode}; see its log")
            if time.time() - t0 > 1800:
                raise SystemExit(f"{engine} server not ready after 30 min")
            time.sleep(3)

    def stop(self) -> None:
        for engine, proc in self.procs.items():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                print(f"stopped {engine} server", flush=True)


# ---------------------------------------------------------------- one run


def sample(
    client: Client, cfg: argparse.Namespace, arm: Arm, seed: int, k: int
) -> tuple[RolloutBatch, list[int]]:
    """Batch k of this seed: the same problems and rollout seeds in every arm."""
    rng = random.Random(seed * 1_000_003 + k)
    probs = [rng.choice(TRAIN) for _ in range(cfg.prompts)]
    batch = client.rollouts(
        [messages(a, b) for a, b in probs],
        n=cfg.n,
        temperature=1.0,
        max_tokens=cfg.max_tokens,
        seed=seed * 1_000_003 + k,
        pruning={"min_p": arm.rho},
        return_safe_token_ids=arm.rho > 0,
    )
    return batch, [a + b for a, b in probs]


def evaluate(client: Client, cfg: argparse.Namespace) -> dict[str, float]:
    """The whole held-out split: greedy once, sampled (T = 1) 4x, no pruning."""
    probs = HELD_OUT[: cfg.heldout_limit] if cfg.heldout_limit else HELD_OUT
    msgs = [messages(a, b) for a, b in probs]
    out: dict[str, float] = {}
    for name, kw in (
        ("greedy", {"temperature": 0.0, "n": 1}),
        ("sampled", {"temperature": 1.0, "n": cfg.eval_samples, "seed": 12345}),
    ):
        batch = client.rollouts(msgs, max_tokens=cfg.max_tokens, pruning={"min_p": 0.0}, **kw)
        rs = [reward(r.text, sum(probs[r.prompt_index])) for r in batch.rollouts]
        out[f"{name}_acc"] = sum(rs) / len(rs)
        out[f"{name}_len"] = sum(len(r.token_ids) for r in batch.rollouts) / len(rs)
    return out


def check_versions(batch: RolloutBatch, expected: int) -> None:
    """Every token sampled by, and over KV of, exactly version ``expected`` (plan 3)."""
    for r in batch.rollouts:
        pv, kv = rollout_versions(r)
        got = set(pv.tolist()) | set(kv.tolist()) | {r.policy_version}
        if got != {expected}:
            raise SystemExit(f"rollout versions {sorted(got)}, expected exactly {expected}")


def subset(batch: RolloutBatch, groups: set[int]) -> RolloutBatch:
    return batch.model_copy(
        update={"rollouts": [r for r in batch.rollouts if r.prompt_index in groups]}
    )


def update(
    model: Any,
    opt: torch.optim.Optimizer,
    batch: RolloutBatch,
    answers: list[int],
    arm: Arm,
    cfg: argparse.Namespace,
    seed: int,
    k: int,
    versions: tuple[int, int],
    token_log: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    """One batch: old log-probs, then ``cfg.minibatches`` AdamW steps (plan section 3)."""
    rewards = torch.tensor([reward(r.text, answers[r.prompt_index]) for r in batch.rollouts])
    gid = torch.tensor([r.prompt_index for r in batch.rollouts])
    adv_all = group_advantages(rewards, gid)
    adv_of = {
        (r.prompt_index, r.sample_index): float(a)
        for r, a in zip(batch.rollouts, adv_all, strict=True)
    }
    groups = list(range(cfg.prompts))
    random.Random(seed * 7919 + k).shuffle(groups)
    per = max(1, len(groups) // cfg.minibatches)
    mbs = [set(groups[i : i + per]) for i in range(0, len(groups), per)]
    loss_cfg = PolicyLossConfig(correction=arm.correction, aggregation="token-mean", cap=2.0)
    # the trainer's "old" log-probs, all minibatches, before any step
    prepared = []
    ds, pruned, sizes = [], [], []
    with torch.no_grad():
        for mb_i, g in enumerate(mbs):
            sub = subset(batch, g)
            bt = sub.to_torch(pad_id=0)
            logits = completion_logits(model, bt)
            old = pruned_logprobs(logits, bt.tokens, bt.safe, mask=bt.loss_mask)
            adv = torch.tensor([adv_of[(r.prompt_index, r.sample_index)] for r in sub.rollouts])
            d = (old.logprobs - bt.engine_masked_logprobs)[old.mask].double()
            ds.append(d)
            pruned.append((1 - bt.engine_safe_logmass.exp())[bt.loss_mask].double())
            sizes.append(bt.safe_sizes[bt.loss_mask].double())
            if token_log is not None:
                _log_tokens(token_log, k, mb_i, sub, bt, logits, old, versions)
            del logits
            prepared.append((bt, old.logprobs.detach(), adv))
    stats: dict[str, list[float]] = {}
    for bt, old_lp, adv in prepared:
        res = pruned_logprobs(completion_logits(model, bt), bt.tokens, bt.safe, mask=bt.loss_mask)
        out = policy_loss(
            res.logprobs, adv, res.mask, old_logprobs=old_lp,
            engine_logprobs=bt.engine_masked_logprobs, config=loss_cfg,
        )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for key, v in {**out.metrics(prefix=""), "grad_norm": float(gn)}.items():
            stats.setdefault(key, []).append(v)
    d = torch.cat(ds)
    k3 = (d.exp() - 1 - d).mean()
    lens = [len(r.token_ids) for r in batch.rollouts]
    return {
        "reward_mean": float(rewards.mean()),
        "completion_len": sum(lens) / len(lens),
        "tokens": int(d.numel()),
        "k3": float(k3),
        "abs_d_mean": float(d.abs().mean()),
        "share_abs_d_gt1": float((d.abs() > 1).double().mean()),
        "abs_d_max": float(d.abs().max()),
        "pruned_mass": float(torch.cat(pruned).mean()),
        "safe_size_mean": float(torch.cat(sizes).mean()),
        **{key: sum(v) / len(v) for key, v in stats.items()},
    }


def _log_tokens(
    rows: list[dict[str, Any]],
    k: int,
    mb: int,
    sub: RolloutBatch,
    bt: Any,
    logits: torch.Tensor,
    old: Any,
    versions: tuple[int, int],
) -> None:
    lp = torch.log_softmax(logits.float() / bt.temperature, dim=-1)
    y = bt.tokens.unsqueeze(-1)
    lp_y = lp.gather(-1, y).squeeze(-1)
    rank = (lp > lp_y.unsqueeze(-1)).sum(-1) + 1
    gap = lp_y - lp.max(-1).values  # log(p_y / max p)
    tv = bt.token_policy_versions if bt.token_policy_versions is not None else None
    kv = bt.token_kv_versions if bt.token_kv_versions is not None else None
    for i, r in enumerate(sub.rollouts):
        for t in range(int(bt.loss_mask[i].sum())):
            rows.append({
                "batch": k, "minibatch": mb, "prompt": r.prompt_index, "sample": r.sample_index,
                "pos": t, "token": int(bt.tokens[i, t]),
                "engine_logprob": float(bt.engine_logprobs[i, t]),
                "engine_masked_logprob": float(bt.engine_masked_logprobs[i, t]),
                "engine_safe_size": int(bt.safe_sizes[i, t]),
                "trainer_logprob": float(lp_y[i, t]),
                "trainer_masked_logprob": float(old.logprobs[i, t]),
                "trainer_rank": int(rank[i, t]),
                "in_S_1e-3": bool(gap[i, t] >= math.log(1e-3)),
                "in_S_1e-2": bool(gap[i, t] >= math.log(1e-2)),
                "d": float(old.logprobs[i, t] - bt.engine_masked_logprobs[i, t]),
                "policy_version": int(tv[i, t]) if tv is not None else r.policy_version,
                "kv_version": int(kv[i, t]) if kv is not None else r.policy_version,
                "trainer_version": versions[0],
            })  # fmt: skip


def auc(points: list[tuple[int, float]], steps: int) -> float:
    pts = sorted(points)
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(pts))
    return area / steps


def run_one(arm: Arm, seed: int, cfg: argparse.Namespace, servers: Servers) -> None:
    out = cfg.results / arm.name / f"s{seed}"
    if (out / "done.json").exists():
        return
    if out.exists():
        shutil.rmtree(out)  # a half-finished run starts again from scratch
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"=== {arm.name} seed {seed} -> {out}", flush=True)
    t_start = time.time()
    train_url = servers.url(arm.engine)
    eval_url = servers.url("fp32")
    model, model_dir = load_policy("smollm2", cfg.train_layers, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    wroot = cfg.weights_root / f"{arm.name}-s{seed}"
    shutil.rmtree(wroot, ignore_errors=True)
    steps_rows: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    tokens: list[dict[str, Any]] = []
    with (
        Client(train_url, timeout=7200) as client,
        Client(train_url, timeout=7200) as sampler,
        Client(eval_url, timeout=7200) as eval_client,
    ):
        pusher = WeightPusher(client, model_dir, wroot / "train", on_inflight="keep")
        pusher.push(model, 0)
        eval_pusher = (
            pusher
            if eval_url == train_url
            else WeightPusher(eval_client, model_dir, wroot / "eval")
        )
        if eval_pusher is not pusher:
            eval_pusher.push(model, 0)
        v0 = pusher.version

        def do_eval(step: int) -> None:
            cache = cfg.results / "eval0.json"
            if step == 0 and cache.exists() and not cfg.tiny:
                e = json.loads(cache.read_text())
            else:
                if step > 0 and eval_pusher is not pusher:
                    eval_pusher.push(model, step)
                e = evaluate(eval_client, cfg)
                if step == 0 and not cfg.tiny:
                    cache.write_text(json.dumps(e))
            evals.append({"step": step, **e})
            write_csv(evals, tmp / "evals.csv")
            print(f"  eval step {step}: {e}", flush=True)

        do_eval(0)
        batch, answers = sample(client, cfg, arm, seed, 1)
        for k in range(1, cfg.steps + 1):
            t0 = time.time()
            trainer_version = v0 + k - 1
            expected = trainer_version if arm.stale == 0 or k == 1 else trainer_version - 1
            check_versions(batch, expected)
            nxt: dict[str, Any] = {}
            th = None
            if arm.stale == 1 and k < cfg.steps:

                def fetch(kk: int = k + 1, nxt: dict[str, Any] = nxt) -> None:
                    try:
                        nxt["v"] = sample(sampler, cfg, arm, seed, kk)
                    except BaseException as exc:  # re-raised below
                        nxt["e"] = exc

                th = threading.Thread(target=fetch, daemon=True)
                th.start()
            tlog = tokens if k in cfg.token_log_steps else None
            m = update(
                model, opt, batch, answers, arm, cfg, seed, k,
                (trainer_version, expected), tlog,
            )  # fmt: skip
            t1 = time.time()
            if th is not None:
                th.join()
                if "e" in nxt:
                    raise nxt["e"]
            pusher.push(model, k)
            if arm.stale == 0 and k < cfg.steps:
                nxt["v"] = sample(client, cfg, arm, seed, k + 1)
            row = {"step": k, "trainer_version": trainer_version, "batch_version": expected, **m}
            row.update(train_s=t1 - t0, step_s=time.time() - t0)
            steps_rows.append(row)
            write_csv(steps_rows, tmp / "steps.csv")
            print(
                f"  {arm.name} s{seed} step {k}: reward {m['reward_mean']:.3f} len "
                f"{m['completion_len']:.1f} k3 {m['k3']:.2e} |d|>1 {m['share_abs_d_gt1']:.4f} "
                f"clip {m.get('clip_frac', 0):.3f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
            if k % cfg.eval_every == 0 or k == cfg.steps:
                do_eval(k)
            if "v" in nxt:
                batch, answers = nxt["v"]
    if tokens:
        with gzip.open(tmp / "tokens.csv.gz", "wt", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(tokens[0]))
            w.writeheader()
            w.writerows(tokens)
    greedy = [(e["step"], e["greedy_acc"]) for e in evals]
    best, collapsed = greedy[0][1], False
    for _, acc in greedy[1:]:
        collapsed |= acc < 0.5 * best
        best = max(best, acc)
    summary = {
        "arm": arm.name, "seed": seed, "steps": cfg.steps, "lr": cfg.lr,
        "auc_greedy": auc(greedy, cfg.steps),
        "auc_sampled": auc([(e["step"], e["sampled_acc"]) for e in evals], cfg.steps),
        "final_greedy": greedy[-1][1], "collapsed": collapsed,
        "mean_log_k3": sum(math.log(max(r["k3"], 1e-12)) for r in steps_rows) / len(steps_rows),
        "wall_s": time.time() - t_start,
    }  # fmt: skip
    (tmp / "done.json").write_text(json.dumps(summary, indent=1))
    tmp.rename(out)
    shutil.rmtree(wroot, ignore_errors=True)
    print(f"=== done {arm.name} seed {seed}: {summary}", flush=True)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--results", type=Path, default=ROOT / "docs/study/results")
    p.add_argument("--weights-root", type=Path, default=Path("/tmp/dvp-study-weights"))
    p.add_argument("--port", type=int, default=8891, help="FP8 server; fp32 on port + 1")
    p.add_argument("--arms", default=",".join(a.name for a in ARMS))
    p.add_argument("--seeds", default="0-7")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--train-layers", type=int, default=6)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--heldout-limit", type=int, default=0, help="0: the whole split")
    p.add_argument("--tiny", action="store_true", help="a minutes-long check of the pipeline")
    a = p.parse_args(argv)
    a.token_log_steps = TOKEN_LOG_STEPS
    if a.tiny:
        a.steps, a.prompts, a.n, a.max_tokens, a.minibatches = 3, 2, 2, 8, 2
        a.eval_every, a.eval_samples, a.heldout_limit = 3, 1, 2
        a.token_log_steps = (2,)
    lo, _, hi = a.seeds.partition("-")
    a.seed_list = list(range(int(lo), int(hi or lo) + 1))
    a.arm_list = [ARM_BY_NAME[n] for n in a.arms.split(",")]
    return a


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.results.mkdir(parents=True, exist_ok=True)
    cfg.weights_root.mkdir(parents=True, exist_ok=True)
    servers = Servers(cfg.weights_root, cfg.results / "logs", cfg.port)

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt  # leaves the loop; the servers get stopped

    signal.signal(signal.SIGTERM, on_term)
    try:
        for attempt in range(3):  # a run that failed (server crash, ...) is retried later
            failed = 0
            for seed in cfg.seed_list:  # seed-major: complete paired sets first
                for arm in cfg.arm_list:
                    try:
                        run_one(arm, seed, cfg, servers)
                    except (Exception, SystemExit):  # SystemExit: a failed check
                        failed += 1
                        print(f"!!! {arm.name} seed {seed} failed (pass {attempt}):", flush=True)
                        traceback.print_exc()
                        sys.stdout.flush()
            if not failed:
                break
    finally:
        servers.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
