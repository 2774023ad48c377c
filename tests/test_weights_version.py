"""A weight update that names its policy_version (what a fleet of replicas relies on).

In process: the real torch engine over the tiny model, the real WeightManager.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from dvp_schemas import WeightsUpdateRequest
from dvp_server.config import ServerConfig
from dvp_server.engines.torch.engine import TorchEngine
from dvp_server.errors import ServiceError
from dvp_server.service.admission import Admission
from dvp_server.service.weights import WeightManager
from safetensors.torch import load_file, save_file


def test_named_version_is_served_and_must_go_up(tiny_dir: Path, tmp_path: Path) -> None:
    sd = load_file(str(tiny_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    save_file(
        {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in sd.items()},
        str(tmp_path / "step.safetensors"),
    )
    config = ServerConfig(weights_root=tmp_path)

    async def scenario() -> None:
        engine = TorchEngine(tiny_dir, max_batch=4, threads=1)
        await engine.start()
        try:
            manager = WeightManager(engine, Admission(8), config)
            named = WeightsUpdateRequest(path="step.safetensors", policy_version=7)
            assert (await manager.update_from_path(named)).policy_version == 7
            assert engine.policy_version == 7 and manager.info().policy_version == 7
            for stale in (7, 3):  # not above the served version: nothing changes
                again = named.model_copy(update={"policy_version": stale})
                with pytest.raises(ServiceError) as err:
                    await manager.update_from_path(again)
                assert err.value.status == 422 and err.value.param == "policy_version"
            assert engine.policy_version == 7
            counted = WeightsUpdateRequest(path="step.safetensors")  # unnamed: counts up
            assert (await manager.update_from_path(counted)).policy_version == 8
            manager.close()
        finally:
            await engine.shutdown()

    asyncio.run(scenario())
