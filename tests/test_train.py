"""The training driver: a short run of the tiny default, exact resume, recipes, data formats."""

import contextlib
import dataclasses
import importlib.util
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port

import amapo_kernels as ak
from amapo_kernels import reference
from amapo_kernels.integrations.hf_head import disable_dropout
from amapo_train import data
from amapo_train import model as models
from amapo_train import train as driver
from amapo_train.config import RECIPES, TrainConfig, UserError
from amapo_train.command_line import check_resume, run_checkpoints
from amapo_train.train import (dry_run, lm_head_params, log_step, loss_and_metrics, main, make_accelerator, pair_loss,
                               sequence_logps, set_up)

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


def test_resume_gives_the_same_losses(tmp_path, capsys):
    """--resume last takes the newest checkpoint of --output-dir (here the --stop-after-steps one)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*SHORT, "--max-steps", "6", "--loss", "dpo"]  # dpo: reference log-probs are precomputed too
    main([*common, "--output-dir", str(straight)])
    first = main([*common, "--output-dir", str(split), "--save-steps", "2", "--stop-after-steps", "3"])
    assert first["steps"] == 3 and first["checkpoint"] == str(split / "checkpoint-3")
    # a stop at or before the step resumed from would train nothing and save that checkpoint anew
    with pytest.raises(UserError, match=re.escape("--stop-after-steps 3: --resume last continues from step 3; give "
                                                  "a later step")):
        main([*common, "--output-dir", str(split), "--resume", "last", "--stop-after-steps", "3"])
    capsys.readouterr()
    main([*common, "--output-dir", str(split), "--resume", "last"])
    assert f"resumed from {split / 'checkpoint-3'} at step 3" in capsys.readouterr().out
    expected, resumed = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, resumed):
        for key in ("loss", "rewards/margins", "learning_rate"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_each_epoch_draws_its_own_order_and_logs_the_rate_each_step_used(tmp_path, monkeypatch):
    """40 pairs in micro-batches of 8, 2 a step: 4 of the 5 micro-batches train in an epoch. Each epoch draws its
    own order (before, every epoch repeated the first one's micro-batches and left out the same 8 pairs), epoch
    0's that of the seed alone; a step logs the learning rate its optimizer step used (before, the next step's:
    step 1 of a warm-up from 0 was logged at the peak rate)."""
    batches, rates = [], []
    monkeypatch.setattr(driver, "collate", lambda pairs, **kwargs: batches.append([p["index"] for p in pairs])
                        or data.collate(pairs, **kwargs))
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *args, **kwargs: rates.append(
        self.param_groups[0]["lr"]) or step(self, *args, **kwargs))
    out = tmp_path / "run"
    main([*SHORT, "--max-train-pairs", "40", "--max-test-pairs", "8", "--loss", "simpo", "--epochs", "2",
          "--warmup-ratio", "0.25", "--lr-scheduler", "linear", "--save-final", "off", "--seed", "7",
          "--output-dir", str(out)])
    # the loader reads one micro-batch ahead: each epoch's 5, of which the first 4 train
    first, second = batches[:4], batches[5:9]
    assert sorted(sum(first, [])) != sorted(sum(second, [])), "both epochs left out the same pairs"
    assert first == [driver.EpochOrder(range(40), 7).order[i:i + 8] for i in range(0, 32, 8)]
    assert second == [driver.EpochOrder(range(40), 8).order[i:i + 8] for i in range(0, 32, 8)]
    assert rates[0] == 0.0 and len(rates) == 4
    assert [record["learning_rate"] for record in read_metrics(out)] == pytest.approx(rates, abs=0)


def test_a_checkpoint_holds_the_model_weights_once(tmp_path, monkeypatch):
    """Without DeepSpeed a resumable checkpoint's state/ holds no model (accelerate's save_state wrote the weights
    there too, beside the from_pretrained copy: twice on disk); --resume loads that copy, as
    test_resume_gives_the_same_losses checks. A checkpoint written before, with state/model.safetensors, still
    resumes to the uninterrupted run's losses (accelerate loads its own copy). The weights file is listed in
    trainer_state.json with its size: one cut short or deleted is refused naming it."""
    common = [*SHORT, "--max-test-pairs", "8", "--max-steps", "4"]
    main([*common, "--output-dir", str(tmp_path / "straight")])
    main([*common, "--output-dir", str(tmp_path / "split"), "--stop-after-steps", "2"])
    checkpoint = tmp_path / "split" / "checkpoint-2"
    assert not (checkpoint / "state" / "model.safetensors").exists() and (checkpoint / "model.safetensors").exists()
    stored = json.loads((checkpoint / "trainer_state.json").read_text())
    weights = checkpoint / "model.safetensors"
    assert stored["model_files"] == {"model.safetensors": weights.stat().st_size}
    saved = weights.read_bytes()  # what --resume now loads is checked as state/ is: cut short, refused naming it
    weights.write_bytes(saved[:100])
    config = TrainConfig(**stored["config"])
    with pytest.raises(UserError, match=f"--resume last: {weights} is 100 bytes, saved as {len(saved)}"):
        check_resume("last", config)
    weights.unlink()
    with pytest.raises(UserError, match=f"--resume {checkpoint}: {weights} is missing"):
        check_resume(str(checkpoint), config)
    with monkeypatch.context() as patched:  # the layout of the versions before
        patched.setattr(driver, "save_model_weights_once", lambda accelerator: None)
        main([*common, "--output-dir", str(tmp_path / "old"), "--stop-after-steps", "2"])
    assert (tmp_path / "old" / "checkpoint-2" / "state" / "model.safetensors").exists()
    main([*common, "--output-dir", str(tmp_path / "old"), "--resume", "last"])
    expected = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert [r["loss"] for r in read_metrics(tmp_path / "old")] == pytest.approx(expected, rel=1e-6)


def test_a_checkpoint_saved_over_an_earlier_runs_keeps_none_of_its_state(tmp_path, monkeypatch):
    """A run saves checkpoint-2 over the one an earlier run left in --output-dir: nothing of the earlier state/ or
    weights files stays. Its state/model.safetensors (a version that kept the weights there) was loaded in place
    of this run's model, silently; its running statistics' file (an object this run does not register) stopped
    accelerate's load with a traceback. Each resumes now to the uninterrupted run's losses."""
    common = [*SHORT, "--max-test-pairs", "8", "--max-steps", "4", "--loss", "alpha_dpo"]
    earlier_runs = {"weights in state/": ["--learning-rate", "3e-3"], "running statistics": ["--hparam", "decay=0.9"]}
    main([*common, "--output-dir", str(tmp_path / "straight")])
    expected = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    for index, (what, earlier) in enumerate(earlier_runs.items()):
        out = tmp_path / str(index)
        with monkeypatch.context() as patched:  # the earlier run: a version that kept the weights in state/
            patched.setattr(driver, "save_model_weights_once", lambda accelerator: None)
            main([*common, *earlier, "--output-dir", str(out), "--stop-after-steps", "2"])
        # a shard of a sharded save (from_pretrained reads a model.safetensors before an index, so its leftover
        # would be read in place of this save's shards; a leftover shard would be listed as this save's)
        (out / "checkpoint-2" / "model-00001-of-00002.safetensors").write_bytes(b"earlier")
        main([*common, "--output-dir", str(out), "--stop-after-steps", "2"])
        assert sorted(path.name for path in (out / "checkpoint-2" / "state").iterdir()) == [
            "custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"], what
        stored = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
        assert list(stored["model_files"]) == ["model.safetensors"], what
        main([*common, "--output-dir", str(out), "--resume", "last"])
        assert [r["loss"] for r in read_metrics(out)] == pytest.approx(expected, rel=1e-6), what


def test_a_sharded_checkpoint_resumes(tmp_path, monkeypatch):
    """A model over transformers' shard size (50GB by default in transformers 5) is saved in shards with an
    index: trainer_state.json lists each, --resume loads them all through from_pretrained to the uninterrupted
    run's losses, and a shard deleted after the save is refused naming it."""
    from transformers import PreTrainedModel

    common = [*SHORT, "--max-test-pairs", "8", "--max-steps", "4"]
    main([*common, "--output-dir", str(tmp_path / "straight")])
    save_pretrained = PreTrainedModel.save_pretrained
    monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                        lambda model, *args, **kwargs: save_pretrained(model, *args, **kwargs, max_shard_size="1MB"))
    main([*common, "--output-dir", str(tmp_path / "split"), "--stop-after-steps", "2"])
    checkpoint = tmp_path / "split" / "checkpoint-2"
    listed = json.loads((checkpoint / "trainer_state.json").read_text())["model_files"]
    shards = [name for name in listed if name.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in listed and "model.safetensors" not in listed
    main([*common, "--output-dir", str(tmp_path / "split"), "--resume", "last"])
    expected = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert [r["loss"] for r in read_metrics(tmp_path / "split")] == pytest.approx(expected, rel=1e-6)
    (checkpoint / shards[-1]).unlink()
    stored = json.loads((checkpoint / "trainer_state.json").read_text())
    with pytest.raises(UserError, match=f"--resume last: {checkpoint / shards[-1]} is missing"):
        check_resume("last", TrainConfig(**stored["config"]))


def test_a_mixture_of_experts_resumes_from_its_from_pretrained_weights(tmp_path):
    """A Mixtral's checkpoint stores its experts as transformers' on-disk layout (one w1 / w2 / w3 per expert)
    while the model holds them fused (gate_up_proj, down_proj): --resume loads them through from_pretrained,
    and the resumed run has the uninterrupted run's losses (router loss included)."""
    from safetensors import safe_open

    tokenizer = models.train_tiny_tokenizer(["Hello there.", "General Kenobi!"], vocab_size=300)
    model = tiny_mixtral(len(tokenizer), output_router_logits=False)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    common = [*SHORT, "--max-test-pairs", "8", "--model", str(tmp_path / "model"), "--max-steps", "4",
              "--max-length", "96", "--max-prompt-length", "48", "--router-aux-loss-coef", "0.5"]
    main([*common, "--output-dir", str(tmp_path / "straight")])
    main([*common, "--output-dir", str(tmp_path / "split"), "--stop-after-steps", "2"])
    checkpoint = tmp_path / "split" / "checkpoint-2"
    with safe_open(checkpoint / "model.safetensors", "pt") as saved:
        on_disk = set(saved.keys())
    fused = "model.layers.0.mlp.experts.gate_up_proj"  # the model's name, not the file's: a conversion is loaded
    assert fused in model.state_dict() and fused not in on_disk
    assert not (checkpoint / "state" / "model.safetensors").exists()
    main([*common, "--output-dir", str(tmp_path / "split"), "--resume", "last"])
    expected = [(r["loss"], r["aux_loss"]) for r in read_metrics(tmp_path / "straight")]
    resumed = [(r["loss"], r["aux_loss"]) for r in read_metrics(tmp_path / "split")]
    assert len(resumed) == 4 and resumed == [pytest.approx(pair, rel=1e-6) for pair in expected]


def test_alpha_dpo_running_statistics_resume_and_survive_evaluation(tmp_path, capsys):
    """alpha_dpo with decay > 0 (the official trainer's running mean and std of M): the state is in the checkpoint,
    so a resumed run has the uninterrupted run's losses; held-out evaluation reads it without updating it, so the
    training losses are those of a run without evaluation; and the state is used (decay = 0 trains otherwise)."""
    common = [*SHORT, "--max-steps", "5", "--loss", "alpha_dpo", "--hparam", "beta=10", "--hparam", "alpha=1"]
    runs = {"straight": [], "evaluated": ["--eval-steps", "1"], "stateless": ["--hparam", "decay=0"]}
    for name, extra in runs.items():
        main([*common, "--hparam", "decay=0.9", *extra, "--output-dir", str(tmp_path / name)])
    split = tmp_path / "split"
    main([*common, "--hparam", "decay=0.9", "--output-dir", str(split), "--stop-after-steps", "3"])
    # after the scheduler's; the state of step 3's batches, which have a spread (a state of 0 would resume alike)
    saved = torch.load(split / "checkpoint-3" / "state" / "custom_checkpoint_1.pkl")
    assert saved["std"] > 0
    capsys.readouterr()
    main([*common, "--hparam", "decay=0.9", "--output-dir", str(split), "--resume", "last"])
    assert f"resumed from {split / 'checkpoint-3'} at step 3" in capsys.readouterr().out
    expected = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    for name in ("split", "evaluated"):
        assert [r["loss"] for r in read_metrics(tmp_path / name)] == pytest.approx(expected, rel=1e-6), name
    assert "eval_loss" in read_metrics(tmp_path / "evaluated")[0]
    stateless = [r["loss"] for r in read_metrics(tmp_path / "stateless")]
    # steps 1-2: the policy is its reference (step 1 is the warm-up's, at learning rate 0), M = 0 and every
    # z-score 0 either way; from step 3 the running statistics are those of the batches so far, not the current
    assert stateless[:2] == pytest.approx(expected[:2], rel=1e-6)
    assert all(abs(a - b) > 1e-3 for a, b in zip(stateless[2:], expected[2:])), (stateless, expected)


def test_resume_of_a_checkpoint_with_another_optimizer_layout_is_one_line(tmp_path, monkeypatch):
    """A checkpoint written when --weight-decay decayed every parameter (one AdamW group) does not load into
    today's two groups: a one-line error naming the cause, before the model loads (was torch's ValueError
    traceback after the set-up). A layout torch refuses otherwise (a parameter in the other group) is one line
    too, at the load."""
    out, common = tmp_path / "run", [*SHORT, "--max-steps", "4", "--weight-decay", "0.1"]
    with monkeypatch.context() as patched:  # the layout of that version
        patched.setattr(driver, "optimizer_groups", lambda model, config: [
            {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": config.weight_decay}])
        main([*common, "--output-dir", str(out), "--stop-after-steps", "2"])
    monkeypatch.setattr(driver, "set_up", lambda config: pytest.fail("set up before the check"))
    with pytest.raises(UserError, match=r"--resume last: \S+/checkpoint-2's AdamW has 1 parameter group\(s\), this "
                                        r"run's 2 .* a checkpoint written before --weight-decay spared them has 1"):
        main([*common, "--output-dir", str(out), "--resume", "last"])
    monkeypatch.undo()
    moved = tmp_path / "moved"
    with monkeypatch.context() as patched:  # one parameter in the other group
        two_groups = driver.optimizer_groups
        patched.setattr(driver, "optimizer_groups", lambda model, config: [
            {**group, "params": group["params"][1:] if i == 0 else [two_groups(model, config)[0]["params"][0],
                                                                    *group["params"]]}
            for i, group in enumerate(two_groups(model, config))])
        main([*common, "--output-dir", str(moved), "--stop-after-steps", "2"])
    with pytest.raises(UserError, match=r"--resume \S+/checkpoint-2: its optimizer state does not fit this run's "
                                        r"AdamW \(2 parameter group\(s\)\): loaded state dict contains a parameter "
                                        r"group that doesn't match the size"):
        main([*common, "--output-dir", str(moved), "--resume", "last"])


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
    if config.per_device_batch_size * world_size < 2:  # AMaPO's statistics over one pair: refused (test_cli)
        with pytest.raises(UserError, match=f"--per-device-batch-size 1 with {world_size} process"):
            dry_run(config, world_size)
        return
    plan = dry_run(config, world_size)
    assert plan["effective_batch_size"] == 128
    assert plan["gradient_accumulation_steps"] * world_size * config.per_device_batch_size == 128
    assert (plan["hparams"].get("beta"), config.learning_rate) == PAPER[recipe]
    assert config.loss == "amapo" and config.epochs == 1 and config.warmup_ratio == 0.1
    assert HUB_ID.match(config.model) and HUB_ID.match(config.dataset)
    assert plan["deepspeed_config"].endswith("ds_zero3.json")
    assert json.loads(open(plan["deepspeed_config"]).read())["zero_optimization"]["stage"] == 3


def test_every_recipe_file_parses():
    """Each recipe is valid for the launch it plans (its authors' processes, else one)."""
    for path in RECIPES.glob("*.yaml"):
        config = TrainConfig.from_recipe(path)
        config.validate(world_size=config.num_processes or 1)


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
    import subprocess
    import sys

    port = free_port()
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
    import subprocess
    import sys

    port = free_port()
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


def test_amapo_metrics_are_the_authors():
    """margin/accuracies: the gap beats mu, the batch's mean gap (not 0); rewards/batch_margin_mean is beta * mu;
    loss/margin the mean adaptive margin; a tie is no accurate reward."""
    chosen = torch.tensor([-1.0, -2.0, -3.0, -4.0], dtype=torch.float64)
    rejected = torch.tensor([-2.0, -2.0, -5.0, -4.5], dtype=torch.float64)  # gaps 1, 0 (a tie), 2, 0.5: mu 0.875
    _, metrics = loss_and_metrics(chosen, rejected, None, TrainConfig(loss="amapo", hparams={"beta": 2.0}))
    _, stats = ak.amapo_loss(chosen, rejected, beta=2.0, return_stats=True)
    assert float(metrics["margin/accuracies"]) == 0.5
    assert float(metrics["rewards/batch_margin_mean"]) == pytest.approx(2.0 * 0.875)
    assert float(metrics["loss/margin"]) == pytest.approx(float(stats["adaptive_margin"].mean()))
    assert float(metrics["loss/margin"]) > 0
    assert float(metrics["rewards/accuracies"]) == 0.75


def test_alpha_dpo_rewards_are_those_of_its_implicit_reference():
    """alpha_dpo logs beta log(pi / pi_hat), pi_hat = U (pi / pi_ref)^alpha its implicit reference: beta ((1 - alpha)
    logp + alpha ref), as its official trainer does (DPO's beta (logp - ref) before)."""
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    refs = (torch.tensor([-2.0, -1.0]), torch.tensor([-1.0, -3.0]))
    config = TrainConfig(loss="alpha_dpo", hparams={"beta": 2.0, "alpha": 0.25})
    _, metrics = loss_and_metrics(chosen, rejected, refs, config)
    # chosen: 2 (0.75 [-1, -2] + 0.25 [-2, -1]) = [-2.5, -3.5]
    # rejected: 2 (0.75 [-1.5, -1] + 0.25 [-1, -3]) = [-2.75, -3]
    assert float(metrics["rewards/chosen"]) == pytest.approx(-3.0)
    assert float(metrics["rewards/rejected"]) == pytest.approx(-2.875)
    assert float(metrics["rewards/accuracies"]) == 0.5 and float(metrics["rewards/margins"]) == pytest.approx(-0.125)


def test_dpo_rewards_are_each_side_against_its_own_reference():
    chosen, rejected = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.5])
    refs = (torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -3.5]))
    loss, metrics = loss_and_metrics(chosen, rejected, refs, TrainConfig(loss="dpo", hparams={"beta": 0.5}))
    # 0.5 * (policy - reference): chosen [0.25, -0.5], rejected [0, 0.5]
    assert float(metrics["rewards/chosen"]) == pytest.approx(-0.125)
    assert float(metrics["rewards/rejected"]) == pytest.approx(0.25)
    assert float(metrics["rewards/accuracies"]) == 0.5
    assert float(loss) == pytest.approx(float(ak.preference_loss(chosen, rejected, method="dpo", beta=0.5,
                                                                   ref_chosen_logps=refs[0], ref_rejected_logps=refs[1])))


