"""Statistics of a per-pair quantity over the batch of every data-parallel rank, for the losses that
normalize by the batch (AMaPO's mean and std of d, alpha-DPO's z-score of its log-ratio gap, KTO's reference
point). As the authors' trainers gather the quantity from every process, so do these: each rank's
(count, pivot, mean offset, M2) are all-gathered in float64 (4 numbers per rank) and merged with Chan et al.'s
parallel-variance formula; on one process the rank's own row is the batch's. Everything here is detached:
the statistics carry no gradient, in every method that uses them."""

import contextlib

import torch
import torch.distributed as dist


def resolve_group(group):
    """The process group whose pairs share the batch statistics (the world if one is initialized), or None
    when that group is one process."""
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if group is None or dist.get_world_size(group) == 1:
        return None
    return group


def local_moments(values: torch.Tensor) -> torch.Tensor:
    """float64 [count, pivot, mean offset, M2] of this rank's values, two-pass around a pivot taken from the
    data (its first element), so that M2 and every gap to the mean keep full relative precision at any spread.
    The pivot is kept finite (0 in place of a non-finite first element) so that a non-finite value has the
    formula's effect: with d = +inf the mean is +inf (the offset), every finite d is below it, and M2 is NaN
    (an infinite pivot would make every gap NaN)."""
    count = values.numel()
    pivot = values[:1].nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).sum()  # 0 for an empty shard too
    deviations = values - pivot
    offset = deviations.sum() / max(count, 1)
    m2 = ((deviations - offset) ** 2).sum()
    return torch.stack([torch.full_like(pivot, count), pivot, offset, m2])


def combine_moments(moments: torch.Tensor) -> torch.Tensor:
    """Chan et al.'s parallel combine of per-rank rows [count, pivot, mean offset, M2] ([R, 4]) into one row:
    M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2, all around the pivot of the largest shard."""
    counts, pivots, offsets, m2s = moments.unbind(1)
    pivot = pivots.gather(0, counts.argmax(0, keepdim=True)).squeeze(0)
    means = (pivots - pivot) + offsets  # each rank's mean, as an offset from the common pivot
    total = counts.sum()
    offset = (counts * means).sum() / total.clamp(min=1)
    m2 = m2s.sum() + (counts * (means - offset) ** 2).sum()
    return torch.stack([total, pivot, offset, m2])


def gathered_moments(values: torch.Tensor, group=None) -> torch.Tensor:
    """float64 [count, pivot, mean offset, M2] of `values` (detached) over every rank of `group`: one
    all-gather of 4 numbers per rank, then Chan's combine. The mean is pivot + offset, the unbiased variance
    M2 / (count - 1)."""
    moments = local_moments(values.detach().double())
    group = resolve_group(group)
    if group is None:  # one rank: its row is the batch's (the combine would only add 18 tiny kernels)
        return moments
    from torch.distributed import _functional_collectives as funcol

    # all_gather_single is the name from torch 2.14 on (all_gather_tensor warns there); 2.11 has only the other
    all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return combine_moments(all_gather(moments[None], 0, group))


def mean(values: torch.Tensor, group=None) -> torch.Tensor:
    """The float64 mean of `values` (detached) over every rank of `group` (0 for an empty batch)."""
    _, pivot, offset, _ = gathered_moments(values, group).unbind()
    return pivot + offset


def z_scores(values: torch.Tensor, group=None) -> torch.Tensor:
    """(values - mean) / std in float64 (detached), mean and unbiased std over every rank of `group`; 0 where
    the batch has no spread (fewer than 2 values, or all equal: M2 is then exactly 0). A non-finite value
    makes M2 NaN, and so every z-score: it is not taken for "no spread"."""
    count, pivot, offset, m2 = gathered_moments(values, group).unbind()
    deviations = (values.detach().double() - pivot) - offset
    no_spread = (count < 2) | (m2 == 0)
    std = torch.sqrt(m2 / (count - 1).clamp(min=1))
    return torch.where(no_spread, torch.zeros_like(deviations), deviations / std)


class RunningStatistics:
    """A decayed running mean and std of a per-pair quantity over the batches seen so far, as alpha-DPO's
    official trainer keeps them for M (its update_and_sync_ref_mean_std): after each batch (the pairs of every
    rank of `group`), mean <- decay * mean + (1 - decay) * the batch's mean, std likewise with the batch's
    unbiased std, both starting from 0 without bias correction (after the first batch they are 1 - decay times
    its own). Two departures, both where the official code gives NaN or changes state outside training: a batch
    of fewer than 2 values (no std) leaves the state as it is, and a running std of 0 (every batch so far
    without spread, e.g. a policy still equal to its reference) gives z-scores of 0, as the batch form does.
    Inside `frozen()` (evaluation) the state is read, not updated; the official trainer updates it in
    evaluation too. The state is two float64 numbers: state_dict() / load_state_dict() carry it across a
    checkpoint (accelerate's register_for_checkpointing takes the object as it is)."""

    def __init__(self):
        self.mean_std = torch.zeros(2, dtype=torch.float64)  # [mean, std]
        self.updating = True

    @contextlib.contextmanager
    def frozen(self):
        """z-scores from the state as it is, without updating it (evaluation)."""
        updating, self.updating = self.updating, False
        try:
            yield self
        finally:
            self.updating = updating

    def z_scores(self, values: torch.Tensor, decay: float, group=None) -> torch.Tensor:
        """(values - mean) / std in float64 (detached) with the running mean and std after this batch's
        update (decay: the weight of the state so far, in [0, 1)); 0 where the running std is 0."""
        transformed = not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(values)
        if self.updating and transformed:  # (the compiler cannot trace the check, and compiles no such tensor)
            # vmap would keep a BatchedTensor as the state (one state for several batches), grad a wrapper that
            # dies with the transform
            raise NotImplementedError("RunningStatistics under a torch.func transform (vmap, grad): its state "
                                      "cannot be updated there; update it outside (frozen() reads it inside)")
        self.mean_std = self.mean_std.to(values.device)
        if self.updating:
            count, pivot, offset, m2 = gathered_moments(values, group).unbind()
            batch = torch.stack([pivot + offset, torch.sqrt(m2 / (count - 1).clamp(min=1))])
            updated = decay * self.mean_std + (1 - decay) * batch
            self.mean_std = torch.where(count >= 2, updated, self.mean_std)  # no host sync
        mean, std = self.mean_std.unbind()
        deviations = values.detach().double() - mean
        return torch.where(std == 0, torch.zeros_like(deviations), deviations / std)

    def state_dict(self) -> dict:
        return {"mean": self.mean_std[0].item(), "std": self.mean_std[1].item()}

    def load_state_dict(self, state: dict) -> None:
        self.mean_std = torch.tensor([state["mean"], state["std"]], dtype=torch.float64)
