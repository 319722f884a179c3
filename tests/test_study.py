"""The miniature study: its command end to end at smoke size, and the pieces its conclusions rest on
(tuned selection on the validation split only, the paired difference, the statistics pool)."""

import dataclasses
import json

import pytest
import torch

from amapo_train import study
from amapo_train.model import tiny_llama
from amapo_train.study import statistics, training
from amapo_train.study.design import BASELINE, CHALLENGERS, METHODS, QUICK, StudyConfig

QUICK_CONFIG = StudyConfig(**QUICK)


def test_quick_study_writes_tables_json_and_plots(tmp_path):
    out = tmp_path / "study"
    assert study.main(["--quick", "--workers", "2", "--out-dir", str(out)]) == 0  # CPU default: worker processes
    report = (out / "results.md").read_text()
    for method in METHODS:
        assert f"| {method.label} |" in report
    for label in CHALLENGERS:
        assert f"| {label} - {BASELINE} |" in report
    for pool in QUICK_CONFIG.pools:
        assert f"| {pool} |" in report
    for split in study.SPLITS:
        assert split in report

    saved = json.loads((out / "results.json").read_text())
    summary, seeds = saved["summary"], len(QUICK_CONFIG.seeds)
    for method in METHODS:
        rows, tuned = summary["grid"][method.label], summary["tuned"][method.label]
        assert [row["setting"] for row in rows] == list(method.grid)
        assert tuned["valid"] == max(row["valid"] for row in rows)  # chosen by validation accuracy
        assert len(tuned["wrong_share"]) == QUICK_CONFIG.pref_steps
        assert all(0.0 <= share <= 1.0 for share in tuned["wrong_share"])
        for split in study.SPLITS:
            stats = tuned[split]
            assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"] and len(stats["per_seed"]) == seeds
    for label in CHALLENGERS:  # the paired difference is of the tuned runs shown in the table
        for split in study.SPLITS:
            expected = [a - b for a, b in zip(summary["tuned"][label][split]["per_seed"],
                                              summary["tuned"][BASELINE][split]["per_seed"])]
            assert summary["paired"][label][split]["per_seed"] == pytest.approx(expected, abs=1e-12)
    by_pool = summary["pools"]["by_pool"]
    assert list(by_pool) == [str(pool) for pool in QUICK_CONFIG.pools]
    full_batch = str(QUICK_CONFIG.batch_pairs)  # the tuned run is the pool of the whole batch
    assert by_pool[full_batch]["ID"] == summary["tuned"][summary["pools"]["method"]]["ID"]
    assert saved["timing"]["runs"] == seeds * (sum(len(m.grid) for m in METHODS) + len(QUICK_CONFIG.pools) - 1)
    for png in ("accuracy.png", "gradient_allocation.png", "paired_difference.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fake_run(valid: float, test: float, pairs: int = 40) -> dict:
    """A run's record whose validation and test accuracies are exactly `valid` and `test`."""
    def correct(accuracy):
        return torch.arange(pairs) < round(accuracy * pairs)

    return {"correct": {"valid": correct(valid), **{split: correct(test) for split in study.SPLITS}},
            "shares": [0.5]}


def test_tuned_setting_is_chosen_on_the_validation_split_only():
    # Setting 1 has the best validation accuracy, the last setting the best test accuracy on every split:
    # choosing on a test split would pick the last one.
    config = dataclasses.replace(QUICK_CONFIG, n_boot=50)
    grid_runs = {}
    for method in METHODS:
        accuracies = [(0.5, 0.6), (0.8, 0.5), (0.7, 0.6)] + [(0.6, 0.9)] * (len(method.grid) - 3)
        grid_runs[method.label] = [[fake_run(valid, test) for _ in config.seeds] for valid, test in accuracies]
    starts = [fake_run(0.5, 0.5) for _ in config.seeds]
    pool_runs = {config.batch_pairs: grid_runs["AMaPO"][1]}
    summary = statistics.summarize(config, starts, grid_runs, pool_runs)
    for method in METHODS:
        tuned = summary["tuned"][method.label]
        assert tuned["setting"] == method.grid[1]
        assert tuned["valid"] == pytest.approx(0.8) and tuned["ID"]["mean"] == pytest.approx(0.5)


def test_selection_ties_go_to_the_first_setting():
    assert statistics.select_setting([[0.7, 0.7], [0.8, 0.6], [0.6, 0.8]]) == 0
    assert statistics.select_setting([[0.5, 0.5], [0.9, 0.7], [0.6, 0.8]]) == 1


def test_paired_difference_worked_example():
    a = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    # Per seed: A 3/4 vs B 1/4 -> +0.5, then 2/4 vs 2/4 -> 0; the mean over seeds is +0.25.
    forward = statistics.paired_difference(a, b, n_boot=2000)
    assert forward["per_seed"] == [0.5, 0.0] and forward["mean"] == 0.25
    assert forward["ci_low"] <= 0.25 <= forward["ci_high"]
    # Per-pair differences lie in {0, +1}, and drawing seed 1 twice (probability 1/4 > 2.5%) gives exactly 0.
    assert forward["ci_low"] == 0.0 and 0.25 < forward["ci_high"] <= 1.0
    backward = statistics.paired_difference(b, a, n_boot=2000)  # same draws: the mirror image
    assert backward["mean"] == -0.25
    assert backward["ci_low"] == pytest.approx(-forward["ci_high"])
    assert backward["ci_high"] == pytest.approx(-forward["ci_low"])
    # One seed, two pairs, differences (1, 0): resampled means 0, 1/2, 1 with probability 1/4, 1/2, 1/4.
    two = statistics.paired_difference(torch.tensor([[1, 1]]), torch.tensor([[0, 1]]), n_boot=2000)
    assert two["mean"] == 0.5 and (two["ci_low"], two["ci_high"]) == (0.0, 1.0)
    # A constant difference has no spread at all.
    constant = statistics.paired_difference(torch.ones(3, 5, dtype=torch.bool), torch.zeros(3, 5, dtype=torch.bool))
    assert (constant["mean"], constant["ci_low"], constant["ci_high"]) == (1.0, 1.0, 1.0)


def test_interval_is_the_2_5_and_97_5_percent_quantiles():
    # One seed of three pairs, two right: a resampled mean is 0, 1/3, 2/3 or 1 with probability 1/27, 6/27, 12/27,
    # 8/27. 1/27 = 3.7% lies between 2.5% and 5%: the 95% interval starts at 0, a 90% one at 1/3.
    values = [[1.0, 1.0, 0.0]]
    wide = statistics.seed_bootstrap(values, n_boot=20000)
    assert (wide["mean"], wide["ci_low"], wide["ci_high"]) == (pytest.approx(2 / 3, rel=1e-12), 0.0, 1.0)
    assert statistics.seed_bootstrap(values, n_boot=20000, confidence=0.9)["ci_low"] == pytest.approx(1 / 3, rel=1e-12)
    mirror = statistics.seed_bootstrap([[0.0, 0.0, 1.0]], n_boot=20000, confidence=0.9)
    assert mirror["ci_high"] == pytest.approx(2 / 3, rel=1e-12)


def test_each_drawn_seed_resamples_its_own_pairs_and_the_seeds_are_resampled():
    # Two seeds, each with pairs (1, 0): the seed draw changes nothing, and the four pair draws (two per drawn
    # seed, independent) give means k/4, k ~ Binomial(4, 1/2): P(0) = 6.25%, P(<= 1/4) = 31.25%, so the 80%
    # interval is [1/4, 3/4]. The same pair draws for both seeds would give {0, 1/2, 1} and [0, 1]; no pair
    # resampling [1/2, 1/2].
    within = statistics.seed_bootstrap([[1.0, 0.0], [1.0, 0.0]], n_boot=20000, confidence=0.8)
    assert (within["ci_low"], within["ci_high"]) == (0.25, 0.75)
    # Seeds (1, 1) and (0, 0): only the seed draw matters, means 1, 1/2, 0 with probability 1/4, 1/2, 1/4.
    across = statistics.seed_bootstrap([[1.0, 1.0], [0.0, 0.0]], n_boot=20000, confidence=0.8)
    assert (across["mean"], across["ci_low"], across["ci_high"]) == (0.5, 0.0, 1.0)


def test_the_seed_picks_the_resamples():
    values = (torch.rand(3, 40, generator=torch.Generator().manual_seed(0)) < 0.6).double()
    one = statistics.seed_bootstrap(values, n_boot=300, seed=1)
    assert one == statistics.seed_bootstrap(values, n_boot=300, seed=1)
    assert (one["ci_low"], one["ci_high"]) != tuple(statistics.seed_bootstrap(values, n_boot=300, seed=2)[key]
                                                    for key in ("ci_low", "ci_high"))


def test_pairing_resolves_a_difference_that_separate_intervals_cannot():
    # B is A with 10 of 200 right answers turned wrong, on each of 3 seeds: +5 points exactly. The accuracies'
    # own intervals overlap widely; the paired interval (same pairs resampled for both) excludes 0.
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 200, generator=generator) < 0.7
    b = a.clone()
    for seed in range(3):
        b[seed, torch.nonzero(a[seed])[:10, 0]] = False
    paired = statistics.paired_difference(a, b)
    assert paired["mean"] == pytest.approx(0.05) and paired["ci_low"] > 0.02
    alone_a, alone_b = statistics.seed_bootstrap(a), statistics.seed_bootstrap(b)
    assert alone_b["ci_high"] > alone_a["ci_low"]


