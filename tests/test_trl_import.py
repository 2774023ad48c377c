"""Importing the TRL integration prints none of TRL's warnings about vLLM versions:
the integration never uses TRL's vLLM path (its rollouts come from the service)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("trl")


def test_importing_the_integration_prints_no_vllm_version_warning() -> None:
    code = "import dvp_client.integrations.trl"
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TRL currently supports vLLM" not in done.stderr, done.stderr[-2000:]
