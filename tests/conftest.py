import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", deadline=None, max_examples=2000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("QUANT4_HYPOTHESIS_PROFILE", "default"))

from helpers import SHARED


@pytest.fixture
def shared_dir():
    if not (SHARED / "models" / "stories260K" / "stories260K.bin").exists():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
