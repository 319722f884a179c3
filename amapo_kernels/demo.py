"""Demo on a built-in batch: every loss through the compiled ops and through the fp64 reference,
with their agreement and timing. `python -m amapo_kernels.demo [--device cuda] [--vocab 32000]`.

The batch is made from a fixed seed: peaked logits like a trained LM's (a low-rank hidden state times a
head, a strong preferred token per position), prompts masked with ignore_index, ragged response lengths,
and a 'reference model' whose logits are a perturbation of the policy's."""

import argparse
import time

import torch

import amapo_kernels as ak
from amapo_kernels import reference
from amapo_kernels.preference import uses_mean_logps

IGNORE = -100


def built_in_batch(pairs, steps, vocab, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rank = 32
    hidden = torch.randn(2 * pairs, steps, rank, generator=generator)
    head = torch.randn(rank, vocab, generator=generator) / rank**0.5
    logits = 3.0 * hidden @ head
    labels = torch.randint(0, vocab, (2 * pairs, steps), generator=generator)
    logits.scatter_add_(-1, labels.unsqueeze(-1), torch.full((2 * pairs, steps, 1), 5.0))  # a fitted policy
    ref_logits = logits + 0.3 * torch.randn(logits.shape, generator=generator)
    prompt = torch.randint(steps // 8, steps // 3, (pairs,), generator=generator).repeat(2)
    length = torch.randint(steps // 2, steps + 1, (2 * pairs,), generator=generator)
    position = torch.arange(steps)
    labels[(position < prompt[:, None]) | (position >= length[:, None])] = IGNORE
    scores = torch.rand(2 * pairs, generator=generator).view(2, pairs).sort(0, descending=True).values
    return logits, ref_logits, labels, {"chosen_scores": scores[0], "rejected_scores": scores[1]}


def timed(fn, repeats):
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats * 1e3


def run_method(method, logits, ref_logits, labels, extras, impl, repeats):
    """Loss and d loss / d logits of one method, from logits, through `impl` (ak or reference)."""
    average = uses_mean_logps(method)
    half = logits.shape[0] // 2
    kwargs = extras if method == "odpo" else {}
    with torch.no_grad():
        ref_logps = impl.sequence_logps(ref_logits, labels, average=average, shift=True).to(
            torch.float64 if logits.dtype == torch.float64 else torch.float32)

    def step():
        leaf = logits.detach().requires_grad_()
        logps = impl.sequence_logps(leaf, labels, average=average, shift=True)
        loss = impl.preference_loss(logps[:half], logps[half:], method=method, ref_chosen_logps=ref_logps[:half],
                                    ref_rejected_logps=ref_logps[half:], **kwargs)
        (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad

    return timed(step, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    logits, ref_logits, labels, extras = built_in_batch(args.pairs, args.steps, args.vocab)
    device = torch.device(args.device)
    logits, ref_logits, labels = logits.to(device), ref_logits.to(device), labels.to(device)
    extras = {name: value.to(device) for name, value in extras.items()}
    print(f"amapo_kernels {ak.__version__} | torch {torch.__version__} | device {device} | "
          f"CUDA kernels built: {ak.has_cuda_kernels()}")
    print(f"built-in batch: {args.pairs} pairs, T={args.steps}, V={args.vocab}, fp32 logits "
          f"({logits.numel() * 4 / 2**20:.0f} MiB), shifted labels, {int((labels != IGNORE).sum())} scored tokens\n")
    header = f"{'method':<10} {'loss (op)':>12} {'loss (fp64 ref)':>16} {'|diff|':>9} {'grad max|diff|':>15} " \
             f"{'op ms':>8} {'eager fp32 ms':>14} {'ref fp64 ms':>12}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for method in ak.METHODS:
        (loss, grad), op_ms = run_method(method, logits, ref_logits, labels, extras, ak, args.repeats)
        (loss64, grad64), ref_ms = run_method(method, logits.double(), ref_logits.double(), labels,
                                              {k: v.double() for k, v in extras.items()}, reference, args.repeats)
        _, eager_ms = run_method(method, logits, ref_logits, labels, extras, reference, args.repeats)
        diff = abs(loss.double() - loss64).item()
        grad_diff = (grad.double() - grad64).abs().max().item()
        worst = max(worst, diff / max(abs(loss64.item()), 1e-30))
        print(f"{method:<10} {loss.item():>12.6f} {loss64.item():>16.6f} {diff:>9.1e} {grad_diff:>15.1e} "
              f"{op_ms:>8.1f} {eager_ms:>14.1f} {ref_ms:>12.1f}")
    print(f"\nworst relative loss difference, op (fp32) vs reference (fp64): {worst:.1e}")
    print("times: fwd+bwd from logits, mean of --repeats after a warm-up; 'eager fp32' is the reference's "
          "plain torch in fp32")
    stats = ak.amapo_loss_from_logits(logits, labels, shift=True, return_stats=True)[1]
    print("AMaPO metrics: " + ", ".join(f"{name}={value.item():.4f}" for name, value in stats.items()
                                        if value.dim() == 0))


if __name__ == "__main__":
    main()
