"""amapo-train's user errors, through the console script: one line on stderr, exit status 2, no traceback,
before any model or data is loaded (so also under --dry-run)."""

import shutil
import subprocess
import sys
from pathlib import Path

import importlib.util
import os
import json

import pytest
import torch

from amapo_train.command_line import STATE_FILE, check_resume
from amapo_train.config import TrainConfig, UserError
from amapo_train.train import cli, dry_run

SCRIPT = shutil.which("amapo-train", path=str(Path(sys.executable).parent))

MISTAKES = {
    "bad loss": (["--loss", "nope"], "argument --loss: invalid choice: 'nope'"),
    "missing data file": (["--dataset", "/nonexistent/pairs.jsonl"], "--dataset /nonexistent/pairs.jsonl: no such file"),
    "missing eval file": (["--eval-dataset", "missing.jsonl"], "--eval-dataset missing.jsonl: no such file"),
    "missing resume directory": (["--resume", "/nonexistent/checkpoint-3"], "--resume /nonexistent/checkpoint-3: no such"),
    "missing local model": (["--model", "./no-such-model"], "--model ./no-such-model: no such directory"),
    "unknown random shape": (["--model", "random:llama9"], "--model random:llama9: unknown shape 'llama9'"),
    "hparam of the wrong type": (["--hparam", "beta=high"], "--hparam beta=high: expected a float"),
    "hparam without a value": (["--hparam", "beta"], "expected NAME=VALUE"),
    "hparam value outside its range": (["--loss", "dpo", "--hparam", "beta=-1"], "beta must be a finite number in (0.0, inf)"),
    # beyond float32, the dtype of a reference-free loss here: a traceback at the first step, --dry-run passed it
    "hparam beyond the loss's dtype": (["--loss", "simpo", "--hparam", "beta=1e39"],
                                       "method='simpo': beta must be within torch.float32's range"),
    "odpo scores given as hparam": (["--loss", "odpo", "--hparam", "chosen_scores=1"], "--chosen-score-column"),
    "score column without odpo": (["--chosen-score-column", "s"], "are for --loss odpo"),
    "eval fraction out of range": (["--eval-fraction", "1.5"], "--eval-fraction must be in (0, 1)"),
    "on/off booleans only": (["--bf16", "yes"], "argument --bf16: expected one of"),
    "bad recipe": (["--recipe", "nope"], "no recipe 'nope'"),
    # a ~user that names nobody (a shell leaves it as it is): pathlib's RuntimeError was a traceback
    "output in the home of no user": (["--output-dir", "~nosuchuser-amapo/run"],
                                      "--output-dir ~nosuchuser-amapo/run: no user 'nosuchuser-amapo' here"),
    "data in the home of no user": (["--dataset", "~nosuchuser-amapo/pairs.jsonl"],
                                    "--dataset ~nosuchuser-amapo/pairs.jsonl: no user 'nosuchuser-amapo' here"),
    "model in the home of no user": (["--model", "~nosuchuser-amapo/model"],
                                     "--model ~nosuchuser-amapo/model: no user 'nosuchuser-amapo' here"),
    # a split or a name the bundled data does not have: --show-examples gave a traceback, --dry-run passed it
    "bundled split that does not exist": (["--train-split", "nope"], "--dataset bundled:hh-rlhf split 'nope': "
                                          "bundled:hh-rlhf has the splits 'train' and 'test', not 'nope'"),
    "bundled test split that does not exist": (["--test-split", "validation"],
                                               "--dataset bundled:hh-rlhf split 'validation': bundled:hh-rlhf has"),
    "bundled eval split that does not exist": (["--eval-dataset", "bundled:hh-rlhf", "--train-split", "test",
                                                "--test-split", "dev"], "--eval-dataset bundled:hh-rlhf split 'dev':"),
    "no such bundled dataset": (["--dataset", "bundled:nope"],
                                "--dataset bundled:nope split 'train': no bundled dataset 'nope'"),
    "hparam the method does not take": (["--hparam", "gamma=1.0"], "'gamma' is not a hyperparameter of amapo"),
    "bad boolean": (["--bf16", "maybe"], "argument --bf16: expected one of"),
    "bad tracker": (["--log-with", "foo"], "argument --log-with: invalid choice"),
    "bad batch arithmetic": (["--total-batch-size", "30", "--per-device-batch-size", "16"], "not a multiple"),
    "unknown attention": (["--attn-implementation", "flash"],  # checked before the model loads
                          "--attn-implementation must be one of ['eager', "),
    "fused under plain DDP": (["--loss-impl", "fused", "--world-size", "2"],  # the decoder would run outside DDP
                              "--loss-impl fused with 2 processes needs --deepspeed (zero2 or zero3)"),
}

