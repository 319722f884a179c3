"""amapo-train: preference training of a causal LM with any loss of amapo_kernels, on accelerate
(DeepSpeed ZeRO-2/3 through the recipe's `deepspeed:` key). With no arguments: the tiny default on CPU.

    amapo-train                                   # recipes/tiny.yaml: tiny Llama, bundled HH-RLHF, CPU
    amapo-train --recipe llama3-8b-base --dry-run # check a paper recipe without downloading anything
    accelerate launch --num_processes 8 -m amapo_train.train --recipe llama3-8b-base
    amapo-train --resume runs/tiny-amapo/checkpoint-30
"""

import argparse
import dataclasses
import json
import math
import os
import time
import typing
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

import amapo_kernels as ak
from amapo_kernels import reference
from amapo_kernels.preference import BASELINES, uses_mean_logps
from amapo_train.config import TrainConfig
from amapo_train.data import PreferenceDataset, collate, concatenated, load_records
from amapo_train.model import load_model_and_tokenizer

STATE_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------------------------------
# The loss of one micro-batch
# ----------------------------------------------------------------------------------------------------


def needs_reference(method: str, hparams: dict) -> bool:
    return method != "amapo" and BASELINES[method].needs_reference({**BASELINES[method].DEFAULTS, **hparams})


def sequence_logps(model, input_ids, attention_mask, labels, *, average: bool, impl: str) -> torch.Tensor:
    """[2N] log-probs of the responses. impl: 'fused' (lm_head fused with the loss, no logits),
    'ops' (this library's op from logits), 'eager' (plain torch log_softmax over fp32 logits, as TRL)."""
    if impl == "fused":
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        head = model.get_output_embeddings()
        return ak.sequence_logps_from_hidden(hidden, head.weight, labels, bias=head.bias, shift=True,
                                             average=average)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if impl == "eager":
        return reference.sequence_logps(logits.float(), labels, shift=True, average=average)
    return ak.sequence_logps(logits, labels, shift=True, average=average)


def pair_loss(model, batch, config, ref_table):
    """(loss, detached metrics) of one micro-batch."""
    input_ids, attention_mask, labels = concatenated(batch)
    logps = sequence_logps(model, input_ids, attention_mask, labels, average=uses_mean_logps(config.loss),
                           impl=config.loss_impl)
    pairs = batch["index"].shape[0]
    chosen, rejected = logps[:pairs], logps[pairs:]
    refs = {}
    if ref_table is not None:
        ref = ref_table[batch["index"].cpu()].to(logps.device)
        refs = {"ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    metrics = {}
    if config.loss == "amapo":
        loss, stats = ak.amapo_loss(chosen, rejected, **config.hparams, return_stats=True)
        metrics.update({k: v for k, v in stats.items() if k.startswith("batch_margin")})
    else:
        loss = ak.preference_loss(chosen, rejected, method=config.loss, **refs, **config.hparams)
    beta = config.hparams.get("beta", getattr(BASELINES.get(config.loss), "DEFAULTS", {}).get("beta", 2.0))
    chosen_reward = beta * (chosen.detach() - refs["ref_chosen_logps"] if refs else chosen.detach())
    rejected_reward = beta * (rejected.detach() - refs["ref_rejected_logps"] if refs else rejected.detach())
    metrics.update({
        "loss": loss.detach(),
        "rewards/chosen": chosen_reward.mean(),
        "rewards/rejected": rejected_reward.mean(),
        "rewards/margins": (chosen_reward - rejected_reward).mean(),
        "rewards/accuracies": (chosen_reward > rejected_reward).float().mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
    })
    return loss, metrics


@torch.no_grad()
def reference_logps_table(accelerator, model, dataset, config) -> torch.Tensor:
    """[len(dataset), 2] (chosen, rejected) log-probs of the starting model, computed once."""
    loader = accelerator.prepare(DataLoader(dataset, batch_size=config.eval_batch_size,
                                            collate_fn=partial(collate, pad_token_id=dataset.pad_token_id)))
    table = torch.zeros(len(dataset), 2, dtype=torch.float64)
    model.eval()
    for batch in tqdm(loader, desc="reference log-probs", disable=not accelerator.is_main_process):
        input_ids, attention_mask, labels = concatenated(batch)
        logps = sequence_logps(model, input_ids, attention_mask, labels, average=uses_mean_logps(config.loss),
                               impl="ops" if config.loss_impl == "fused" else config.loss_impl)
        pairs = batch["index"].shape[0]
        index, chosen, rejected = accelerator.gather_for_metrics((batch["index"], logps[:pairs], logps[pairs:]))
        table[index.cpu()] = torch.stack([chosen, rejected], 1).double().cpu()
    model.train()
    return table


# ----------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config.validate(world_size)
    ds_config = config.deepspeed_config_path()
    # DeepSpeed picks its own device (DS_ACCELERATOR=cpu for CPU runs); accelerate's cpu flag would bypass it.
    on_cpu = not ds_config and (config.device == "cpu" or not torch.cuda.is_available())
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and world_size > 1 else []
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps(world_size),
        mixed_precision="bf16" if config.bf16 else "no",
        log_with=None if config.log_with == "none" else config.log_with,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=f"{config.output_dir}/logs"),
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config) if ds_config else None,
        cpu=on_cpu,
        kwargs_handlers=handlers,
    )


