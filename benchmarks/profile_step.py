"""Where one fwd+bwd step of our loss spends its time, kernel by kernel (torch.profiler), beside the step's
wall time: the gap between the two is launch overhead, host syncs and idle GPU, which no kernel shows.

    python benchmarks/profile_step.py --device cuda --path from_logits --size 4x2048x128256 --dtype bf16
    python benchmarks/profile_step.py --device cuda --path from_hidden --backend triton --size 4x2048x4096x128256
    python benchmarks/profile_step.py --path from_logits --size 2x64x512            # CPU: ATen ops instead

The inputs are the benchmarks' own (bench_from_logits.make_inputs, bench_fused_linear.make_inputs: peaked
logits, a quarter of each sequence a prompt, shift=True). --steps steps are profiled after --warmup; times
are per step. Wall time: median of 20 steps with CUDA events (perf_counter on the CPU), outside the profiler.
On the CPU the table is a smoke test only: the profiler's own overhead there is of the ops' size.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import amapo_kernels as ak  # noqa: E402
from bench_common import (InputsDoNotFit, Parser, allocated, environment, int_at_least, markdown_table,  # noqa: E402
                          output_path, replace_text, sizes_of, time_ms, unavailable_backend)
from bench_from_logits import DTYPES  # noqa: E402

PATHS = ("from_logits", "from_hidden")
BACKENDS = ("triton", "cublas", "torch")


def make_step(path, size, dtype, device, backend, inplace):
    """A closure running one fwd+bwd step of our loss on the benchmarks' inputs, and its input description."""
    dims = [int(d) for d in size.split("x")]
    if path == "from_logits":
        import bench_from_logits

        logits, labels = bench_from_logits.make_inputs(*dims, dtype, device)
        work = logits.clone() if inplace else logits

        def step():
            if inplace:
                work.copy_(logits)  # the in-place backward overwrote it (timed too: it is a copy of the logits)
            leaf = work.detach().requires_grad_()
            logits_in = bench_from_logits._ModelOutput.apply(leaf) if inplace else leaf  # not a leaf: see there
            ak.amapo_loss_from_logits(logits_in, labels, shift=True, inplace_backward=inplace).backward()

        return step
    import bench_fused_linear

    hidden, weight, labels = bench_fused_linear.make_inputs(*dims, dtype, device)

    def step():
        hidden.grad = weight.grad = None
        ak.amapo_loss_from_hidden(hidden, weight, labels, shift=True, backend=backend).backward()

    return step


def kernel_table(step, device, steps):
    """[(name, calls per step, ms per step)] of the device kernels (CPU: the ATen ops), largest first."""
    on_cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if on_cuda:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if on_cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            total_us = event.self_device_time_total
        else:
            if not event.key.startswith(("aten::", "amapo_kernels::")):
                continue
            total_us = event.self_cpu_time_total
        rows.append((event.key, event.count / steps, total_us / 1e3 / steps))
    return sorted(rows, key=lambda row: -row[2])


def summary(label, wall_ms, busy_ms, device):
    """The first line: wall time against the table's total, saying what that total sums on `device`."""
    what = "kernel time" if device == "cuda" else "CPU op time"
    summed = "kernels: their device times" if device == "cuda" else "CPU ops: their self times"
    return (f"{label}: wall {wall_ms:.3f} ms a step, {what} {busy_ms:.3f} ms "
            f"({100 * busy_ms / wall_ms:.0f}% of the wall time; {summed})")


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--path", choices=PATHS, default="from_logits")
    parser.add_argument("--size", required=True, help="BxTxV (from_logits) or BxTxHxV (from_hidden)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--backend", choices=BACKENDS, default="triton", help="from_hidden only")
    parser.add_argument("--inplace", action="store_true", help="from_logits with inplace_backward=True")
    parser.add_argument("--warmup", type=int_at_least(0), default=3)
    parser.add_argument("--steps", type=int_at_least(1), default=5)
    parser.add_argument("--top", type=int_at_least(1), default=15, help="rows of the kernel table")
    parser.add_argument("--json", type=output_path())
    parser.add_argument("--markdown", type=output_path())
    args = parser.parse_args(argv)
    dims = "BxTxV" if args.path == "from_logits" else "BxTxHxV"
    try:
        sizes = sizes_of(dims)(args.size)
    except argparse.ArgumentTypeError as error:
        parser.error(f"--size for {args.path}: {error}")
    if len(sizes) != 1:
        parser.error(f"--size for {args.path}: one {dims} size, got {args.size!r}")
    args.size = sizes[0]
    if args.inplace and args.path != "from_logits":  # the step would run without it, its label would claim it
        parser.error(f"--inplace: from_logits only (inplace_backward), not --path {args.path}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.path == "from_hidden":
        reason = unavailable_backend(args.backend, DTYPES[args.dtype], args.device)
        if reason:
            parser.error(f"--backend {args.backend}: {reason}")
    try:
        step = allocated(lambda: make_step(args.path, args.size, DTYPES[args.dtype], args.device, args.backend,
                                           args.inplace))
    except InputsDoNotFit as reason:
        parser.error(f"--size {args.size}: {reason}")
    for _ in range(args.warmup):
        step()
    wall_ms = time_ms(step, args.device, warmup=0, repeats=20)
    kernels = kernel_table(step, args.device, args.steps)
    busy_ms = sum(ms for _, _, ms in kernels)
    what = "kernel" if args.device == "cuda" else "CPU op"
    label = f"{args.path} {args.size} {args.dtype}" + (f" backend={args.backend}" if args.path == "from_hidden" else "")
    label += " inplace_backward" if args.inplace else ""
    line = summary(label, wall_ms, busy_ms, args.device)
    print(line)
    table = [[name[:90], f"{calls:g}", f"{ms:.3f}", f"{100 * ms / busy_ms:.1f}%"]
             for name, calls, ms in kernels[: args.top]]
    columns = [what, "calls a step", "ms a step", "share"]
    print(markdown_table(columns, table))
    if args.json:
        replace_text(args.json, json.dumps({"meta": environment(args.device), "label": label, "wall_ms": wall_ms,
                                            "busy_ms": busy_ms, "kernels": kernels}, indent=1))
    if args.markdown:
        replace_text(args.markdown, f"{line}\n\n{markdown_table(columns, table)}\n")
    return wall_ms, kernels


if __name__ == "__main__":
    main()
