"""Output of ``dvp-diagnose``: the text table and the PNG plot (the JSON is the result dict).

The result dict (written as ``diagnose.json``) has three parts, which the text
and the plot render:

- ``sampled``: ``|dlogp|`` on sampled tokens (server vs fp32 trainer), binned by p,
  the fitted eps, rank correlations;
- ``vocab``: the same over the whole vocabulary at random positions (fp32 vs a
  local engine-dtype copy), with the per-position logit eps and the bound check;
- ``settings``: per pruning rule (no DVP, then DVP at each rho): log-ratio
  quantiles, K3, pruned mass, mean ``|S|``, sequence-level spread, and the
  complementary CDF of ``|log ratio|`` for the tail plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["render_text", "write_plot"]


def _f(x: float, width: int = 9) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(width)
    return f"{x:{width}.3g}"


def _bins_table(title: str, part: dict[str, Any]) -> list[str]:
    fit = part["fit"]
    eps = fit["eps_bound"]
    lines = [
        title,
        f"  eps fitted (bound 2*eps*(1-p) over every bin's p99): {eps:.4g}; "
        f"eps of the mean curve: {fit['eps_mean']:.4g} ({fit['bins_used']} bins with "
        f">= {part['min_bin_count']} tokens)",
        f"  Spearman rank correlation of per-bin mean |dlogp| vs (1-p): "
        f"{part['spearman_bins']:.3f}; per token: {part['spearman_tokens']:.3f}",
        f"  {'p bin':>23} {'count':>9} {'mean':>9} {'p99':>9} {'max':>9} {'2eps(1-p)':>9}",
    ]
    for b in part["bins"]:
        if b["count"] == 0:
            continue
        bound = 2 * eps * b["one_minus_p"] if not math.isnan(eps) else math.nan
        lines.append(
            f"  [{b['lo']:<10.6g},{b['hi']:>10.6g}) {b['count']:>9d} {_f(b['mean'])} "
            f"{_f(b['p99'])} {_f(b['max'])} {_f(bound)}"
        )
    return lines


def render_text(result: dict[str, Any]) -> str:
    """The human-readable report of a diagnose result dict."""
    meta = result["meta"]
    lines = [
        f"dvp-diagnose: {meta['model_id']} on {meta['url']} ({meta['engine']} engine, "
        f"{_engine_kind(meta)}) vs fp32 trainer ({meta['model_dir']})",
        f"  {meta['rollouts_per_setting']} rollouts per setting "
        f"({meta['prompts']} prompts x n={meta['samples_per_prompt']}), max_tokens "
        f"{meta['max_tokens']}, T={meta['temperature']}, seed {meta['seed']}, "
        f"{meta['wall_s']:.0f} s",
        "",
    ]
    s = result["sampled"]
    lines += _bins_table(
        f"|dlogp| on sampled tokens, no DVP ({s['tokens']} tokens): server "
        f"{meta['engine_dtype']} engine vs fp32 trainer",
        s,
    )
    v = result["vocab"]
    lines += [""]
    lines += _bins_table(
        f"|dlogp| over the whole vocabulary at {v['positions']} random positions "
        f"({v['pairs']} token-position pairs)",
        v,
    )
    lines += [
        f"  NOTE: {v['note']}",
        f"  proxy check on the sampled tokens of those rollouts ({v['proxy_tokens']} tokens): "
        f"mean |dlogp| local {meta['engine_dtype']} copy {v['proxy_abs_dlogp_local']:.4g}, "
        f"server {v['proxy_abs_dlogp_server']:.4g}",
        f"  per-position logit eps = min_c max|dz/T - c|: median {v['eps_logits']['median']:.4g}, "
        f"max {v['eps_logits']['max']:.4g}; pairs above 2*eps*(1-p): "
        f"{v['bound_violation']['first_order']:.3g} (first order), "
        f"{v['bound_violation']['with_second_order']:.3g} (+ eps^2/2); "
        f"pairs with p >= 0.01: {v['bound_violation'].get('share_p_ge_0.01', math.nan):.3g} "
        f"of all, above the bound among them "
        f"{v['bound_violation'].get('first_order_p_ge_0.01', math.nan):.3g}",
        "",
        "With and without DVP (replay mode; log ratio d = log pi_S(y) trainer - engine):",
        f"  {'setting':>12} {'tokens':>7} {'|d| p50':>9} {'|d| p99':>9} {'p99.9':>9} "
        f"{'max':>9} {'K3':>9} {'pruned':>9} {'mean|S|':>9} {'seq sd':>9} {'seq max':>9} "
        f"{'p(y)<1e-3':>9}",
    ]
    for st in result["settings"]:
        q = st["abs_log_ratio"]
        lines.append(
            f"  {st['name']:>12} {st['tokens']:>7d} {_f(q['p50'])} {_f(q['p99'])} "
            f"{_f(q['p99.9'])} {_f(q['max'])} {_f(st['k3'])} {_f(st['pruned_mass_engine'])} "
            f"{_f(st['safe_size_mean'])} {_f(st['seq_log_ratio']['std'])} "
            f"{_f(st['seq_log_ratio']['max_abs'])} {_f(st['tail_token_frac'])}"
        )
    lines += [
        "  pruned = mean engine 1 - Z_S (TV(pi, pi_S) per step); seq = per-rollout sum of d; "
        "p(y)<1e-3 = fraction of sampled tokens with trainer p below 1e-3.",
    ]
    return "\n".join(lines + _length_table(result["settings"])) + "\n"


def _length_table(settings: Sequence[dict[str, Any]]) -> list[str]:
    """Per setting: sd of the prefix log ratio ``sum_{t<L} d_t`` at each L, and sd(d)*sqrt(L)."""
    rows = [st for st in settings if st.get("seq_by_length")]
    if not rows:
        return []
    lengths = [int(r["length"]) for r in rows[0]["seq_by_length"]]
    lines = [
        "",
        "Sequence log ratio vs length (sd over rollouts of sum_{t<L} d_t; in brackets "
        "sd(d_t)*sqrt(L), independent tokens):",
        f"  {'setting':>12} " + " ".join(f"{'L=' + str(n):>16}" for n in lengths),
    ]
    for st in rows:
        by_len = {int(r["length"]): r for r in st["seq_by_length"]}
        cells = [
            f"{_f(by_len[n]['std'], 7)} [{_f(by_len[n]['sqrt_l_ref'], 6)}]"
            if n in by_len
            else " " * 16
            for n in lengths
        ]
        lines.append(f"  {st['name']:>12} " + " ".join(cells))
    return lines


def _engine_kind(meta: dict[str, Any]) -> str:
    """The engine's dtype, and its weight quantization when it has one."""
    quant = meta.get("quantization")
    return f"{meta['engine_dtype']}, {quant} weights" if quant else str(meta["engine_dtype"])


