"""The four paper recipes state what the AMaPO authors ran (github Shiroha-Offical/AMaPO:
training_configs/*-AMaPO.yaml and accelerate_configs/deepspeed_zero3.yaml, num_processes 4), and --dry-run
shows it, with the pairs AMaPO's batch statistics are taken over."""

import json

import pytest

from amapo_train.config import TrainConfig
from amapo_train.train import dry_run, main, stats_pool_warning

# recipe: model, dataset, beta, learning rate, per-device batch, processes, accumulation, max length,
# max prompt length, eval steps; the authors' values.
AUTHORS = {
    "llama3-8b-base": ("princeton-nlp/Llama-3-Base-8B-SFT", "HuggingFaceH4/ultrafeedback_binarized", 3.0, 6e-7,
                       1, 4, 32, 2048, 1800, 100),
    "llama3-8b-instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "princeton-nlp/llama3-ultrafeedback", 3.0, 1e-6,
                           2, 4, 16, 2048, 1800, 1000),
    "mistral-7b-base": ("alignment-handbook/zephyr-7b-sft-full", "HuggingFaceH4/ultrafeedback_binarized", 2.0, 4e-7,
                        2, 4, 16, 1024, 512, 1000),
    "mistral-7b-instruct": ("mistralai/Mistral-7B-Instruct-v0.2", "princeton-nlp/mistral-instruct-ultrafeedback", 2.0,
                            6e-7, 2, 4, 16, 2048, 1800, 1000),
}


@pytest.mark.parametrize("recipe", sorted(AUTHORS))
def test_dry_run_shows_the_authors_setting(recipe, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, dataset, beta, lr, per_device, processes, accumulation, max_length, max_prompt, eval_steps = AUTHORS[recipe]
    main(["--recipe", recipe, "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert (plan["model"], plan["dataset"], plan["hparams"]["beta"], plan["learning_rate"]) == (model, dataset, beta, lr)
    assert (plan["per_device_batch_size"], plan["world_size"], plan["gradient_accumulation_steps"]) == \
        (per_device, processes, accumulation)
    assert plan["effective_batch_size"] == 128
    assert (plan["max_length"], plan["max_prompt_length"]) == (max_length, max_prompt)
    assert plan["amapo_stats_pairs"] == per_device * processes
    assert plan["tokenization"] == "trl" and "warning" not in plan
    config = TrainConfig.from_recipe(recipe)
    assert (config.eval_steps, config.max_grad_norm, config.bf16, config.deepspeed) == (eval_steps, 1.0, True, "zero3")
    assert config.chat_template == ("mistral" if recipe == "mistral-7b-instruct" else None)


def test_a_launch_that_changes_the_statistics_pool_is_warned_about():
    config = TrainConfig.from_recipe("llama3-8b-base")
    assert stats_pool_warning(config, 4) is None
    plan = dry_run(config, 8)
    assert plan["amapo_stats_pairs"] == 8 and plan["effective_batch_size"] == 128
    assert "8 pairs" in plan["warning"] and "used 4" in plan["warning"]
    assert stats_pool_warning(TrainConfig.from_recipe("llama3-8b-base", loss="simpo"), 8) is None


@pytest.mark.parametrize("recipe", sorted(AUTHORS))
def test_recipe_schedule_is_the_authors(recipe):
    # The recipes' headers: 1 epoch, 10% warm-up, AdamW without weight decay, clipping at 1.0; the authors'
    # seed 42; AMaPO with the TRL tokenization and the empty system turn of their runs.
    config = TrainConfig.from_recipe(recipe)
    assert (config.epochs, config.warmup_ratio, config.weight_decay, config.max_grad_norm, config.seed) == \
        (1, 0.1, 0.0, 1.0, 42)
    assert (config.loss, config.tokenization, config.insert_system_message, config.total_batch_size) == \
        ("amapo", "trl", True, 128)
    assert config.hparams == {"beta": AUTHORS[recipe][2]} and config.learning_rate == AUTHORS[recipe][3]


def test_dry_run_plans_for_the_launchers_world_size(monkeypatch, capsys):
    """Under a launcher (WORLD_SIZE) --dry-run plans its processes, not the recipe's; --world-size overrides both."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    main(["--recipe", "llama3-8b-base", "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert (plan["world_size"], plan["gradient_accumulation_steps"], plan["amapo_stats_pairs"]) == (8, 16, 8)
    assert "warning" in plan
    main(["--recipe", "llama3-8b-base", "--dry-run", "--world-size", "2"])
    plan = json.loads(capsys.readouterr().out)
    assert (plan["world_size"], plan["gradient_accumulation_steps"]) == (2, 64)
