"""The training driver: a short run of the tiny default, exact resume, recipes, data formats."""

import json
import re

import pytest
import torch

from amapo_train import data
from amapo_train.config import RECIPES, TrainConfig, UserError
from amapo_train.train import dry_run, main

SHORT = ["--max-train-pairs", "96", "--max-test-pairs", "32", "--log-with", "none", "--device", "cpu",
         "--total-batch-size", "16", "--per-device-batch-size", "8"]


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_default_runs_end_to_end(tmp_path):
    """A shorter version of README command 1: metrics, a loadable checkpoint, held-out accuracy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    result = main([*SHORT, "--max-steps", "3", "--save-steps", "2", "--output-dir", str(out)])
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "batch_margin_mean", "tokens_per_s", "learning_rate"):
        assert all(key in r and r[key] == r[key] for r in records), key
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.vocab_size == len(tokenizer)
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation == result["eval"]
    assert evaluation["n_pairs"] == 32
    assert 0.0 <= evaluation["normalized"]["ci_low"] <= evaluation["normalized"]["accuracy"] <= 1.0


def test_resume_gives_the_same_losses(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*SHORT, "--max-steps", "6", "--loss", "dpo"]  # dpo: reference log-probs are precomputed too
    main([*common, "--output-dir", str(straight)])
    first = main([*common, "--output-dir", str(split), "--stop-after-steps", "3"])
    assert first["steps"] == 3
    main([*common, "--output-dir", str(split), "--resume", first["checkpoint"]])
    expected, resumed = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, resumed):
        for key in ("loss", "rewards/margins", "learning_rate"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_resume_refuses_another_runs_settings(tmp_path):
    """The restored optimizer, scheduler and data position belong to the checkpoint's run: a resume that changes
    its model, loss or optimisation is refused, naming the settings; where it writes and how often it
    evaluates may change."""
    common = [*SHORT, "--max-steps", "4", "--total-batch-size", "16", "--per-device-batch-size", "8"]
    first = main([*common, "--output-dir", str(tmp_path / "run"), "--stop-after-steps", "2"])
    resume = [*common, "--resume", first["checkpoint"]]
    with pytest.raises(UserError, match=re.escape("had hparams={'beta': 2.0}, learning_rate=0.001, loss='amapo'")) \
            as refused:
        main([*resume, "--output-dir", str(tmp_path / "other"), "--learning-rate", "0.01", "--loss", "dpo"])
    assert "this one has hparams={}, learning_rate=0.01, loss='dpo'" in str(refused.value)
    with pytest.raises(UserError, match="had model='tiny'; this one has model='random:llama3-vocab-tiny'"):
        main([*resume, "--output-dir", str(tmp_path / "other"), "--model", "random:llama3-vocab-tiny"])
    assert not (tmp_path / "other").exists()
    resumed = main([*resume, "--output-dir", str(tmp_path / "run"), "--eval-steps", "1", "--loss-impl", "eager"])
    assert resumed["steps"] == 4


PAPER = {  # AMaPO paper, Table 9: beta and learning rate per setting
    "llama3-8b-base": (3.0, 6e-7),
    "llama3-8b-instruct": (3.0, 1e-6),
    "mistral-7b-base": (2.0, 4e-7),
    "mistral-7b-instruct": (2.0, 6e-7),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@pytest.mark.parametrize("recipe", sorted(PAPER))
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_paper_recipes_dry_run(recipe, world_size):
    config = TrainConfig.from_recipe(recipe)
    plan = dry_run(config, world_size)
    assert plan["effective_batch_size"] == 128
    assert plan["gradient_accumulation_steps"] * world_size * config.per_device_batch_size == 128
    assert (plan["hparams"].get("beta"), config.learning_rate) == PAPER[recipe]
    assert config.loss == "amapo" and config.epochs == 1 and config.warmup_ratio == 0.1
    assert HUB_ID.match(config.model) and HUB_ID.match(config.dataset)
    assert plan["deepspeed_config"].endswith("ds_zero3.json")
    assert json.loads(open(plan["deepspeed_config"]).read())["zero_optimization"]["stage"] == 3


def test_every_recipe_file_parses():
    for path in RECIPES.glob("*.yaml"):
        TrainConfig.from_recipe(path).validate(world_size=1)


def test_bad_batch_arithmetic():
    config = TrainConfig(total_batch_size=128, per_device_batch_size=3)
    with pytest.raises(UserError, match="not a multiple"):
        config.validate(world_size=1)


class CharTokenizer:
    """Just enough of a tokenizer for the data functions: one id per character, bos "<s>" 1, eos 2."""

    bos_token, bos_token_id, eos_token_id, chat_template = "<s>", 1, 2, None

    def __call__(self, text, add_special_tokens=True):
        ids = [1] if add_special_tokens else []
        if text.startswith(self.bos_token):
            ids, text = ids + [1], text[len(self.bos_token):]
        return {"input_ids": ids + [3 + (ord(c) % 50) for c in text]}


def test_formats_and_truncation():
    tokenizer = CharTokenizer()
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    assert data.detect_format(hh) == "hh-rlhf"
    assert data.record_texts(hh, tokenizer) == ("\n\nHuman: hi\n\nAssistant:", " yes", " no")
    uf = {"prompt": "hi", "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
          "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}
    assert data.detect_format(uf) == "ultrafeedback"
    assert data.record_texts(uf, tokenizer) == ("\n\nUser: hi\n\nAssistant:", " yes", " no")
    pairs = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert data.detect_format(pairs) == "pairs"
    with pytest.raises(ValueError, match="no column 'rejected'"):
        data.detect_format({"chosen": "x", "prompt": "p"})

    # The "separate" rule (the option kept from before; the default "trl" rule: tests/test_tokenize.py).
    separate = {"tokenization": "separate"}
    pair = data.tokenize_pair(tokenizer, "abcdef", "xyz", "uv", max_length=6, max_prompt_length=3, **separate)
    prompt_ids = [1] + tokenizer("abcdef")["input_ids"][-2:]  # truncated from the left, BOS kept
    assert pair["chosen_input_ids"][:3] == prompt_ids and len(pair["chosen_input_ids"]) == 6
    assert pair["chosen_labels"][:3] == [-100] * 3 and pair["chosen_labels"][3:] == pair["chosen_input_ids"][3:]
    assert pair["rejected_input_ids"][3:] == tokenizer("uv", add_special_tokens=False)["input_ids"] + [2]
    assert data.tokenize_pair(tokenizer, "abc", "  ", "no", max_length=10, max_prompt_length=5) is None
    assert data.tokenize_pair(tokenizer, "abc", "  ", "no", max_length=10, max_prompt_length=5, **separate) is None
    # A prompt already starting with the BOS text (a rendered chat template) gets no second BOS.
    templated = data.tokenize_pair(tokenizer, "<s>ab", "x", "y", max_length=10, max_prompt_length=5, **separate)
    assert templated["chosen_input_ids"][:3] == [1] + tokenizer("ab", add_special_tokens=False)["input_ids"]

    dataset = data.PreferenceDataset([pairs, {**pairs, "chosen": " "}, hh], tokenizer, max_length=20,
                                     max_prompt_length=10)
    assert (len(dataset), dataset.dropped, dataset.record_index) == (2, 1, [0, 2])
    assert [dataset[i]["index"] for i in range(2)] == [0, 1]


def test_collate_pads_both_sides_to_one_length():
    pairs = [{"chosen_input_ids": [1, 5, 6], "chosen_labels": [-100, 5, 6], "rejected_input_ids": [1, 7],
              "rejected_labels": [-100, 7], "index": 4}]
    batch = data.collate(pairs, pad_token_id=0)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (1, 3)
    assert batch["index"].tolist() == [4]
    assert batch["rejected_labels"].tolist() == [[-100, 7, -100]]
    assert batch["rejected_attention_mask"].tolist() == [[1, 1, 0]]
    ids, mask, labels = data.concatenated(batch)
    assert ids.shape == (2, 3) and torch.equal(labels[0], batch["chosen_labels"][0])


def test_deepspeed_zero3_on_cpu(tmp_path):
    """The driver under DeepSpeed ZeRO-3 (one CPU process, gloo): it trains and checkpoints."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    out = tmp_path / "run"
    command = [sys.executable, "-m", "amapo_train.train", *SHORT, "--deepspeed", "zero3", "--max-steps", "2",
               "--output-dir", str(out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "accelerate: DEEPSPEED" in run.stdout + run.stderr
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert (out / "final" / "config.json").exists()


def test_console_script_exits_zero(monkeypatch, capsys):
    """`amapo-train` is train.cli: exit status 0 (a returned dict would make sys.exit report failure)."""
    from amapo_train.train import cli

    monkeypatch.setattr("sys.argv", ["amapo-train", "--recipe", "llama3-8b-base", "--dry-run"])
    assert cli() == 0
    assert json.loads(capsys.readouterr().out)["effective_batch_size"] == 128


def test_two_cpu_processes(tmp_path):
    """Data parallel on 2 CPU processes (torchrun, gloo): trains, and the held-out evaluation gathers
    every process's pairs (20 pairs, not one shard of them)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "amapo_train.train", "--max-train-pairs", "64", "--max-test-pairs", "20", "--log-with", "none",
               "--device", "cpu", "--total-batch-size", "16", "--per-device-batch-size", "4", "--max-steps", "2",
               "--output-dir", str(out)]
    run = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert json.loads((out / "eval.json").read_text())["n_pairs"] == 20


AUTHORS_AND_TRL_METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",  # TRL's names
    "rewards/batch_margin_mean", "margin/accuracies", "loss/margin", "logits/chosen", "logits/rejected",  # authors'
)


def test_metric_names_and_eval_during_training_reach_metrics_and_tensorboard(tmp_path):
    """Issue 14: TRL's and the authors' metric names in metrics.jsonl and TensorBoard; held-out loss, reward
    accuracy and ranking accuracy every --eval-steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    main([*SHORT, "--log-with", "tensorboard", "--max-steps", "2", "--eval-steps", "2", "--hparam", "beta=2.5",
          "--output-dir", str(out)])
    records = read_metrics(out)
    for key in AUTHORS_AND_TRL_METRICS:
        assert all(key in r and r[key] == r[key] for r in records), key
    assert all(r["rewards/batch_margin_mean"] == pytest.approx(2.5 * r["batch_margin_mean"], rel=1e-5) for r in records)
    held_out = ("eval_loss", "eval_rewards/accuracies", "eval_ranking_accuracy/normalized")
    assert [all(key in r for key in held_out) for r in records] == [False, True]
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    tags = set()
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    missing = [key for key in (*AUTHORS_AND_TRL_METRICS, *held_out) if key not in tags]
    assert not missing, (missing, sorted(tags))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_logs_peak_memory_and_skips_the_final_checkpoint(tmp_path):
    """On CUDA every step's record has peak_memory_gib (bench_train reads it); --save-final off keeps no model."""
    out = tmp_path / "run"
    args = [arg if arg != "cpu" else "cuda" for arg in SHORT]
    result = main([*args, "--max-steps", "2", "--save-final", "off", "--loss-impl", "fused", "--output-dir", str(out)])
    records = read_metrics(out)
    assert all(0 < r["peak_memory_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30 for r in records)
    assert "checkpoint" not in result and not (out / "final").exists()


@pytest.mark.parametrize("max_grad_norm, clipping", [(1.0, 1.0), (0.5, 0.5), (0, 0.0), (None, 0.0)])
def test_deepspeed_clips_at_max_grad_norm(max_grad_norm, clipping):
    """DeepSpeed clips by itself: its config's "auto" takes --max-grad-norm (0 or None: off), where accelerate
    filled it with 1.0 whatever the flag said."""
    from amapo_train.train import deepspeed_plugin

    config = TrainConfig(deepspeed="zero2", max_grad_norm=max_grad_norm)
    plugin = deepspeed_plugin(config, config.deepspeed_config_path())
    assert plugin.deepspeed_config["gradient_clipping"] == clipping


def test_held_out_data_without_a_pair_is_a_user_error(tmp_path):
    """An --eval-dataset with no usable pair is refused once the data is tokenized, before training (it
    trained to the end, then failed in the ranking evaluation with a traceback)."""
    empty_responses = tmp_path / "eval.jsonl"
    empty_responses.write_text(json.dumps({"prompt": "Hi", "chosen": "", "rejected": ""}) + "\n")
    with pytest.raises(UserError, match=r"held-out data .*eval\.jsonl.*: no usable pair \(1 dropped"):
        main([*SHORT, "--eval-dataset", str(empty_responses), "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
