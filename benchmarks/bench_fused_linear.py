"""AMaPO from hidden states (fused lm_head, amapo_kernels.fused_linear) vs materializing all logits.

For each size B x T x H x V (a concatenated batch, chosen rows first, shift=True) it measures one
forward + backward of the loss, gradients of hidden and lm_head weight:

    fused      amapo_loss_from_hidden(hidden, weight, labels, backend="torch")  (tiles of logits, PyTorch)
    triton     amapo_loss_from_hidden(..., backend="triton")                 (Triton kernels; CUDA only)
    triton_filter  the same with gradient_filter=True (Cut Cross-Entropy-style tile skipping; CUDA only)
    cublas     amapo_loss_from_hidden(..., backend="cublas")  (the lm_head products on cuBLAS in fp32 chunks,
               reduced by Triton kernels; CUDA only)
    op_logits  F.linear(hidden, weight) -> amapo_loss_from_logits            (logits materialized, compiled op)
    eager      F.linear(hidden, weight) -> reference.amapo_loss_from_logits  (plain torch, log_softmax copy)
    compile    torch.compile of eager
  peers (CUDA; a peer that cannot run says why in its row):
    cce_filter    Cut Cross-Entropy 25.1.1 linear_cross_entropy(shift=True, reduction="none"), its gradient
                  filter on (filter_eps="high", its default), per-token NLL -> masked mean -> AMaPO loss
    cce_nofilter  the same with filter_eps=None (exact gradient)
    liger_simpo   Liger-Kernel 0.8.5 LigerFusedLinearSimPOLoss (beta=2, gamma=1, no NLL term): its own
                  fused-linear preference loss, SimPO (length-normalized, reference-free as AMaPO)
    trl_chunked   TRL 1.16's chunked log-prob kernel (trl.kernels.ChunkedLogProbFunction) as its DPOTrainer
                  calls it through add_fused_lm_head: scored positions only, chunk 32768 -> AMaPO loss
    floor_4mm     the four matmuls any exact method does (logits, their recompute, grad hidden, grad
                  weight), torch/cuBLAS in the input dtype, over the scored positions only
Logits are peaked like a trained LM's (weight scaled so that logits have std ~4: a few nats of entropy).
Agreement: after its timed runs each method runs once more and its loss and gradients (hidden, weight) are
compared with the plain-PyTorch reference of the same loss (eager: AMaPO, or SimPO for liger_simpo) on the
same inputs; "err vs ref" is the larger relative error, and a row beyond bench_common.AGREEMENT_LIMIT says
it disagrees (the floor computes no loss); for the two gradient filters, whose gradients are approximate by
design, the note gives the gradient's error instead (their loss must still agree).

Time: median over --repeats runs after --warmup (CUDA: torch.cuda.Event pairs; CPU: perf_counter).
Memory, CUDA ("extra MiB"): torch.cuda.max_memory_allocated during one run, less the memory held before it
(the inputs hidden, weight and labels, and the reference results; the previous run's gradients are freed
first) and less the size of hidden's and weight's gradients, which every exact method must write: the peak
a method needs beyond its inputs and their gradients. Every row is charged alike, the floor included (it
keeps no gradients, so its figure is its peak less that size). CPU ("largest MiB"): the largest single
tensor any op returns during the run, the gradients included (a TorchDispatchMode tracker), which bounds
what the run must hold at once from below; it is not a peak-RSS measurement.

    python benchmarks/bench_fused_linear.py                                   # CPU, small sizes
    python benchmarks/bench_fused_linear.py --device cuda --dtype bf16 --json out.json
"""

