"""The CPU op has up to three paths (csrc/sequence_logps_cpu.cpp): row kernels built for AVX-512 and for AVX2,
and ATen's ops on row blocks (everywhere, and always for fp64). AMAPO_CPU_KERNELS (read once per process)
picks one; the rest of the suite runs the default, the widest set this processor has. Here every other
path this processor can run passes the kernel tests in a subprocess, so that each stays held to the fp64
reference, and a bad or unrunnable choice is an error naming the variable. Whatever the path, the out-of-place
gradient is advised onto transparent huge pages (its first-touch page faults cost more than the kernel)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amapo_kernels as ak

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ak.cpu_kernels()
# The sets the processor has: AVX-512 machines have AVX2 too; ATen's ops run everywhere.
RUNNABLE = {"avx512": ["avx512", "avx2", "aten"], "avx2": ["avx2", "aten"], "aten": ["aten"]}[DEFAULT]

PROBE = """
import torch, amapo_kernels as ak
from amapo_kernels.testing import peaked_logits
g = torch.Generator().manual_seed(0)
results = {{"kernels": ak.cpu_kernels()}}
for dtype in (torch.float32, torch.bfloat16):
    x = peaked_logits(3, 40, 1003, dtype=dtype, generator=g).requires_grad_()
    labels = torch.randint(0, 1003, (3, 40), generator=g)
    out = ak.sequence_logps(x, labels, shift=True)
    (grad,) = torch.autograd.grad(out.sum(), x)
    results[str(dtype)] = (out, grad)
