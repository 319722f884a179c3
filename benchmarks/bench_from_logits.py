"""AMaPO from logits, forward + backward: this library's op against its peers, in one run.

    python benchmarks/bench_from_logits.py                         # CPU rows (small sizes)
    python benchmarks/bench_from_logits.py --device cuda --json out.json
    python benchmarks/bench_from_logits.py --device cuda --sizes 4x2048x128256 --dtypes bf16

Workload: logits [B, T, V] of a concatenated batch (chosen rows first), labels with the prompt masked,
`shift=True`; time of loss + d loss / d logits. Peers, each where it is installed:
  eager     amapo_kernels.reference: log_softmax over fp32 logits, gather, masked mean (as TRL does)
  compile   torch.compile of the same eager function
  liger     Liger-Kernel's LigerCrossEntropyLoss (per-token, reduction="none") + the AMaPO loss
  ours      amapo_kernels.amapo_loss_from_logits
Logits are realistic (peaked, a few nats of entropy: amapo_kernels.testing.peaked_logits), not uniform
noise. Time: median of --repeats after warm-up (CUDA events on a GPU). Memory: peak bytes allocated
beyond the inputs on CUDA; on the CPU the largest tensor created. On CUDA the achieved bandwidth counts
the logits read twice and their gradient written once, against a device-to-device copy measured in the
same run. Ratios are peer time / ours."""

import argparse
import json
import statistics
import time

import torch

import amapo_kernels as ak
from amapo_kernels import reference
from amapo_kernels.testing import LargestTensor, peaked_logits

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = {"cpu": "2x512x32000,4x1024x32000", "cuda": "4x512x32000,4x2048x32000,8x2048x32000,"
                 "4x512x128256,4x2048x128256,8x2048x128256"}


def make_inputs(batch, steps, vocab, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = peaked_logits(batch, steps, vocab, dtype=dtype, generator=generator, device=device)
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    labels[:, : steps // 4] = -100  # the prompt
    return logits, labels.to(device)


def eager_loss(logits, labels):
    logps = reference.sequence_logps(logits.float(), labels, shift=True)
    half = logps.shape[0] // 2
    return ak.amapo_loss(logps[:half], logps[half:])


def liger_loss(logits, labels):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    shifted, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    token_nll = LigerCrossEntropyLoss(reduction="none")(shifted, targets).view(labels.shape[0], -1)
    mask = labels[:, 1:] != -100
    logps = -(token_nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    half = logps.shape[0] // 2
    return ak.amapo_loss(logps[:half], logps[half:])


def ours_loss(logits, labels):
    return ak.amapo_loss_from_logits(logits, labels, shift=True)


def peers(device):
    available = {"ours": ours_loss, "eager": eager_loss, "compile": torch.compile(eager_loss)}
    if device == "cuda":
        try:
            import liger_kernel  # noqa: F401

            available["liger"] = liger_loss
        except ImportError:
            pass
    return available


def step(fn, logits, labels):
    leaf = logits.detach().requires_grad_()
    loss = fn(leaf, labels)
    loss.backward()
    return leaf.grad


def timed_ms(fn, logits, labels, device, repeats):
    for _ in range(3):
        step(fn, logits, labels)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(fn, logits, labels)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step(fn, logits, labels)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def extra_memory_bytes(fn, logits, labels, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(fn, logits, labels)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with LargestTensor() as tracker:
        step(fn, logits, labels)
    return tracker.largest_bytes


def copy_bandwidth_gbs(device):
    """Measured device-to-device copy bandwidth, bytes read + written, GB/s."""
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 2 * source.numel() * 10 / (start.elapsed_time(end) * 1e-3) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", help="comma-separated BxTxV (B counts rows: B/2 pairs)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    device = args.device
    bandwidth = copy_bandwidth_gbs(device) if device == "cuda" else None
    rows = []
    header = f"{'B x T x V':>16} {'dtype':>5} {'peer':>8} {'fwd+bwd ms':>11} {'x ours':>7} {'extra MiB':>10}"
    header += f" {'% of copy BW':>13}" if bandwidth else ""
    print(f"device {device}" + (f", measured copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else ""))
    print(header)
    for size in (args.sizes or DEFAULT_SIZES[device]).split(","):
        batch, steps, vocab = map(int, size.split("x"))
        for dtype_name in args.dtypes.split(","):
            logits, labels = make_inputs(batch, steps, vocab, DTYPES[dtype_name], device)
            results = {}
            for name, fn in peers(device).items():
                results[name] = (timed_ms(fn, logits, labels, device, args.repeats),
                                 extra_memory_bytes(fn, logits, labels, device))
            for name, (ms, extra) in results.items():
                row = {"size": size, "dtype": dtype_name, "peer": name, "ms": ms, "extra_bytes": extra,
                       "time_vs_ours": ms / results["ours"][0]}
                line = f"{size:>16} {dtype_name:>5} {name:>8} {ms:>11.2f} {row['time_vs_ours']:>7.2f} {extra / 2**20:>10.1f}"
                if bandwidth:
                    moved = 3 * logits.numel() * logits.element_size()
                    row["bandwidth_fraction"] = moved / (ms * 1e-3) / 1e9 / bandwidth
                    line += f" {100 * row['bandwidth_fraction']:>12.1f}%"
                rows.append(row)
                print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "copy_bandwidth_gbs": bandwidth, "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
