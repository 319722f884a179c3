"""amapo-train's user errors, through the console script: one line on stderr, exit status 2, no traceback,
before any model or data is loaded (so also under --dry-run)."""

import shutil
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest
import torch

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
    "odpo scores given as hparam": (["--loss", "odpo", "--hparam", "chosen_scores=1"], "--chosen-score-column"),
    "score column without odpo": (["--chosen-score-column", "s"], "are for --loss odpo"),
    "eval fraction out of range": (["--eval-fraction", "1.5"], "--eval-fraction must be in (0, 1)"),
    "on/off booleans only": (["--bf16", "yes"], "argument --bf16: expected one of"),
    "bad recipe": (["--recipe", "nope"], "no recipe 'nope'"),
    "hparam the method does not take": (["--hparam", "gamma=1.0"], "'gamma' is not a hyperparameter of amapo"),
    "bad boolean": (["--bf16", "maybe"], "argument --bf16: expected one of"),
    "bad tracker": (["--log-with", "foo"], "argument --log-with: invalid choice"),
    "bad batch arithmetic": (["--total-batch-size", "30", "--per-device-batch-size", "16"], "not a multiple"),
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