class OneProcess:
    """accelerate's side of log_step for one CPU process: reduce and gather return their input."""

    device = torch.device("cpu")

    def __init__(self):
        self.logged = []

    def reduce(self, tensor, reduction):
        return tensor

    def gather(self, tensor):
        return tensor

    def log(self, values, step):
        self.logged.append((step, values))


def test_the_logged_grad_norm_is_the_steps_norm_before_clipping(tmp_path):
    """metrics.jsonl's grad_norm (the HF Trainer's): the first step's is the norm of the gradient of its two
    micro-batches' mean loss, recomputed here from the same model and batches; clipping to 1e-4 logs the same norms
    (taken before the clipping; the first step's learning rate is 0, the warm-up's start) and then trains another
    model (the clipping took effect in the second step)."""
    common = [*SHORT, "--max-steps", "3"]
    main([*common, "--max-grad-norm", "0", "--output-dir", str(tmp_path / "free")])
    main([*common, "--max-grad-norm", "1e-4", "--output-dir", str(tmp_path / "clipped")])
    free, clipped = read_metrics(tmp_path / "free"), read_metrics(tmp_path / "clipped")
    config = TrainConfig.from_recipe("tiny", max_train_pairs=96, max_test_pairs=32, log_with="none", device="cpu",
                                     total_batch_size=16, per_device_batch_size=8, output_dir=str(tmp_path / "again"))
    run = set_up(config)
    run.model.train()
    accumulation = run.accelerator.gradient_accumulation_steps
    for batch in list(run.loader)[:accumulation]:
        loss, _ = pair_loss(run.model, batch, config, run.ref_table, contextlib.ExitStack())
        (loss / accumulation).backward()
    norm = sum(p.grad.double().square().sum() for p in run.model.parameters() if p.grad is not None).sqrt()
    assert free[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-4)  # torch's fp32 norm: ~1e-5 off
    assert [r["grad_norm"] for r in clipped[:2]] == [r["grad_norm"] for r in free[:2]] and min(
        r["grad_norm"] for r in free) > 1e-4
    assert clipped[2]["loss"] != pytest.approx(free[2]["loss"], rel=1e-6)