import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import amapo_kernels as ak  # noqa: E402
from amapo_kernels import reference as ref  # noqa: E402
from amapo_kernels.fused_linear import TOKEN_CHUNK, VOCAB_CHUNK, amapo_loss_from_hidden  # noqa: E402
from amapo_kernels.testing import LargestTensor  # noqa: E402
from bench_common import (AGREEMENT_LIMIT, InputsDoNotFit, Parser, agreement, allocated,  # noqa: E402
                          compiled_for_this_size, cuda_peak_extra_bytes, disagreement, environment, format_error,
                          int_at_least, markdown_table, names_of, output_path, sizes_of, time_ms, unavailable_backend,
                          unless_out_of_memory, write_results)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = {"cpu": "2x128x128x4096,4x256x256x8192", "cuda": "8x1024x4096x32000,8x2048x4096x128256"}
DEFAULT_METHODS = {"cpu": "fused,op_logits,eager",
                   "cuda": "triton,triton_filter,cublas,fused,op_logits,eager,compile,cce_filter,cce_nofilter,liger_simpo,trl_chunked,floor_4mm"}
METHODS = tuple(DEFAULT_METHODS["cuda"].split(","))  # every method has a row on CUDA by default
TRITON_MODULE_METHODS = ("triton", "triton_filter", "cublas")  # our CUDA-only backends (CPU: TRITON_INTERPRET=1)


class PeerUnavailable(Exception):
    """Why a peer has no numbers here (not installed, needs CUDA)."""


def eager_pair_logps(hidden, weight, labels):
    """(chosen, rejected) length-normalized log-probs from all the logits, in plain PyTorch (the reference): the
    logits in the inputs' dtype, their log-softmax in fp32, as bench_from_logits's eager (in bf16, the loss was 9%
    off the fp64 one at 2x128x64x8192, beyond the agreement limit: tests/test_benchmarks.py)."""
    return ref.sequence_logps(F.linear(hidden, weight).float(), labels, shift=True).chunk(2)


def eager_loss(hidden, weight, labels):
    return ref.amapo_loss(*eager_pair_logps(hidden, weight, labels))


def eager_simpo_loss(hidden, weight, labels):
    """The reference of liger_simpo's loss: SimPO with its beta and gamma on eager's log-probs."""
    return ref.preference_loss(*eager_pair_logps(hidden, weight, labels), method="simpo", beta=2.0, gamma=1.0)


_COMPILED = {}


def compiled_eager_loss(hidden, weight, labels):
    if "eager" not in _COMPILED:  # dropped at each size (main)
        _COMPILED["eager"] = compiled_for_this_size(eager_loss)
    return _COMPILED["eager"](hidden, weight, labels)


def masked_mean_loss(token_logps, mask):
    logps = (token_logps.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
    half = logps.shape[0] // 2
    return ak.amapo_loss(logps[:half], logps[half:])


def cce_loss(hidden, weight, labels, filter_eps):
    if not hidden.is_cuda:
        raise PeerUnavailable("Cut Cross-Entropy's kernels are Triton: CUDA only")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as error:
        raise PeerUnavailable(f"cut-cross-entropy not installed ({error}); bash scripts/fetch_peer_wheels.sh") from None
    # with shift and reduction="none", CCE returns [B, T-1]: entry t is the NLL of labels[:, t + 1]
    nll = linear_cross_entropy(hidden, weight, labels, shift=True, reduction="none", filter_eps=filter_eps)
    return masked_mean_loss(-nll, labels[:, 1:] != -100)


def liger_simpo_loss(hidden, weight, labels):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
    except ImportError as error:
        raise PeerUnavailable(f"liger-kernel not installed ({error}); bash scripts/fetch_peer_wheels.sh") from None
    if "simpo" not in _COMPILED:
        _COMPILED["simpo"] = LigerFusedLinearSimPOLoss(beta=2.0, gamma=1.0, compute_nll_loss=False)
    return _COMPILED["simpo"](weight, hidden[:, :-1], labels[:, 1:])[0]


def trl_chunked_loss(hidden, weight, labels):
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError as error:
        raise PeerUnavailable(f"trl 1.16 not installed ({error}); pip install trl==1.16.0") from None
    targets = labels[:, 1:]
    mask = targets != -100
    log_probs = ChunkedLogProbFunction.apply(hidden[:, :-1][mask], weight, None, targets[mask], 1.0,
                                             _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))[0]
    return masked_mean_loss(log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs), mask)


