"""Benchmark: the JAX pruned log-probs against a naive masked log-softmax in JAX.

Logits path, ``[B, T, V]`` logits (float32 or bf16), loss ``sum(w * logp)`` with fixed
random weights, ``jax.jit(jax.value_and_grad(...))`` with respect to the logits:

- naive: ``u = logits.astype(f32) / T``; ``log_softmax(where(mask, u, -inf))`` gathered at
  y; the safe sets as a dense bool mask ``[B, T, V]``; gradient by autodiff;
- ours: ``dvp_client.train.jax.pruned_logprobs`` with the sets as a bitmap
  ``uint8 [B, T, V / 8]`` (what ``rollouts_to_arrays`` gives), which also returns
  ``log p(y)`` and ``log Z_S``; analytic ``custom_vjp``, chunks of 16 Mi elements.

Head path (``--head``): hidden ``[4, 1024, 576]`` and an LM head ``(V, H)``, gradient
into both: (a) naive ``hidden @ W^T / T``, ``log_softmax`` over the full vocabulary,
gather; (b) ``hidden @ W^T`` then ``pruned_logprobs``; (c) ``pruned_logprobs_from_hidden``.

Measured: wall clock of the jitted forward + backward (after a compile and warm-up
call; ``--repeat`` round-robin rounds, every method once per round; speed-up = median
over rounds of naive / ours within a round), and XLA's own buffer plan for the
compiled function (``compiled.memory_analysis()``: temporaries + outputs, the inputs
not counted), the counterpart of the torch benchmark's "extra peak". Values: max
``|ours - naive|`` of the log-probs and of the gradients.

Usage::

    .venv/bin/python bench/jax_objective.py                    # [4, 512, 49152], fp32 and bf16
    .venv/bin/python bench/jax_objective.py --quick            # [2, 128, 49152]
    .venv/bin/python bench/jax_objective.py --head 49152 151936
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from dvp_client.train.jax import mask_to_bitmap, pruned_logprobs, pruned_logprobs_from_hidden

TEMPERATURE = 0.9
MIN_P = 1e-3
MiB = 1 << 20


def logits_case(b: int, t: int, v: int, seed: int = 0) -> dict[str, np.ndarray]:
    """LLM-like logits (N(0, 2^2), 32 plausible tokens per step at N(8, 2^2)), the min-p
    sets at ``TEMPERATURE``, tokens drawn from the sets, loss weights."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, size=(b, t, v)).astype(np.float32)
    hot = rng.integers(0, v, size=(b, t, 32))
    np.put_along_axis(z, hot, rng.normal(8, 2, size=(b, t, 32)).astype(np.float32), axis=-1)
    u = z / TEMPERATURE
    mask = u - u.max(-1, keepdims=True) >= np.log(MIN_P)
    y = np.argmax(np.where(mask, rng.random((b, t, v)), -1.0), axis=-1)  # uniform in S
    w = rng.normal(size=(b, t)).astype(np.float32)
    return {"logits": z, "mask": mask, "tokens": y, "w": w}


def naive_logits(z: jax.Array, y: jax.Array, mask: jax.Array, w: jax.Array) -> jax.Array:
    u = jnp.where(mask, z.astype(jnp.float32) / TEMPERATURE, -jnp.inf)
    logp = jnp.take_along_axis(jax.nn.log_softmax(u, axis=-1), y[..., None], axis=-1)[..., 0]
    return jnp.sum(w * logp), logp  # type: ignore[return-value]


def ours_logits(z: jax.Array, y: jax.Array, bitmap: jax.Array, w: jax.Array) -> jax.Array:
    res = pruned_logprobs(z, y, bitmap, TEMPERATURE)
    return jnp.sum(w * res.logprobs), res.logprobs  # type: ignore[return-value]


def compiled(fn: Callable[..., Any], argnums: tuple[int, ...], *args: Any) -> tuple[Any, int]:
    """The jitted value-and-grad and XLA's temp + output bytes for it."""
    f = jax.jit(jax.value_and_grad(fn, argnums=argnums, has_aux=True))
    c = f.lower(*args).compile()
    m = c.memory_analysis()
    extra = int(m.temp_size_in_bytes + m.output_size_in_bytes) if m is not None else -1
    return f, extra


def run(methods: dict[str, tuple[Any, tuple[Any, ...]]], repeat: int) -> dict[str, list[float]]:
    """Round-robin timing; returns seconds per method per round."""
    for f, args in methods.values():  # warm-up (compile is cached)
        jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeat):
        for k, (f, args) in methods.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t0)
    return times


