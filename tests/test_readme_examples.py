"""The README's first request examples, run as written against a real SmolLM2 server.

The curl example's JSON body and the Python example (with the server's URL put in
place of ``http://127.0.0.1:8000``) are read from README.md, sent to a real
server (torch engine, SmolLM2-135M-Instruct), and every rollout must be a real
answer: more than one token, non-empty text, ended by eos or the length cap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
README_URL = "http://127.0.0.1:8000"


def _blocks(lang: str) -> list[str]:
    """The README's fenced code blocks in ``lang``, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def curl_body() -> dict[str, Any]:
    """The JSON body of the first curl example that posts to /v1/rollouts."""
    block = next(b for b in _blocks("bash") if "curl" in b and "/v1/rollouts" in b)
    match = re.search(r"-d '(.*?)'", block, flags=re.S)
    assert match, block
    body: dict[str, Any] = json.loads(match.group(1))
    return body


def python_example() -> str:
    """The first Python example that asks for rollouts."""
    return next(b for b in _blocks("python") if "c.rollouts(" in b and README_URL in b)


def _check(rollouts: list[dict[str, Any]], n: int) -> None:
    assert len(rollouts) == n
    for r in rollouts:
        assert len(r["token_ids"]) > 1, r
        assert r["text"] and r["text"].strip(), r
        assert r["finish_reason"] in ("stop", "length"), r


def test_examples_are_chat_prompts() -> None:
    """The examples use chat messages (a bare text prompt makes SmolLM2 stop at once)."""
    prompt = curl_body()["prompts"][0]
    assert isinstance(prompt, list) and prompt[0]["role"] == "user"
    assert '"role": "user"' in python_example()


@pytest.mark.slow
def test_readme_curl_example(smollm2_server: str) -> None:
    body = curl_body()
    r = httpx.post(f"{smollm2_server}/v1/rollouts", json=body, timeout=600)
    assert r.status_code == 200, r.text
    rollouts = r.json()["rollouts"]
    _check(rollouts, len(body["prompts"]) * body["n"])
    if body.get("return_safe_token_ids"):
        for ro in rollouts:
            assert ro["safe_token_ids"]["ids"], ro


@pytest.mark.slow
def test_readme_python_example(smollm2_server: str) -> None:
    code = python_example().replace(README_URL, smollm2_server)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # our own README
    batch = namespace["batch"]
    _check([r.model_dump() for r in batch.rollouts], len(batch.rollouts))
    assert len(batch.rollouts) > 1
    namespace["c"].close()
