"""HTTP checks of a dvp-serve container, run from the host by deploy/compose_e2e.sh.

Each subcommand prints one line per check, ``PASS <check>: <detail>`` or
``FAIL <check>: <detail>``, and exits 0 (the shell script counts the lines). Only
loopback URLs are accepted: the container's port is published on 127.0.0.1.

    python deploy/compose_e2e.py readme URL            # the README's curl and Python examples
    python deploy/compose_e2e.py rollout URL ENGINE [KEY]   # engine name, safe sets
    python deploy/compose_e2e.py auth URL KEY          # DVP_API_KEY enforced
    python deploy/compose_e2e.py drain URL KEY GRACE -- CMD...  # CMD (a stop) mid-rollout
    python deploy/compose_e2e.py offline     # a script for a container with no network
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
README_URL = "http://127.0.0.1:8000"
CHAT = [{"role": "user", "content": "What is 7*8?"}]


def report(ok: bool, check: str, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {check}: {detail}", flush=True)
    return ok


def loopback(url: str) -> str:
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"not a loopback URL: {url}")
    return url.rstrip("/")


def http(
    method: str, url: str, body: Any = None, key: str | None = None, timeout: float = 600
) -> tuple[int, Any]:
    """(status, parsed JSON or text) of one request; never raises on an HTTP status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("content-type", "application/json")
    if key is not None:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError as exc:  # refused, reset, timed out: no HTTP status at all
        return 0, f"{type(exc).__name__}: {exc}"
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def rollout_problems(r: dict[str, Any], vocab: int | None) -> list[str]:
    """What is wrong with one rollout (JSON): a real answer, and its safe sets consistent."""
    problems = []
    ids = r["token_ids"]
    if len(ids) <= 1 or not (r.get("text") or "").strip():
        problems.append(f"{len(ids)} tokens, text {r.get('text')!r}")
    if r["finish_reason"] not in ("stop", "length"):
        problems.append(f"finish_reason {r['finish_reason']}")
    sets = r.get("safe_token_ids")
    if sets is None:
        return [*problems, "no safe_token_ids"]
    ids_flat, offsets = sets["ids"], sets["offsets"]
    if len(offsets) != len(ids) + 1:
        problems.append(f"{len(offsets)} offsets for {len(ids)} tokens")
        return problems
    for t, y in enumerate(ids):
        row = ids_flat[offsets[t] : offsets[t + 1]]
        size = r["safe_sizes"][t]
        if row:
            if size != len(row) or y not in row or row != sorted(set(row)):
                problems.append(f"step {t}: token {y}, |S| {size}, row of {len(row)}")
        elif size != (sets.get("vocab_size") or vocab):  # the whole-vocabulary marker
            problems.append(f"step {t}: empty row but |S| {size}")
        full, masked = r["logprobs"][t], r["masked_logprobs"][t]
        logmass = r["safe_logmass"][t]
        if None in (full, logmass) or not math.isclose(masked, full - logmass, abs_tol=1e-4):
            problems.append(f"step {t}: masked {masked} != {full} - {logmass}")
        if masked > 1e-6 or (logmass is not None and logmass > 1e-6):
            problems.append(f"step {t}: log-prob above 0 ({masked}, {logmass})")
    return problems[:5]


def check_rollouts(check: str, rollouts: list[dict[str, Any]], n: int, vocab: int | None) -> None:
    problems = [
        f"rollout {i}: {p}" for i, r in enumerate(rollouts) for p in rollout_problems(r, vocab)
    ]
    if len(rollouts) != n:
        problems.insert(0, f"{len(rollouts)} rollouts, expected {n}")
    steps = sum(len(r["token_ids"]) for r in rollouts)
    pruned = sum(1 for r in rollouts for s in r.get("safe_sizes") or [] if s < (vocab or 0))
    detail = "; ".join(problems[:3]) if problems else f"{n} rollouts, {steps} steps"
    if not problems and vocab:
        detail += f", {pruned} steps pruned below V={vocab}"
        if pruned == 0:
            problems.append("the rule pruned nothing")
            detail += " (nothing pruned)"
    report(not problems, check, detail)


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def cmd_readme(url: str) -> None:
    """The README's first curl and Python examples, run as written with the URL swapped."""
    vocab = models(url)[1]
    port = urlsplit(url).port
    block = next(b for b in readme_blocks("bash") if "curl" in b and "/v1/rollouts" in b)
    script = block.replace("localhost:8000", f"127.0.0.1:{port}")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600)
    try:
        body = json.loads(re.search(r"-d '(.*?)'", block, flags=re.S)[1])  # type: ignore[index]
        rollouts = json.loads(proc.stdout)["rollouts"]
        n = len(body["prompts"]) * body["n"]
    except (ValueError, KeyError, TypeError) as exc:
        report(False, "README curl example", f"rc {proc.returncode}, {exc}: {proc.stdout[:200]}")
    else:
        check_rollouts("README curl example", rollouts, n, vocab)

    code = next(b for b in readme_blocks("python") if "c.rollouts(" in b and README_URL in b)
    namespace: dict[str, Any] = {}
    try:
        exec(compile(code.replace(README_URL, url), "README.md", "exec"), namespace)
        batch = namespace["batch"]
        rollouts = [r.model_dump(mode="json") for r in batch.rollouts]
        namespace["c"].close()
    except Exception as exc:  # the example itself failed: that is the finding
        report(False, "README Python example", f"{type(exc).__name__}: {exc}")
    else:
        check_rollouts("README Python example", rollouts, len(rollouts), vocab)


