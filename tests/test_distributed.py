"""Batch statistics over ranks (AMaPO's mean and std, alpha-DPO's z-score, KTO's reference point): 2 CPU
processes (gloo) give the loss and gradients of the same pairs on one process. Shards of unequal size: the global mean loss is sum_r (B_r / B) * loss_r and
each pair's global gradient is (B_r / B) times its rank-local one (so plain gradient averaging over ranks
is the global-mean gradient only when every B_r is equal)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import exact_amapo, peaked_logits, random_labels, small_spread_pairs

import amapo_kernels as ak

SHARDS = (3, 5)  # pairs per rank
STEPS, VOCAB = 6, 29


def global_batch():
    generator = torch.Generator().manual_seed(21)
    pairs = sum(SHARDS)
    chosen = torch.randn(pairs, generator=generator, dtype=torch.float64) - 1.0
    rejected = torch.randn(pairs, generator=generator, dtype=torch.float64) - 1.4
    logits = peaked_logits(2 * pairs, STEPS, VOCAB, dtype=torch.float32, generator=generator)
    labels = random_labels(2 * pairs, STEPS, VOCAB, ignore_prob=0.2, generator=generator)
    return chosen.float(), rejected.float(), logits, labels


# The baselines whose pair losses use the whole batch, with hyperparameters where per-rank statistics would
# show: KTO's default beta = 0.1 keeps its loss nearly linear in the reference points, where the weighted
# local means add up to the global one.
BATCH_STATISTICS_BASELINES = {"alpha_dpo": {}, "kto": {"beta": 5.0}}
RUNNING = "alpha_dpo_running"  # decay > 0: running statistics over two batches of every rank


def reference_logps(chosen, rejected):
    """Reference log-probs for the baselines' pairs: log-ratios that spread and are mostly positive (KTO
    clamps its reference points at 0); a function of each pair alone, so that a rank's shard of them is the
    shard of the global batch's."""
    return chosen - 0.5 - 0.3 * torch.sin(5 * chosen), rejected - 0.2 - 0.3 * torch.cos(5 * rejected)


def shard(rank):
    start = sum(SHARDS[:rank])
    return slice(start, start + SHARDS[rank])


def concatenated(logits, labels, pairs):
    """Rows of the chosen and rejected responses of `pairs`, chosen first (TRL's concatenated layout)."""
    half = logits.shape[0] // 2
    rows = torch.cat([torch.arange(half)[pairs], half + torch.arange(half)[pairs]])
    return logits[rows], labels[rows]