def datasets(config, tokenizer):
    kwargs = dict(fmt=config.dataset_format, max_length=config.max_length, max_prompt_length=config.max_prompt_length)
    splits = {}
    for name, split, limit in (("train", config.train_split, config.max_train_pairs),
                               ("test", config.test_split, config.max_test_pairs)):
        splits[name] = PreferenceDataset(load_records(config.dataset, split, limit), tokenizer, **kwargs)
        splits[name].pad_token_id = tokenizer.pad_token_id
    return splits["train"], splits["test"]


def dry_run(config: TrainConfig, world_size: int) -> dict:
    """What a run would do, checked without downloading anything."""
    config.validate(world_size)
    accumulation = config.gradient_accumulation_steps(world_size)
    return {
        "model": config.model,
        "dataset": config.dataset,
        "loss": config.loss,
        "hparams": {**getattr(BASELINES.get(config.loss), "DEFAULTS", {}), **config.hparams},
        "learning_rate": config.learning_rate,
        "world_size": world_size,
        "per_device_batch_size": config.per_device_batch_size,
        "gradient_accumulation_steps": accumulation,
        "effective_batch_size": config.per_device_batch_size * accumulation * world_size,
        "deepspeed_config": config.deepspeed_config_path(),
        "needs_reference_logps": needs_reference(config.loss, config.hparams),
    }


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def save_checkpoint(accelerator, model, tokenizer, config, step: int, name: str) -> Path:
    directory = Path(config.output_dir) / name
    accelerator.save_state(str(directory / "state"))
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        (directory / STATE_FILE).write_text(json.dumps({"step": step, "config": dataclasses.asdict(config)}, indent=2))
    accelerator.wait_for_everyone()
    return directory


