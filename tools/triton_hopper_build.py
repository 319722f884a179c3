"""The fused lm_head's Triton kernels as Triton's JIT builds them on an H100 / H200, built here without a GPU.

Each kernel launch that amapo_kernels.triton_fused_linear's entry points make for a small CPU batch is
recorded instead of run; its arguments get the specialization that the JIT gives them at run time (an
integer equal to 1, a unit stride, becomes a constant; 16-byte-aligned pointers and multiples of 16 are
marked divisible by 16); it is compiled for sm_90a in every autotuned configuration; and the build is read:
- wgmma: Hopper's warpgroup MMA instructions in the PTX (16-bit and tf32 operands use tensor cores);
- pipelined: cp.async copies in the PTX, i.e. the K-loop is software-pipelined over num_stages buffers;
- shared memory per block, registers per thread and spill bytes (ptxas -v of that very build);
- blocks per SM: how many of its blocks an SM holds at once by those registers, that shared memory and its
  threads (one, and the SM idles its tensor cores through each tile's epilogue and pipeline refill; two,
  and one block's wgmma runs through the other's).

Why not compile from a signature written by hand: without the run-time specialization Triton cannot prove
the loads contiguous and aligned, so it neither vectorizes nor pipelines them and allocates one stage of
shared memory (48 KiB instead of the 144 KiB that the first bf16 configuration takes at run time): checks
on that build would pass for a kernel that never runs.

The batch (H and V multiples of 16, as every Llama / Qwen / Gemma / Mistral shape; T - 1 not, as at
T = 2048 with shift) gives the divisibility of the paper's shape. fp32 with tf32 is recorded as fp32
(the CPU never allows tf32) and built with PRECISION="tf32", as a GPU with allow_tf32 set would.

    python tools/triton_hopper_build.py      # the table; tests/test_triton_fused_linear.py asserts on it
Needs the compiled (not interpreted) Triton: TRITON_INTERPRET unset.
"""

import contextlib
import io
import os
import re
import sys
from dataclasses import dataclass

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from amapo_kernels import triton_fused_linear as kernels

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_MEMORY = 232448  # bytes a block may opt into on H100 / H200 (227 KiB)
# An SM of sm_90 (CUDA C++ Programming Guide, "Compute Capabilities"): 228 KiB of shared memory, of which the
# system reserves 1 KiB a block; 64K registers in 4 partitions, allocated to warps in units of 256; 64 warps.
SM_SHARED_MEMORY, SHARED_RESERVED_PER_BLOCK = 233472, 1024
REGISTERS_PER_PARTITION, PARTITIONS, REGISTER_UNIT, MAX_WARPS = 16384, 4, 256, 64
KERNELS = ("_stats_kernel", "_stats_from_logits_kernel", "_grad_logits_kernel", "_grad_from_logits_kernel",
           "_accumulating_backward_kernel")
TUNED = kernels.TUNED_KERNELS
OPERANDS = {"bf16": (torch.bfloat16, "ieee"), "fp32": (torch.float32, "ieee"), "tf32": (torch.float32, "tf32")}
EPILOGUES = ("plain", "bias+softcap")  # Llama / Mistral heads; Gemma-2's softcapped logits (with a bias too)
SHAPE = {"batch": 2, "seq_len": 48, "width": 64, "vocab": 1040}


@dataclass
class Launch:
    kernel: str
    args: tuple
    kwargs: dict