def test_an_interrupted_save_over_an_earlier_checkpoint_is_not_resumed(tmp_path):
    """An earlier run's checkpoint-2 is saved over and the save stops half-way (a killed job): its trainer_state.json,
    which made --resume last take it, is gone with the first write, so the half-written state is never resumed."""
    out = tmp_path / "run"
    main([*SHORT, "--max-steps", "4", "--stop-after-steps", "2", "--output-dir", str(out)])
    config = TrainConfig(**json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["config"])
    assert [step for step, _ in run_checkpoints(out, config)] == [2]

    class Killed(Exception):
        pass

    class KilledWhileSaving(OneProcess):
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, directory):
            Path(directory).mkdir(parents=True, exist_ok=True)  # as accelerate's
            (Path(directory) / "half-written").write_text("")
            raise Killed

    with pytest.raises(Killed):
        driver.save_checkpoint(KilledWhileSaving(), None, None, config, 2, "checkpoint-2")
    assert not (out / "checkpoint-2" / "trainer_state.json").exists() and run_checkpoints(out, config) == []


def test_a_stop_after_steps_checkpoint_that_save_steps_wrote_is_saved_once(tmp_path, monkeypatch):
    """--stop-after-steps 2 with --save-steps 1: checkpoint-2 is written once. Saved again, its trainer_state.json
    went first, and with --save-total-limit 1 (checkpoint-1 pruned by the first save) a job killed during the second
    save kept no checkpoint to resume."""
    saved = []

    def counting_save(accelerator, model, tokenizer, config, step, name, resumable=True):
        saved.append(name)
        return save(accelerator, model, tokenizer, config, step, name, resumable)

    save = driver.save_checkpoint
    monkeypatch.setattr(driver, "save_checkpoint", counting_save)
    out = tmp_path / "run"
    result = main([*SHORT, "--max-test-pairs", "8", "--max-steps", "4", "--save-steps", "1", "--save-total-limit", "1",
                   "--stop-after-steps", "2", "--output-dir", str(out)])
    assert saved == ["checkpoint-1", "checkpoint-2"]
    assert result == {"steps": 2, "output_dir": str(out), "checkpoint": str(out / "checkpoint-2")}
    config = TrainConfig(**json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["config"])
    assert [step for step, _ in run_checkpoints(out, config)] == [2]


