"""The Markdown tables ``load.py`` prints: medians over rounds, with each round's ratio."""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["compare_table", "vllm_table"]


def vllm_table(results: list[dict[str, Any]]) -> str:
    """Medians over the rounds (and each round's ratios), vLLM engine.

    Columns: generated tokens/s of the load over the whole run and while every client
    was busy (steady), each over the same round's single batch; the same for prompt +
    generated tokens; CPU seconds other jobs took during the load (noise).
    """

    def med(key: str) -> float:
        values = [r[key] for r in results if r[key] is not None]
        return float(statistics.median(values)) if values else math.nan  # too short a run

    def per(key: str) -> str:
        return ", ".join(f"{r[key]:.2f}" if r[key] is not None else "-" for r in results)

    return "\n".join(
        [
            "| engine | rounds | load tok/s | single-batch tok/s | load / single (per round) "
            "| steady / single | prompt+generated: load / single | mean running (steady) "
            "| p50 | p99 | errors | 429s | other jobs' CPU s |",
            "|---|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---|",
            f"| vllm | {len(results)} | {med('tokens_per_s'):.0f} "
            f"| {med('single_batch_tps'):.0f} | {med('load_over_single'):.2f} "
            f"({per('load_over_single')}) | {med('steady_over_single'):.2f} "
            f"({per('steady_over_single')}) | {med('processed_load_over_single'):.2f} "
            f"({per('processed_load_over_single')}) | {med('mean_running'):.1f} "
            f"({med('steady_mean_running'):.1f}) | {med('p50_s'):.2f} s "
            f"| {med('p99_s'):.2f} s | {sum(r['errors'] for r in results)} "
            f"| {sum(r['rejected_429'] for r in results)} | {per('other_cpu_s')} |",
        ]
    )


def compare_table(results: list[dict[str, Any]]) -> str:
    """Medians per mode over the rounds (and each round's ratio)."""
    lines = [
        "| continuous batching | rounds | load tok/s | single-batch tok/s | load / single "
        "(per round) | p50 | p99 | mean engine batch | errors |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for cb in (True, False):
        rs = [r for r in results if r["continuous_batching"] is cb]

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return float(statistics.median(r[key] for r in rs if r[key] is not None))

        ratios = ", ".join(f"{r['load_over_single']:.2f}" for r in rs)
        lines.append(
            f"| {'on' if cb else 'off'} | {len(rs)} | {med('tokens_per_s'):.0f} "
            f"| {med('single_batch_tps'):.0f} | {med('load_over_single'):.2f} ({ratios}) "
            f"| {med('p50_s'):.2f} s | {med('p99_s'):.2f} s | {med('mean_engine_batch'):.1f} "
            f"| {sum(r['errors'] for r in rs)} |"
        )
    return "\n".join(lines)