x = peaked_logits(2, 9, 67, dtype=torch.float32, generator=g)
labels = torch.randint(0, 67, (2, 9), generator=g)
labels[:, ::3] = -100
results["stats"] = (labels, torch.ops.amapo_kernels.sequence_logps_fwd(x, labels, -100, False, False)[1])
torch.save(results, {path!r})
"""


def run_python(args, kernels, cwd, timeout=300, **extra_env):
    env = {**os.environ, "AMAPO_CPU_KERNELS": kernels, **extra_env}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_variable_selects_each_path_and_the_paths_agree(tmp_path):
    results = {}
    for kernels in RUNNABLE:
        path = tmp_path / f"{kernels}.pt"
        done = run_python(["-c", PROBE.format(path=str(path))], kernels, tmp_path)
        assert done.returncode == 0, done.stderr
        results[kernels] = torch.load(path)
        assert results[kernels]["kernels"] == kernels
    aten = results["aten"]
    for kernels in RUNNABLE:  # the op's (max, log sum exp) per row: ignored rows' are 0 (the aten path's were not)
        labels, stats = results[kernels]["stats"]
        assert torch.count_nonzero(stats[labels == -100]) == 0, kernels
        torch.testing.assert_close(stats, aten["stats"][1], rtol=1e-6, atol=1e-6)
    for kernels in RUNNABLE[:-1]:
        for dtype in ("torch.float32", "torch.bfloat16"):
            (out, grad), (out_aten, grad_aten) = results[kernels][dtype], aten[dtype]
            torch.testing.assert_close(out, out_aten, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad.float(), grad_aten.float(), rtol=1e-2, atol=1e-7)
        # The paths round differently somewhere: equal bits would mean one path ran twice.
        out, grad = results[kernels]["torch.float32"]
        assert not (torch.equal(out, aten["torch.float32"][0]) and torch.equal(grad, aten["torch.float32"][1]))
    if "avx512" in results:  # 16 lanes against 8 group the sums of exp otherwise
        assert not torch.equal(results["avx512"]["torch.float32"][1], results["avx2"]["torch.float32"][1])


@pytest.mark.parametrize("kernels", [k for k in ("avx2", "aten") if k in RUNNABLE and k != DEFAULT])
def test_other_path_passes_the_kernel_tests(kernels):
    tests = ["tests/test_sequence_logps.py", "tests/test_nan_propagation.py", "tests/test_inplace_backward.py"]
    done = run_python(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], kernels, ROOT, timeout=600,
                      AMAPO_HYPOTHESIS_EXAMPLES="5")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


def test_a_bad_or_unrunnable_choice_is_an_error_naming_the_variable(tmp_path):
    probe = ["-c", "import torch, amapo_kernels as ak; ak.sequence_logps(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long))"]
    done = run_python(probe, "avx1024", tmp_path)
    assert done.returncode != 0 and "AMAPO_CPU_KERNELS must be auto, avx512, avx2 or aten, got 'avx1024'" in done.stderr
    done = run_python(["-c", "import amapo_kernels as ak; ak.cpu_kernels()"], "avx1024", tmp_path)
    assert done.returncode != 0 and "RuntimeError: AMAPO_CPU_KERNELS must be" in done.stderr
    if "avx512" not in RUNNABLE:
        done = run_python(probe, "avx512", tmp_path)
        assert done.returncode != 0 and "AMAPO_CPU_KERNELS=avx512: this processor" in done.stderr


# Functions whose code may use AVX instructions: the row kernels' own namespaces and ATen's per-capability
# vector namespaces (at::vec::AVX2 / AVX512) instantiated in those two files. AVX code: a VEX/EVEX mnemonic
# (v...), 256/512-bit registers or AVX-512 mask registers.
VECTOR_NAMESPACES = ("amapo::cpu_rows::avx2::", "amapo::cpu_rows::avx512::", "at::vec::AVX2::", "at::vec::AVX512::")
AVX_CODE = re.compile(r"^\s*[0-9a-f]+:\s+v[a-z0-9]+\b|%[yz]mm|%k[0-7]")


@pytest.mark.skipif(shutil.which("objdump") is None or sys.platform != "linux", reason="needs objdump (binutils)")
def test_vector_instructions_stay_in_the_row_kernels():
    """The two row files compile ATen's headers with -mavx2 / -mavx512f; the linker keeps one copy of each
    inline function (c10::Half conversions, Tensor accessors, ...), and a copy taken from those files would
    run AVX-512 code on processors without it (SIGILL). Only the namespaces above may hold AVX code."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", ak._C.__file__], capture_output=True,
                             text=True, check=True).stdout
    leaked, function = set(), None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif function and AVX_CODE.search(line) and not any(n in function for n in VECTOR_NAMESPACES):
            leaked.add(function)
    assert not leaked, f"vector code outside the row kernels: {sorted(leaked)[:5]}"


def transparent_huge_pages() -> str:
    """Linux's THP mode ('always', 'madvise' or 'never'); '' where there is none."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return re.search(r"\[(\w+)\]", mode.read_text()).group(1) if mode.exists() else ""


def anon_huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(transparent_huge_pages() != "madvise",
                    reason="needs transparent huge pages in 'madvise' mode ('always' gives every allocation "
                           "huge pages, 'never' none: the advice would not show)")
def test_out_of_place_gradient_is_advised_onto_huge_pages():
    """The logits-sized gradient is advised onto 2 MiB pages before it is written: on 4 KiB pages first-touch
    faults took most of the backward (4x1024x32000 fp32 on the 2-core machine: 360 ms, 136 with them).
    A 64 MiB gradient: above glibc's largest dynamic mmap threshold (32 MiB) it is always a fresh mapping. A
    16 MiB one could come from heap memory a training run earlier in this process had freed, its pages already
    faulted on 4 KiB pages (no first-touch cost left to save), and the test failed after such a run."""
    x = torch.randn(2, 64, 131072, requires_grad=True)
    labels = torch.randint(0, 131072, (2, 64))
    (grad,) = torch.autograd.grad(ak.sequence_logps(x, labels, shift=True).sum(), x)
    assert anon_huge_kib(grad.data_ptr() + grad.nbytes // 2) >= 2048