def test_a_resume_killed_while_rewriting_metrics_keeps_the_log(tmp_path, monkeypatch):
    """rewrite_metrics (a resume's first write) killed half-way leaves metrics.jsonl as it was: a truncated log would
    be continued by the next resume, its first steps missing."""
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": step}) + "\n" for step in (1, 2, 3, 4)))

    class Killed(Exception):
        pass

    def killed_while_writing(path, text, *args, **kwargs):
        path.open("w").close()  # what the write's open() does first
        raise Killed

    monkeypatch.setattr(Path, "write_text", killed_while_writing)
    with pytest.raises(Killed):
        driver.rewrite_metrics(log, up_to_step=3)
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    driver.rewrite_metrics(log, up_to_step=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_checkpoint_damaged_after_its_save_is_refused_naming_the_file(tmp_path, capsys):
    """A file of state/ cut short or deleted after the save (a full disk, a copy stopped half-way) is one line naming
    it, for --resume DIR and --resume last, before anything loads: not accelerate's traceback, nor (a missing RNG
    state, which accelerate skips) a silent resume without it."""
    out = tmp_path / "run"
    main([*SHORT, "--max-test-pairs", "8", "--max-steps", "2", "--stop-after-steps", "1", "--output-dir", str(out)])
    checkpoint = out / "checkpoint-1"
    config = TrainConfig(**json.loads((checkpoint / "trainer_state.json").read_text())["config"])
    assert check_resume(str(checkpoint), config) == str(checkpoint)
    optimizer = checkpoint / "state" / "optimizer.bin"
    saved = optimizer.read_bytes()
    optimizer.write_bytes(saved[:len(saved) // 2])
    with pytest.raises(UserError, match=f"--resume {checkpoint}: {optimizer} is {len(saved) // 2} bytes, saved as "
                                        f"{len(saved)}"):
        check_resume(str(checkpoint), config)
    optimizer.write_bytes(saved)
    (checkpoint / "state" / "random_states_0.pkl").unlink()
    with pytest.raises(UserError, match=re.escape(f"--resume last: {checkpoint / 'state' / 'random_states_0.pkl'} "
                                                  "is missing")):
        check_resume("last", config)
    capsys.readouterr()
    assert driver.cli([*SHORT, "--max-test-pairs", "8", "--max-steps", "2", "--output-dir", str(out),
                       "--resume", "last"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "random_states_0.pkl is missing" in error, error


def test_a_steps_metrics_are_micro_batch_means():
    """Summed over the 2 micro-batches of a step, a loss of 1.2 is a step loss of 0.6; tokens/s: the step's
    tokens over its seconds."""
    accelerator = OneProcess()
    sums = {"loss": torch.tensor(1.2), "rewards/accuracies": torch.tensor(1.5)}
    record = log_step(accelerator, sums, 2, 300, time.perf_counter() - 2.0, 7, 1, 0.25)
    assert record["loss"] == pytest.approx(0.6) and record["rewards/accuracies"] == pytest.approx(0.75)
    assert (record["step"], record["epoch"], record["learning_rate"]) == (7, 1, 0.25)
    assert record["tokens_per_s"] == pytest.approx(150, rel=0.05)
    assert accelerator.logged == [(7, record)]


def test_dpo_at_learning_rate_zero_stays_at_its_reference(tmp_path):
    """At learning rate 0 the policy is its reference: every step's DPO loss is log 2 (the mean over the step's 2
    micro-batches, not their sum) and its rewards 0, on the training pairs and on the held-out ones (each side
    against its own reference log-prob, from its own split's table); the held-out ranking accuracies logged at
    the last step are the final evaluation's. --save-steps 1 checkpoints every step but the last (the final
    checkpoint's, which --save-final off leaves out)."""
    out = tmp_path / "run"
    result = main([*SHORT, "--max-train-pairs", "32", "--max-test-pairs", "16", "--loss", "dpo", "--learning-rate",
                   "0", "--max-steps", "2", "--eval-steps", "2", "--save-steps", "1", "--save-final", "off",
                   "--output-dir", str(out)])
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["loss"] == pytest.approx(math.log(2), abs=1e-6)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert record[key] == pytest.approx(0.0, abs=1e-6), key
    last = records[-1]
    assert last["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins"):
        assert last[key] == pytest.approx(0.0, abs=1e-6), key
    for kind in ("summed", "normalized"):
        assert last[f"eval_ranking_accuracy/{kind}"] == pytest.approx(result["eval"][kind]["accuracy"]), kind
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert "checkpoint" not in result and not (out / "final").exists()


def test_schedule_and_optimizer_follow_the_config(tmp_path):
    """100 pairs in micro-batches of 8 (the last 4 dropped: AMaPO's statistics are over 8 pairs), 2 per step:
    6 steps an epoch, 12 in 2 epochs, of which a quarter, 3, warm up linearly; the cosine reaches 0 at step 12;
    AdamW takes the learning rate and the weight decay."""
    config = TrainConfig.from_recipe("tiny", max_train_pairs=100, max_test_pairs=8, log_with="none", device="cpu",
                                     total_batch_size=16, per_device_batch_size=8, epochs=2, warmup_ratio=0.25,
                                     weight_decay=0.05, learning_rate=0.01, output_dir=str(tmp_path / "run"))
    run = set_up(config)
    assert (len(run.loader), run.accelerator.gradient_accumulation_steps) == (12, 2)
    assert (run.steps_per_epoch, run.total_steps) == (6, 12)
    # warm-up from 0; the decay on the weights, none on the norms (optimizer_groups)
    assert [(g["lr"], g["weight_decay"]) for g in run.optimizer.param_groups] == [(0.0, 0.05), (0.0, 0.0)]
    factors = [run.scheduler.lr_lambdas[0](step) for step in (1, 3, 12)]
    assert factors == pytest.approx([1 / 3, 1.0, 0.0], abs=1e-12)
    assert run.scheduler.base_lrs == [0.01, 0.01]


class Clock:
    """amapo_train.train's time: each perf_counter() reading one second after the last."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


@pytest.fixture
def collated_tokens(monkeypatch):
    """The tokens (chosen and rejected attention masks) of each micro-batch the driver collates, in order."""
    tokens = []

    def counting_collate(pairs, pad_token_id):
        batch = data.collate(pairs, pad_token_id=pad_token_id)
        tokens.append(int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()))
        return batch

    monkeypatch.setattr(driver, "collate", counting_collate)
    return tokens


def test_each_step_is_clipped_once_and_counts_its_tokens(tmp_path, monkeypatch, collated_tokens):
    """--max-grad-norm reaches the clipping once per optimizer step, not per micro-batch; tokens_per_s is the
    step's tokens, chosen and rejected (its 2 micro-batches' attention masks), over its seconds."""
    from accelerate import Accelerator

    norms, tokens = [], collated_tokens
    clip = Accelerator.clip_grad_norm_
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, parameters, max_norm, **kwargs:
                        norms.append(max_norm) or clip(self, parameters, max_norm, **kwargs))

    monkeypatch.setattr(driver, "time", Clock())
    out = tmp_path / "run"
    main([*SHORT, "--max-train-pairs", "32", "--max-test-pairs", "8", "--max-steps", "2", "--max-grad-norm", "0.25",
          "--eval-steps", "2", "--save-final", "off", "--output-dir", str(out)])
    assert norms == [0.25, 0.25]
    records = read_metrics(out)
    # the first 4 batches collated: the training epoch's micro-batches (the evaluation comes after)
    assert [r["tokens_per_s"] for r in records] == [tokens[0] + tokens[1], tokens[2] + tokens[3]]
    # AMaPO's held-out log-probs are length-normalized too (a random model's: about -log(vocabulary) a token)
    assert abs(records[1]["eval_logps/chosen"] - records[1]["logps/chosen"]) < 1.0


def test_the_accelerator_gets_the_configs_precision_tracker_and_accumulation(monkeypatch, tmp_path):
    import accelerate

    made = []
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: made.append(kwargs))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for bf16, tracker in ((True, "none"), (False, "tensorboard")):
        make_accelerator(TrainConfig(bf16=bf16, log_with=tracker, device="cpu", total_batch_size=16,
                                     per_device_batch_size=4, output_dir=str(tmp_path)))
    assert [(m["mixed_precision"], m["log_with"], m["gradient_accumulation_steps"], m["cpu"]) for m in made] == \
        [("bf16", None, 4, True), ("no", "tensorboard", 4, True)]


def test_fused_path_keeps_a_zero3_lm_head_gathered_until_released(monkeypatch):
    """Under ZeRO-3 the lm_head weight (marked with a ds_id) is gathered into the caller's ExitStack and stays
    gathered until the caller closes it (after the backward); without a stack the fused path refuses."""
    import deepspeed

    events = []

    @contextlib.contextmanager
    def gathered(params):
        events.append(("gathered", params))
        yield
        events.append(("released", params))

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gathered)
    model = models.tiny_llama(32)
    model.lm_head.weight.ds_id = 0  # how ZeRO-3 marks the parameters it partitions
    with pytest.raises(ValueError, match="keep_gathered"):
        lm_head_params(model, None)
    with contextlib.ExitStack() as keep_gathered:
        weight, bias = lm_head_params(model, keep_gathered)
        assert weight is model.lm_head.weight and bias is None
        assert [(event, params[0] is weight) for event, params in events] == [("gathered", True)]
    assert [event for event, _ in events] == ["gathered", "released"]


def test_fused_mean_logit_is_the_ops_one():
    """The fused path never forms the logits; its logits/chosen|rejected mean, h . mean_v(W), equals the mean of the
    ops path's logits over positions and vocabulary."""
    model = models.tiny_llama(64)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 64, (4, 9), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        fused = sequence_logps(model, input_ids, mask, labels, average=True, impl="fused")
        ops = sequence_logps(model, input_ids, mask, labels, average=True, impl="ops")
    assert torch.allclose(fused[0], ops[0], rtol=1e-4)
    assert torch.allclose(fused[1], ops[1], rtol=1e-4, atol=1e-6)


def test_a_micro_batchs_metrics_are_each_sides():
    """pair_loss: the first half of the concatenated rows is the chosen side, and each pair's reference log-probs
    are the table's row of its batch["index"] (here in reverse order)."""
    model = models.tiny_llama(64)
    pairs = [{"chosen_input_ids": [1, 5, 6, 7], "chosen_labels": [-100, 5, 6, 7], "rejected_input_ids": [1, 5, 9],
              "rejected_labels": [-100, 5, 9], "index": 1},
             {"chosen_input_ids": [1, 8, 3], "chosen_labels": [-100, 8, 3], "rejected_input_ids": [1, 2, 4, 4, 4],
              "rejected_labels": [-100, -100, 4, 4, 4], "index": 0}]
    batch = data.collate(pairs, pad_token_id=0)
    table = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], dtype=torch.float64)
    _, metrics = pair_loss(model, batch, TrainConfig(loss="dpo", loss_impl="ops", hparams={"beta": 1.0}), table)
    with torch.no_grad():
        for side, refs in (("chosen", [-3.0, -1.0]), ("rejected", [-4.0, -2.0])):
            logits = model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]).logits
            logps = reference.sequence_logps(logits.float(), batch[f"{side}_labels"], shift=True, average=False)
            assert float(metrics[f"logps/{side}"]) == pytest.approx(float(logps.mean()), rel=1e-5), side
            assert float(metrics[f"rewards/{side}"]) == pytest.approx(float((logps.double() - torch.tensor(refs)).mean()),
                                                                       rel=1e-5), side
            assert float(metrics[f"logits/{side}"]) == pytest.approx(float(logits.mean()), rel=1e-5, abs=1e-7), side


