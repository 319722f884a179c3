"""AMaPO from logits, forward + backward: this library's op against its peers, in one run.

    python benchmarks/bench_from_logits.py                         # CPU rows (small sizes)
    python benchmarks/bench_from_logits.py --device cuda --sizes 4x2048x128256 --dtypes bf16 \\
        --json from_logits.json --markdown from_logits.md         # the paper size (scripts/gpu_check.sh)
    ncu --clock-control none -k regex:'(forward|backward)_rows_kernel' --launch-skip 4 --launch-count 2 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/bench_from_logits.py --device cuda --sizes 4x2048x128256 --dtypes bf16 --peers ours
    (achieved DRAM throughput and issue-slot use of the forward and backward kernels)

Workload: logits [B, T, V] of a concatenated batch (chosen rows first), labels with the first quarter
(the prompt) ignored, `shift=True`; the time of the loss plus d loss / d logits. Logits are realistic
(peaked, a few nats of entropy: amapo_kernels.testing.peaked_logits), not uniform noise. Peers:
  ours          amapo_kernels.amapo_loss_from_logits (a separate logits-sized gradient)
  ours_inplace  the same with inplace_backward=True (the gradient written over the logits)
  ours_unchecked  the same with check_labels=False (no label-range check, so no host sync; CUDA only:
                on the CPU the check always runs)
  eager         log_softmax over fp32 logits, gather, masked mean (amapo_kernels.reference), AMaPO loss
  compile       torch.compile of eager
  liger         Liger-Kernel's LigerCrossEntropyLoss(reduction="none") as its users call it: the contiguous
                logits viewed as [N, V] (no copy) with the labels shifted instead (transformers'
                ForCausalLMLoss convention); it writes its gradient over the logits. Then the AMaPO loss.
  liger_pref    Liger's preference losses (LigerFusedLinearDPOLoss, ...) take hidden states, not logits:
                benchmarks/bench_fused_linear.py has them.
  trl           TRL 1.16's from-logits path: trl.trainer.utils.selective_log_softmax on logits[:, :-1] with
                row_mask (ignored rows skipped), masked mean, AMaPO loss.
A peer that cannot run here says why in its row.

Time: median of --repeats (>= 20 on CUDA) after 3 warm-ups, CUDA events on a GPU. Peers that overwrite
the logits get a fresh copy before each run, untimed. Memory, CUDA ("extra MiB"): the peak allocated during
one run less what was allocated before it (the logits, labels and the reference's results; each run's logits
gradient is freed with the run, so none is held there). Unlike bench_fused_linear.py, which leaves its inputs'
(small) gradients out, the logits' gradient counts here: a separate logits-sized gradient is what in-place
saves. CPU ("largest MiB"): the largest single tensor created during the run, a gradient included.
Limit (CUDA): the bytes the op must move at the copy bandwidth measured in the same run: every scored row
of logits read twice (forward, backward), the whole gradient written once (ignored rows get zeros); rows of
ignored labels are not read. "% of limit" = limit time / measured time. Ratios are peer time / ours.
Agreement: after its timed runs each peer runs once more and its loss and d loss / d logits are compared
with eager's (the plain-PyTorch reference, amapo_kernels.reference) on the same inputs; "err vs ref" is the
larger relative error (of the loss, and of the gradient's norm-wise difference), and a row beyond
bench_common.AGREEMENT_LIMIT says it disagrees: a timing of a wrongly wired peer is worth nothing."""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import (AGREEMENT_LIMIT, InputsDoNotFit, Parser, agreement, allocated, compiled_for_this_size,
                          copy_bandwidth_gbs, cuda_peak_extra_bytes, disagreement, environment, format_error,
                          int_at_least, markdown_table, output_path, sizes_of, time_ms, unless_out_of_memory,
                          write_results)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import amapo_kernels as ak  # noqa: E402
from amapo_kernels import reference  # noqa: E402
from amapo_kernels.testing import LargestTensor, peaked_logits  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = {"cpu": "2x512x32000,4x1024x32000", "cuda": "4x512x32000,4x2048x32000,8x2048x32000,"
                 "4x512x128256,4x2048x128256,8x2048x128256"}
PEERS = ["ours", "ours_inplace", "ours_unchecked", "eager", "compile", "liger", "liger_pref", "trl"]
OVERWRITES_LOGITS = {"ours_inplace", "liger"}
IGNORE = -100


class PeerUnavailable(Exception):
    """Why a peer has no row of numbers (not installed, not applicable)."""