if not torch.cuda.is_available():  # no silent CPU fallback
    MISTAKES["cuda without a GPU"] = (["--device", "cuda"], "--device cuda: no CUDA device")
if importlib.util.find_spec("wandb") is None:  # no warning-and-carry-on
    MISTAKES["wandb not installed"] = (["--log-with", "wandb"], "--log-with wandb: `wandb` is not installed")


@pytest.mark.skipif(SCRIPT is None, reason="the amapo-train console script is not installed in this venv")
@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_user_error_is_one_line_and_status_2(name):
    args, message = MISTAKES[name]
    run = subprocess.run([SCRIPT, *args, "--dry-run"], capture_output=True, text=True, timeout=120)
    lines = [line for line in run.stderr.splitlines() if line.strip() and "Warning" not in line
             and "[WARNING]" not in line]
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("amapo-train: error:") and message in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def test_paths_in_the_home_are_expanded_once_from_a_recipe_or_the_command_line(tmp_path, monkeypatch):
    """A ~ that reaches amapo-train unexpanded (a recipe's `output_dir: ~/runs/x`, a quoted flag) was checked as
    $HOME/runs/x and written to ./~/runs/x: the config's paths are expanded once, where it is read."""
    from amapo_train.command_line import build_parser, config_from_args

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: ~/runs/x\ndataset: ~/pairs.jsonl\nmodel: ~/model\ndeepspeed: ~/ds.json\n")
    config = config_from_args(build_parser("").parse_args(["--recipe", str(recipe), "--eval-dataset", "~/eval.jsonl"]))
    assert (config.output_dir, config.dataset, config.eval_dataset, config.model, config.deepspeed) == (
        str(home / "runs/x"), str(home / "pairs.jsonl"), str(home / "eval.jsonl"), str(home / "model"),
        str(home / "ds.json"))
    (home / "r.yaml").parent.mkdir()
    (home / "r.yaml").write_text("loss: simpo\n")
    config = config_from_args(build_parser("").parse_args(["--recipe", "~/r.yaml", "--model", "random:llama3-tiny"]))
    assert (config.loss, config.output_dir, config.model) == ("simpo", TrainConfig.output_dir, "random:llama3-tiny")