def test_an_epoch_ends_at_its_last_full_step(tmp_path):
    """40 pairs are 5 micro-batches of 8, one step of 3 an epoch: the 2 left over make no step of their own (the
    end of the data would sync them as one), and the next epoch starts afresh."""
    out = tmp_path / "run"
    main([*SHORT, "--max-train-pairs", "40", "--max-test-pairs", "4", "--total-batch-size", "24", "--epochs", "2",
          "--save-final", "off", "--output-dir", str(out)])
    assert [(r["step"], r["epoch"]) for r in read_metrics(out)] == [(1, 0), (2, 1)]


def test_fused_refuses_a_logit_scale_before_any_step(tmp_path):
    """A model that scales its logits (here logit_scale=0.5) is refused with --loss-impl fused as a user error, before
    training: the fused path would leave the scale out."""
    tokenizer = models.train_tiny_tokenizer(["Hello there.", "General Kenobi!"], vocab_size=300)
    model = models.tiny_llama(len(tokenizer))
    model.config.logit_scale = 0.5
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with pytest.raises(UserError, match="'fused' does not apply the model's logit_scale=0.5"):
        main([*SHORT, "--model", str(tmp_path / "model"), "--loss-impl", "fused", "--max-steps", "1",
              "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_local_model_loads_in_fp32_with_a_pad_token_and_the_template_override(tmp_path):
    """The fp32 master copy whatever dtype the checkpoint holds; a tokenizer without a pad token pads with its EOS;
    --chat-template replaces the tokenizer's template."""
    tokenizer = models.train_tiny_tokenizer(["Hello there.", "General Kenobi!"], vocab_size=300)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    models.tiny_llama(len(tokenizer)).to(torch.bfloat16).save_pretrained(tmp_path)
    model, loaded = models.load_model_and_tokenizer(TrainConfig(model=str(tmp_path), chat_template="mistral"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert loaded.pad_token_id == loaded.eos_token_id is not None
    assert loaded.chat_template == data.CHAT_TEMPLATES["mistral"]


def test_the_seed_initializes_the_tiny_model(monkeypatch):
    tokenizer = models.train_tiny_tokenizer(["Hello there.", "General Kenobi!"], vocab_size=300)
    monkeypatch.setattr(models, "load_tokenizer", lambda config: tokenizer)
    weights = [models.load_model_and_tokenizer(TrainConfig(seed=seed))[0].lm_head.weight for seed in (1, 1, 2)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_a_single_local_file_holds_out_a_seeded_tenth_unless_told(tmp_path):
    """Without --eval-dataset or --eval-fraction, a local file holds out 10% of its records; a Hub (or bundled)
    source is evaluated on its --test-split."""
    pairs = tmp_path / "pairs.jsonl"
    plan = dry_run(TrainConfig(dataset=str(pairs), seed=3), 1)
    assert plan["eval_data"].startswith(f"0.1 of {pairs} held out (seed 3)")
    assert dry_run(TrainConfig.from_recipe("llama3-8b-base"), 4)["eval_data"] == \
        "HuggingFaceH4/ultrafeedback_binarized split test_prefs (training: split train_prefs)"


def test_a_checkpoints_save_time_is_not_the_next_steps(tmp_path, monkeypatch, collated_tokens):
    """tokens_per_s of the step after a checkpoint is its own tokens over its own seconds: the checkpoint (here 100 s
    on amapo_train.train's clock) is left out, as the evaluation is."""
    clock, tokens = Clock(), collated_tokens
    save = driver.save_checkpoint

    def slow_save(*args, **kwargs):
        clock.now += 100.0
        return save(*args, **kwargs)

    monkeypatch.setattr(driver, "time", clock)
    monkeypatch.setattr(driver, "save_checkpoint", slow_save)
    out = tmp_path / "run"
    main([*SHORT, "--max-train-pairs", "32", "--max-test-pairs", "8", "--max-steps", "2", "--save-steps", "1",
          "--save-final", "off", "--output-dir", str(out)])
    assert [r["tokens_per_s"] for r in read_metrics(out)] == [tokens[0] + tokens[1], tokens[2] + tokens[3]]


def test_the_tiny_models_checkpoint_stops_at_its_tokenizers_eos(tmp_path):
    """The tiny (and random:SHAPE) model's config kept LlamaConfig's ids, bos 1 / eos 2, which in the tiny tokenizer
    are <|eos|> and <|pad|>: a checkpoint loaded with plain transformers generated until <|pad|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("tiny", "random:llama3-vocab-tiny"):
        model, tokenizer = models.load_model_and_tokenizer(TrainConfig(model=name))
        model.save_pretrained(tmp_path / "saved")
        tokenizer.save_pretrained(tmp_path / "saved")
        loaded, loaded_tokenizer = (AutoModelForCausalLM.from_pretrained(tmp_path / "saved"),
                                    AutoTokenizer.from_pretrained(tmp_path / "saved"))
        expected = (loaded_tokenizer.bos_token_id, loaded_tokenizer.eos_token_id, loaded_tokenizer.pad_token_id)
        assert expected == (0, 1, 2)
        for settings in (loaded.config, loaded.generation_config):
            assert (settings.bos_token_id, settings.eos_token_id, settings.pad_token_id) == expected, name


def test_the_seeded_tiny_model_is_unchanged_by_its_token_ids():
    """The ids are set after the init: the weights (the embedding's padding row included) are the seed's."""
    config = TrainConfig()
    model, tokenizer = models.load_model_and_tokenizer(config)
    plain = models.tiny_llama(len(tokenizer), seed=config.seed)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_a_blank_response_is_counted_as_what_it_is(tmp_path, capsys):
    """The trl tokenization never cuts a response to nothing: a pair it drops has a blank response in the data,
    which the log called 'empty response after truncation'."""
    pairs, held_out = tmp_path / "pairs.jsonl", tmp_path / "held_out.jsonl"
    good = [{"prompt": f"Question {i}?", "chosen": f" Yes {i}.", "rejected": f" No {i}."} for i in range(9)]
    pairs.write_text("\n".join(json.dumps(r) for r in [{**good[0], "chosen": "   "}, *good]))
    held_out.write_text("\n".join(json.dumps(r) for r in good[:2]))
    main(["--dataset", str(pairs), "--eval-dataset", str(held_out), "--log-with", "none", "--device", "cpu",
          "--total-batch-size", "8", "--per-device-batch-size", "8", "--max-steps", "1", "--save-final", "off",
          "--output-dir", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    assert "data: 9 train / 2 test pairs (1 / 0 dropped: an empty or blank response, in the data or after " \
           "truncation)" in printed, printed


def test_a_chat_template_refusing_a_record_is_a_user_error(tmp_path, capsys):
    """A template that refuses a conversation (Gemma's 'System role not supported') was a jinja2 traceback once the
    model had loaded; amapo-eval already said it in one line."""
    tokenizer = models.train_tiny_tokenizer(["What color is the sky? It is blue. It is green."] * 4, vocab_size=300)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
                               "{% endfor %}")
    model_dir = tmp_path / "model"
    models.tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    record = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color?"}],
              "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Green."}]}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(record) for _ in range(10)))
    status = driver.cli(["--model", str(model_dir), "--dataset", str(pairs), "--log-with", "none", "--device", "cpu",
                         "--output-dir", str(tmp_path / "run")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("amapo-train: error:")]
    assert status == 2 and len(errors) == 1, errors
    assert re.search(rf"--dataset {re.escape(str(pairs))}: record [0-9]: System role not supported", errors[0])
    # one in --eval-dataset: named under that flag (it was under --dataset's), by its position in that file
    user_only = {**record, "prompt": record["prompt"][1:]}
    pairs.write_text("\n".join(json.dumps(user_only) for _ in range(10)))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(json.dumps(record if i == 2 else user_only) for i in range(4)))
    status = driver.cli(["--model", str(model_dir), "--dataset", str(pairs), "--eval-dataset", str(held_out),
                         "--log-with", "none", "--device", "cpu", "--output-dir", str(tmp_path / "run")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("amapo-train: error:")]
    assert status == 2 and errors == [f"amapo-train: error: --eval-dataset {held_out}: record 2: System role not "
                                      "supported"], errors


def test_a_diverged_run_stops_at_its_first_non_finite_step(tmp_path, capsys):
    """A learning rate that sends the weights to inf: the run went on to its end with NaN losses, saved NaN
    checkpoints and a final model, reported a held-out accuracy of 0 and exited 0. It now stops at the first step
    with a non-finite gradient norm, before that step's update and before any checkpoint of it."""
    out = tmp_path / "run"
    status = driver.cli([*SHORT, "--learning-rate", "1e30", "--max-steps", "5", "--save-steps", "1",
                         "--output-dir", str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("amapo-train: error:")]
    assert status == 2 and len(errors) == 1, errors
    found = re.fullmatch(r"amapo-train: error: step (\d): the gradient norm is nan: training diverged and stopped "
                         r"\(lower --learning-rate, or check the data\); the checkpoints before it are kept", errors[0])
    assert found, errors[0]
    step = int(found.group(1))
    assert step >= 2  # a step of finite gradients first: its checkpoint is kept
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, step)) and all(math.isfinite(s["loss"]) for s in steps)
    assert sorted(p.name for p in out.iterdir()) == [*(f"checkpoint-{i}" for i in range(1, step)), "metrics.jsonl"]
    with pytest.raises(UserError, match="^step 7: the loss is inf: training diverged"):  # DeepSpeed's check
        driver.stop_if_diverged(7, "loss", math.inf)
    driver.stop_if_diverged(7, "gradient norm", None)  # DeepSpeed's optimizer may compute no norm


def test_a_fresh_run_over_an_earlier_one_says_what_it_replaces(tmp_path, capsys):
    """A fresh run into an earlier run's directory starts metrics.jsonl anew and leaves the earlier checkpoints
    beside its own: a warning names them (a rerun of the same command still runs); the first run gets none."""
    out = tmp_path / "run"
    common = [*SHORT, "--max-train-pairs", "32", "--max-test-pairs", "8", "--output-dir", str(out)]
    main([*common, "--max-steps", "2", "--save-steps", "1"])
    assert "holds an earlier run" not in capsys.readouterr().out
    main([*common, "--max-steps", "1", "--save-steps", "0"])
    printed = capsys.readouterr().out
    assert f"warning: --output-dir {out} holds an earlier run (metrics.jsonl, checkpoint-1/, final/): " \
           "this run starts metrics.jsonl anew" in printed, printed
    assert [r["step"] for r in read_metrics(out)] == [1]


def test_attention_implementation_is_set_on_the_model(tmp_path, monkeypatch):
    """--attn-implementation reaches the model (tiny, random:SHAPE and from_pretrained alike: set after the load);
    one that cannot run here is one line naming the flag, not transformers' traceback."""
    seen, original = {}, models.with_attention

    def spy(model, name):
        model = original(model, name)
        seen["impl"] = model.config._attn_implementation
        return model

    monkeypatch.setattr(models, "with_attention", spy)
    main([*SHORT, "--max-steps", "1", "--save-final", "off", "--attn-implementation", "eager",
          "--output-dir", str(tmp_path / "eager")])
    assert seen["impl"] == "eager"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(UserError, match="--attn-implementation flash_attention_2: FlashAttention2 .* installed"):
            main([*SHORT, "--max-steps", "1", "--save-final", "off", "--attn-implementation", "flash_attention_2",
                  "--output-dir", str(tmp_path / "fa2")])


def test_checkpointing_is_non_reentrant():
    """As the authors' configs ask (use_reentrant: False), whatever transformers' default: its 4.x default was
    the reentrant form."""
    model = models.tiny_llama(64)
    models.enable_checkpointing(model)
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}


def test_save_total_limit_keeps_the_newest_checkpoints_of_this_run(tmp_path, capsys):
    """--save-total-limit 2 with a checkpoint every step of 4: checkpoint-2 and checkpoint-3 stay (the 4th step's
    is final/, not counted), checkpoint-1 is deleted; another run's checkpoint (another seed) is left alone
    though older. final/ is the model without the accelerate state (AdamW's, 12 bytes a parameter, of no use once
    the run is done): an earlier run's state/ there is removed, and --resume refuses it."""
    out = tmp_path / "run"
    another_run = out / "checkpoint-0"
    (another_run / "state").mkdir(parents=True)
    (another_run / driver.STATE_FILE).write_text(json.dumps({"step": 0, "config": {"seed": 7}}))
    (out / "final" / "state").mkdir(parents=True)
    args = [*SHORT, "--max-test-pairs", "8", "--save-steps", "1", "--save-total-limit", "2", "--output-dir", str(out)]
    result = main([*args, "--max-steps", "4"])
    printed = capsys.readouterr().out
    assert "--save-total-limit counts those of this run's settings" in printed, printed
    assert f"deleted {out / 'checkpoint-1'} (--save-total-limit 2)" in printed, printed
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "logs") == [
        "checkpoint-0", "checkpoint-2", "checkpoint-3", "final"]
    assert (out / "checkpoint-3" / "state").is_dir() and (another_run / "state").is_dir()
    assert result["checkpoint"] == str(out / "final") and not (out / "final" / "state").exists()
    assert json.loads((out / "final" / driver.STATE_FILE).read_text())["step"] == 4
    with pytest.raises(UserError, match=r"final: a model without the training state \(state/\) to resume from"):
        check_resume(str(out / "final"), TrainConfig())


def test_pruning_counts_this_runs_checkpoints_up_to_the_step_saved(tmp_path):
    """Of checkpoints with this run's settings at steps 1, 2, 3 and an earlier run's 9 (past the step just
    saved, 3), a limit of 2 deletes step 1 only; one without state/, one of other settings and an unreadable
    one are never counted."""
    config = TrainConfig(output_dir=str(tmp_path))

    def checkpoint(name, step, settings=dataclasses.asdict(config), state=True, text=None):
        (tmp_path / name / "state").mkdir(parents=True) if state else (tmp_path / name).mkdir()
        stored = text if text is not None else json.dumps({"step": step, "config": settings})
        (tmp_path / name / driver.STATE_FILE).write_text(stored)

    for step in (1, 2, 3, 9):
        checkpoint(f"checkpoint-{step}", step)
    checkpoint("checkpoint-0", 0, state=False)
    checkpoint("checkpoint-00", 0, settings={**dataclasses.asdict(config), "seed": 1})
    checkpoint("checkpoint-000", 0, text="{not json")
    assert driver.prune_checkpoints(tmp_path, config, keep=2, step=3) == [tmp_path / "checkpoint-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-0", "checkpoint-00", "checkpoint-000", "checkpoint-2", "checkpoint-3", "checkpoint-9"]
    assert check_resume("last", config) == str(tmp_path / "checkpoint-9")  # --resume last: the newest
    with pytest.raises(UserError, match=f"--resume last: --output-dir {tmp_path / 'none'} holds no checkpoint-STEP "
                                        "directory of this run's settings"):
        check_resume("last", TrainConfig(output_dir=str(tmp_path / "none")))


def test_a_data_error_of_several_lines_is_said_on_one():
    """What the tokenizer raises about a record (a template's message can span lines) is one line of the CLI's
    error, as every user error."""
    with pytest.raises(UserError) as info:
        with driver.tokenization_errors("--eval-dataset held.jsonl"):
            raise ValueError("the template refuses\n  a system turn")
    assert str(info.value) == "--eval-dataset held.jsonl: the template refuses a system turn"


def tiny_mixtral(vocab_size, output_router_logits):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
        output_router_logits=output_router_logits, router_aux_loss_coef=0.02))


def router_batch():
    pairs = [{"chosen_input_ids": [1, 5, 6, 7], "chosen_labels": [-100, 5, 6, 7], "rejected_input_ids": [1, 5, 9],
              "rejected_labels": [-100, 5, 9], "index": 0},
             {"chosen_input_ids": [1, 8, 3], "chosen_labels": [-100, 8, 3], "rejected_input_ids": [1, 2, 4, 4, 4],
              "rejected_labels": [-100, -100, 4, 4, 4], "index": 1}]
    return data.collate(pairs, pad_token_id=0)


@pytest.mark.parametrize("loss_impl", ["fused", "ops", "eager"])
def test_a_mixture_of_experts_router_loss_is_the_models_own(loss_impl):
    """A Mixtral whose config has output_router_logits on: the loss is the preference loss plus
    router_aux_loss_coef x the router load-balancing loss its own forward computes (the term its language-modelling
    loss carries), on every path; logged as aux_loss, with `loss` the sum, as TRL's DPOTrainer does. Before, the
    term was silently left out, on every path."""
    model = tiny_mixtral(64, output_router_logits=True)
    config = TrainConfig(loss_impl=loss_impl)
    weight, line = driver.router_loss_weight(model, config)
    assert weight == 0.02 and "output_router_logits is on" in line
    batch = router_batch()
    loss, metrics = pair_loss(model, batch, config, None, router_weight=weight)
    input_ids, attention_mask, labels = data.concatenated(batch)
    with torch.no_grad():
        own = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        logps = reference.sequence_logps(own.logits.double(), labels, shift=True, average=True)
        preference = reference.amapo_loss(*logps.chunk(2))
    assert own.aux_loss > 0
    assert float(metrics["aux_loss"]) == pytest.approx(float(own.aux_loss), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(preference) + 0.02 * float(own.aux_loss), rel=1e-4)
    assert float(metrics["loss"]) == float(loss.detach())
    loss.backward()  # the router's gate learns from the load-balancing term (and the preference loss)
    gate = next(p for name, p in model.named_parameters() if name.endswith("mlp.gate.weight"))
    with_router = gate.grad.clone()
    model.zero_grad()
    pair_loss(model, batch, config, None)[0].backward()
    assert not torch.allclose(gate.grad, with_router)


def test_the_router_loss_weight_follows_the_model_config_unless_told():
    """Unset: the config's coefficient where its output_router_logits is on, else none, saying TRL 1.16 would add
    it; --router-aux-loss-coef sets it (0: none); a model without a router refuses a non-zero one before any
    step, naming the flag; a dense model says nothing."""
    off = tiny_mixtral(64, output_router_logits=False)
    weight, line = driver.router_loss_weight(off, TrainConfig())
    assert weight == 0.0 and "output_router_logits is off" in line and "router_aux_loss_coef=0.02" in line
    assert driver.router_loss_weight(off, TrainConfig(router_aux_loss_coef=0.5))[0] == 0.5
    assert driver.router_loss_weight(tiny_mixtral(64, True), TrainConfig(router_aux_loss_coef=0.0))[0] == 0.0
    dense = models.tiny_llama(64)
    assert driver.router_loss_weight(dense, TrainConfig()) == (0.0, None)
    assert driver.router_loss_weight(dense, TrainConfig(router_aux_loss_coef=0.0)) == (0.0, None)
    with pytest.raises(UserError, match="--router-aux-loss-coef 0.1: LlamaForCausalLM is not a mixture of experts"):
        driver.router_loss_weight(dense, TrainConfig(router_aux_loss_coef=0.1))
    with pytest.raises(UserError, match="--router-aux-loss-coef -0.1: must be >= 0"):
        TrainConfig(router_aux_loss_coef=-0.1).validate()


def test_a_mixture_of_experts_trains_with_its_router_loss_end_to_end(tmp_path, capsys):
    """amapo-train --model <a local Mixtral> --router-aux-loss-coef: the run says so, and metrics.jsonl has aux_loss
    each step (and eval_aux_loss with --eval-steps), its loss the preference loss plus the weighted term."""
    tokenizer = models.train_tiny_tokenizer(["Hello there.", "General Kenobi!"], vocab_size=300)
    tiny_mixtral(len(tokenizer), output_router_logits=False).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    main([*SHORT, "--model", str(tmp_path / "model"), "--max-steps", "2", "--eval-steps", "2", "--max-length", "96",
          "--max-prompt-length", "48", "--router-aux-loss-coef", "0.5", "--output-dir", str(tmp_path / "run")])
    assert "router load-balancing loss x 0.5 (--router-aux-loss-coef)" in capsys.readouterr().out
    records = read_metrics(tmp_path / "run")
    assert all(record["aux_loss"] > 0 for record in records)
    assert records[-1]["eval_aux_loss"] > 0


def dropout_models():
    """Tiny models of families that keep dropout in modules (GPT-2), as rates for functional dropout (OPT), in
    attention (Llama's attention_dropout), or all three (Phi)."""
    import transformers

    shape = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    return {
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **shape, hidden_size=32, intermediate_size=48, attention_dropout=0.5)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5,
            bos_token_id=0, eos_token_id=0)),
        "opt": transformers.OPTForCausalLM(transformers.OPTConfig(
            **shape, hidden_size=32, ffn_dim=48, word_embed_proj_dim=32, dropout=0.5, attention_dropout=0.5,
            activation_dropout=0.5)),
        "phi": transformers.PhiForCausalLM(transformers.PhiConfig(
            **shape, hidden_size=32, intermediate_size=48, resid_pdrop=0.5, embd_pdrop=0.5, attention_dropout=0.5)),
    }


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_dropout_is_off_in_every_form(family, attention):
    """disable_dropout: in training mode the model computes what it computes in eval mode. TRL's walk (nn.Dropout
    modules only) leaves Llama's, Phi's and OPT's on (their attention_dropout, OPT's functional rates)."""
    model = dropout_models()[family]
    model.set_attn_implementation(attention)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits), "the model has no dropout: proves nothing"
        assert disable_dropout(model) > 0
        training = model(ids).logits
        model.eval()
        assert torch.equal(training, model(ids).logits)
    assert disable_dropout(model) == 0
    assert model.config.to_dict() == dropout_models()[family].config.to_dict()  # the saved config is the model's