def make_inputs(batch, steps, vocab, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = peaked_logits(batch, steps, vocab, dtype=dtype, generator=generator, device=device)
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    labels[:, : steps // 4] = IGNORE  # the prompt
    return logits, labels.to(device)


def pair_loss(logps):
    half = logps.shape[0] // 2
    return ak.amapo_loss(logps[:half], logps[half:])


def masked_mean(token_logps, mask):
    return (token_logps * mask).sum(1) / mask.sum(1).clamp(min=1)


def eager_loss(logits, labels):
    return pair_loss(reference.sequence_logps(logits.float(), labels, shift=True))


def liger_loss(logits, labels):
    if logits.device.type != "cuda":
        raise PeerUnavailable("Liger-Kernel's kernels are Triton: CUDA only")
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError as error:
        raise PeerUnavailable(f"liger-kernel not installed ({error}); bash scripts/fetch_peer_wheels.sh") from None
    shift_labels = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    batch, steps, vocab = logits.shape
    token_nll = LigerCrossEntropyLoss(reduction="none", ignore_index=IGNORE)(
        logits.view(-1, vocab), shift_labels.reshape(-1)
    ).view(batch, steps)
    return pair_loss(masked_mean(-token_nll, shift_labels != IGNORE))


def liger_preference(logits, labels):
    raise PeerUnavailable("Liger's preference losses take hidden states: see bench_fused_linear.py")


def trl_loss(logits, labels):
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError as error:
        raise PeerUnavailable(f"trl not installed ({error}); pip install trl==1.16.0") from None
    targets = labels[:, 1:]
    mask = targets != IGNORE
    token_logps = selective_log_softmax(logits[:, :-1], targets.clamp(min=0), row_mask=mask)
    return pair_loss(masked_mean(token_logps.float(), mask))


class _ModelOutput(torch.autograd.Function):
    """The benchmark's leaf logits as a model's output (a non-leaf tensor over the same storage, no copy):
    sequence_logps(inplace_backward=True) refuses a leaf that requires grad, whose values it would overwrite."""

    @staticmethod
    def forward(ctx, logits):
        return logits.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def ours_unchecked(logits, labels):
    if logits.device.type != "cuda":
        raise PeerUnavailable("check_labels=False saves a host sync on CUDA; on the CPU the check always runs")
    return ak.amapo_loss_from_logits(logits, labels, shift=True, check_labels=False)


def peer_fns(device):
    fns = {
        "ours": lambda logits, labels: ak.amapo_loss_from_logits(logits, labels, shift=True),
        "ours_inplace": lambda logits, labels: ak.amapo_loss_from_logits(_ModelOutput.apply(logits), labels,
                                                                         shift=True, inplace_backward=True),
        "ours_unchecked": ours_unchecked,
        "eager": eager_loss,
        "compile": compiled_for_this_size(eager_loss),
        "liger": liger_loss,
        "liger_pref": liger_preference,
        "trl": trl_loss,
    }
    return fns


def must_move_bytes(logits, labels):
    """Scored rows read twice + the whole gradient written once (see the module docstring)."""
    row_bytes = logits.shape[-1] * logits.element_size()
    scored_rows = int((labels[:, 1:] != IGNORE).sum())
    return (2 * scored_rows + logits.shape[0] * logits.shape[1]) * row_bytes


def loss_and_gradient(fn, logits, labels):
    """fn's loss and (d loss / d logits,) for these logits."""
    leaf = logits.detach().requires_grad_()
    loss = fn(leaf, labels)
    loss.backward()
    return loss.detach(), (leaf.grad,)


def measure(name, fn, logits, labels, device, repeats, expected):
    """(ms, extra bytes, errors against the reference's `expected` (loss, gradients), None without one) of one
    peer; raises PeerUnavailable with the reason it cannot run."""
    work = logits.clone() if name in OVERWRITES_LOGITS else logits
    prepare = (lambda: work.copy_(logits)) if name in OVERWRITES_LOGITS else None

    def run():
        leaf = work.detach().requires_grad_()
        fn(leaf, labels).backward()

    ms = time_ms(run, device, warmup=3, repeats=repeats, prepare=prepare)
    if device == "cuda":
        extra = cuda_peak_extra_bytes(run, prepare, gradient_bytes=0)  # the logits' gradient counts (docstring)
    else:
        if prepare:
            prepare()
        with LargestTensor() as tracker:
            run()
        extra = tracker.largest_bytes
    if prepare:
        prepare()
    if expected is None:
        return ms, extra, None
    return ms, extra, unless_out_of_memory(lambda: agreement(*loss_and_gradient(fn, work, labels), *expected))


def bench_size(size, dtype_name, device, peers, repeats, bandwidth):
    batch, steps, vocab = map(int, size.split("x"))
    try:
        logits, labels = allocated(lambda: make_inputs(batch, steps, vocab, DTYPES[dtype_name], device))
    except InputsDoNotFit as reason:  # one row says so; the other sizes still run
        return [{"size": size, "dtype": dtype_name, "peer": "every peer", "limit_ms": None, "note": str(reason)}]
    limit_ms = must_move_bytes(logits, labels) / (bandwidth * 1e9) * 1e3 if bandwidth else None
    fns = peer_fns(device)
    # held through the peers' runs, outside their memory measurements
    expected = unless_out_of_memory(lambda: loss_and_gradient(eager_loss, logits, labels))
    results = {}
    for name in peers:
        try:
            results[name] = measure(name, fns[name], logits, labels, device, repeats, expected)
        except PeerUnavailable as reason:
            results[name] = str(reason)
        except Exception as error:  # noqa: BLE001 - a peer's failure is reported in its row, ours is not
            if name.startswith("ours"):
                raise
            results[name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        if device == "cuda":
            torch.cuda.empty_cache()
    ours_ms = results["ours"][0] if isinstance(results.get("ours"), tuple) else None
    rows = []
    for name, result in results.items():
        row = {"size": size, "dtype": dtype_name, "peer": name, "limit_ms": limit_ms}
        if isinstance(result, str):
            row["note"] = result
        else:
            ms, extra, errors = result
            row.update(ms=ms, extra_bytes=extra, time_vs_ours=ms / ours_ms if ours_ms else None,
                       fraction_of_limit=limit_ms / ms if limit_ms else None, **(errors or {}))
            note = disagreement(errors) if errors else None
            if note:
                row["note"] = note
        rows.append(row)
    return rows


def format_row(row):
    if "ms" not in row:
        return [row["size"], row["dtype"], row["peer"], "-", "-", "-", "-", "-", row["note"]]
    fraction = f"{100 * row['fraction_of_limit']:.0f}%" if row.get("fraction_of_limit") else "-"
    ratio = f"{row['time_vs_ours']:.2f}" if row.get("time_vs_ours") else "-"
    return [row["size"], row["dtype"], row["peer"], f"{row['ms']:.2f}", ratio, f"{row['extra_bytes'] / 2**20:.1f}",
            fraction, format_error(row), row.get("note", "")]


def columns(device):
    """The table's columns, the memory column named by what is measured on `device` (see the docstring)."""
    memory = "extra MiB" if device == "cuda" else "largest MiB"
    return ["B x T x V", "dtype", "peer", "fwd+bwd ms", "x ours", memory, "% of limit", "err vs ref", "note"]


LINE = "{:>16} {:>5} {:>14} {:>10} {:>7} {:>11} {:>10} {:>10}  {}"  # the printed table


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", type=sizes_of("BxTxV"), help="comma-separated BxTxV (B counts rows: B/2 pairs)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {PEERS}")
    parser.add_argument("--repeats", type=int_at_least(1), default=20,
                        help="timed runs per peer; the median is reported")
    parser.add_argument("--json", type=output_path(), help="write the rows and the environment here")
    parser.add_argument("--markdown", type=output_path(), help="write the table as markdown here")
    args = parser.parse_args(argv)
    peers = args.peers.split(",")
    unknown = [p for p in peers if p not in PEERS] + [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"unknown peer or dtype {unknown}; peers: {PEERS}, dtypes: {sorted(DTYPES)}")
    if "ours" not in peers:
        peers.insert(0, "ours")  # every ratio is to ours
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and args.repeats < 20:
        parser.error("--device cuda: use --repeats >= 20")
    bandwidth = copy_bandwidth_gbs() if args.device == "cuda" else None
    meta = environment(args.device)
    meta.update(copy_bandwidth_gbs=bandwidth, repeats=args.repeats, timing="median",
                memory="cuda peak allocated beyond the inputs, the logits' gradient included" if bandwidth
                else "cpu largest tensor created, a gradient included",
                limit="scored logits rows read twice + whole gradient written once, at the measured copy bandwidth",
                agreement=f"loss and gradient against eager's, relative; a row beyond {AGREEMENT_LIMIT} disagrees")
    print(f"device {meta.get('gpu', 'cpu')}, torch {torch.__version__}"
          + (f", measured copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else ""))
    print(LINE.format(*columns(args.device)))
    where = meta.get("gpu") or (f"CPU, {meta['cpu_threads']} threads, ATen {meta['torch_cpu_capability']}, "
                                f"our row kernels {meta['amapo_cpu_kernels']}")
    header = (f"From logits, fwd+bwd, {where} (driver {meta.get('driver', '-')}), torch "
              f"{meta['torch']}, {meta['date']}\n\n`{meta['command']}`\n\n")
    rows = []

    def save(complete):
        write_results(args.json, {"meta": meta, "rows": rows}, args.markdown,
                      header + markdown_table(columns(args.device), [format_row(row) for row in rows]), complete)

    for size in args.sizes or DEFAULT_SIZES[args.device].split(","):
        for dtype_name in args.dtypes.split(","):
            for row in bench_size(size, dtype_name, args.device, peers, args.repeats, bandwidth):
                rows.append(row)
                print(LINE.format(*format_row(row)), flush=True)
                save(complete=False)
    save(complete=True)
    return rows


if __name__ == "__main__":
    main()
