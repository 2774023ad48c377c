"""Response bytes per token of ``/v1/rollouts``: JSON against msgpack, safe sets off and on.

Against a running server (``dvp-serve``, any engine), the same seeded request is
sent once per wire format (``Accept: application/json`` / ``application/msgpack``)
for each configuration:

- ``sets off``: min_p = 1e-3, no safe ids (per token: id, log p, log pi_S,
  log Z_S, |S|);
- ``sets on, list``: min_p = 1e-3 (and 1e-2) with ``return_safe_token_ids`` as a
  CSR of plain ids (``safe_token_ids_format: "list"``);
- ``sets on, packed``: the same sets packed (bitmaps for dense steps, delta +
  varint ids for the others; base64 in JSON, bin in msgpack): what ``dvp_client``
  asks for.

Reported per configuration: mean |S|; body bytes per generated token for JSON
and msgpack (and both gzip-compressed at level 6, as a proxy would send them);
msgpack / JSON; and the client's decode time per token (``json.loads`` /
``msgpack.unpackb`` of the same bodies, median of ``--decode-repeats``; packed
sets are not unpacked in that time). The two bodies are checked to hold the same
values, and the packed sets the same sets as the list.

A list of min-p sets can be large in the worst case (V - 1 ids per step): run the
server with a ``--max-response-bytes`` that admits it, or the list rows get a 422.

    dvp-serve --model smollm2 --engine torch --max-response-bytes 8000000000 &
    .venv/bin/python bench/wire.py                   # 8 prompts x n=4 x 32 tokens
    .venv/bin/python bench/wire.py --base-url http://127.0.0.1:9000 --prompts 16
"""

from __future__ import annotations

import argparse
import base64
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


def configs(min_ps: list[float]) -> list[tuple[str, float, bool, str]]:
    """(name, min_p, safe ids asked, format): sets off at the first min_p, then per min_p
    the sets as a list and packed."""
    out = [(f"sets off, min_p {min_ps[0]:g}", min_ps[0], False, "list")]
    for p in min_ps:
        out += [(f"sets on, {fmt}, min_p {p:g}", p, True, fmt) for fmt in ("list", "packed")]
    return out


@dataclass
class Result:
    sets: list[list[int]] | None
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
    for r in a["rollouts"]:  # packed sets: base64 in JSON, bytes in msgpack
        if (st := r.get("safe_token_ids")) and st.get("format") == "packed":
            st["data"] = base64.b64decode(st["data"])
    if a != b:
        raise SystemExit(f"{name}: the JSON and msgpack answers differ")
    tokens = a["usage"]["completion_tokens"]
    sizes = [s for r in a["rollouts"] for s in r["safe_sizes"]]
    return Result(
        sets=_sets(a["rollouts"]) if body["return_safe_token_ids"] else None,
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


def _sets(rollouts: list[dict[str, Any]]) -> list[list[int]]:
    """Every step's set as (offset-free) sorted ids, either format, the marker expanded."""
    import numpy as np
    from dvp_client.safe_ids import decode_packed, expand_full

    out = []
    for r in rollouts:
        st, sizes = r["safe_token_ids"], np.asarray(r["safe_sizes"])
        vocab = st.get("vocab_size") or 0
        if st.get("format") == "packed":
            offsets, ids = decode_packed(st["data"], sizes, vocab)
        else:
            offsets, ids = np.asarray(st["offsets"]), np.asarray(st["ids"])
        offsets, ids = expand_full(offsets, ids, sizes, vocab) if vocab else (offsets, ids)
        out += [ids[offsets[t] : offsets[t + 1]].tolist() for t in range(len(sizes))]
    return out


def _check_same_sets(results: list[Result]) -> None:
    """The packed rows carry exactly the sets of the list rows with the same rule."""
    by_rule: dict[str, list[list[int]]] = {}
    for r in results:
        if r.sets is None:
            continue
        rule = r.name.rsplit(",", 1)[-1]
        if by_rule.setdefault(rule, r.sets) != r.sets:
            raise SystemExit(f"{r.name}: its sets differ from the list format's")


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
    parser.add_argument(
        "--min-p", type=float, nargs="+", default=[1e-3, 1e-2], help="rules to measure"
    )
    args = parser.parse_args()
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[: args.prompts]]
    with httpx.Client(base_url=args.base_url, timeout=1800) as http:
        card = http.get("/v1/models").json()["data"][0]
        print(f"server {args.base_url}: {card['id']} ({card['engine']}, {card['dtype']})")
        print(f"{len(prompts)} prompts x n={args.n} x {args.max_tokens} tokens, seed {args.seed}")
        results = []
        for name, min_p, sets, fmt in configs(args.min_p):
            body = {
                "prompts": prompts,
                "n": args.n,
                "sampling": {"max_tokens": args.max_tokens, "seed": args.seed, "ignore_eos": True},
                "pruning": {"min_p": min_p},
                "return_safe_token_ids": sets,
                "safe_token_ids_format": fmt,
            }
            results.append(measure(http, body, name, args.decode_repeats))
    _check_same_sets(results)
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