def test_dpo_with_a_dropout_model_starts_at_its_reference(tmp_path, capsys):
    """A model with dropout (attention_dropout 0.5): its reference log-probs are computed in eval mode, so at
    learning rate 0 the rewards are 0 only with dropout off (--disable-dropout, on by default, as the authors'
    trainer); with it off they are noise."""
    tokenizer = models.train_tiny_tokenizer(["Hello there.", "General Kenobi!"], vocab_size=300)
    model = dropout_models()["llama"]
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    common = [*SHORT, "--model", str(tmp_path / "model"), "--loss", "dpo", "--hparam", "beta=10", "--learning-rate",
              "0", "--max-steps", "1", "--save-final", "off", "--max-length", "96", "--max-prompt-length", "48"]
    main([*common, "--output-dir", str(tmp_path / "off")])
    assert "dropout off in the model (--disable-dropout)" in capsys.readouterr().out
    for key in ("rewards/chosen", "rewards/rejected"):
        assert read_metrics(tmp_path / "off")[0][key] == 0.0, key
    main([*common, "--disable-dropout", "off", "--output-dir", str(tmp_path / "on")])
    assert abs(read_metrics(tmp_path / "on")[0]["rewards/chosen"]) > 1e-3


def test_no_key_value_cache_is_built(monkeypatch):
    """The driver's forwards (fused and ops; training, reference and held-out) and amapo-eval's ranking pass
    use_cache=False, as the authors' trainer and TRL: before, every forward built a DynamicCache holding each
    layer's keys and values (under no_grad all layers' at once: about 2 GiB for an 8B Llama at 8 rows of 2048
    tokens in bf16, by arithmetic)."""
    from transformers import cache_utils

    from amapo_train.eval.ranking import pair_logps

    built = []
    original = cache_utils.DynamicCache.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", counting)
    model, batch = models.tiny_llama(64), router_batch()
    input_ids, attention_mask, labels = data.concatenated(batch)
    for impl in ("fused", "ops", "eager"):
        pair_loss(model, batch, TrainConfig(loss_impl=impl), None)[0].backward()
        with torch.no_grad():
            sequence_logps(model, input_ids, attention_mask, labels, average=True, impl=impl)
    with torch.no_grad():
        pair_logps(model, batch)
    model(input_ids=input_ids)  # the counter counts: a forward with the config's use_cache builds one
    assert len(built) == 1


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_ends_the_run_with_a_checkpoint_that_resumes_it(tmp_path, stop):
    """SIGTERM (a preemption, a time limit) or SIGUSR1 (`sbatch --signal=USR1@120`) mid-run: the run finishes its
    optimizer step, saves checkpoint-STEP, says so and exits with 128 + the signal's number; --resume last then
    trains the rest, as an uninterrupted run does. Before, the signal killed the run: nothing since the last
    --save-steps was kept."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    common = [*SHORT, "--epochs", "20", "--max-steps", "40", "--output-dir", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "amapo_train.train", *common], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.02)
    process.send_signal(getattr(signal, stop))
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + getattr(signal, stop), output[-3000:]
    stopped_at = len(read_metrics(out))
    assert 2 <= stopped_at < 40, output[-3000:]
    assert f"stopped by {stop} after step {stopped_at} of 40: {out / f'checkpoint-{stopped_at}'} saved" in output
    assert json.loads((out / f"checkpoint-{stopped_at}" / "trainer_state.json").read_text())["step"] == stopped_at
    resumed = main([*common, "--resume", "last"])
    assert resumed["steps"] == 40 and "stop_signal" not in resumed
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 41))
    if stop == "SIGTERM":
        straight = tmp_path / "straight"
        main([*common[:-1], str(straight)])
        assert [r["loss"] for r in records] == [r["loss"] for r in read_metrics(straight)]


def test_a_stop_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """Two processes (gloo, started as a launcher starts them), SIGUSR1 to the second only: both stop after the
    same optimizer step (the flag is all-reduced after every step), one checkpoint of that step is saved, and both
    exit: 128 + SIGUSR1 where it arrived, 128 + SIGTERM in the other. Without the agreement the first process would
    wait for the second in the next step's collectives."""
    import os
    import signal
    import subprocess
    import sys

    out, port = tmp_path / "run", free_port()
    command = [sys.executable, "-m", "amapo_train.train", "--max-train-pairs", "96", "--max-test-pairs", "8",
               "--log-with", "none", "--device", "cpu", "--total-batch-size", "8", "--per-device-batch-size", "4",
               "--epochs", "20", "--max-steps", "60", "--output-dir", str(out)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={
        **os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in (0, 1)]
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2):
        assert all(p.poll() is None for p in processes) and time.monotonic() < deadline, \
            [p.communicate()[0][-2000:] for p in processes]
        time.sleep(0.02)
    processes[1].send_signal(signal.SIGUSR1)
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [128 + signal.SIGTERM, 128 + signal.SIGUSR1], \
        [o[-2000:] for o in outputs]
    stopped_at = len(read_metrics(out))
    assert 2 <= stopped_at < 60
    assert f"stopped by another process's stop signal after step {stopped_at} of 60" in outputs[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{stopped_at}"]
    assert json.loads((out / f"checkpoint-{stopped_at}" / "trainer_state.json").read_text())["step"] == stopped_at


def test_torchrun_passes_sigterm_on_and_the_run_checkpoints(tmp_path):
    """SIGTERM to torchrun (as `accelerate launch` and SLURM's preemption send it): torchrun passes it to both
    workers, which stop after the same step and save its checkpoint before torchrun's shutdown timeout."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "amapo_train.train", "--max-train-pairs", "96", "--max-test-pairs", "8", "--log-with", "none",
               "--device", "cpu", "--total-batch-size", "8", "--per-device-batch-size", "4", "--epochs", "20",
               "--max-steps", "60", "--output-dir", str(out)]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0][-3000:]
        time.sleep(0.02)
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=300)[0]
    stopped_at = len(read_metrics(out))
    assert f"stopped by SIGTERM after step {stopped_at} of 60" in output, output[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{stopped_at}"]
    assert json.loads((out / f"checkpoint-{stopped_at}" / "trainer_state.json").read_text())["step"] == stopped_at


def test_weight_decay_spares_biases_and_norms_as_the_hf_trainer():
    """--weight-decay decays every weight but biases and normalization weights, by the installed transformers'
    Trainer rule (the authors' trainer's); before, AdamW decayed every parameter. Without decay, one group."""
    from transformers import Trainer

    model = dropout_models()["phi"]  # LayerNorm modules with biases, and biased projections
    config = TrainConfig(weight_decay=0.1)
    groups = driver.optimizer_groups(model, config)
    assert len(groups) == config.optimizer_group_count()  # the count --resume checks a checkpoint against
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    assert decayed == set(Trainer.get_decay_parameter_names(None, model))
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.1, 0.0)
    spared = {names[id(p)] for p in groups[1]["params"]}
    assert spared and all("bias" in n or "layernorm" in n or "norm" in n for n in spared), spared
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "model.final_layernorm.weight" in spared
    assert len(decayed) + len(spared) == len(list(model.parameters()))
    config = TrainConfig(weight_decay=0.0)
    groups = driver.optimizer_groups(model, config)
    assert [len(g["params"]) for g in groups] == [len(list(model.parameters()))]
    assert config.optimizer_group_count() == 1


@pytest.mark.parametrize("name, factors", [("linear", [1 / 3, 1.0, 5 / 9, 0.0]), ("constant_with_warmup",
                                                                                   [1 / 3, 1.0, 1.0, 1.0])])
def test_the_learning_rate_schedule_after_the_warm_up_is_the_configs(tmp_path, name, factors):
    """--lr-scheduler linear or constant_with_warmup: 12 steps, 3 of warm-up, then linear to 0 or constant
    (cosine, the recipes', in test_schedule_and_optimizer_follow_the_config); another name is a one-line error."""
    config = TrainConfig.from_recipe("tiny", max_train_pairs=100, max_test_pairs=8, log_with="none", device="cpu",
                                     total_batch_size=16, per_device_batch_size=8, epochs=2, warmup_ratio=0.25,
                                     lr_scheduler=name, output_dir=str(tmp_path / "run"))
    run = set_up(config)
    assert [run.scheduler.lr_lambdas[0](step) for step in (1, 3, 7, 12)] == pytest.approx(factors, abs=1e-12)
    with pytest.raises(UserError, match=r"--lr-scheduler must be one of \['cosine', 'linear', 'constant_with_warmup'\]"):
        TrainConfig(lr_scheduler="cosine_with_restarts").validate()
