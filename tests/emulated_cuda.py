"""The CUDA kernels of csrc/ and their host code, run on CPU tensors by the CPU emulation of the CUDA execution
model in tests/cuda_emulation/: where no GPU is lent, the tests still execute the CUDA code itself, not only
its CPU twin. The emulation checks results, barrier and shuffle discipline, and (across schedules) data races;
it is no substitute for the GPU run of `scripts/gpu_check.sh` (timing, the hardware's own fast-exp values,
compute-sanitizer)."""

import contextlib
import fcntl
import functools
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# An H100 SXM's: with few rows the host code splits each row's vocabulary across blocks, as on that GPU.
H100_MULTIPROCESSORS = 132

# The emulation's build, one folder per torch: the C++ ABI changes between releases.
BUILD = ROOT / "build" / f"cuda_emulation-torch-{torch.__version__}"


@functools.cache
def module():
    """The emulated ops, compiled on first use (about 25 s on 2 cores; cached in BUILD)."""
    from torch.utils.cpp_extension import load

    BUILD.mkdir(parents=True, exist_ok=True)
    # Before 2.14, torch guards the build with a file whose existence alone blocks: a build killed midway (^C,
    # a time limit) leaves it, and every later load waits on it forever. Builders here hold an OS lock on the
    # folder first, which the kernel drops when its holder dies, so the one holding it knows that file is stale.
    with open(BUILD / "builder.flock", "w") as builder:
        fcntl.flock(builder, fcntl.LOCK_EX)
        (BUILD / "lock").unlink(missing_ok=True)
        return load(
            name="amapo_cuda_emulation",
            sources=[str(ROOT / "tests" / "cuda_emulation" / "emulated_ops.cpp")],
            extra_include_paths=[str(ROOT / "csrc")],
            extra_cflags=["-O2", "-Wno-unknown-pragmas", "-fno-strict-aliasing"],
            build_directory=str(BUILD),
        )


class Launches:
    """The number of grids the emulation ran since this object was made."""

    def __init__(self):
        self.start = module().launches()

    def __int__(self):
        return module().launches() - self.start


@contextlib.contextmanager
def as_cpu_kernels(multiprocessors=H100_MULTIPROCESSORS, schedule=0, max_grid=2**31):
    """Within the block, the amapo_kernels ops on CPU tensors run the emulated CUDA kernels (registered over the
    CPU kernels, which are back when it ends); `multiprocessors`, `schedule` and `max_grid` are the emulation's
    (tests/cuda_emulation/emulated_ops.cpp). Yields a Launches counter."""
    emulated = module()
    how = dict(multiprocessors=multiprocessors, schedule=schedule, max_grid=max_grid)

    def sequence_logps_fwd(logits, labels, ignore_index, average, shift, check_labels=True):
        return emulated.sequence_logps_fwd(logits, labels, ignore_index, average, shift, check_labels, **how)

    def sequence_logps_bwd(grad, logits, labels, softmax_stats, ignore_index, average, shift):
        return emulated.sequence_logps_bwd(grad, logits, labels, softmax_stats, ignore_index, average, shift,
                                           inplace=False, **how)

    def sequence_logps_bwd_inplace(grad, logits, labels, softmax_stats, ignore_index, average, shift):
        emulated.sequence_logps_bwd(grad, logits, labels, softmax_stats, ignore_index, average, shift, inplace=True,
                                    **how)

    def amapo_loss_fwd(chosen, rejected, batch_moments, beta, label_smoothing, variant, ablation):
        return emulated.amapo_loss_fwd(chosen, rejected, batch_moments, beta, label_smoothing, variant, ablation,
                                       **how)

    def amapo_loss_bwd(grad, chosen, rejected, margins, beta, label_smoothing):
        return emulated.amapo_loss_bwd(grad, chosen, rejected, margins, beta, label_smoothing, **how)

    library = torch.library.Library("amapo_kernels", "IMPL")
    try:
        for kernel in (sequence_logps_fwd, sequence_logps_bwd, sequence_logps_bwd_inplace, amapo_loss_fwd,
                       amapo_loss_bwd):
            library.impl(kernel.__name__, kernel, "CPU")
        yield Launches()
    finally:
        library._destroy()