def train(config: TrainConfig, resume: str | None = None, stop_after_steps: int | None = None) -> dict:
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    accelerator = make_accelerator(config)
    set_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    train_set, test_set = datasets(config, tokenizer)
    accelerator.print(f"accelerate: {accelerator.distributed_type.value}, {accelerator.num_processes} process(es), "
                      f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}")
    accelerator.print(f"data: {len(train_set)} train / {len(test_set)} test pairs "
                      f"({train_set.dropped} / {test_set.dropped} dropped: empty response after truncation)")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed)).tolist()
    loader = DataLoader(Subset(train_set, order), batch_size=config.per_device_batch_size, drop_last=True,
                        collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accumulation = accelerator.gradient_accumulation_steps
    steps_per_epoch = len(loader) // accumulation
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    if total_steps == 0:
        raise ValueError(f"no optimizer step: {len(train_set)} pairs is fewer than one batch of "
                         f"{config.total_batch_size}")
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)
    accelerator.register_for_checkpointing(scheduler)
    ref_table = reference_logps_table(accelerator, model, train_set, config) \
        if needs_reference(config.loss, config.hparams) else None

    step = 0
    if resume:
        accelerator.load_state(str(Path(resume) / "state"))
        step = json.loads((Path(resume) / STATE_FILE).read_text())["step"]
        accelerator.print(f"resumed from {resume} at step {step}")
    log_path = Path(config.output_dir) / "metrics.jsonl"
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        if not resume:
            log_path.unlink(missing_ok=True)  # a fresh run starts a fresh log; a resumed one appends
    accelerator.init_trackers("amapo-train", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
    last = min(total_steps, stop_after_steps or total_steps)
    progress = tqdm(total=total_steps, initial=step, desc=f"{config.loss} ({config.loss_impl})",
                    disable=not accelerator.is_main_process)
    model.train()
    while step < last:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        batches = accelerator.skip_first_batches(loader, done_in_epoch * accumulation) if done_in_epoch else loader
        sums, tokens, started = {}, 0, time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(model):
                loss, metrics = pair_loss(model, batch, config, ref_table)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.float()
            tokens += int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            record = log_step(accelerator, sums, accumulation, tokens, started, step, epoch, scheduler)
            if accelerator.is_main_process:
                with log_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            sums, tokens, started = {}, 0, time.perf_counter()
            if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                save_checkpoint(accelerator, model, tokenizer, config, step, f"checkpoint-{step}")
            if step >= last or step % steps_per_epoch == 0:  # the epoch's last full step
                break
    progress.close()
    result = {"steps": step, "output_dir": config.output_dir}
    if step >= total_steps:
        result["checkpoint"] = str(save_checkpoint(accelerator, model, tokenizer, config, step, "final"))
        result["eval"] = evaluate(accelerator, model, test_set, config)
    elif stop_after_steps:
        result["checkpoint"] = str(save_checkpoint(accelerator, model, tokenizer, config, step, f"checkpoint-{step}"))
    accelerator.wait_for_everyone()  # every process done before any tears the process group down
    accelerator.end_training()
    return result


def log_step(accelerator, sums, accumulation, tokens, started, step, epoch, scheduler) -> dict:
    """Metrics of one optimizer step: micro-batch means, averaged over processes."""
    keys = sorted(sums)
    means = accelerator.reduce(torch.stack([sums[k] / accumulation for k in keys]).to(accelerator.device),
                               reduction="mean")
    total_tokens = accelerator.reduce(torch.tensor(float(tokens), device=accelerator.device), reduction="sum")
    record = {"step": step, "epoch": epoch, "learning_rate": scheduler.get_last_lr()[0]}
    record.update({key: float(value) for key, value in zip(keys, means)})
    record["tokens_per_s"] = float(total_tokens) / max(time.perf_counter() - started, 1e-9)
    accelerator.log(record, step=step)
    return record


def evaluate(accelerator, model, test_set, config) -> dict:
    """Held-out ranking accuracy (summed and length-normalized log-probs) with bootstrap intervals."""
    from amapo_train.eval.ranking import evaluate_ranking

    loader = accelerator.prepare(DataLoader(test_set, batch_size=config.eval_batch_size,
                                            collate_fn=partial(collate, pad_token_id=test_set.pad_token_id)))
    def gather(tensors):
        return accelerator.gather_for_metrics(tuple(t.to(accelerator.device) for t in tensors))

    result = evaluate_ranking(model, loader, progress=accelerator.is_main_process, gather=gather)
    accelerator.print(f"held-out ranking accuracy ({result['n_pairs']} pairs, 95% bootstrap interval): "
                      + ", ".join(f"{kind} {100 * result[kind]['accuracy']:.1f}% "
                                  f"[{100 * result[kind]['ci_low']:.1f}, {100 * result[kind]['ci_high']:.1f}]"
                                  for kind in ("normalized", "summed")))
    if accelerator.is_main_process:
        (Path(config.output_dir) / "eval.json").write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


_PARSERS = {int: int, float: float, bool: lambda text: text.lower() in ("1", "true", "yes"), str: str}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny", help="recipe name (recipes/NAME.yaml) or YAML path")
    parser.add_argument("--dry-run", action="store_true", help="parse and check the recipe, download nothing")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="for --dry-run: the number of processes to plan for")
    parser.add_argument("--resume", help="a checkpoint directory of an earlier run of the same recipe")
    parser.add_argument("--stop-after-steps", type=int, help="stop (and checkpoint) early, keeping the schedule")
    for field in dataclasses.fields(TrainConfig):
        if field.name == "hparams":
            continue
        base = next(t for t in typing.get_args(field.type) or (field.type,) if t is not type(None))
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=_PARSERS[base], dest=field.name)
    parser.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE",
                        help="loss hyperparameter, e.g. --hparam beta=3.0 (repeatable)")
    return parser.parse_args(argv)


def config_from_args(args) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "hparams"}
    config = TrainConfig.from_recipe(args.recipe, **overrides)
    for item in args.hparam:
        name, _, value = item.partition("=")
        config.hparams[name] = _number_or_text(value)
    return config


def _number_or_text(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def cli() -> int:
    """The `amapo-train` console script: exit status 0 on success."""
    main()
    return 0


def main(argv=None):
    """Runs the command line `argv`; returns train()'s result (None for --dry-run)."""
    args = parse_args(argv)
    config = config_from_args(args)
    if args.dry_run:
        print(json.dumps(dry_run(config, args.world_size), indent=2))
        return None
    return train(config, resume=args.resume, stop_after_steps=args.stop_after_steps)


if __name__ == "__main__":
    main()