def diff(a: Any, b: Any) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def bench_logits(shape: tuple[int, int, int], dtype: str, repeat: int) -> None:
    c = logits_case(*shape)
    z = jnp.asarray(c["logits"], jnp.bfloat16 if dtype == "bf16" else jnp.float32)
    y, w, mask = jnp.asarray(c["tokens"]), jnp.asarray(c["w"]), jnp.asarray(c["mask"])
    bitmap = mask_to_bitmap(mask)
    sizes = c["mask"].sum(-1)
    fn, mem_n = compiled(naive_logits, (0,), z, y, mask, w)
    fo, mem_o = compiled(ours_logits, (0,), z, y, bitmap, w)
    times = run({"naive": (fn, (z, y, mask, w)), "ours": (fo, (z, y, bitmap, w))}, repeat)
    (_, lp_n), g_n = fn(z, y, mask, w)
    (_, lp_o), g_o = fo(z, y, bitmap, w)
    ratio = statistics.median(n / o for n, o in zip(times["naive"], times["ours"], strict=True))
    print(
        f"logits {list(shape)} {dtype}: |S| mean {sizes.mean():.0f} max {sizes.max()}\n"
        f"  naive {statistics.median(times['naive']) * 1e3:.0f} ms, {mem_n / MiB:.0f} MiB | "
        f"ours {statistics.median(times['ours']) * 1e3:.0f} ms, {mem_o / MiB:.0f} MiB | "
        f"speed-up {ratio:.2f}x, memory {mem_o / mem_n:.2f} of naive | "
        f"max diff logp {diff(lp_o, lp_n):.1e} grad {diff(g_o[0], g_n[0]):.1e}",
        flush=True,
    )


def head_case(v: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, t, h = 4, 1024, 576
    hid = rng.normal(size=(b, t, h)).astype(np.float32)
    wt = (rng.normal(size=(v, h)) * (4.0 / h**0.5)).astype(np.float32)
    masks, ys = [], []
    for i in range(b):  # sets from the logits, one row at a time (memory)
        u = hid[i] @ wt.T / TEMPERATURE
        m = u - u.max(-1, keepdims=True) >= np.log(MIN_P)
        ys.append(np.argmax(np.where(m, rng.random(m.shape), -1.0), axis=-1))
        masks.append(np.asarray(mask_to_bitmap(m)))
    return {
        "hidden": hid,
        "weight": wt,
        "tokens": np.stack(ys),
        "bitmap": np.stack(masks),
        "w": rng.normal(size=(b, t)).astype(np.float32),
    }


def bench_head(v: int, repeat: int, naive: bool) -> None:
    c = head_case(v)
    hid, wt = jnp.asarray(c["hidden"]), jnp.asarray(c["weight"])
    y, bm, w = jnp.asarray(c["tokens"]), jnp.asarray(c["bitmap"]), jnp.asarray(c["w"])

    def a(h: jax.Array, W: jax.Array) -> Any:
        u = jnp.einsum("bth,vh->btv", h, W) / TEMPERATURE
        lp = jnp.take_along_axis(jax.nn.log_softmax(u, -1), y[..., None], -1)[..., 0]
        return jnp.sum(w * lp), lp

    def b(h: jax.Array, W: jax.Array) -> Any:
        res = pruned_logprobs(jnp.einsum("bth,vh->btv", h, W), y, bm, TEMPERATURE)
        return jnp.sum(w * res.logprobs), res.logprobs

    def fused(h: jax.Array, W: jax.Array) -> Any:
        res = pruned_logprobs_from_hidden(h, W, y, bm, TEMPERATURE)
        return jnp.sum(w * res.logprobs), res.logprobs

    fns = {"(b) matmul + pruned_logprobs": b, "(c) pruned_logprobs_from_hidden": fused}
    if naive:
        fns = {"(a) naive full log_softmax": a, **fns}
    methods, mems = {}, {}
    for k, f in fns.items():
        cf, mems[k] = compiled(f, (0, 1), hid, wt)
        methods[k] = (cf, (hid, wt))
    times = run(methods, repeat)
    outs = {k: f(*args) for k, (f, args) in methods.items()}
    base = "(b) matmul + pruned_logprobs"
    print(f"head V={v}, hidden [4, 1024, 576]:", flush=True)
    for k in methods:
        r = statistics.median(x / o for x, o in zip(times[base], times[k], strict=True))
        (_, lp), (gh, gw) = outs[k]
        (_, lp_b), (gh_b, gw_b) = outs[base]
        d = (
            ""
            if k.startswith("(a)")
            else (
                f", vs (b): logp {diff(lp, lp_b):.1e} "
                f"grad h {diff(gh, gh_b):.1e} W {diff(gw, gw_b):.1e}"
            )
        )
        print(
            f"  {k}: {statistics.median(times[k]):.2f} s ({r:.2f}x (b)), "
            f"{mems[k] / MiB:.0f} MiB{d}",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="[2, 128, 49152]")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--head", type=int, nargs="*", help="vocabulary sizes for the head path")
    p.add_argument("--no-naive-head", action="store_true", help="skip (a) (its logits are big)")
    args = p.parse_args()
    print(f"jax {jax.__version__}, {jax.default_backend()}, {jax.device_count()} device(s)")
    if args.head:
        for v in args.head:
            bench_head(v, args.repeat, not args.no_naive_head)
        return
    shape = (2, 128, 49152) if args.quick else (4, 512, 49152)
    for dtype in ("fp32", "bf16"):
        bench_logits(shape, dtype, args.repeat)


if __name__ == "__main__":
    main()
