"""Response bytes per token of ``/v1/rollouts``: JSON against msgpack, safe sets off and on.

Against a running server (``dvp-serve``, any engine), the same seeded request is
sent once per wire format (``Accept: application/json`` / ``application/msgpack``)
for each configuration:

- ``sets off``: min_p = 1e-3, no safe ids (per token: id, log p, log pi_S,
  log Z_S, |S|);
- ``sets on``: min_p = 1e-3 and 1e-2 with ``return_safe_token_ids`` (plus every
  step's S in CSR: |S| ids per token).

Reported per configuration: mean |S|; body bytes per generated token for JSON
and msgpack (and both gzip-compressed at level 6, as a proxy would send them);
msgpack / JSON; and the client's decode time per token (``json.loads`` /
``msgpack.unpackb`` of the same bodies, median of ``--decode-repeats``). The two
bodies are checked to hold the same values.

    dvp-serve --model smollm2 --engine torch &       # in another shell
    .venv/bin/python bench/wire.py                   # 8 prompts x n=4 x 32 tokens
    .venv/bin/python bench/wire.py --base-url http://127.0.0.1:9000 --prompts 16
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import httpx
import msgpack
from _prompts import QUESTIONS as _QUESTIONS  # bench/, next to this file

# wire.py's recorded runs used a shorter last question: kept, so they reproduce.
QUESTIONS = [*_QUESTIONS[:-1], "Why is the sky blue? Answer briefly."]
CONFIGS: list[tuple[str, float, bool]] = [
    ("sets off, min_p 1e-3", 1e-3, False),
    ("sets on, min_p 1e-3", 1e-3, True),
    ("sets on, min_p 1e-2", 1e-2, True),
]


@dataclass
class Result:
    name: str
    tokens: int
    mean_set: float
    json_bytes: int
    msgpack_bytes: int
    json_gz: int
    msgpack_gz: int
    json_decode_s: float
    msgpack_decode_s: float


def _decode_time(fn: Any, data: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(http: httpx.Client, body: dict[str, Any], name: str, decode_repeats: int) -> Result:
    """Send ``body`` as JSON and as msgpack; sizes and decode times of the two answers."""
    answers = {}
    for accept in ("application/json", "application/msgpack"):
        r = http.post("/v1/rollouts", json=body, headers={"accept": accept})
        r.raise_for_status()
        answers[accept] = r.content
    js, mp = answers["application/json"], answers["application/msgpack"]
    a, b = json.loads(js), msgpack.unpackb(mp)
    a.pop("id"), b.pop("id")
    if a != b:
        raise SystemExit(f"{name}: the JSON and msgpack answers differ")
    tokens = a["usage"]["completion_tokens"]
    sizes = [s for r in a["rollouts"] for s in r["safe_sizes"]]
    return Result(
        name=name,
        tokens=tokens,
        mean_set=sum(sizes) / len(sizes),
        json_bytes=len(js),
        msgpack_bytes=len(mp),
        json_gz=len(gzip.compress(js, 6)),
        msgpack_gz=len(gzip.compress(mp, 6)),
        json_decode_s=_decode_time(json.loads, js, decode_repeats),
        msgpack_decode_s=_decode_time(msgpack.unpackb, mp, decode_repeats),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base-url", default=os.environ.get("DVP_BASE_URL", "http://127.0.0.1:8000")
    )
    parser.add_argument("--prompts", type=int, default=8, help="chat prompts (<= 16)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode-repeats", type=int, default=20)
    args = parser.parse_args()
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[: args.prompts]]
    with httpx.Client(base_url=args.base_url, timeout=1800) as http:
        card = http.get("/v1/models").json()["data"][0]
        print(f"server {args.base_url}: {card['id']} ({card['engine']}, {card['dtype']})")
        print(f"{len(prompts)} prompts x n={args.n} x {args.max_tokens} tokens, seed {args.seed}")
        results = []
        for name, min_p, sets in CONFIGS:
            body = {
                "prompts": prompts,
                "n": args.n,
                "sampling": {"max_tokens": args.max_tokens, "seed": args.seed, "ignore_eos": True},
                "pruning": {"min_p": min_p},
                "return_safe_token_ids": sets,
            }
            results.append(measure(http, body, name, args.decode_repeats))
    _print(results)


def _print(results: list[Result]) -> None:
    head = (
        "| configuration | mean \\|S\\| | JSON B/token | msgpack B/token | msgpack/JSON "
        "| gzip JSON | gzip msgpack | decode JSON us/token | decode msgpack us/token |"
    )
    print(head)
    print("|---" * 9 + "|")
    for r in results:
        t = r.tokens
        print(
            f"| {r.name} | {r.mean_set:.1f} | {r.json_bytes / t:.0f} "
            f"| {r.msgpack_bytes / t:.0f} | {r.msgpack_bytes / r.json_bytes:.2f} "
            f"| {r.json_gz / t:.0f} | {r.msgpack_gz / t:.0f} "
            f"| {r.json_decode_s / t * 1e6:.2f} | {r.msgpack_decode_s / t * 1e6:.2f} |"
        )


if __name__ == "__main__":
    main()