def four_matmuls(hidden, weight, labels):
    """The floor: logits, their recompute, grad hidden, grad weight, over the scored positions (four
    matmuls: until 2026-12-04 this ran the logits matmul twice, five in all; see benchmarks/results/)."""
    with torch.no_grad():
        x = hidden[:, :-1][labels[:, 1:] != -100]
        logits = x @ weight.t()
        x @ weight.t()  # noqa: B018 - the recompute of the backward
        logits @ weight  # grad hidden
        logits.t() @ x  # grad weight


def make_inputs(batch, steps, width, vocab, dtype, device):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, steps, width, generator=generator).to(dtype).to(device)
    weight = (4 * torch.randn(vocab, width, generator=generator) / width**0.5).to(dtype).to(device)
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    labels[:, : steps // 4] = -100  # a prompt
    return hidden.requires_grad_(), weight.requires_grad_(), labels.to(device)


def step_fn(name, hidden, weight, labels, token_chunk, vocab_chunk):
    """One forward + backward of `name`, returning the loss (None for the floor). It accumulates into hidden.grad
    and weight.grad: clear_gradients() must run before it (untimed, and before a memory baseline is read)."""

    def run():
        if name == "floor_4mm":
            four_matmuls(hidden, weight, labels)
            return None
        if name in PEER_LOSSES:
            loss = PEER_LOSSES[name](hidden, weight, labels)
        elif name == "fused":
            loss = amapo_loss_from_hidden(hidden, weight, labels, shift=True, token_chunk=token_chunk,
                                          vocab_chunk=vocab_chunk, backend="torch")
        elif name in TRITON_MODULE_METHODS:
            loss = amapo_loss_from_hidden(hidden, weight, labels, shift=True, backend=name.split("_")[0],
                                          gradient_filter=name == "triton_filter")
        elif name == "op_logits":
            loss = ak.amapo_loss_from_logits(F.linear(hidden, weight), labels, shift=True)
        elif name == "eager":
            loss = eager_loss(hidden, weight, labels)
        else:
            raise ValueError(f"unknown method {name!r}")  # main's parser refuses it: a bug if reached
        loss.backward()
        return loss.detach()

    return run


def clear_gradients(hidden, weight):
    """prepare() of every run: the previous run's gradients freed outside the timing, and before the memory
    baseline is read (held there, they would be subtracted from the run that refills them)."""

    def clear():
        hidden.grad = weight.grad = None

    return clear


def gradient_bytes(hidden, weight):
    """The size of hidden's and weight's gradients: what every exact method must write, left out of "extra"."""
    return sum(tensor.numel() * tensor.element_size() for tensor in (hidden, weight))


def reference_results(loss_fns, hidden, weight, labels):
    """{loss_fn: (loss, (grad hidden, grad weight))} of each reference loss on these inputs, computed before
    the methods run and held through their runs (outside their memory measurements)."""
    results = {}
    for loss_fn in loss_fns:
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        results[loss_fn] = (loss.detach(), (hidden.grad, weight.grad))
    hidden.grad = weight.grad = None
    return results


def errors_against_reference(name, run, prepare, hidden, weight, expected):
    """The agreement of one more run of `name` with its reference loss's results in `expected` (None for the
    floor, which computes no loss, and without reference results)."""
    if name == "floor_4mm" or expected is None:
        return None
    prepare()
    loss = run()
    return agreement(loss, (hidden.grad, weight.grad), *expected[REFERENCE_LOSS.get(name, eager_loss)])


PEER_LOSSES = {
    "compile": compiled_eager_loss,
    "cce_filter": lambda hidden, weight, labels: cce_loss(hidden, weight, labels, "high"),
    "cce_nofilter": lambda hidden, weight, labels: cce_loss(hidden, weight, labels, None),
    "liger_simpo": liger_simpo_loss,
    "trl_chunked": trl_chunked_loss,
}
REFERENCE_LOSS = {"liger_simpo": eager_simpo_loss}  # every other method computes eager_loss's AMaPO
FILTERED = {"triton_filter", "cce_filter"}  # backward tiles of small softmax skipped: approximate gradients


def memory_bytes(run, prepare, device, gradients):
    """CUDA: peak allocated beyond what was held before the run and beyond `gradients` bytes (the size of the
    inputs' gradients; see the module docstring). CPU: the largest tensor created, a gradient included."""
    if device == "cuda":
        return cuda_peak_extra_bytes(run, prepare, gradients)
    prepare()
    with LargestTensor() as tracker:
        run()
    return tracker.largest_bytes


def main(argv=None):
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--sizes", type=sizes_of("BxTxHxV"), help="comma-separated BxTxHxV (B even)")
    parser.add_argument("--methods", type=names_of(METHODS), help="comma-separated; default: " + "; ".join(
        f"{device}: {methods}" for device, methods in DEFAULT_METHODS.items()))
    parser.add_argument("--token-chunk", type=int_at_least(1), default=TOKEN_CHUNK)
    parser.add_argument("--vocab-chunk", type=int_at_least(1), default=VOCAB_CHUNK)
    parser.add_argument("--warmup", type=int_at_least(0), default=3)
    parser.add_argument("--repeats", type=int_at_least(1), default=20)
    parser.add_argument("--json", type=output_path(), help="also write the results here")
    parser.add_argument("--markdown", type=output_path(), help="also write the table, with time ratios to ours (triton on CUDA, fused on the CPU), here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and args.repeats < 20:
        parser.error("--device cuda: use --repeats >= 20")
    methods = args.methods or DEFAULT_METHODS[args.device].split(",")
    dtype = DTYPES[args.dtype]
    for name in (name for name in methods if name in TRITON_MODULE_METHODS):
        reason = unavailable_backend(name.split("_")[0], dtype, args.device, gradient_filter=name == "triton_filter")
        if reason:
            parser.error(f"--methods {name}: {reason}")

    memory = "cuda_peak_extra_bytes" if args.device == "cuda" else "cpu_largest_tensor_bytes"
    env = environment(args.device)
    meta = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__, "memory_metric": memory,
            "token_chunk": args.token_chunk, "vocab_chunk": args.vocab_chunk, "warmup": args.warmup,
            "repeats": args.repeats, "timing": "median", "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "environment": env,
            "memory": ("peak allocated in a run less the inputs (held before it) and less the size of hidden's "
                       "and weight's gradients" if args.device == "cuda" else
                       "the largest single tensor created in a run, a gradient included"),
            "agreement": f"loss and gradients against the reference's, relative; a row beyond {AGREEMENT_LIMIT} "
                         "disagrees"}
    rows = []

    def save(complete):
        meta["triton_autotuned"] = triton_autotuned()
        write_results(args.json, {"meta": meta, "results": rows}, args.markdown,
                      markdown_report(rows, args, env, meta["triton_autotuned"]), complete)

    header = (f"{'B x T x H x V':>24} {'method':>12} {'fwd+bwd ms':>11} {memory_column(args.device):>12} "
              f"{'err vs ref':>10}")
    print(header)
    for size in args.sizes or DEFAULT_SIZES[args.device].split(","):
        batch, steps, width, vocab = map(int, size.split("x"))
        _COMPILED.pop("eager", None)  # compiled anew for this size's shapes
        try:
            hidden, weight, labels = allocated(lambda: make_inputs(batch, steps, width, vocab, dtype, args.device))
        except InputsDoNotFit as reason:  # one row says so; the other sizes still run
            rows.append({"batch": batch, "steps": steps, "width": width, "vocab": vocab, "method": "every method",
                         "ms": None, "memory_bytes": None, "note": str(reason)})
            print(f"{size:>24} {'every method':>12} {reason}", flush=True)
            save(complete=False)
            continue
        references = {REFERENCE_LOSS.get(name, eager_loss) for name in methods if name != "floor_4mm"}
        expected = unless_out_of_memory(lambda: reference_results(references, hidden, weight, labels))
        for name in methods:
            ms, mem, errors, note = measure(name, hidden, weight, labels, expected, args)
            rows.append({"batch": batch, "steps": steps, "width": width, "vocab": vocab, "method": name,
                         "ms": ms, "memory_bytes": mem, "note": note, **(errors or {})})
            shown = (note, "", "") if ms is None else (f"{ms:.2f}", f"{mem / 2**20:.1f}", format_error(errors))
            print(f"{size:>24} {name:>12} {shown[0]:>11} {shown[1]:>12} {shown[2]:>10}", flush=True)
            save(complete=False)
        del expected
    save(complete=True)


def measure(name, hidden, weight, labels, expected, args):
    """(ms, memory bytes, errors against the reference, note) of one method; a peer that cannot run gets
    Nones and the reason in its note, and a peer's failure is its note (ours raise)."""
    run = step_fn(name, hidden, weight, labels, args.token_chunk, args.vocab_chunk)
    prepare = clear_gradients(hidden, weight)
    try:
        ms = time_ms(run, args.device, args.warmup, args.repeats, prepare)
        mem = memory_bytes(run, prepare, args.device, gradient_bytes(hidden, weight))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, None, "OOM"
    except PeerUnavailable as reason:
        return None, None, None, str(reason)
    except Exception as error:  # noqa: BLE001 - a peer's failure goes in its row; ours raises
        if name in ("fused", *TRITON_MODULE_METHODS, "op_logits"):
            raise
        return None, None, None, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    errors = unless_out_of_memory(lambda: errors_against_reference(name, run, prepare, hidden, weight, expected))
    return ms, mem, errors, disagreement(errors, name in FILTERED) if errors else None


def triton_autotuned() -> dict[str, str]:
    """The tiles the autotuner chose in this process: none unless the Triton kernels ran (their module is
    imported on first use; a CPU torch may have no triton at all)."""
    module = sys.modules.get("amapo_kernels.triton_fused_linear")
    return module.autotuned_configs() if module else {}


def ours_method(device):
    """The backend amapo_loss_from_hidden's backend="auto" takes on this device: the baseline of the ratios."""
    return "triton" if device == "cuda" else "fused"


def memory_column(device):
    """The memory column's name: what is measured on `device` (see the module docstring)."""
    return "extra MiB" if device == "cuda" else "largest MiB"


def markdown_report(rows, args, env, autotuned):
    ours = ours_method(args.device)  # what amapo_loss_from_hidden runs by default there
    ours_ms = {(r["batch"], r["steps"], r["width"], r["vocab"]): r["ms"] for r in rows if r["method"] == ours}
    cells = []
    for r in rows:
        baseline = ours_ms.get((r["batch"], r["steps"], r["width"], r["vocab"]))
        ratio = f"{r['ms'] / baseline:.2f}" if r["ms"] and baseline else "-"
        cells.append([f"{r['batch']}x{r['steps']}x{r['width']}x{r['vocab']}", args.dtype, r["method"],
                      "-" if r["ms"] is None else f"{r['ms']:.2f}", ratio,
                      "-" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.1f}", format_error(r),
                      r["note"] or ""])
    header = (f"From hidden states, fwd+bwd, {env.get('gpu', 'CPU')} (driver {env.get('driver', '-')}), torch "
              f"{env['torch']}, {env['date']}\n\n`{env['command']}`\n\n")
    columns = ["B x T x H x V", "dtype", "method", "fwd+bwd ms", f"x {ours}", memory_column(args.device), "err vs ref",
               "note"]
    chosen = "".join(f"- {kernel}: {config}\n" for kernel, config in autotuned.items())
    footer = f"\nTriton tiles the autotuner chose:\n\n{chosen}" if chosen else ""
    return header + markdown_table(columns, cells) + footer


if __name__ == "__main__":
    main()