def models(url: str, key: str | None = None) -> tuple[str, int | None]:
    status, body = http("GET", f"{url}/v1/models", key=key, timeout=30)
    if status != 200:
        return f"HTTP {status}", None
    card = body["data"][0]
    return str(card["engine"]), int(card["vocab_size"])


def cmd_rollout(url: str, engine: str, key: str | None) -> None:
    """The engine is the one asked for; a rollout with exact safe sets at T = 1.0 and 0.7."""
    served, vocab = models(url, key)
    report(served == engine, f"engine {engine}", f"/v1/models says {served}")
    for temperature in (1.0, 0.7):
        body = {
            "prompts": [CHAT, "The capital of France is"],
            "n": 2,
            "sampling": {"max_tokens": 24, "temperature": temperature, "seed": 1},
            "pruning": {"min_p": 1e-3},
            "return_safe_token_ids": True,
        }
        status, resp = http("POST", f"{url}/v1/rollouts", body, key=key)
        check = f"rollout with safe sets ({served}, T={temperature})"
        if status != 200:
            report(False, check, f"HTTP {status}: {str(resp)[:200]}")
            continue
        check_rollouts(check, resp["rollouts"], 4, vocab)


def cmd_auth(url: str, key: str) -> None:
    """Without the key or with a wrong one: 401; with it: 200; /health needs none."""
    got = {
        "no key": http("GET", f"{url}/v1/models", timeout=30)[0],
        "wrong key": http("GET", f"{url}/v1/models", key=key + "x", timeout=30)[0],
        "rollout, no key": http(
            "POST", f"{url}/v1/rollouts", {"prompts": ["Hi"], "sampling": {"max_tokens": 2}}
        )[0],
        "key": http("GET", f"{url}/v1/models", key=key, timeout=30)[0],
        "/health, no key": http("GET", f"{url}/health", timeout=30)[0],
    }
    want = {"no key": 401, "wrong key": 401, "rollout, no key": 401, "key": 200}
    want["/health, no key"] = 200
    detail = ", ".join(f"{k} {v}" for k, v in got.items())
    report(got == want, "DVP_API_KEY enforced", detail)


def cmd_drain(url: str, key: str, grace_s: float, command: list[str]) -> None:
    """Run ``command`` (docker compose stop) once a streamed rollout is decoding; the
    stream must still end with every rollout complete (drained, not aborted), and the
    command must return 0 within the grace period."""
    body = {
        "prompts": [CHAT],
        "n": 2,
        "sampling": {"max_tokens": 256, "ignore_eos": True, "seed": 3},
        "pruning": {"min_p": 1e-3},
        "stream": True,
    }
    req = urllib.request.Request(
        f"{url}/v1/rollouts", data=json.dumps(body).encode(), method="POST"
    )
    req.add_header("content-type", "application/json")
    req.add_header("authorization", f"Bearer {key}")
    lines: list[dict[str, Any]] = []
    started = threading.Event()
    errors: list[str] = []

    def read() -> None:
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                for raw in resp:
                    lines.append(json.loads(raw))
                    started.set()
        except Exception as exc:  # reported below
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not started.wait(120) or errors:
        report(False, "stop drains in-flight rollouts", f"no stream started: {errors}")
        return
    t0 = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    reader.join(60)
    report(
        proc.returncode == 0 and took < grace_s,
        "docker compose stop",
        f"rc {proc.returncode} in {took:.1f} s (grace period {grace_s:.0f} s)",
    )
    chunks = [x for x in lines if x.get("object") == "rollout.chunk"]
    summary = [x for x in lines if x.get("object") == "rollout.summary"]
    tokens = sum(len(c["token_ids"]) for c in chunks)
    finishes = [r.get("finish_reason") for s in summary for r in s.get("rollouts", [])]
    ok = not errors and len(summary) == 1 and finishes == ["length", "length"] and tokens == 512
    report(
        ok,
        "stop drains in-flight rollouts",
        f"{len(chunks)} chunks, {tokens}/512 tokens, finish {finishes}, errors {errors}",
    )


OFFLINE = """
import json, time, urllib.request
base = "http://127.0.0.1:8000"
deadline = time.monotonic() + 600
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            health = json.load(r)
        if health["status"] == "ok":
            break
    except Exception:
        pass
    if time.monotonic() > deadline:
        raise SystemExit("not healthy in 600 s")
    time.sleep(2)
body = {"prompts": [[{"role": "user", "content": "What is 7*8?"}]], "n": 2,
        "sampling": {"max_tokens": 16, "seed": 0}, "pruning": {"min_p": 0.001}}
req = urllib.request.Request(base + "/v1/rollouts", data=json.dumps(body).encode(),
                             headers={"content-type": "application/json"})
with urllib.request.urlopen(req, timeout=300) as r:
    out = json.load(r)
print(json.dumps({"engine": health["engine"],
                  "tokens": [len(x["token_ids"]) for x in out["rollouts"]]}))
"""


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "readme":
        cmd_readme(loopback(args[0]))
    elif cmd == "rollout":
        cmd_rollout(loopback(args[0]), args[1], args[2] if len(args) > 2 else None)
    elif cmd == "auth":
        cmd_auth(loopback(args[0]), args[1])
    elif cmd == "drain":
        cmd_drain(loopback(args[0]), args[1], float(args[2]), args[args.index("--") + 1 :])
    elif cmd == "offline":
        print(OFFLINE)
    else:
        sys.exit(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
