"""AMaPO from hidden states (fused lm_head, amapo_kernels.fused_linear) vs materializing all logits.

For each size B x T x H x V (a concatenated batch, chosen rows first, shift=True) it measures one
forward + backward of the loss, gradients of hidden and lm_head weight:

    fused      amapo_loss_from_hidden(hidden, weight, labels)                (tiles of logits only)
    op_logits  F.linear(hidden, weight) -> amapo_loss_from_logits            (logits materialized, compiled op)
    eager      F.linear(hidden, weight) -> reference.amapo_loss_from_logits  (plain torch, log_softmax copy)

Time: median over --repeats runs after --warmup (CUDA: torch.cuda.Event pairs; CPU: perf_counter).
Memory: CUDA: torch.cuda.max_memory_allocated during the run minus the memory held before it (inputs);
CPU: the largest single tensor any op returns during the run (a TorchDispatchMode tracker), which bounds
what the run must hold at once from below; it is not a peak-RSS measurement.

    python benchmarks/bench_fused_linear.py                                   # CPU, small sizes
    python benchmarks/bench_fused_linear.py --device cuda --dtype bf16 --json out.json
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import amapo_kernels as ak  # noqa: E402
from amapo_kernels import reference as ref  # noqa: E402
from amapo_kernels.fused_linear import TOKEN_CHUNK, VOCAB_CHUNK, amapo_loss_from_hidden  # noqa: E402
from amapo_kernels.testing import LargestTensor  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = {"cpu": "2x128x128x4096,4x256x256x8192", "cuda": "8x1024x4096x32000,8x2048x4096x128256"}


def make_inputs(batch, steps, width, vocab, dtype, device):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, steps, width, generator=generator).to(dtype).to(device)
    weight = (torch.randn(vocab, width, generator=generator) / width**0.5).to(dtype).to(device)
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    labels[:, : steps // 4] = -100  # a prompt
    return hidden.requires_grad_(), weight.requires_grad_(), labels.to(device)


def step_fn(name, hidden, weight, labels, token_chunk, vocab_chunk):
    """One forward + backward of `name`; gradients are cleared first."""

    def run():
        hidden.grad = weight.grad = None
        if name == "fused":
            loss = amapo_loss_from_hidden(hidden, weight, labels, shift=True, token_chunk=token_chunk,
                                          vocab_chunk=vocab_chunk)
        elif name == "op_logits":
            loss = ak.amapo_loss_from_logits(F.linear(hidden, weight), labels, shift=True)
        else:
            logps = ref.sequence_logps(F.linear(hidden, weight), labels, shift=True).float()
            half = logps.shape[0] // 2
            loss = ref.amapo_loss(logps[:half], logps[half:])
        loss.backward()

    return run


def time_ms(run, device, warmup, repeats):
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def memory_bytes(run, device):
    """CUDA: peak allocated beyond what was held before the run. CPU: the largest tensor created."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with LargestTensor() as tracker:
        run()
    return tracker.largest_bytes


def parse_sizes(text):
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--sizes", help="comma-separated BxTxHxV (B even)")
    parser.add_argument("--methods", default="fused,op_logits,eager")
    parser.add_argument("--token-chunk", type=int, default=TOKEN_CHUNK)
    parser.add_argument("--vocab-chunk", type=int, default=VOCAB_CHUNK)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and args.repeats < 20:
        parser.error("--device cuda: use --repeats >= 20")

    dtype = DTYPES[args.dtype]
    rows = []
    header = f"{'B x T x H x V':>24} {'method':>10} {'fwd+bwd ms':>11} {'extra MiB' if args.device == 'cuda' else 'largest MiB':>12}"
    print(header)
    for batch, steps, width, vocab in parse_sizes(args.sizes or DEFAULT_SIZES[args.device]):
        hidden, weight, labels = make_inputs(batch, steps, width, vocab, dtype, args.device)
        for name in args.methods.split(","):
            run = step_fn(name, hidden, weight, labels, args.token_chunk, args.vocab_chunk)
            try:
                ms = time_ms(run, args.device, args.warmup, args.repeats)
                mem = memory_bytes(run, args.device)
            except torch.OutOfMemoryError:
                ms = mem = None
                torch.cuda.empty_cache()
            rows.append({"batch": batch, "steps": steps, "width": width, "vocab": vocab, "method": name,
                         "ms": ms, "memory_bytes": mem})
            size = f"{batch}x{steps}x{width}x{vocab}"
            shown = ("OOM", "") if ms is None else (f"{ms:.2f}", f"{mem / 2**20:.1f}")
            print(f"{size:>24} {name:>10} {shown[0]:>11} {shown[1]:>12}")

    if args.json:
        memory = "cuda_peak_extra_bytes" if args.device == "cuda" else "cpu_largest_tensor_bytes"
        meta = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__, "memory_metric": memory,
                "token_chunk": args.token_chunk, "vocab_chunk": args.vocab_chunk, "warmup": args.warmup,
                "repeats": args.repeats, "timing": "median", "platform": platform.platform(),
                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
