"""The test vectors of docs/protocol.md: parsed from the page, checked against the
implementation and against the float64 reference (so the table itself is right)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _dvp_reference import ppo_loss, rule_set, step_logprobs
from dvp_client.train.losses import PolicyLossConfig, policy_loss
from dvp_client.train.objective import pruned_logprobs
from dvp_client.train.rule import safe_mask
from dvp_schemas import PruningRule

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
TABLE_DIGITS = 5e-10  # the table has 9 decimals
IMPL_ATOL = 2e-6  # float32 implementation against the float64 table


def table(name: str) -> list[dict[str, str]]:
    """Rows of the markdown table between ``<!-- vectors:name -->`` markers."""
    text = DOC.read_text()
    m = re.search(rf"<!-- vectors:{name} -->\n(.*?)<!-- /vectors:{name} -->", text, re.S)
    assert m, f"no vectors:{name} block in {DOC}"
    lines = [ln.strip() for ln in m.group(1).strip().splitlines()]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    header, rows = cells[0], cells[2:]
    assert all(len(r) == len(header) for r in rows)
    return [dict(zip(header, r, strict=True)) for r in rows]


RULE = table("rule")
LOSS = table("loss")


def test_tables_are_complete() -> None:
    assert len(RULE) >= 8 and len(LOSS) >= 10
    assert {r["correction"] for r in LOSS} == {
        "none",
        "token-tis",
        "seq-tis",
        "token-mis",
        "seq-mis",
        "icepop",
    }
    assert {r["aggregation"] for r in LOSS} == {
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
    }


@pytest.mark.parametrize("row", RULE, ids=[r["id"] for r in RULE])
def test_rule_vector(row: dict[str, str]) -> None:
    z = json.loads(row["logits"])
    t, min_p, top_p = float(row["T"]), float(row["min_p"]), float(row["top_p"])
    top_k, y = int(row["top_k"]), int(row["y"])
    s_want = sorted(json.loads(row["S"].replace("{", "[").replace("}", "]")))
    want = [float(row[k]) for k in ("log p(y)", "log pi_S(y)", "log Z_S")]
    # The float64 reference reproduces the table.
    s_ref = rule_set(np.array(z), t, min_p, top_k or None, top_p)
    assert np.nonzero(s_ref)[0].tolist() == s_want
    ref = step_logprobs(np.array(z), s_ref, y, t)
    assert [ref["full"], ref["masked"], ref["log_z"]] == pytest.approx(want, abs=TABLE_DIGITS)
    # The implementation: the rule, then replay and recompute on the same logits.
    logits = torch.tensor(z, dtype=torch.float32).view(1, 1, -1)
    mask = safe_mask(logits, temperature=t, min_p=min_p, top_k=top_k, top_p=top_p)
    assert mask.view(-1).nonzero().view(-1).tolist() == s_want
    tokens = torch.tensor([[y]])
    rule = PruningRule(min_p=min_p, top_k=top_k, top_p=top_p)
    for mode in ("replay", "recompute"):
        r = pruned_logprobs(logits, tokens, mask, t, mode=mode, rule=rule)  # type: ignore[arg-type]
        got = [float(r.full_logprobs), float(r.logprobs), float(r.log_z)]
        assert got == pytest.approx(want, abs=IMPL_ATOL), mode


def loss_inputs() -> dict[str, np.ndarray]:
    return {
        r["name"]: np.array(json.loads(r["value"]), dtype=np.float64) for r in table("loss-inputs")
    }


@pytest.mark.parametrize("row", LOSS, ids=[r["id"] for r in LOSS])
def test_loss_vector(row: dict[str, str]) -> None:
    x = loss_inputs()
    mask = x["mask"].astype(bool)
    kw = {k: float(row[k]) for k in ("eps_low", "eps_high", "cap")}
    band = (float(row["icepop_low"]), float(row["icepop_high"]))
    want = float(row["loss"])
    ref = ppo_loss(
        x["logp"], x["old"], x["eng"], x["advantages"], mask,
        mode=row["correction"], agg=row["aggregation"], band=band, **kw,
    )  # fmt: skip
    assert ref == pytest.approx(want, abs=TABLE_DIGITS)
    cfg = PolicyLossConfig(
        correction=row["correction"],  # type: ignore[arg-type]
        aggregation=row["aggregation"],  # type: ignore[arg-type]
        icepop_low=band[0],
        icepop_high=band[1],
        **kw,
    )
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    out = policy_loss(
        t["logp"], t["advantages"], torch.from_numpy(mask),
        old_logprobs=t["old"], engine_logprobs=t["eng"], config=cfg,
    )  # fmt: skip
    assert float(out.loss) == pytest.approx(want, abs=TABLE_DIGITS)
