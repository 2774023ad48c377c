"""``dvp-diagnose``: see the engine-vs-trainer mismatch of a served model, and what DVP does to it.

Against a running ``dvp-serve`` (any engine), this samples rollouts without DVP
and with DVP at several rho (``min_p``), recomputes the same tokens with the
trainer's reference model in float32 (the same weights, resolved with
:func:`dvp_server.model_store.resolve_model`), and reports:

1. ``|dlogp|`` of sampled tokens binned by p (mean, p99, max, count) next to the
   bound shape ``2 eps (1 - p)`` with eps fitted, and the rank correlation of the
   per-bin ``|dlogp|`` with ``1 - p``;
2. the same over the whole vocabulary at random positions, fp32 against a local
   copy in the engine's dtype (a rollout carries only sampled tokens' log-probs);
3. per setting: ``|log ratio|`` quantiles (p50, p99, p99.9, max), K3 KL, pruned
   mass, mean ``|S|``, the spread of per-rollout summed log ratios.

Outputs ``diagnose.txt``, ``diagnose.json`` and ``diagnose.png`` in ``--out``.

Example::

    dvp-serve --engine torch --dtype bfloat16 --port 8000 &
    dvp-diagnose --url http://127.0.0.1:8000 --model smollm2 --rollouts 64 --max-tokens 64
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from dvp_client import Client
from dvp_client.train.metrics import mismatch_metrics

from ..model_store import resolve_model
from .report import render_text, write_plot
from .sample import Reference, Scored, chat_prompts, sample_setting, score_batches
from .stats import (
    MIN_BIN_COUNT,
    binned_abs_dlogp,
    bound_violation_fraction,
    fit_eps,
    prob_edges,
    quantiles,
    seq_spread_by_length,
    spearman,
    spearman_bins,
)
from .vocab import compare_vocab

__all__ = ["DiagnoseConfig", "app", "main", "run_diagnose", "setting_summary"]

VOCAB_NOTE = (
    "rollouts carry only the sampled tokens' log-probs, so this compares the trainer's fp32 "
    "logits with a LOCAL copy of the same weights in the engine's dtype, teacher-forced on "
    "the same tokens (not the server's own logits)"
)
TAIL_P = 1e-3  # a sampled token with trainer p below this counts as a tail token
CCDF_POINTS = 120


@dataclass(frozen=True)
class DiagnoseConfig:
    """What ``dvp-diagnose`` runs; see :func:`command` for each option's meaning."""

    url: str = "http://127.0.0.1:8000"
    model: str = "smollm2"
    cache_dir: Path | None = None
    api_key: str | None = field(default=None, repr=False)
    rollouts: int = 64
    samples_per_prompt: int = 4
    max_tokens: int = 64
    temperature: float = 1.0
    rhos: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    vocab_positions: int = 32
    engine_dtype: str | None = None
    seed: int = 0
    prompts_per_request: int = 8
    out: Path = Path("dvp-diagnose")
    decades: int = 6
    per_decade: int = 2
    min_bin_count: int = MIN_BIN_COUNT
    timeout_s: float = 3600.0
    progress: bool = True

    def __post_init__(self) -> None:
        """Raises ValueError naming the option that is out of range."""
        positive = {
            "rollouts": self.rollouts,
            "samples_per_prompt": self.samples_per_prompt,
            "max_tokens": self.max_tokens,
            "vocab_positions": self.vocab_positions,
            "prompts_per_request": self.prompts_per_request,
            "min_bin_count": self.min_bin_count,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < self.temperature <= 100:
            raise ValueError(f"temperature must be in (0, 100], got {self.temperature}")
        if not self.rhos or any(not 0 < r <= 1 for r in self.rhos):
            raise ValueError(f"rho values must be in (0, 1], got {list(self.rhos)}")
        if not 1 <= self.decades <= 6:
            raise ValueError(f"decades must be in [1, 6], got {self.decades}")
        if self.engine_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(
                f"engine_dtype must be float32, bfloat16 or float16, got {self.engine_dtype!r}"
            )


def _ccdf(abs_d: torch.Tensor) -> dict[str, list[float]]:
    """Fraction of tokens with ``|d| > x`` at log-spaced x (for the tail plot)."""
    pos = abs_d[abs_d > 0].double()
    if pos.numel() == 0:
        return {"x": [], "y": []}
    xs = torch.logspace(math.log10(float(pos.min())), math.log10(float(pos.max())), CCDF_POINTS)
    xs = xs.double()
    ys = (abs_d.double().unsqueeze(0) > xs.unsqueeze(1)).double().mean(1)  # (points,)
    return {"x": xs.tolist(), "y": ys.tolist()}


def _length_points(max_len: int) -> list[int]:
    """Prefix lengths for the spread-vs-length table: 1, 2, 4, ... and ``max_len``."""
    points = [2**i for i in range(max_len.bit_length()) if 2**i < max_len]
    return [*points, max_len]


def setting_summary(name: str, rho: float, scored: Scored) -> dict[str, Any]:
    """One row of the with/without-DVP table from a setting's scored tokens.

    K3, pruned mass and mean ``|S|`` come from :func:`dvp_client.train.metrics.mismatch_metrics`
    on the pruned log-probs (replay mode); the log ratio is ``d = log pi'_S(y) -
    masked_logprob``, and a rollout's sequence log ratio is ``sum_t d_t``.
    """
    m = mismatch_metrics(
        scored.mask,
        scored.engine_masked,
        scored.trainer_masked,
        engine_full=scored.engine_full,
        trainer_full=scored.trainer_full,
        engine_logmass=scored.engine_logmass,
        trainer_logmass=scored.trainer_logmass,
        safe_sizes=scored.safe_sizes,
        quantiles=(0.001, 0.5, 0.999),
    )
    d = scored.log_ratio.double()
    abs_d = d[scored.mask].abs()
    q = quantiles(abs_d, [0.5, 0.99, 0.999, 1.0])
    seq = d.sum(-1)  # (N,): log of the sequence-level ratio
    tail = scored.trainer_full.double()[scored.mask] < math.log(TAIL_P)
    return {
        "name": name,
        "rho": rho,
        "tokens": int(scored.mask.sum()),
        "abs_log_ratio": {"p50": q[0], "p99": q[1], "p99.9": q[2], "max": q[3]},
        "log_ratio_min": float(d[scored.mask].min()),
        "log_ratio_max": float(d[scored.mask].max()),
        "k3": m["mismatch/k3_pruned"],
        "k1": m["mismatch/k1_pruned"],
        "k3_full": m.get("mismatch/k3_full", math.nan),
        "pruned_mass_engine": m.get("dvp/pruned_mass_engine", math.nan),
        "pruned_mass_trainer": m["dvp/pruned_mass_trainer"],
        "safe_size_mean": m["dvp/safe_size_mean"],
        "is_weight_q0.001": m["is_weight/q0.001"],
        "is_weight_q0.999": m["is_weight/q0.999"],
        "seq_log_ratio": {
            "std": float(seq.std()) if seq.numel() > 1 else math.nan,
            "p99_abs": quantiles(seq.abs(), [0.99])[0],
            "max_abs": float(seq.abs().max()),
        },
        "tail_token_frac": float(tail.double().mean()) if tail.numel() else math.nan,
        "seq_by_length": seq_spread_by_length(d, scored.mask, _length_points(d.shape[-1])),
        "ccdf": _ccdf(abs_d),
    }


def _binned_part(
    engine_logp: torch.Tensor,
    trainer_logp: torch.Tensor,
    mask: torch.Tensor,
    cfg: DiagnoseConfig,
) -> dict[str, Any]:
    """Bins, eps fit and rank correlations of one ``|dlogp|`` comparison."""
    bins = binned_abs_dlogp(
        engine_logp, trainer_logp, mask, prob_edges(cfg.decades, cfg.per_decade)
    )
    d = (trainer_logp.double() - engine_logp.double())[mask].abs()
    one_minus_p = -torch.expm1(trainer_logp.double()[mask])
    sub = torch.randperm(d.numel(), generator=torch.Generator().manual_seed(cfg.seed))[:200_000]
    return {
        "tokens": int(mask.sum()),
        "min_bin_count": cfg.min_bin_count,
        "bins": [b.as_dict() for b in bins],
        "fit": fit_eps(bins, cfg.min_bin_count),
        "spearman_bins": spearman_bins(bins, cfg.min_bin_count),
        "spearman_tokens": spearman(d[sub].numpy(), one_minus_p[sub].numpy()),
        "abs_dlogp_mean": float(d.mean()) if d.numel() else math.nan,
    }


def _server_card(client: Client, cfg: DiagnoseConfig) -> Any:
    card = client.models().data[0]
    if card.policy_version != 0:
        typer.echo(
            f"warning: the server's policy_version is {card.policy_version}: its weights were "
            "updated since start, the reference model may not match them",
            err=True,
        )
    return card


def _sample_all(
    client: Client, cfg: DiagnoseConfig, settings: list[tuple[str, float]]
) -> dict[str, list[Any]]:
    """Rollouts of every setting, with a token progress bar (upper bound: max_tokens each)."""
    from tqdm import tqdm

    n_prompts = math.ceil(cfg.rollouts / cfg.samples_per_prompt)
    prompts = chat_prompts(n_prompts)
    total = len(settings) * n_prompts * cfg.samples_per_prompt * cfg.max_tokens
    out = {}
    with tqdm(total=total, unit="tok", desc="sampling", disable=not cfg.progress) as bar:
        for name, rho in settings:
            bar.set_postfix_str(name)
            before = bar.n
            out[name] = sample_setting(
                client,
                prompts,
                n=cfg.samples_per_prompt,
                rule={"min_p": rho},
                temperature=cfg.temperature,
                max_tokens=cfg.max_tokens,
                seed=cfg.seed,
                prompts_per_request=cfg.prompts_per_request,
                on_tokens=bar.update,
            )
            bar.update(before + total // len(settings) - bar.n)  # rollouts that stopped early
    return out


def run_diagnose(cfg: DiagnoseConfig) -> dict[str, Any]:
    """Sample, score and summarise (see the module docstring); returns the result dict.

    Raises:
        ValueError: the reference model does not match the served one (vocabulary size).
        dvp_client.APIError: the server refused or could not be reached.
    """
    t0 = time.perf_counter()
    settings = [("no DVP", 0.0)] + [(f"rho={r:g}", r) for r in cfg.rhos]
    with Client(cfg.url, api_key=cfg.api_key, timeout=cfg.timeout_s) as client:
        card = _server_card(client, cfg)
        sampled = _sample_all(client, cfg, settings)
    model_dir = resolve_model(cfg.model, cfg.cache_dir)
    ref = Reference(model_dir, cfg.engine_dtype or card.dtype, card.capabilities.quantization)
    if ref.vocab_size != card.vocab_size:
        raise ValueError(
            f"--model {cfg.model!r} has vocabulary {ref.vocab_size}, the server's model "
            f"{card.id!r} has {card.vocab_size}: pass the served model"
        )
    from tqdm import tqdm

    n_batches = sum(len(b) for b in sampled.values())
    scored: dict[str, Scored] = {}
    with tqdm(total=n_batches, unit="batch", desc="fp32 scoring", disable=not cfg.progress) as bar:
        for name, _ in settings:
            scored[name] = score_batches(ref, sampled[name], cfg.max_tokens, lambda: bar.update())
    base = scored["no DVP"]
    ok = base.mask & torch.isfinite(base.engine_full)
    vocab = compare_vocab(ref, sampled["no DVP"], cfg.vocab_positions, cfg.seed)
    full_mask = torch.ones_like(vocab.trainer_logp, dtype=torch.bool)
    vocab_part = _binned_part(vocab.engine_logp, vocab.trainer_logp, full_mask, cfg)
    vocab_part.update(
        positions=int(vocab.eps.numel()),
        pairs=int(full_mask.sum()),
        note=VOCAB_NOTE,
        proxy_abs_dlogp_local=vocab.proxy_abs_dlogp_local,
        proxy_abs_dlogp_server=vocab.proxy_abs_dlogp_server,
        proxy_tokens=vocab.proxy_tokens,
        eps_logits={
            "median": float(vocab.eps.median()),
            "max": float(vocab.eps.max()),
        },
        bound_violation=bound_violation_fraction(vocab.engine_logp, vocab.trainer_logp, vocab.eps),
    )
    return {
        "meta": {
            "url": cfg.url,
            "model": cfg.model,
            "model_id": card.id,
            "model_dir": str(model_dir),
            "engine": card.engine,
            "engine_dtype": ref.engine_dtype,
            "server_dtype": card.dtype,
            "quantization": card.capabilities.quantization,
            "trainer_dtype": "float32",
            "policy_version": card.policy_version,
            "rollouts_per_setting": int(base.mask.shape[0]),
            "prompts": math.ceil(cfg.rollouts / cfg.samples_per_prompt),
            "samples_per_prompt": cfg.samples_per_prompt,
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
            "rhos": list(cfg.rhos),
            "seed": cfg.seed,
            "prob_edges": prob_edges(cfg.decades, cfg.per_decade),
            "wall_s": time.perf_counter() - t0,
            "command": shlex.join(["dvp-diagnose", *sys.argv[1:]]),
        },
        "sampled": _binned_part(base.engine_full, base.trainer_full, ok, cfg),
        "vocab": vocab_part,
        "settings": [setting_summary(name, rho, scored[name]) for name, rho in settings],
    }


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write ``diagnose.txt``, ``diagnose.json`` and ``diagnose.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"diagnose.{k}" for k in ("txt", "json", "png")}
    paths["txt"].write_text(render_text(result))
    paths["json"].write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    write_plot(result, paths["png"])
    return paths


app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0] if __doc__ else None)


