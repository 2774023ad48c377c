"""Verify a weight update: does the engine now compute what the file says?

An engine can report success and a new ``policy_version`` while a forward still uses
a copy of the old weights (a tied head's prepacked kernel, a quantized copy, a cache:
see ``engines/vllm/_worker.py``). The check reads the truth from the file itself:

1. a separate Python process (:class:`ReferenceWorker`: spawned at the first check
   and kept, so torch and transformers are imported once; the API stays responsive
   and the engine's own code is not involved) builds the model from the served
   config (no random initialisation), loads the file's tensors into it (float32; a
   tied head follows the embedding), and greedily continues :data:`REFERENCE_TEXT` by
   :data:`NEW_TOKENS` tokens with a KV cache, recording ``log p`` of each token
   (float64 ``log_softmax`` of the float32 logits);
2. the engine scores the same prompt + continuation (``engine.score`` at T = 1, no
   pruning: the full ``log p``);
3. every position must satisfy ``|log p_engine - log p_reference| <= atol``. Greedy
   tokens are the model's most probable ones, where the precision error of a correct
   engine is smallest (it scales as ``1 - p``), and a stale head moves them by orders
   of magnitude more (measured on SmolLM2: -13.6 against 0.0).

``atol`` by the engine's precision (:func:`default_atol`), or ``--weights-verify-atol``.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dvp_schemas import PruningRule, WeightsVerifyReport

from ..engines.base import Engine
from ..engines.scoring import ScoreParams

__all__ = [
    "NEW_TOKENS",
    "REFERENCE_TEXT",
    "ReferenceWorker",
    "VerifyMismatch",
    "default_atol",
    "reference",
    "verify_engine",
]

#: The prompt whose greedy continuation is compared.
REFERENCE_TEXT = "The capital of France is Paris. The capital of Japan is"
#: Tokens of greedy continuation compared.
NEW_TOKENS = 16
#: The reference process's time limit (seconds).
REFERENCE_TIMEOUT_S = 600.0


def default_atol(dtype: str, quantized: bool) -> float:
    """The allowed |log p| difference at greedy tokens for an engine's precision.

    float32 engines differ from the float32 reference by summation order only
    (about 1e-5 measured); 16-bit engines by rounding (bf16 on SmolLM2: a few 1e-2 at
    sampled tokens, less at greedy ones); FP8 rounding of the linears by more.
    """
    if quantized:
        return 1.0
    return 1e-3 if dtype in ("float32", "fp32") else 0.25


class VerifyMismatch(ValueError):
    """The engine does not compute what the file says.

    Attributes:
        position: index (in the compared continuation) of the first disagreement.
        report: what was measured.
    """

    def __init__(self, message: str, position: int, report: WeightsVerifyReport) -> None:
        super().__init__(message)
        self.position = position
        self.report = report


@dataclass
class Reference:
    """The reference forward's answer: token ids and ``log p`` of each new token."""

    prompt: list[int]
    completion: list[int]
    logprobs: list[float]


class ReferenceWorker:
    """One spawned process that runs :func:`reference`, started on first use and kept."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def run(self, model_dir: Path, files: Sequence[Path]) -> Reference:
        """:func:`reference` in the worker process.

        Raises:
            RuntimeError: the reference forward failed or timed out (the message says
                why; a dead or stuck worker is replaced at the next call).
        """
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")  # no fork of a threaded server
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._pool, reference, Path(model_dir), list(files))
        try:
            return await asyncio.wait_for(job, REFERENCE_TIMEOUT_S)
        except Exception as exc:
            self.close()
            raise RuntimeError(f"the reference forward failed: {exc!r}") from exc

    def close(self) -> None:
        """Stop the worker process (a later :meth:`run` starts a new one)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()  # a stuck forward: do not wait for it
            pool.shutdown(wait=False, cancel_futures=True)


async def verify_engine(
    engine: Engine,
    model_dir: Path,
    files: Sequence[Path],
    atol: float,
    worker: ReferenceWorker,
) -> WeightsVerifyReport:
    """Compare the engine's ``log p`` with a reference forward of ``files`` (module docstring).

    Raises:
        VerifyMismatch: a position differs by more than ``atol`` (or is not finite).
        RuntimeError: the reference process failed (its message included).
    """
    score = getattr(engine, "score", None)
    if score is None or not engine.info.capabilities.score:
        raise RuntimeError(f"the {engine.info.name} engine does not score sequences")
    t0 = time.perf_counter()
    ref = await worker.run(model_dir, files)
    params = ScoreParams(temperature=1.0, rule=PruningRule())
    scored = (await score([(ref.prompt, ref.completion)], params))[0]
    got = [float(x) for x in scored.logprobs]
    diffs = [abs(a - b) for a, b in zip(got, ref.logprobs, strict=True)]
    bad = next((i for i, d in enumerate(diffs) if not d <= atol), None)  # NaN is bad
    finite = [d for d in diffs if math.isfinite(d)]
    report = WeightsVerifyReport(
        positions=len(diffs),
        max_abs_diff=max(finite) if len(finite) == len(diffs) else float("inf"),
        atol=atol,
        seconds=time.perf_counter() - t0,
    )
    if bad is not None:
        raise VerifyMismatch(
            f"the engine does not compute what the file says: at position {bad} of the "
            f"check sequence (token {ref.completion[bad]}) the engine's log p is "
            f"{got[bad]:.6g}, the file's {ref.logprobs[bad]:.6g} (|d| {diffs[bad]:.3g} > "
            f"atol {atol:g})",
            bad,
            report,
        )
    return report


def reference(model_dir: Path, files: Sequence[Path]) -> Reference:
    """The file's own greedy continuation of :data:`REFERENCE_TEXT` and its ``log p``.

    float32 weights and forward; ``log_softmax`` in float64. A tied head follows the
    embedding (the file has no ``lm_head.weight``); any other tensor the model has and
    the file lacks is an error.

    Raises:
        ValueError: the files do not cover the model's tensors.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
    from transformers.initialization import no_init_weights

    from ..model_store import load_tokenizer

    torch.set_num_threads(1)  # beside a running engine: take one core
    config = AutoConfig.from_pretrained(str(model_dir))
    with no_init_weights():  # every tensor comes from the file
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    prompt = [int(t) for t in load_tokenizer(model_dir)(REFERENCE_TEXT).input_ids]
    completion: list[int] = []
    logprobs: list[float] = []
    cache = DynamicCache(config=config)
    step = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(step, past_key_values=cache, use_cache=True).logits[0, -1]
            logp = torch.log_softmax(logits.double(), dim=-1)
            token = int(torch.argmax(logp))
            completion.append(token)
            logprobs.append(float(logp[token]))
            step = torch.tensor([[token]])
    return Reference(prompt=prompt, completion=completion, logprobs=logprobs)