def test_a_run_writes_where_its_home_path_was_checked(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert cli(["--output-dir", "~/run", "--max-steps", "2", "--stop-after-steps", "1", "--max-train-pairs", "64",
                "--max-test-pairs", "8"]) == 0
    assert (home / "run" / "metrics.jsonl").is_file() and list(cwd.iterdir()) == []
    with pytest.raises(UserError, match=f"--resume {home}/run/checkpoint-9: no such directory"):
        check_resume("~/run/checkpoint-9", TrainConfig())
    run_config = TrainConfig.from_recipe("tiny", output_dir=str(home / "run"), max_steps=2, max_train_pairs=64,
                                         max_test_pairs=8)
    assert check_resume("~/run/checkpoint-1", run_config) == str(home / "run/checkpoint-1")


def test_a_split_the_run_does_not_read_is_not_checked(capsys):
    """The held-out pairs come from --eval-fraction of the training split: the test split is not read."""
    assert cli(["--eval-fraction", "0.1", "--test-split", "dev", "--dry-run"]) == 0


def test_show_examples_of_a_split_the_bundled_data_lacks_is_one_line(capsys):
    assert cli(["--train-split", "nope", "--show-examples", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "amapo-train: error: --dataset bundled:hh-rlhf split 'nope': bundled:hh-rlhf has the splits 'train' and "
        "'test', not 'nope'"]


def test_every_flag_has_help_and_shows_its_default_and_choices():
    import dataclasses

    from amapo_train import train
    from amapo_train.command_line import CHOICES, build_parser
    from amapo_train.config import TrainConfig

    defaults = TrainConfig()
    parser = build_parser(train.__doc__)
    assert all(action.help for action in parser._actions)
    flags = {action.dest: action for action in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        if field.name != "hparams" and getattr(defaults, field.name) is not None:
            assert "default" in flags[field.name].help, field.name
    assert all(flags[name].choices == choices for name, choices in CHOICES.items())


VALUE_MISTAKES = {  # a value outside what its flag takes; run in process (amapo_train.train.cli)
    "negative learning rate": (["--learning-rate", "-1"], "--learning-rate -1.0: must be >= 0"),
    "NaN learning rate": (["--learning-rate", "nan"], "--learning-rate nan: must be a finite number"),
    "no pair per device": (["--per-device-batch-size", "0"], "--per-device-batch-size 0: must be >= 1"),
    "no pair per step": (["--total-batch-size", "0"], "--total-batch-size 0: must be >= 1"),
    "no epoch": (["--epochs", "0"], "--epochs 0: must be >= 1"),
    "no step": (["--max-steps", "0"], "--max-steps 0: must be >= 1"),
    "warm-up beyond the run": (["--warmup-ratio", "2"], "--warmup-ratio 2.0: must be in [0, 1]"),
    "negative weight decay": (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be >= 0"),
    "negative clipping norm": (["--max-grad-norm", "-1"], "--max-grad-norm -1.0: must be >= 0"),
    "negative seed": (["--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
    "seed beyond 32 bits": (["--seed", str(2**32)], "--seed 4294967296: must be in [0, 4294967295]"),
    "no held-out pair per pass": (["--eval-batch-size", "0"], "--eval-batch-size 0: must be >= 1"),
    "no training pair": (["--max-train-pairs", "0"], "--max-train-pairs 0: must be >= 1"),
    "no held-out pair": (["--max-test-pairs", "0"], "--max-test-pairs 0: must be >= 1"),
    "no process": (["--num-processes", "0"], "--num-processes 0: must be >= 1"),
    "prompt as long as the pair": (["--max-length", "64", "--max-prompt-length", "64"],
                                   "--max-prompt-length 64 must lie in [1, --max-length 64)"),
    "no prompt token": (["--max-prompt-length", "0"], "--max-prompt-length 0 must lie in [1, --max-length"),
    "no process planned": (["--world-size", "0"], "--world-size 0: must be >= 1"),
    "no example": (["--show-examples", "0"], "--show-examples 0: must be >= 1"),
    "stop before the first step": (["--stop-after-steps", "-1"], "--stop-after-steps -1: must be >= 1"),
    "a device the driver does not place on": (["--device", "mps"], "argument --device: invalid choice: 'mps'"),
    "a GPU index (CUDA_VISIBLE_DEVICES picks it)": (["--device", "cuda:1"], "argument --device: invalid choice"),
    "held-out split that is the training split": (["--eval-dataset", "bundled:hh-rlhf", "--test-split", "train"],
                                                 "--eval-dataset bundled:hh-rlhf is the training data"),
    "two held-out sources": (["--eval-dataset", "bundled:hh-rlhf", "--eval-fraction", "0.1"],
                             "give --eval-dataset or --eval-fraction, not both"),
    "every record held out": (["--eval-fraction", "1"], "--eval-fraction must be in (0, 1), got 1.0"),
    # AMaPO's mean/std and alpha-DPO's z-score span one micro-batch of every process: over one pair every z-score
    # is 0, and AMaPO would train without its margin
    "AMaPO's statistics over one pair": (["--per-device-batch-size", "1", "--total-batch-size", "16"],
                                         "--per-device-batch-size 1 with 1 process(es): loss='amapo' takes z-scores"),
    "alpha-DPO's z-score over one pair": (["--loss", "alpha_dpo", "--per-device-batch-size", "1",
                                           "--total-batch-size", "16"], "so over 1 pair, where every z-score is 0"),
    "the 8B recipe on one process": (["--recipe", "llama3-8b-base", "--world-size", "1"],
                                     "--per-device-batch-size 1 with 1 process(es): loss='amapo'"),
    "AMaPO's held-out loss over one pair": (["--eval-batch-size", "1", "--eval-steps", "5"],
                                            "--eval-batch-size 1 with 1 process(es): loss='amapo'"),
    # running statistics are updated by training batches: one of one pair never would
    "alpha-DPO's running statistics from one-pair batches": (
        ["--loss", "alpha_dpo", "--hparam", "decay=0.9", "--per-device-batch-size", "1", "--total-batch-size", "16"],
        "--per-device-batch-size 1 with 1 process(es): loss='alpha_dpo'"),
}


def assert_one_line_error(status, stderr, message):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("amapo-train: error:") and message in lines[0], stderr


@pytest.mark.parametrize("name", sorted(VALUE_MISTAKES))
def test_value_outside_what_its_flag_takes_is_a_user_error(name, capsys):
    from amapo_train.train import cli

    args, message = VALUE_MISTAKES[name]
    status = cli([*args, "--dry-run"])
    assert_one_line_error(status, capsys.readouterr().err, message)


def test_boundary_numbers_are_accepted(capsys):
    """0 turns clipping, intermediate checkpoints and evaluation during training off; 0 and 1 bound the
    warm-up share; a learning rate of 0 is AdamW's own lower bound."""
    from amapo_train.train import cli

    for args in (["--max-grad-norm", "0", "--save-steps", "0", "--eval-steps", "0", "--warmup-ratio", "0"],
                 ["--warmup-ratio", "1", "--learning-rate", "0", "--seed", str(2**32 - 1), "--max-steps", "1"],
                 ["--max-length", "2", "--max-prompt-length", "1", "--world-size", "1"]):
        assert cli([*args, "--dry-run"]) == 0, capsys.readouterr().err


def test_one_pair_batches_without_z_scores_are_accepted(capsys):
    """The guard of the one-pair cases above: a method without z-scores, alpha-DPO with alpha = 0, AMaPO's one
    pair per device over two processes, a held-out batch of one pair with no held-out loss during training
    (eval_steps 0: only the ranking accuracy, which takes no batch statistics), and one with alpha-DPO's running
    statistics (the held-out loss reads them, whatever its batch) are planned."""
    from amapo_train.train import cli

    one_pair = ["--per-device-batch-size", "1", "--total-batch-size", "16"]
    for args in ([*one_pair, "--loss", "simpo"], [*one_pair, "--loss", "alpha_dpo", "--hparam", "alpha=0"],
                 [*one_pair, "--world-size", "2"], ["--eval-batch-size", "1", "--eval-steps", "0"],
                 ["--loss", "alpha_dpo", "--hparam", "decay=0.9", "--eval-batch-size", "1", "--eval-steps", "5"]):
        assert cli([*args, "--dry-run"]) == 0, capsys.readouterr().err


RECIPE_MISTAKES = {  # a recipe file's text -> the one-line error
    "not YAML": ("epochs: [\n", "not readable as YAML"),
    "not a mapping": ("- epochs\n- seed\n", "expected a mapping of keys to values, got a list"),
    "a word for an integer": ("max_length: long\n", "max_length: expected an integer, got 'long'"),
    "a boolean for an integer": ("epochs: true\n", "epochs: expected an integer, got True"),
    "a fraction for an integer": ("per_device_batch_size: 2.5\n", "per_device_batch_size: expected an integer"),
    "a number for a mapping": ("hparams: 3\n", "hparams: expected a mapping, got 3"),
    "a word for a boolean": ("bf16: maybe\n", "bf16: expected on/off (true/false), got 'maybe'"),
    "a value outside its range": ("warmup_ratio: 1.5\n", "--warmup-ratio 1.5: must be in [0, 1]"),
    "a word for a numeric hyperparameter": ("hparams: {beta: high}\n", "hparams: beta=high: expected a float"),
}


@pytest.mark.parametrize("name", sorted(RECIPE_MISTAKES))
def test_recipe_mistake_is_a_user_error(name, tmp_path, capsys):
    from amapo_train.train import cli

    text, message = RECIPE_MISTAKES[name]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    status = cli(["--recipe", str(recipe), "--dry-run"])
    assert_one_line_error(status, capsys.readouterr().err, message)


def test_recipe_numbers_that_yaml_reads_as_strings(tmp_path):
    """YAML 1.1 reads 6e-7 (no dot) and quoted numbers as strings: the recipe's field types convert them."""
    from amapo_train.config import TrainConfig

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 6e-7\nepochs: '2'\nwarmup_ratio: 0\nbf16: 'off'\nmax_steps: null\n"
                      "hparams: {beta: 2e0, label_smoothing: 1e-1, variant: paper}\n")
    config = TrainConfig.from_recipe(recipe)
    assert config.hparams == {"beta": 2.0, "label_smoothing": 0.1, "variant": "paper"}
    assert config.learning_rate == 6e-7 and isinstance(config.learning_rate, float)
    assert config.epochs == 2 and config.warmup_ratio == 0.0 and isinstance(config.warmup_ratio, float)
    assert config.bf16 is False and config.max_steps is None
    config.validate()


def test_too_few_pairs_for_one_step_is_a_user_error(tmp_path, capsys):
    from amapo_train.train import cli

    status = cli(["--max-train-pairs", "8", "--total-batch-size", "32", "--per-device-batch-size", "16",
                  "--output-dir", str(tmp_path / "run"), "--log-with", "none", "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("amapo-train: error:")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "no optimizer step: 8 training pairs are fewer than one batch of --total-batch-size 32" in lines[0]


def test_world_size_is_for_dry_runs_only(capsys):
    """A run's processes are its launcher's: a --world-size there would check the batch arithmetic of
    another launch than the one running."""
    from amapo_train.train import cli

    status = cli(["--world-size", "2", "--max-steps", "1"])
    assert_one_line_error(status, capsys.readouterr().err, "--world-size is for --dry-run")


def test_deepspeed_config_and_output_dir_are_checked_first(tmp_path, capsys):
    from amapo_train.train import cli

    broken = tmp_path / "ds.json"
    broken.write_text("{not json")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for args, message in ((["--deepspeed", "zero9"], "--deepspeed zero9: no such file, and not one of ['zero2', 'zero3']"),
                          (["--deepspeed", str(broken)], "not a JSON DeepSpeed config"),
                          (["--output-dir", str(a_file / "run")], f"--output-dir {a_file / 'run'}: {a_file} is not a directory")):
        status = cli([*args, "--dry-run"])
        assert_one_line_error(status, capsys.readouterr().err, message)
    assert cli(["--deepspeed", "zero3", "--output-dir", str(tmp_path / "new" / "run"), "--dry-run"]) == 0
    assert not (tmp_path / "new").exists()  # a dry run creates nothing


@pytest.mark.parametrize("settings, message", [
    ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps is 1 where this run's is 32 (4 process(es))"),
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu is 4 where this run's is 1"),
    ({"gradient_clipping": 0.5}, "gradient_clipping is 0.5 where this run's is 1.0"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO-3 without stage3_gather_16bit_weights_on_model_save: true"),
    ([], "not a JSON DeepSpeed config: a list, not an object")])
def test_a_deepspeed_file_that_disagrees_with_the_run_is_refused(tmp_path, capsys, settings, message):
    """accelerate fills a DeepSpeed file's "auto" values only: its own accumulation, micro-batch or clipping
    replaced the run's with one log line (an accumulation of 1 made llama3-8b-base's batch of 128 on 4 processes
    one of 4), and ZeRO-3 without the weights' gather for saving failed at the first checkpoint. Refused, before
    anything loads; the same numbers as the run's, or "auto", pass."""
    from amapo_train.train import cli

    file = tmp_path / "ds.json"
    base = ["--recipe", "llama3-8b-base", "--world-size", "4", "--deepspeed", str(file), "--dry-run"]
    file.write_text(json.dumps(settings))
    assert_one_line_error(cli(base), capsys.readouterr().err, message)
    file.write_text(json.dumps({"gradient_accumulation_steps": 32, "train_micro_batch_size_per_gpu": "auto",
                                "gradient_clipping": 1, "zero_optimization": {
                                    "stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}))
    assert cli(base) == 0


def test_an_option_off_by_default_can_be_set_back_to_none():
    """A recipe's ablation can be undone from the command line: `--hparam ablation=none` is None, not the
    string 'none' (which the method would refuse)."""
    from amapo_train.command_line import build_parser, config_from_args

    args = build_parser("").parse_args(["--hparam", "ablation=no_exp", "--hparam", "ablation=None"])
    config = config_from_args(args)
    assert config.hparams["ablation"] is None
    config.validate()


def test_local_files_are_checked_before_loading(tmp_path, monkeypatch, capsys):
    """The training file under another spelling is no held-out data; a model directory needs its config.json."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": "yes", "rejected": "no"}) + "\n")
    monkeypatch.chdir(tmp_path)
    status = cli(["--dataset", "pairs.jsonl", "--eval-dataset", str(pairs), "--dry-run"])
    assert_one_line_error(status, capsys.readouterr().err, f"--eval-dataset {pairs} is the training data")
    status = cli(["--model", str(tmp_path), "--dry-run"])
    assert_one_line_error(status, capsys.readouterr().err, f"--model {tmp_path}: no config.json there")


def test_deepspeed_none_turns_a_recipes_deepspeed_off(capsys):
    assert cli(["--recipe", "llama3-8b-base", "--deepspeed", "none", "--loss-impl", "ops", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["deepspeed_config"] is None


def test_resume_checks_the_checkpoint_before_loading_it(tmp_path):
    """A checkpoint is its trainer_state.json and state/; a run with another seed (data order, held-out split) is
    refused."""
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    with pytest.raises(UserError, match="no trainer_state.json and state/"):
        check_resume(str(checkpoint), TrainConfig(seed=1))
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 2, "config": {"seed": 1, "output_dir": "a"}}))
    with pytest.raises(UserError, match=r"a model without the training state \(state/\) to resume from"):
        check_resume(str(checkpoint), TrainConfig(seed=1))
    (checkpoint / "state").mkdir()
    check_resume(str(checkpoint), TrainConfig(seed=1, output_dir="b"))
    with pytest.raises(UserError, match="the checkpoint's run had seed=1; this one has seed=2"):
        check_resume(str(checkpoint), TrainConfig(seed=2))
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 2, "config": 5}))
    with pytest.raises(UserError, match="unreadable trainer_state.json"):
        check_resume(str(checkpoint), TrainConfig(seed=1))


def test_odpo_reads_ultrafeedbacks_score_columns_unless_told():
    assert dry_run(TrainConfig(loss="odpo"), 1)["score_columns"] == ["score_chosen", "score_rejected"]
    assert dry_run(TrainConfig(loss="odpo", rejected_score_column="low"), 1)["score_columns"] == ["score_chosen", "low"]
    assert TrainConfig(loss="odpo", chosen_score_column="high").score_columns() == ("high", "score_rejected")


def test_a_hub_model_that_cannot_be_reached_is_a_one_line_error(tmp_path):
    """Offline, `--model org/name` was a 100-line traceback and exit status 1 (after ~50 s of retries without
    HF_HUB_OFFLINE); a dataset that cannot be reached was already one line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "amapo_train.train", "--model", "no-such-org/no-such-model",
                          "--max-steps", "1", "--log-with", "none", "--device", "cpu", "--output-dir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in run.stderr.splitlines() if line.startswith("amapo-train: error:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert len(lines) == 1 and "--model no-such-org/no-such-model: cannot be loaded: " in lines[0], run.stderr
