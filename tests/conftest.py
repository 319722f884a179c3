import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import amapo_kernels

# Deterministic, bounded property tests: the same examples on every run (CI and local).
settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("AMAPO_HYPOTHESIS_EXAMPLES", "25")),
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")

CUDA_READY = torch.cuda.is_available() and amapo_kernels.has_cuda_kernels()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device")]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
