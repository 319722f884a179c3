import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

import amapo_kernels

# Deterministic, bounded property tests: the same examples on every run (CI and local). AMAPO_HYPOTHESIS_EXPLORE=1
# draws new random examples on each run instead, a local search beyond the fixed ones (a failure prints its blob).
settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("AMAPO_HYPOTHESIS_EXAMPLES", "25")),
    derandomize=os.environ.get("AMAPO_HYPOTHESIS_EXPLORE") != "1",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")

# The training processes that tests start JIT-compile a DeepSpeed CPU op: into the work tree, one folder per torch.
# torch's default, ~/.cache/torch_extensions/py311_cu130, is shared by every torch of one Python and CUDA (a module
# another torch built there fails to load: undefined symbol), and before torch 2.14 a build killed midway leaves a
# lock file there on which every later build waits forever.
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path(__file__).resolve().parents[1] / ".torch_extensions" / f"torch-{torch.__version__}"))

CUDA_READY = torch.cuda.is_available() and amapo_kernels.has_cuda_kernels()

CUDA_DEVICE = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device")]
)
# "emulated-cuda": the CUDA kernels themselves, on CPU tensors, through the CPU emulation of tests/emulated_cuda.py,
# so that every device-parametrized test runs the CUDA code in CI, where there is no GPU.
DEVICES = ["cpu", "emulated-cuda", CUDA_DEVICE]


def on_device(name):
    """The device string a test uses for `name`; for "emulated-cuda", "cpu" with the emulated CUDA kernels
    registered over the CPU ones, and a check that the test did run them."""
    if name != "emulated-cuda":
        yield name
        return
    import emulated_cuda

    with emulated_cuda.as_cpu_kernels() as launches:
        yield "cpu"
    assert int(launches) > 0, "the test ran no emulated CUDA kernel"


@pytest.fixture(params=DEVICES)
def device(request):
    yield from on_device(request.param)


@pytest.fixture(params=["emulated-cuda", CUDA_DEVICE])
def cuda_device(request):
    """The CUDA kernels: on a GPU, and through the CPU emulation (which runs where there is none)."""
    yield from on_device(request.param)
