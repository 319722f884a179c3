"""Small fwd+bwd cases of every CUDA kernel, for compute-sanitizer (memcheck/racecheck/synccheck/initcheck);
scripts/gpu_check.sh runs it under each tool with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that each tensor is
its own allocation (memcheck then sees an out-of-bounds access instead of a neighbour's bytes).
Layouts: V below one block of threads, V = 1, odd V, a strided vocabulary slice, time-major strides, the
in-place backward, T = 1 with shift, rows split across blocks (few rows, large V), out-of-range labels with
check_labels=False, and the AMaPO pair op at 1, 3 and 300 pairs.
Prints one line per case; exits non-zero when a case disagrees with the fp64 reference (a loose smoke
check: the tolerance rule itself is tested by pytest)."""
import sys
import torch
import amapo_kernels as ak
from amapo_kernels import reference as ref
from amapo_kernels.testing import peaked_logits

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
g = torch.Generator().manual_seed(0)
bad = 0


def labels_for(b, t, v, ignore_rows=()):
    lab = torch.randint(0, v, (b, t), generator=g)
    lab[torch.rand(b, t, generator=g) < 0.2] = -100
    for r in ignore_rows:
        lab[r] = -100
    return lab.to(dev)


cases = [  # (B, T, V, dtype, layout, shift, inplace)
    (4, 9, 31, torch.bfloat16, "contig", True, False),      # V < 256: idle lanes in the block merge
    (4, 9, 257, torch.float16, "contig", True, True),       # in-place backward, fp16
    (2, 5, 1, torch.float32, "contig", True, False),        # V = 1
    (4, 7, 1000, torch.float64, "time_major", False, False),
    (4, 6, 32001, torch.bfloat16, "vocab_slice", True, True),  # odd V, strided view, in-place
    (2, 1, 50, torch.float32, "contig", True, False),       # T = 1 with shift: no scored row
]
for b, t, v, dtype, layout, shift, inplace in cases:
    if layout == "time_major":
        x = peaked_logits(t, b, v, dtype=dtype, generator=g, device=dev).transpose(0, 1)
    elif layout == "vocab_slice":
        x = peaked_logits(b, t, v + 5, dtype=dtype, generator=g, device=dev)[:, :, :v]
    else:
        x = peaked_logits(b, t, v, dtype=dtype, generator=g, device=dev)
    lab = labels_for(b, t, v, ignore_rows=[b - 1])
    x64 = x.detach().double().requires_grad_()
    expect = ref.sequence_logps(x64, lab, shift=shift)
    (expect_grad,) = torch.autograd.grad(expect.sum() * 0.5, x64)
    base = x.detach().clone()
    leaf = base.requires_grad_() if not inplace else base.clone().requires_grad_()
    inp = leaf * 1 if inplace else leaf  # a non-leaf, so the in-place backward may overwrite it
    out = ak.sequence_logps(inp, lab, shift=shift, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(out.sum() * 0.5, leaf)
    err = (out.double() - expect).abs().max().item()
    gerr = (grad.double() - expect_grad).abs().max().item()
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    ok = err <= tol * max(1.0, expect.abs().max().item()) and gerr <= tol and torch.isfinite(grad).all()
    bad += not ok
    print(f"{'ok ' if ok else 'BAD'} B={b} T={t} V={v} {str(dtype)[6:]} {layout} shift={shift} inplace={inplace}"
          f" err={err:.2e} grad_err={gerr:.2e}")
# check_labels=False with labels just outside [0, V) (in a split row and in a row of its own block): NaN for
# those sequences and, under memcheck, no read outside the logits
if dev == "cuda":
    for b, t, v in ((2, 3, 32001), (2, 300, 257)):
        x = peaked_logits(b, t, v, dtype=torch.bfloat16, generator=g, device=dev).requires_grad_()
        lab = labels_for(b, t, v)
        lab[0, 1], lab[1, t - 1] = v, -2
        out = ak.sequence_logps(x, lab, shift=True, check_labels=False)
        (grad,) = torch.autograd.grad(out.sum(), x)
        ok = bool(out.isnan().all()) and not bool(torch.isnan(grad).any())
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} B={b} T={t} V={v} check_labels=False, labels V and -2: NaN log-probs")
# the AMaPO pair op, B = 1 (zero spread), 3 and 300 pairs (> one block of threads)
for n in (1, 3, 300):
    c = (torch.randn(n, generator=g) - 1).to(dev).requires_grad_()
    r = (torch.randn(n, generator=g) - 1.2).to(dev).requires_grad_()
    loss = ak.amapo_loss(c, r)
    gc, gr = torch.autograd.grad(loss, (c, r))
    c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    l64 = ref.amapo_loss(c64, r64)
    g64 = torch.autograd.grad(l64, (c64, r64))
    e = max(abs(loss.item() - l64.item()), (gc.double() - g64[0]).abs().max().item())
    ok = e < 1e-5
    bad += not ok
    print(f"{'ok ' if ok else 'BAD'} amapo pairs={n} err={e:.2e}")
if dev == "cuda":
    torch.cuda.synchronize()
sys.exit(1 if bad else 0)