def test_statistics_reject_bad_input():
    with pytest.raises(ValueError, match=r"\[seeds, pairs\]"):
        statistics.seed_bootstrap(torch.ones(4))
    with pytest.raises(ValueError, match="same"):
        statistics.paired_difference(torch.ones(2, 3), torch.ones(2, 4))


@pytest.mark.parametrize("loss, pool_matters", [("simpo", False), ("amapo", True)])
def test_pool_changes_only_the_statistics(loss, pool_matters):
    """Accumulating micro-batches keeps the batch's gradient: for SimPO (no batch statistics) pools of 4 and
    32 give the same gradient; for AMaPO the margin's statistics, and so the gradient, depend on the pool."""
    task = study.Task(QUICK_CONFIG)
    pairs = task.pairs(32, "train", "train", torch.Generator().manual_seed(0))
    model = tiny_llama(QUICK_CONFIG.vocab, seed=0)
    grads = {}
    for pool in (4, 32):
        model.zero_grad()
        training.batch_backward(model, pairs, loss, {"beta": 2.0}, pool, "cpu")
        grads[pool] = torch.cat([p.grad.flatten() for p in model.parameters()])
    close = torch.allclose(grads[4], grads[32], rtol=1e-4, atol=1e-6 * grads[32].abs().max().item())
    assert close != pool_matters