def losses_and_grads(chosen, rejected, logits, labels):
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss = ak.amapo_loss(c, r, beta=2.0, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, (c, r))
    x = logits.clone().requires_grad_()
    logits_loss = ak.amapo_loss_from_logits(x, labels, beta=2.0, shift=True, variant="paper")
    (logits_grad,) = torch.autograd.grad(logits_loss, x)
    result = {"loss": loss, "grads": grads, "logits_loss": logits_loss, "logits_grad": logits_grad}
    ref_chosen, ref_rejected = reference_logps(chosen, rejected)
    for method in BATCH_STATISTICS_BASELINES:
        c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
        method_loss = ak.preference_loss(c, r, method=method, ref_chosen_logps=ref_chosen,
                                         ref_rejected_logps=ref_rejected, **BATCH_STATISTICS_BASELINES[method])
        result[method] = method_loss
        result[f"{method}_grads"] = torch.autograd.grad(method_loss, (c, r))
    running = ak.RunningStatistics()  # alpha_dpo's running statistics: the second batch's z-scores take both
    for moved in (0.0, 0.3):
        c, r = (chosen + moved * torch.sin(3 * chosen)).requires_grad_(), rejected.clone().requires_grad_()
        result[RUNNING] = ak.preference_loss(c, r, method="alpha_dpo", ref_chosen_logps=ref_chosen,
                                             ref_rejected_logps=ref_rejected, decay=0.5, running=running)
    result[f"{RUNNING}_grads"] = torch.autograd.grad(result[RUNNING], (c, r))
    result["running_state"] = running.mean_std
    return result


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        chosen, rejected, logits, labels = global_batch()
        pairs = shard(rank)
        result = losses_and_grads(chosen[pairs], rejected[pairs], *concatenated(logits, labels, pairs))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    world = len(SHARDS)
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    chosen, rejected, logits, labels = global_batch()
    single = losses_and_grads(chosen, rejected, logits, labels)
    total = sum(SHARDS)
    weights = [pairs / total for pairs in SHARDS]

    for key in ("loss", "logits_loss", *BATCH_STATISTICS_BASELINES, RUNNING):
        combined = sum(w * result[key] for w, result in zip(weights, ranks))
        torch.testing.assert_close(combined, single[key], rtol=1e-6, atol=1e-7)
    for result in ranks:  # every rank holds the same state, the one process's
        torch.testing.assert_close(result["running_state"], single["running_state"], rtol=1e-12, atol=0)
    for key in ("grads", *(f"{method}_grads" for method in (*BATCH_STATISTICS_BASELINES, RUNNING))):
        for side in (0, 1):
            combined = torch.cat([w * result[key][side] for w, result in zip(weights, ranks)])
            torch.testing.assert_close(combined, single[key][side], rtol=1e-6, atol=1e-9)
    for rank, (w, result) in enumerate(zip(weights, ranks)):
        expected, _ = concatenated(single["logits_grad"], labels, shard(rank))
        torch.testing.assert_close(w * result["logits_grad"], expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", ["amapo", *BATCH_STATISTICS_BASELINES])
def test_statistics_are_global_not_local(method):
    """Guard against a test that cannot fail: per-rank statistics would give a different loss here (as
    alpha-DPO's and KTO's did before they gathered theirs)."""
    chosen, rejected, _, _ = global_batch()
    ref_chosen, ref_rejected = reference_logps(chosen, rejected)

    def loss_of(pairs):
        references = {} if method == "amapo" else {"ref_chosen_logps": ref_chosen[pairs],
                                                     "ref_rejected_logps": ref_rejected[pairs]}
        hparams = {"beta": 2.0, "label_smoothing": 0.1} if method == "amapo" else BATCH_STATISTICS_BASELINES[method]
        return ak.preference_loss(chosen[pairs], rejected[pairs], method=method, **references, **hparams)

    weights = [pairs / sum(SHARDS) for pairs in SHARDS]
    combined_local = sum(w * loss_of(shard(rank)) for rank, w in enumerate(weights))
    assert abs(combined_local.item() - loss_of(slice(None)).item()) > 1e-4


EXACT_SHARDS = (2, 4)  # unequal: 6 pairs, as the one-process exact test (tests/test_exact_amapo.py)
EXACT_CASES = [(spread, variant) for spread in (1e-2, 1e-4, 1e-6) for variant in ak.VARIANTS]


def exact_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start = sum(EXACT_SHARDS[:rank])
        pairs = slice(start, start + EXACT_SHARDS[rank])
        results = []
        for spread, variant in EXACT_CASES:
            chosen, rejected = small_spread_pairs(spread, seed=int(spread**-0.5))
            c, r = chosen[pairs].clone().requires_grad_(), rejected[pairs].clone().requires_grad_()
            loss = ak.amapo_loss(c, r, beta=2.0, label_smoothing=0.1, variant=variant)
            results.append((loss.detach(), torch.autograd.grad(loss, c)[0]))
        torch.save(results, os.path.join(out_dir, f"exact{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_are_exact_at_small_spreads(tmp_path):
    """Chan's combine over 2 gloo ranks with unequal shards: the global loss sum_r (B_r / B) loss_r and the
    gradients (B_r / B) grad_r agree with the exact computation to 1e-12 relative at spreads down to 1e-6."""
    world = len(EXACT_SHARDS)
    mp.spawn(exact_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"exact{rank}.pt") for rank in range(world)]
    weights = [pairs / sum(EXACT_SHARDS) for pairs in EXACT_SHARDS]
    for case, (spread, variant) in enumerate(EXACT_CASES):
        chosen, rejected = small_spread_pairs(spread, seed=int(spread**-0.5))
        exact_loss, exact_grads = exact_amapo(chosen, rejected, beta=2.0, label_smoothing=0.1, variant=variant)
        loss = sum(w * result[case][0].item() for w, result in zip(weights, ranks))
        grads = torch.cat([w * result[case][1] for w, result in zip(weights, ranks)]).tolist()
        assert loss == pytest.approx(exact_loss, rel=1e-12, abs=0), (spread, variant)
        assert grads == pytest.approx(exact_grads, rel=1e-12, abs=0), (spread, variant)


def own_pairs_losses(chosen, rejected, **keywords):
    """AMaPO's and the batch-statistics baselines' losses and chosen gradients over the pairs given."""
    ref_chosen, ref_rejected = reference_logps(chosen, rejected)
    results = {}
    for method, hparams in {"amapo": {}, **BATCH_STATISTICS_BASELINES}.items():
        references = {} if method == "amapo" else {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        c = chosen.clone().requires_grad_()
        loss = ak.preference_loss(c, rejected, method=method, **references, **hparams, **keywords)
        results[method] = (loss.detach(), torch.autograd.grad(loss, c)[0])
    return results


def subgroup_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        groups = [dist.new_group([other]) for other in range(world)]  # every rank creates every group
        chosen, rejected, _, _ = global_batch()
        results = own_pairs_losses(chosen[shard(rank)], rejected[shard(rank)], group=groups[rank])
        torch.save(results, os.path.join(out_dir, f"subgroup{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_group_restricts_the_statistics_to_its_ranks(tmp_path):
    """group= names the ranks whose pairs share the batch statistics: with each of 2 gloo ranks in a group of its
    own, a rank's loss and gradients are those of its pairs alone on one process, not the world's batch's (which
    the default group gives, and which differ: test_statistics_are_global_not_local)."""
    world = len(SHARDS)
    mp.spawn(subgroup_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    chosen, rejected, _, _ = global_batch()
    for rank in range(world):
        ranks_results = torch.load(tmp_path / f"subgroup{rank}.pt")
        alone = own_pairs_losses(chosen[shard(rank)], rejected[shard(rank)])
        for method, (loss, grad) in ranks_results.items():
            torch.testing.assert_close(loss, alone[method][0], rtol=1e-14, atol=0)
            torch.testing.assert_close(grad, alone[method][1], rtol=1e-14, atol=0)


def test_dtensor_inputs_of_the_fused_lm_head_are_refused_by_name(tmp_path):
    """FSDP2 and tensor parallelism hold the lm_head weight as a DTensor (outside the model's forward, a shard):
    passed to the fused lm_head it is refused with an error naming the argument, not a failure inside the tiles'
    matmul ("got mixed torch.Tensor and DTensor") or at the Triton launch; its full_tensor() gives the plain
    weight's loss, and the gradient reaches the sharded parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        generator = torch.Generator().manual_seed(22)
        hidden = torch.randn(4, STEPS, 8, generator=generator)
        weight = torch.randn(VOCAB, 8, generator=generator) / 8**0.5
        labels = random_labels(4, STEPS, VOCAB, ignore_prob=0.2, generator=generator)
        sharded = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
        refused = {"lm_head_weight": (hidden, sharded, labels),
                   "hidden": (distribute_tensor(hidden, mesh, [Replicate()]), weight, labels)}
        for name, args in refused.items():
            with pytest.raises(TypeError, match=f"{name} is a DTensor"):
                ak.amapo_loss_from_hidden(*args, shift=True)
            with pytest.raises(TypeError, match=f"{name} is a DTensor"):
                ak.sequence_logps_from_hidden(*args, shift=True)
        loss = ak.amapo_loss_from_hidden(hidden, sharded.full_tensor(), labels, shift=True)
        plain = weight.clone().requires_grad_()
        expected = ak.amapo_loss_from_hidden(hidden, plain, labels, shift=True)
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        loss.backward()
        expected.backward()
        torch.testing.assert_close(sharded.grad.full_tensor(), plain.grad, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