def _bin_x(bins: Sequence[dict[str, Any]]) -> list[float]:
    return [1.0 - b["one_minus_p"] for b in bins]


def write_plot(result: dict[str, Any], path: Path) -> None:
    """Three panels: ``|dlogp|`` vs p with the fitted bound; ``|log ratio|`` tails per
    setting; the sequence log ratio's spread vs length per setting.

    matplotlib with the Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2))
    for key, color, label in (("sampled", "C0", "sampled tokens"), ("vocab", "C2", "whole vocab")):
        part = result[key]
        bins = [b for b in part["bins"] if b["count"] > 0 and b["mean"] > 0]  # log axis
        x = _bin_x(bins)
        ax1.plot(x, [b["mean"] for b in bins], "o-", color=color, ms=4, label=f"{label}: mean")
        ax1.plot(x, [b["p99"] for b in bins], "^", color=color, ms=4, alpha=0.7, label="p99")
        ax1.plot(x, [b["max"] for b in bins], "x", color=color, ms=4, alpha=0.5, label="max")
    p = np.concatenate([np.logspace(-7, -0.31, 200), 1 - np.logspace(-0.31, -7, 200)])
    for key, style in (("sampled", "k--"), ("vocab", "g:")):
        eps = result[key]["fit"]["eps_bound"]
        if not math.isnan(eps):
            ax1.plot(p, 2 * eps * (1 - p), style, lw=1, label=f"2 eps (1-p), eps={eps:.3g}")
    ax1.set_xscale("logit")
    ax1.set_yscale("log")
    ax1.set_xlabel("trainer p(token)")
    ax1.set_ylabel("|log p_engine - log p_trainer|")
    meta = result["meta"]
    ax1.set_title(f"{_engine_kind(meta)} engine vs fp32 trainer", fontsize=10)
    ax1.legend(fontsize=6, ncol=2, loc="lower left")
    for st in result["settings"]:
        c = st["ccdf"]
        ax2.step(c["x"], c["y"], where="post", label=st["name"])
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("|log ratio| on sampled tokens (trainer / engine)")
    ax2.set_ylabel("fraction of tokens above")
    ax2.set_title("ratio tails, with vs without DVP", fontsize=10)
    ax2.legend(fontsize=8)
    _length_panel(ax3, result["settings"])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _length_panel(ax: Any, settings: Sequence[dict[str, Any]]) -> None:
    """sd of the prefix log ratio vs L per setting, dashed: sd(d_t) sqrt(L)."""
    for i, st in enumerate(settings):
        rows = st.get("seq_by_length") or []
        x = [r["length"] for r in rows]
        ax.plot(x, [r["std"] for r in rows], "o-", color=f"C{i}", ms=3, label=st["name"])
        ax.plot(x, [r["sqrt_l_ref"] for r in rows], "--", color=f"C{i}", lw=0.8, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("prefix length L (tokens)")
    ax.set_ylabel("sd over rollouts of sum_{t<L} log ratio")
    ax.set_title("errors accumulate over the sequence (dashed: sd(d) sqrt(L))", fontsize=10)
    ax.legend(fontsize=8)