STUDY_MISTAKES = {  # argv -> the start of its one-line message; all refused before any run starts
    ("--scale", "0"): "--scale must be >= 1",
    ("--seeds", "1", "1"): "seeds must be distinct",
    ("--workers", "0"): "--workers must be >= 1",
    ("--device", "foo"): "--device 'foo'",
    # torch parses these names, but the study runs on cpu or cuda only: they failed after the SFT runs started
    ("--device", "meta"): "--device meta: only cpu and cuda are supported",
    ("--device", "mps"): "--device mps: only cpu and cuda are supported",
    # amapo-train's seed range; 2**64 overflowed torch's generator inside the first run (a traceback)
    ("--seeds", str(2**64)): f"--seeds {2**64}: must be in [0, 4294967295]",
    ("--seeds", "-1"): "--seeds -1: must be in [0, 4294967295]",
    ("--out-dir", ""): "--out-dir is empty: give a directory path",  # it wrote the results into the working directory
    ("--workers", "two"): "argument --workers: invalid int value",  # argparse's own errors: one line too
    ("--out-dir", "/dev/null/study"): "--out-dir /dev/null/study: /dev/null is not a directory",
    # a quoted ~user that names nobody (a shell leaves it as it is): pathlib's RuntimeError was a traceback
    ("--out-dir", "~nosuchuser-amapo/study"): "--out-dir ~nosuchuser-amapo/study: no user 'nosuchuser-amapo' here",
    ("--hh-rlhf", "--runs-dir", "/dev/null/runs"): "--runs-dir /dev/null/runs: /dev/null is not a directory",
}