@dataclass
class Build:
    kernel: str
    operands: str
    epilogue: str
    config: dict  # BN, BV, BK (where the kernel has one), num_warps, num_stages
    wgmma: bool
    pipelined: bool
    shared: int
    registers: int
    spill_bytes: int

    @property
    def blocks_per_sm(self) -> int:
        """The blocks of this build one SM holds at once (the least of its registers', shared memory's and
        warps' limits)."""
        warps = self.config["num_warps"]
        per_warp = -(-self.registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
        by_registers = REGISTERS_PER_PARTITION // per_warp * PARTITIONS // warps
        by_shared = SM_SHARED_MEMORY // (self.shared + SHARED_RESERVED_PER_BLOCK)
        return min(by_registers, by_shared, MAX_WARPS // warps)


class _Recorder:
    """Stands in for a kernel: kernel[grid](*args, **kwargs) records the call."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.name, args, kwargs))


@contextlib.contextmanager
def _recording(launches: list, config_index: int):
    """Every kernel of the module replaced by a recorder, the autotuned ones pinned to one configuration."""
    saved = {name: getattr(kernels, name) for name in KERNELS}
    pinned = os.environ.get(kernels.CONFIG_VARIABLE)
    os.environ[kernels.CONFIG_VARIABLE] = str(config_index)
    try:
        for name in KERNELS:
            setattr(kernels, name, _Recorder(name, launches))
        yield
    finally:
        for name, kernel in saved.items():
            setattr(kernels, name, kernel)
        if pinned is None:
            del os.environ[kernels.CONFIG_VARIABLE]
        else:
            os.environ[kernels.CONFIG_VARIABLE] = pinned


def record_launches(dtype: torch.dtype, config_index: int, epilogue: str) -> list[Launch]:
    """The launches of both forwards (Triton and cuBLAS matmuls) and of the three backward paths (g chunks with
    Triton matmuls, with cuBLAS matmuls, the accumulating kernel with the gradient filter) for a CPU batch, with
    bias and softcap or without either."""
    if kernels.INTERPRETED:
        raise RuntimeError("triton_fused_linear was imported under TRITON_INTERPRET=1: nothing is compiled there")
    generator = torch.Generator().manual_seed(0)
    batch, seq_len, width, vocab = SHAPE["batch"], SHAPE["seq_len"], SHAPE["width"], SHAPE["vocab"]
    hidden = torch.randn(batch, seq_len, width, generator=generator).to(dtype)
    weight = torch.randn(vocab, width, generator=generator).to(dtype)
    bias = torch.randn(vocab, generator=generator).to(dtype) if epilogue == "bias+softcap" else None
    labels = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    labels[:, :5] = -100  # a prompt
    common = {"shift": True, "softcap": 30.0 if epilogue == "bias+softcap" else None, "ignore_index": -100}
    launches = []
    with _recording(launches, config_index):
        kernels.token_stats(hidden, weight, bias, labels, **common, matmuls="cublas")
        stats = kernels.token_stats(hidden, weight, bias, labels, **common)
        coefs = torch.ones(stats.shape[0])
        for options in ({}, {"matmuls": "cublas"}, {"gradient_filter": True}):
            kernels.gradients(hidden, weight, bias, labels, stats[:, :2], coefs, **common, need_hidden=True,
                              need_weight=True, need_bias=bias is not None, **options)
    return launches


def build_for_hopper(launch: Launch, operands: str, epilogue: str) -> Build:
    """Compiles one recorded launch for sm_90a as the JIT would at run time, and reads the build."""
    kernel = getattr(kernels, launch.kernel)
    kwargs = dict(launch.kwargs)
    if "PRECISION" in kwargs:
        kwargs["PRECISION"] = OPERANDS[operands][1]
    backend = make_backend(HOPPER)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    # Triton prints ptxas -v (registers, spills) when asked; its on-disk cache would skip ptxas altogether.
    printed = io.StringIO()
    with knobs.cache.scope(), knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(printed):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=HOPPER, options=options.__dict__)
    log = printed.getvalue()
    ptx = compiled.asm["ptx"]
    registers = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    if registers is None or len(spills) != 2:
        raise RuntimeError(f"no ptxas -v report for {launch.kernel}:\n{log}")
    config = {key: kwargs[key] for key in ("BN", "BV", "BK") if key in kwargs}
    config.update(num_warps=options.num_warps, num_stages=options.num_stages)
    return Build(launch.kernel, operands, epilogue, config, wgmma="wgmma.mma_async" in ptx,
                 pipelined="cp.async.cg" in ptx or "cp.async.ca" in ptx, shared=compiled.metadata.shared,
                 registers=int(registers.group(1)), spill_bytes=sum(spills))


def hopper_builds(operands: str, epilogue: str) -> list[Build]:
    """Every kernel in every configuration it can launch with, for 'bf16', 'fp32' or 'tf32' operands and
    one of EPILOGUES."""
    dtype = OPERANDS[operands][0]
    tuning = kernels.TUNING["fp32" if dtype == torch.float32 else "half"]
    builds, built = [], set()
    for index in range(len(tuning)):
        for launch in record_launches(dtype, index, epilogue):
            # the chunks of a backward launch one kernel alike; the untuned kernels have one configuration
            key = (launch.kernel, index if launch.kernel in TUNED else 0)
            if key not in built:
                built.add(key)
                builds.append(build_for_hopper(launch, operands, epilogue))
    return builds


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90a, the run-time specialization of a batch {SHAPE}\n")
    print("| kernel | operands | epilogue | BN x BV x BK | warps | stages | wgmma | pipelined | shared KiB | registers "
          "| spill bytes | blocks / SM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for operands in OPERANDS:
        for b in (b for epilogue in EPILOGUES for b in hopper_builds(operands, epilogue)):
            tile = " x ".join(str(b.config[key]) for key in ("BN", "BV", "BK") if key in b.config)
            cells = [b.kernel, operands, b.epilogue, tile, b.config["num_warps"], b.config["num_stages"],
                     "yes" if b.wgmma else "no", "yes" if b.pipelined else "no", f"{b.shared / 1024:.0f}", b.registers,
                     b.spill_bytes, b.blocks_per_sm]
            print("| " + " | ".join(str(cell) for cell in cells) + " |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