def _rhos(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"--rho must be comma-separated numbers, got {value!r}") from None


@app.command()
def command(
    url: Annotated[
        str, typer.Option(help="Base URL of the running dvp-serve.")
    ] = DiagnoseConfig.url,
    model: Annotated[
        str,
        typer.Option(
            help="The served model for the fp32 reference: 'smollm2', a .gguf file "
            "or a transformers directory (resolved as dvp-serve resolves it)."
        ),
    ] = DiagnoseConfig.model,
    cache_dir: Annotated[Path | None, typer.Option(help="GGUF conversion cache.")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="DVP_API_KEY", help="Bearer key of the server.")
    ] = None,
    rollouts: Annotated[int, typer.Option(help="Rollouts per setting.")] = DiagnoseConfig.rollouts,
    samples_per_prompt: Annotated[
        int, typer.Option(help="n per prompt.")
    ] = DiagnoseConfig.samples_per_prompt,
    max_tokens: Annotated[
        int, typer.Option(help="Tokens per rollout, at most.")
    ] = DiagnoseConfig.max_tokens,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature (> 0).")
    ] = DiagnoseConfig.temperature,
    rho: Annotated[
        str, typer.Option(help="DVP min_p values to compare with no DVP, comma-separated.")
    ] = "1e-4,1e-3,1e-2",
    vocab_positions: Annotated[
        int, typer.Option(help="Random positions for the whole-vocabulary comparison.")
    ] = DiagnoseConfig.vocab_positions,
    engine_dtype: Annotated[
        str | None,
        typer.Option(help="dtype of the local engine copy (whole-vocab); default: the server's."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the rollouts and of the positions.")] = 0,
    prompts_per_request: Annotated[
        int, typer.Option(help="Prompts per request.")
    ] = DiagnoseConfig.prompts_per_request,
    out: Annotated[Path, typer.Option(help="Output directory.")] = DiagnoseConfig.out,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Measure |dlogp| vs p on a served model, and what DVP does to the ratio tails."""  # fmt: skip
    try:
        cfg = DiagnoseConfig(
            url=url, model=model, cache_dir=cache_dir, api_key=api_key, rollouts=rollouts,
            samples_per_prompt=samples_per_prompt, max_tokens=max_tokens,
            temperature=temperature, rhos=_rhos(rho), vocab_positions=vocab_positions,
            engine_dtype=engine_dtype, seed=seed, prompts_per_request=prompts_per_request,
            out=out, progress=progress,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    result = run_diagnose(cfg)
    paths = write_outputs(result, cfg.out)
    typer.echo(paths["txt"].read_text())
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def main() -> None:
    """Console-script entry point (``dvp-diagnose``)."""
    app(prog_name="dvp-diagnose")
