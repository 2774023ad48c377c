"""dvp_client.train.jax: the protocol's test vectors, the loss / advantages / metrics
against torch on random data, RolloutBatch replay, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from _dvp_batches import engine_response  # noqa: E402
from _dvp_reference import ppo_loss  # noqa: E402
from dvp_client import RolloutBatch  # noqa: E402
from dvp_client.safe_ids import encode_packed  # noqa: E402
from dvp_client.train import advantages as t_adv  # noqa: E402
from dvp_client.train import losses as t_losses  # noqa: E402
from dvp_client.train import metrics as t_metrics  # noqa: E402
from dvp_client.train.jax import (  # noqa: E402
    Aggregation,
    Correction,
    PolicyLossConfig,
    RuleArrays,
    group_advantages,
    mask_to_bitmap,
    mismatch_metrics,
    policy_loss,
    pruned_logprobs,
    rollouts_to_arrays,
    safe_mask,
    unpack_bitmap,
)
from dvp_schemas import PackedSafeTokenIds, PruningRule  # noqa: E402
from test_protocol_vectors import LOSS, RULE, TABLE_DIGITS, loss_inputs, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMPL_ATOL = 2e-6


@pytest.mark.parametrize("row", RULE, ids=[r["id"] for r in RULE])
def test_rule_vector(row: dict[str, str]) -> None:
    z = jnp.asarray(json.loads(row["logits"]), jnp.float32).reshape(1, 1, -1)
    t, y = float(row["T"]), int(row["y"])
    rule = RuleArrays(t, float(row["min_p"]), int(row["top_k"]), float(row["top_p"]))
    want_s = sorted(json.loads(row["S"].replace("{", "[").replace("}", "]")))
    mask = np.asarray(safe_mask(z, rule))
    assert mask.reshape(-1).nonzero()[0].tolist() == want_s
    want = [float(row[k]) for k in ("log p(y)", "log pi_S(y)", "log Z_S")]
    tok = jnp.asarray([[y]])
    for mode in ("replay", "recompute"):
        r = pruned_logprobs(z, tok, mask_to_bitmap(mask), t, mode=mode, rule=rule)  # type: ignore[arg-type]
        got = [float(r.full_logprobs[0, 0]), float(r.logprobs[0, 0]), float(r.log_z[0, 0])]
        assert got == pytest.approx(want, abs=IMPL_ATOL), mode


@pytest.mark.parametrize("row", LOSS, ids=[r["id"] for r in LOSS])
def test_loss_vector(row: dict[str, str]) -> None:
    x = {k: jnp.asarray(v, jnp.float32) for k, v in loss_inputs().items()}
    cfg = PolicyLossConfig(
        correction=row["correction"],  # type: ignore[arg-type]
        aggregation=row["aggregation"],  # type: ignore[arg-type]
        icepop_low=float(row["icepop_low"]),
        icepop_high=float(row["icepop_high"]),
        **{k: float(row[k]) for k in ("eps_low", "eps_high", "cap")},
    )
    out = policy_loss(x["logp"], x["advantages"], x["mask"].astype(bool),
                      old_logprobs=x["old"], engine_logprobs=x["eng"], config=cfg)  # fmt: skip
    assert float(out.loss) == pytest.approx(float(row["loss"]), abs=IMPL_ATOL)


def test_packed_vectors_replay_as_bitmaps() -> None:
    for row in table("packed"):
        v = int(row["V"])
        sizes = json.loads(row["`safe_sizes`"])
        sets = [
            list(range(v)) if "{0 .. " in s else json.loads("[" + s.strip("{} ") + "]")
            for s in row["sets of steps 0, 1, ..."].split("}, ")
        ]
        body = {
            "id": "r", "model": "m", "engine": "torch", "temperature": 1.0,
            "pruning": {"min_p": 0.01}, "policy_version": 0,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "rollouts": [{
                "prompt_index": 0, "sample_index": 0, "prompt_token_ids": [1],
                "token_ids": [s[0] for s in sets], "masked_logprobs": [0.0] * len(sets),
                "safe_sizes": sizes, "finish_reason": "length", "policy_version": 0,
                "safe_token_ids": {"format": "packed", "vocab_size": v,
                                   "data": row["`data` (base64)"].strip("`")},
            }],
        }  # fmt: skip
        a = rollouts_to_arrays(RolloutBatch.model_validate(body), vocab_size=v)
        assert a.safe_bitmap is not None
        bits = np.asarray(unpack_bitmap(jnp.asarray(a.safe_bitmap), v))[0]
        assert [np.nonzero(b)[0].tolist() for b in bits] == sets


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("correction", list(Correction))
@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_loss_matches_torch_and_float64(
    seed: int, correction: Correction, aggregation: Aggregation
) -> None:
    rng = np.random.default_rng(seed)
    b, t = 4, 7
    logp = rng.normal(-1.0, 0.5, size=(b, t))
    old = logp + rng.normal(0, 0.15, size=(b, t))
    eng = old + rng.normal(0, 0.4, size=(b, t))
    adv = rng.normal(size=b)
    mask = rng.random((b, t)) < 0.8
    mask[3] = False  # a rollout with no token
    kw = dict(correction=correction.value, aggregation=aggregation.value, eps_high=0.28,
              cap=1.5, icepop_low=0.7, icepop_high=1.6)  # fmt: skip
    ref = ppo_loss(logp, old, eng, adv, mask, mode=correction.value, agg=aggregation.value,
                   eps_low=0.2, eps_high=0.28, cap=1.5, band=(0.7, 1.6))  # fmt: skip
    lt = torch.tensor(logp, dtype=torch.float32, requires_grad=True)
    ot = t_losses.policy_loss(
        lt, torch.tensor(adv, dtype=torch.float32), torch.from_numpy(mask),
        old_logprobs=torch.tensor(old, dtype=torch.float32),
        engine_logprobs=torch.tensor(eng, dtype=torch.float32),
        config=t_losses.PolicyLossConfig(**kw),  # type: ignore[arg-type]
    )  # fmt: skip
    ot.loss.backward()
    cfg = PolicyLossConfig(**kw)  # type: ignore[arg-type]

    def f(lp):  # type: ignore[no-untyped-def]
        o = policy_loss(lp, jnp.asarray(adv, jnp.float32), jnp.asarray(mask),
                        old_logprobs=jnp.asarray(old, jnp.float32),
                        engine_logprobs=jnp.asarray(eng, jnp.float32), config=cfg)  # fmt: skip
        return o.loss, o

    (loss, oj), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(logp, jnp.float32))
    assert float(loss) == pytest.approx(ref, abs=2e-6)
    assert float(loss) == pytest.approx(float(ot.loss.detach()), abs=2e-6)
    assert lt.grad is not None
    np.testing.assert_allclose(np.asarray(g), lt.grad.numpy(), atol=2e-6)
    np.testing.assert_array_equal(np.asarray(oj.keep), ot.keep.numpy())
    np.testing.assert_allclose(np.asarray(oj.weights), ot.weights.numpy(), atol=2e-6)


def test_loss_edge_cases_and_config_errors() -> None:
    z = jnp.zeros((2, 3))
    none = policy_loss(z, jnp.ones(2), jnp.zeros((2, 3), bool))
    assert float(none.loss) == 0.0  # no kept token
    zero_adv = jax.grad(lambda x: policy_loss(x, jnp.zeros(2), jnp.ones((2, 3), bool)).loss)(z)
    assert float(jnp.abs(zero_adv).max()) == 0.0
    ratio_one = policy_loss(z, jnp.ones(2), jnp.ones((2, 3), bool))
    assert np.allclose(np.asarray(ratio_one.ratio), 1.0) and float(ratio_one.loss) == -1.0
    with pytest.raises(ValueError, match=r"eps_high must be positive and finite, got -0\.1"):
        PolicyLossConfig(eps_high=-0.1)
    with pytest.raises(ValueError, match="correction must be one of"):
        PolicyLossConfig(correction="tis")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs engine_logprobs"):
        policy_loss(
            z,
            jnp.ones(2),
            jnp.ones((2, 3), bool),
            config=PolicyLossConfig(correction="icepop"),  # type: ignore[arg-type]
        )
    assert [c.value for c in Correction] == [c.value for c in t_losses.Correction]
    assert [a.value for a in Aggregation] == [a.value for a in t_losses.Aggregation]


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_torch(scale: bool) -> None:
    rng = np.random.default_rng(4)
    r = rng.normal(size=11)
    gid = np.array([5, 5, 5, 2, 2, 9, 7, 7, 7, 7, 2])  # any ids; group 9 is a singleton
    got = np.asarray(group_advantages(jnp.asarray(r, jnp.float32), jnp.asarray(gid), scale=scale))
    want = t_adv.group_advantages(torch.tensor(r, dtype=torch.float32), torch.from_numpy(gid),
                                  scale=scale).numpy()  # fmt: skip
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert got[5] == 0.0


def test_metrics_match_torch() -> None:
    rng = np.random.default_rng(8)
    b, t = 5, 9
    arrs = {
        "engine_masked": rng.normal(-1, 1, (b, t)), "trainer_masked": rng.normal(-1, 1, (b, t)),
        "engine_full": rng.normal(-2, 1, (b, t)), "trainer_full": rng.normal(-2, 1, (b, t)),
        "engine_logmass": -rng.random((b, t)), "trainer_logmass": -rng.random((b, t)),
    }  # fmt: skip
    arrs["engine_full"][0, :3] = np.nan  # the engine's nulls
    mask = rng.random((b, t)) < 0.8
    sizes, xor = rng.integers(1, 100, (b, t)), rng.integers(0, 3, (b, t))
    dropped = rng.random((b, t)) < 0.1
    got = mismatch_metrics(mask, *(arrs[k] for k in ("engine_masked", "trainer_masked")),
                           **{k: v for k, v in arrs.items() if "masked" not in k},  # type: ignore[arg-type]
                           safe_sizes=sizes, set_disagreement=xor, dropped=dropped)  # fmt: skip
    tt = {k: torch.from_numpy(v) for k, v in arrs.items()}
    want = t_metrics.mismatch_metrics(
        torch.from_numpy(mask), tt.pop("engine_masked"), tt.pop("trainer_masked"), **tt,  # type: ignore[arg-type]
        safe_sizes=torch.from_numpy(sizes), set_disagreement=torch.from_numpy(xor),
        dropped=torch.from_numpy(dropped),
    )  # fmt: skip
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12, nan_ok=True), k


@pytest.mark.parametrize("with_ids", [True, False])
def test_rollouts_to_arrays_matches_to_torch(with_ids: bool) -> None:
    rule = PruningRule(min_p=0.05, top_k=12)
    batch, _ = engine_response(3, [3, 5, 2, 4], [6, 0, 4, 5], rule=rule, with_ids=with_ids)
    t = batch.to_torch(pad_id=7)
    a = rollouts_to_arrays(batch, vocab_size=40, pad_id=7, pad_steps_to=4)
    assert a.tokens.shape == (4, 8) and a.prompt_length == t.prompt_length  # 6 -> 8 steps
    n = t.tokens.shape[1]
    np.testing.assert_array_equal(a.input_ids[:, : t.input_ids.shape[1]], t.input_ids.numpy())
    np.testing.assert_array_equal(a.position_ids[:, : n + t.prompt_length], t.position_ids.numpy())
    np.testing.assert_array_equal(a.loss_mask[:, :n], t.loss_mask.numpy())
    assert not a.loss_mask[:, n:].any()
    np.testing.assert_array_equal(a.engine_masked_logprobs[:, :n], t.engine_masked_logprobs.numpy())
    if with_ids:
        assert a.safe_bitmap is not None and t.safe is not None
        bits = np.asarray(unpack_bitmap(jnp.asarray(a.safe_bitmap), 40))
        np.testing.assert_array_equal(bits[:, :n], t.safe.to_mask(40).numpy())
        # packed on the wire gives the same bitmap
        packed = batch.model_copy(deep=True)
        for r in packed.rollouts:
            st = r.safe_token_ids
            assert st is not None and st.format == "list"
            data = encode_packed(np.asarray(st.offsets), np.asarray(st.ids),
                                 np.asarray(r.safe_sizes), 40)  # fmt: skip
            r.safe_token_ids = PackedSafeTokenIds(vocab_size=40, data=data)
        b2 = rollouts_to_arrays(packed, vocab_size=40,
                                pad_id=7, pad_steps_to=4)  # fmt: skip
        np.testing.assert_array_equal(b2.safe_bitmap, a.safe_bitmap)
    else:
        assert a.safe_bitmap is None  # the rule prunes: recompute mode only


def test_jax_modules_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import dvp_client, dvp_client.train.jax as j\n"
        "from dvp_client.train.jax import fused, losses, logprobs, metrics, rule, sets\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad[:5]\n"
    )
    paths = [str(ROOT / d) for d in ("client", "schemas")]
    env = {"PYTHONPATH": ":".join(paths), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_table_digits_are_what_the_torch_tests_use() -> None:
    assert TABLE_DIGITS < IMPL_ATOL
