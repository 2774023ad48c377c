"""POST /v1/weights, POST /v1/weights/upload, GET /v1/weights: policy weight updates.

A weight update replaces every tensor of the served checkpoint (same names, same
shapes), or serves a PEFT LoRA adapter on the base checkpoint (docs/lora.md), and
bumps ``policy_version``. What happens to in-flight rollouts:

- ``"drain"`` (default): the update waits for them (new rollouts wait at
  admission meanwhile); no rollout mixes two versions;
- ``"abort"``: they end first with ``finish_reason="abort"`` and an error saying so;
- ``"keep"`` (async RL): they pause between two steps, the weights swap, and they
  continue; nothing waits, new rollouts are admitted throughout. A rollout that
  spans the update says so per token (``Rollout.version_spans``): the version that
  sampled each token and the oldest version of the keys / values it read;
- ``"recompute"``: as keep, but each in-flight rollout's context is prefilled again
  under the new weights first, so every later token reads only new keys / values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ._base import RequestModel, ResponseModel

InflightPolicy = Literal["drain", "abort", "keep", "recompute"]


class WeightsUpdateRequest(RequestModel):
    """Load new weights from the server's allowed weights root.

    Example::

        {"path": "step-0100/model.safetensors", "on_inflight": "drain"}
    """

    path: str = Field(
        min_length=1,
        max_length=4096,
        description="A .safetensors file, or a directory of them, relative to the server's "
        "--weights-root (an absolute path must lie inside it). '..' or symlinks that leave "
        "the root are refused (403). A directory holding adapter_config.json is a PEFT LoRA "
        "adapter (with adapter_model.safetensors): served on the base checkpoint.",
    )
    on_inflight: InflightPolicy | None = Field(
        None,
        description="What happens to in-flight rollouts: 'drain' waits for them, 'abort' "
        "ends them (finish_reason 'abort' with an error), 'keep' continues them with the "
        "new weights (per-token version spans), 'recompute' also prefills their context "
        "again first. Default: the server's policy.",
    )
    drain_timeout_s: float | None = Field(
        None,
        gt=0.0,
        le=86400.0,
        description="Longest wait for in-flight rollouts; past it the update is refused "
        "(409) and nothing changes. Default: the server's.",
    )
    verify: bool | None = Field(
        None,
        description="After the load, check that the engine now computes what the file "
        "says: its log-probs of a short fixed sequence against a float32 reference forward "
        "of the file's own tensors (in a separate process). A disagreement answers 422 "
        "naming the first differing position and the previous weights serve again. "
        "Default: the server's --weights-verify.",
    )
    policy_version: int | None = Field(
        None,
        ge=1,
        le=2**62,
        description="The policy_version the new weights are served as; it must be above "
        "the served one (422 otherwise). Default: the served one plus one. A fleet (Ray "
        "Serve) serves one version on every replica, so a replica started later reports "
        "the same number.",
    )


class ReplicaWeights(ResponseModel):
    """One replica of a fleet (Ray Serve) and the weights it serves."""

    replica: str = Field(description="The Serve replica id.")
    state: str = Field(description="Serve's replica state: RUNNING, STARTING, UPDATING, ...")
    policy_version: int | None = Field(
        None, description="The version it serves; None: not reported yet (starting)."
    )
    source: str | None = Field(None, description="Where its weights came from.")
    error: str | None = Field(
        None, description="Why its last weight load failed (it is then taken out of rotation)."
    )


class LoraAdapterInfo(ResponseModel):
    """A LoRA adapter served on top of the base weights (``W + scale * B @ A``)."""

    source: str = Field(description="'path:<relative folder>' or 'upload:sha256:<hex>'.")
    rank: int = Field(description="The adapter's rank r.")
    lora_alpha: float = Field(description="Its lora_alpha.")
    scale: float = Field(description="lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA).")
    target_modules: list[str] = Field(description="The adapted modules' names (q_proj, ...).")
    num_tensors: int = Field(description="Weights of the base model the adapter changes.")
    served_as: Literal["merged", "runtime"] = Field(
        description="How the engine applies it: 'merged' (it computes with the weights "
        "W + scale * B @ A, exact) or 'runtime' (vLLM's LoRA kernels add "
        "scale * B @ (A @ x) beside the base, --enable-lora)."
    )


class WeightsInfo(ResponseModel):
    """The weights being served."""

    policy_version: int = Field(description="Bumped by one at every successful update.")
    source: str = Field(
        description="Where they came from: 'model:<id>' (start-up), 'path:<relative path>' "
        "or 'upload:sha256:<hex>'."
    )
    loaded_at: str = Field(description="When they were loaded (ISO 8601, UTC).")
    num_tensors: int = Field(description="Tensors in the checkpoint.")
    on_inflight: InflightPolicy = Field(description="The server's default update policy.")
    base_source: str | None = Field(
        None,
        description="The base checkpoint (as in 'source') when an adapter is served; "
        "null otherwise.",
    )
    adapter: LoraAdapterInfo | None = Field(
        None, description="The LoRA adapter served on the base; null: the checkpoint alone."
    )


class WeightsVerifyReport(ResponseModel):
    """What ``verify`` measured: the engine against a reference forward of the file."""

    positions: int = Field(description="Tokens compared (a fixed prompt's greedy continuation).")
    max_abs_diff: float = Field(
        description="Largest |log p_engine - log p_reference| over those tokens."
    )
    atol: float = Field(description="The bound it had to stay within.")
    seconds: float = Field(description="Time the check took (reference forward and score).")


class WeightsUpdateResponse(WeightsInfo):
    """The result of an update: the new weights and what happened to in-flight rollouts."""

    previous_version: int = Field(description="policy_version before the update.")
    aborted_rollouts: int = Field(description="In-flight rollouts aborted by the update.")
    drained_rollouts: int = Field(description="In-flight rollouts the update waited for.")
    kept_rollouts: int = Field(
        0, description="In-flight rollouts that continued across the update (keep, recompute)."
    )
    wait_s: float = Field(description="Seconds new rollouts were held (drain or abort).")
    load_s: float = Field(description="Seconds the swap itself took.")
    verify: WeightsVerifyReport | None = Field(
        None, description="The check after the load, when the update asked for it."
    )
    replicas: list[ReplicaWeights] | None = Field(
        None,
        description="Fleet updates (Ray Serve) only: the version each replica serves "
        "afterwards (all of them at policy_version, else the update answered an error).",
    )


class FleetStatus(ResponseModel):
    """``GET /v1/fleet`` (Ray Serve deployments): the fleet's weight version per replica."""

    app: str = Field(description="The Serve application.")
    deployment: str = Field(description="The Serve deployment.")
    status: str = Field(description="Serve's deployment status: HEALTHY, UPDATING, ...")
    policy_version: int = Field(description="The version the fleet is configured to serve.")
    source: str | None = Field(None, description="Its weights ('path:<relative path>').")
    converged: bool = Field(
        description="Every live replica serves policy_version and none is starting or failed."
    )
    replicas: list[ReplicaWeights] = Field(description="Live replicas, by id.")