@pytest.mark.parametrize("argv", sorted(STUDY_MISTAKES))
def test_config_and_cli_errors_are_one_line_exit_2(argv, tmp_path, capsys, monkeypatch):
    # A mistake is one line and status 2, never the usage block or a traceback, and it comes before the study
    # runs: run_study would fail the test if it started (an unwritable --out-dir used to fail after the runs).
    monkeypatch.setattr("amapo_train.study.run.run_study", lambda *args: pytest.fail("the study ran"))
    out_dir = [] if "--out-dir" in argv else ["--out-dir", str(tmp_path / "study")]
    assert study.main(["--quick", *out_dir, *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m amapo_train.study: error: " + STUDY_MISTAKES[argv]), lines


def test_config_errors():
    with pytest.raises(ValueError, match="pools must divide"):
        StudyConfig(pools=(4, 12, 32))
    if not torch.cuda.is_available():
        with pytest.raises(study.run.UserError, match="no CUDA device"):
            study.run.run(["--device", "cuda"])


def test_oracle_decides_the_winner():
    task = study.Task(study.StudyConfig())
    for pair in task.pairs(50, "ood", "ood", torch.Generator().manual_seed(3)):
        prompt = torch.tensor(pair["prompt"])
        assert task.reward(prompt, torch.tensor(pair["chosen"])) > task.reward(prompt, torch.tensor(pair["rejected"]))


def test_world_does_not_depend_on_the_global_rng():
    # Worker processes build the task after other work: the world must be the same whatever ran before.
    torch.manual_seed(1)
    first = study.Task(QUICK_CONFIG)
    torch.manual_seed(2)
    torch.rand(100)
    second = study.Task(QUICK_CONFIG)
    assert torch.equal(first.oracle, second.oracle)
    for kind in ("train", "ood"):
        assert torch.equal(first.prompt_profiles[kind], second.prompt_profiles[kind])
        assert all(torch.equal(a, b) for a, b in zip(first.model_profiles[kind], second.model_profiles[kind]))


def test_a_run_is_a_pure_function_of_its_arguments():
    # Jobs run in any order in any worker: the same arguments must give the same run.
    config = dataclasses.replace(QUICK_CONFIG, pref_steps=2)
    start = training.sft_job(config, 0)
    first = training.run_job(config, 0, start, "AMaPO", {"beta": 2.0}, 8)
    training.seed_data.cache_clear()
    torch.manual_seed(123)
    torch.rand(10)
    second = training.run_job(config, 0, start, "AMaPO", {"beta": 2.0}, 8)
    assert first["shares"] == second["shares"]
    assert all(torch.equal(first["correct"][key], second["correct"][key]) for key in first["correct"])


def test_optional_hh_rlhf_part(tmp_path):
    from amapo_train.study import hh_rlhf

    results = hh_rlhf.hh_rlhf_study(tmp_path, ("AMaPO (paper)",), 32, "cpu", log=lambda line: None)
    assert list(results) == ["AMaPO (paper)"]
    assert "| AMaPO (paper) |" in hh_rlhf.markdown(results)


def test_results_md_names_the_command_that_made_it(tmp_path, monkeypatch):
    # The footer said "Regenerate: `python -m amapo_train.study`" whatever the flags, so a --quick (or --seeds,
    # --scale) report told its reader that the default study would give its numbers.
    starts = [fake_run(0.5, 0.5) for _ in QUICK_CONFIG.seeds]
    grid_runs = {m.label: [[fake_run(0.5, 0.5) for _ in QUICK_CONFIG.seeds] for _ in m.grid] for m in METHODS}
    pool_runs = {pool: grid_runs["AMaPO"][0] for pool in QUICK_CONFIG.pools}
    summary = statistics.summarize(QUICK_CONFIG, starts, grid_runs, pool_runs)
    timing = {"runs": 1, "run_seconds_mean": 0.1, "workers": 1, "device": "cpu"}
    monkeypatch.setattr("amapo_train.study.run.run_study", lambda *args: (summary, timing))
    out = tmp_path / "study"
    assert study.main(["--quick", "--seeds", "0", "1", "--out-dir", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert f"Regenerate: `python -m amapo_train.study --quick --seeds 0 1 --out-dir {out}`" in text, text[-300:]
    command = json.loads((out / "results.json").read_text())["command"]
    assert command.endswith(f"--quick --seeds 0 1 --out-dir {out}"), command
