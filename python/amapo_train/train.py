"""amapo-train: preference training of a causal LM with any loss of amapo_kernels, on accelerate
(DeepSpeed ZeRO-2/3 through the recipe's `deepspeed:` key). With no arguments: the tiny default, on the
CPU (or the GPU, where there is one).

    amapo-train                                   # recipes/tiny.yaml: tiny Llama, bundled HH-RLHF, CPU or GPU
    amapo-train --recipe llama3-8b-base --dry-run # check a paper recipe without downloading anything
    accelerate launch --num_processes 4 -m amapo_train.train --recipe llama3-8b-base
    amapo-train --resume runs/tiny-amapo/checkpoint-30   # or --resume last: the newest of --output-dir
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import typing
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import amapo_kernels as ak
from amapo_kernels import reference
from amapo_kernels.integrations.hf_head import disable_dropout, fused_logit_softcap, router_loss_function
from amapo_kernels.batch_statistics import RunningStatistics
from amapo_kernels.preference import (keeps_running_statistics, logged_rewards, method_defaults, needs_reference,
                                      uses_mean_logps)
from amapo_train.cli_errors import UserError, one_line, require_extras, run_console_script
from amapo_train.config import TrainConfig
from amapo_train.command_line import (MODEL_FILES, STATE_FILE, STATE_FILES, build_parser, check_run, config_from_args,
                                      default_world_size, held_out_plan, model_files, run_checkpoints, state_files)
from amapo_train.data import (IGNORE_INDEX, PreferenceDataset, check_detected_formats, check_scores, collate,
                              concatenated, holdout_positions, load_records, looks_local)

# tqdm and amapo_train.model (transformers) are imported where used: `amapo-train` without the training
# extras then says how to install them (cli) instead of failing at import.

# Why a pair is dropped (PreferenceDataset.dropped): a response blank in the data (the only cause under the default
# trl tokenization, whose truncation always leaves each response a token) or cut to nothing (separate).
DROPPED = "an empty or blank response, in the data or after truncation"
# The records an --eval-fraction split held out of the training file, written beside eval.json: no other source names
# them, and `amapo-eval rank --data OUTPUT_DIR/held_out.jsonl` then scores the pairs eval.json scored.
HELD_OUT_FILE = "held_out.jsonl"
# How a run goes on when a mixture of experts' router load-balancing loss cannot be computed on its path.
ROUTER_LOSS_WAY_OUT = "--router-aux-loss-coef 0 trains without it; --loss-impl ops takes the model's own"


# ----------------------------------------------------------------------------------------------------
# The loss of one micro-batch
# ----------------------------------------------------------------------------------------------------


def lm_head_params(model, keep_gathered: contextlib.ExitStack | None):
    """(weight, bias) of the output layer, for the fused path, which reads them outside the layer's own
    forward. Under DeepSpeed ZeRO-3 they are partitioned there (this rank's shard, shape (0,)): they are
    gathered into `keep_gathered`, which the caller keeps open until the backward has run. Called after
    the decoder's forward: a tied embedding (the same parameter) has then been used and released by
    ZeRO-3's hooks, and its backward comes after the lm_head's."""
    head = model.get_output_embeddings()
    params = [p for p in (head.weight, head.bias) if p is not None]
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if partitioned:
        if keep_gathered is None:
            raise ValueError("under ZeRO-3 the fused loss needs `keep_gathered`, an ExitStack kept open through "
                             "the backward (the lm_head weight is gathered into it)")
        import deepspeed

        keep_gathered.enter_context(deepspeed.zero.GatheredParameters(partitioned))
    return head.weight, head.bias


def sequence_logps(model, input_ids, attention_mask, labels, *, average: bool, impl: str,
                   keep_gathered: contextlib.ExitStack | None = None, router_loss: bool = False):
    """([2N] log-probs of the responses, [2N] detached mean logit of each row, the mixture of experts' router
    load-balancing loss of the forward with `router_loss`, else None). impl: 'fused' (lm_head fused with the loss,
    no logits; the model's final logit softcap applied, Gemma 2's), 'ops' (this library's op from logits), 'eager'
    (plain torch log_softmax over fp32 logits, as TRL). The mean logit (over positions and vocabulary, padding
    included, as the authors' `logits/chosen`) is exact in the fused path too: mean_v(h W^T + b) = h . mean_v(W) +
    mean(b); None there for a softcapped head, whose mean needs every logit."""
    # use_cache=False, as the authors' trainer and TRL: else the forward keeps every layer's keys and values in a
    # cache the loss never reads (under no_grad, the reference and held-out passes, all layers' at once)
    forward_options = {"use_cache": False, **({"output_router_logits": True} if router_loss else {})}
    if impl == "fused":
        # The fused path calls the decoder and the head directly. A DDP wrapper here holds one process (a
        # launcher's RANK / WORLD_SIZE=1: TrainConfig.validate refuses more without DeepSpeed), whose reducer
        # has nothing to sync: the model inside it is called. DeepSpeed's engine forwards these attributes.
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        outputs = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **forward_options)
        hidden = outputs.last_hidden_state
        weight, bias = lm_head_params(model, keep_gathered)
        softcap = fused_logit_softcap(model, "--loss-impl")
        logps = ak.sequence_logps_from_hidden(hidden, weight, labels, bias=bias, shift=True, average=average,
                                              logit_softcap=softcap)
        aux_loss = (router_loss_function(model, "--router-aux-loss-coef", ROUTER_LOSS_WAY_OUT)(
            getattr(outputs, "router_logits", None), attention_mask) if router_loss else None)
        if softcap is not None:
            return logps, None, aux_loss
        with torch.no_grad():
            mean_logits = (hidden.float() @ weight.float().mean(0)).mean(1)
            if bias is not None:
                mean_logits = mean_logits + bias.float().mean()
        return logps, mean_logits, aux_loss
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, **forward_options)
    aux_loss = getattr(outputs, "aux_loss", None) if router_loss else None
    if router_loss and aux_loss is None:
        raise UserError(f"--router-aux-loss-coef: {type(outputs).__name__} of output_router_logits=True has no "
                        f"aux_loss; {ROUTER_LOSS_WAY_OUT}")
    logits = outputs.logits
    mean_logits = logits.detach().mean(dim=(1, 2), dtype=torch.float32)
    if impl == "eager":
        return reference.sequence_logps(logits.float(), labels, shift=True, average=average), mean_logits, aux_loss
    return ak.sequence_logps(logits, labels, shift=True, average=average), mean_logits, aux_loss


def pair_loss(model, batch, config, ref_table, keep_gathered: contextlib.ExitStack | None = None,
              router_weight: float = 0.0, running: RunningStatistics | None = None):
    """(loss, detached metrics) of one micro-batch (the batch format of amapo_train.data.collate) under
    `config` (its loss, hparams, loss_impl); ref_table: reference log-probs indexed by batch["index"] (None
    for reference-free methods). Under ZeRO-3 with the fused path, pass an ExitStack and keep it open
    through the backward (see lm_head_params). router_weight: a mixture of experts' router load-balancing
    loss, x this, is added (see router_loss_weight). running: the loss's running statistics, if it keeps any
    (updated by this batch)."""
    input_ids, attention_mask, labels = concatenated(batch)
    logps, mean_logits, aux_loss = sequence_logps(model, input_ids, attention_mask, labels,
                                                  average=uses_mean_logps(config.loss), impl=config.loss_impl,
                                                  keep_gathered=keep_gathered, router_loss=bool(router_weight))
    pairs = batch["index"].shape[0]
    refs = None
    if ref_table is not None:
        ref = ref_table[batch["index"].cpu()].to(logps.device)
        refs = (ref[:, 0], ref[:, 1])
    loss, metrics = loss_and_metrics(logps[:pairs], logps[pairs:], refs, config, batch_hparams(batch, logps.device),
                                     running)
    if mean_logits is not None:
        metrics["logits/chosen"] = mean_logits[:pairs].mean()
        metrics["logits/rejected"] = mean_logits[pairs:].mean()
    return with_router_loss(loss, metrics, aux_loss, router_weight)


def with_router_loss(loss, metrics, aux_loss, router_weight):
    """(loss + router_weight x aux_loss, metrics with it: `loss` the sum, `aux_loss` the router's, as TRL's
    DPOTrainer logs them); the loss and metrics as they are without a router loss."""
    if aux_loss is None:
        return loss, metrics
    loss = loss + router_weight * aux_loss.to(loss.dtype)
    metrics.update({"loss": loss.detach(), "aux_loss": aux_loss.detach().float()})
    return loss, metrics


def batch_hparams(batch, device) -> dict:
    """The per-pair hyperparameters a batch carries (ODPO's scores), as loss keywords."""
    return {key: batch[key].to(device) for key in ("chosen_scores", "rejected_scores") if key in batch}


def loss_and_metrics(chosen, rejected, refs, config, pair_hparams=None, running=None):
    """(loss, detached metrics) from the policy's log-probs (refs: the reference's, or None; pair_hparams:
    per-pair hyperparameters of the batch, see batch_hparams; running: the loss's running statistics): TRL's names
    and, for AMaPO, the authors' (rewards/batch_margin_mean = beta * mu, margin/accuracies: the reward
    margin beats beta * mu, loss/margin: the mean adaptive margin)."""
    hparams = {**method_defaults(config.loss), **config.hparams}
    metrics = {}
    if config.loss == "amapo":
        loss, stats = ak.amapo_loss(chosen, rejected, **config.hparams, return_stats=True)
        metrics.update({k: v for k, v in stats.items() if k.startswith("batch_margin")})
        if hparams.get("variant", "code") == "code":
            mu = stats["batch_margin_mean"]
            metrics["rewards/batch_margin_mean"] = hparams["beta"] * mu
            metrics["margin/accuracies"] = ((chosen.detach() - rejected.detach()) > mu).float().mean()
        metrics["loss/margin"] = stats["adaptive_margin"].mean()
    else:
        ref_kwargs = {"ref_chosen_logps": refs[0], "ref_rejected_logps": refs[1]} if refs else {}
        state = {"running": running} if running is not None else {}
        loss = ak.preference_loss(chosen, rejected, method=config.loss, **ref_kwargs, **config.hparams,
                                  **(pair_hparams or {}), **state)
    chosen_reward = logged_rewards(config.loss, hparams, chosen, refs[0] if refs else None)
    rejected_reward = logged_rewards(config.loss, hparams, rejected, refs[1] if refs else None)
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
    from tqdm.auto import tqdm

    loader = accelerator.prepare(DataLoader(dataset, batch_size=config.eval_batch_size,
                                            collate_fn=partial(collate, pad_token_id=dataset.pad_token_id)))
    table = torch.zeros(len(dataset), 2, dtype=torch.float64)
    model.eval()
    for batch in tqdm(loader, desc="reference log-probs", disable=not accelerator.is_main_process):
        input_ids, attention_mask, labels = concatenated(batch)
        # the policy's own implementation: under bf16 the ops path reads bf16-rounded logits, the fused one unrounded
        # fp32 sums of bf16 products, so another one would make the policy differ from its reference at step 0
        with contextlib.ExitStack() as gathered:  # the fused path's ZeRO-3 lm_head gather, for this batch
            logps, _, _ = sequence_logps(model, input_ids, attention_mask, labels,
                                         average=uses_mean_logps(config.loss), impl=config.loss_impl,
                                         keep_gathered=gathered)
        pairs = batch["index"].shape[0]
        index, chosen, rejected = accelerator.gather_for_metrics((batch["index"], logps[:pairs], logps[pairs:]))
        table[index.cpu()] = torch.stack([chosen, rejected], 1).double().cpu()
    model.train()
    return table


# ----------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------


# What a launcher (accelerate, torchrun, deepspeed, mpirun) sets; without any, DeepSpeed looks for mpi4py.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def single_process_without_launcher() -> None:
    """`amapo-train --deepspeed zero3` started directly (one GPU, no launcher): DeepSpeed would look for mpi4py
    to learn its rank and fail. Tell it what a launcher would: rank 0 of 1, on a free local port."""
    if any(name in os.environ for name in LAUNCHER_VARIABLES):
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def deepspeed_plugin(config: TrainConfig, ds_config: str):
    """accelerate's DeepSpeed plugin for the config file ds_config. DeepSpeed clips gradients by itself
    (accelerate's clip_grad_norm_ does nothing there): the file's "auto" takes --max-grad-norm (0: off), which
    accelerate would fill with 1.0."""
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=ds_config, gradient_clipping=float(config.max_grad_norm or 0))


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    ds_config = config.deepspeed_config_path()
    if ds_config:
        single_process_without_launcher()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config.validate(world_size)
    # DeepSpeed picks its own device (DS_ACCELERATOR=cpu for CPU runs); accelerate's cpu flag would bypass it.
    cpu_run = config.device == "cpu" or not torch.cuda.is_available()
    on_cpu = not ds_config and cpu_run
    # CPU processes talk over gloo (DeepSpeed's too); without it accelerate would count one process.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu_run and world_size > 1 else []
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps(world_size),
        mixed_precision="bf16" if config.bf16 else "no",
        log_with=None if config.log_with == "none" else config.log_with,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=f"{config.output_dir}/logs"),
        deepspeed_plugin=deepspeed_plugin(config, ds_config) if ds_config else None,
        cpu=on_cpu,
        kwargs_handlers=handlers,
    )


class Splits(typing.NamedTuple):
    """load_splits' records: the training and held-out ones, where the held-out ones come from (held_out_plan),
    and each record's position in its source (its file, or its split), by which the messages name it."""
    train: list[dict]
    test: list[dict]
    source: str
    train_positions: list[int]
    test_positions: list[int]


def data_names(config: TrainConfig) -> tuple[str, str]:
    """How the messages name the training data and the held-out data: the flag and its value, and the split
    where the source has several (a Hub or bundled dataset; a local file has one)."""
    fraction = held_out_plan(config)[0]
    test_flag, test_source = ("--eval-dataset", config.eval_dataset) if config.eval_dataset else \
        ("--dataset", config.dataset)

    def name(flag, source, split):
        return f"{flag} {source}" + ("" if looks_local(source) else f" split {split!r}")

    return (name("--dataset", config.dataset, config.train_split),
            name(test_flag, test_source, config.train_split if fraction else config.test_split))


def load_splits(config: TrainConfig) -> Splits:
    """The training and held-out records, checked (a known format, ODPO's score columns) before any model loads.
    An error names the data at fault (data_names) and the record's position in its source: with a held-out
    share of one file, its position in the file, not in the share."""
    fraction, source = held_out_plan(config)
    train_name, test_name = data_names(config)
    with data_errors(train_name):
        train = load_records(config.dataset, config.train_split)
        train_at = list(range(len(train)))
        if fraction:
            train_at, test_at = holdout_positions(len(train), fraction, config.seed)
            train, test = [train[i] for i in train_at], [train[i] for i in test_at]
    if not fraction:
        with data_errors(test_name):
            test = load_records(config.eval_dataset or config.dataset, config.test_split)
        test_at = list(range(len(test)))
    train, train_at = train[:config.max_train_pairs or None], train_at[:config.max_train_pairs or None]
    test, test_at = test[:config.max_test_pairs or None], test_at[:config.max_test_pairs or None]
    for records, positions, name in ((train, train_at, train_name), (test, test_at, test_name)):
        with data_errors(name):
            check_detected_formats(records, "record", config.dataset_format, positions)
            if config.score_columns():
                check_scores(records, config.score_columns(), "record", positions)
    return Splits(train, test, source, train_at, test_at)


@contextlib.contextmanager
def data_errors(name: str):
    """A missing file, bad JSON, a bad record or no `datasets` as a user error naming the data (data_names)."""
    try:
        yield
    except (OSError, ValueError, ImportError) as error:
        raise UserError(f"{name}: {one_line(error)}") from error


def datasets(config, tokenizer, splits: Splits):
    """Tokenized (train, test) PreferenceDatasets of load_splits' records."""
    kwargs = dict(fmt=config.dataset_format, max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                  tokenization=config.tokenization, insert_system_message=config.insert_system_message,
                  score_columns=config.score_columns())
    tokenized = []
    sides = zip((splits.train, splits.test), (splits.train_positions, splits.test_positions), data_names(config))
    for records, positions, name in sides:
        with tokenization_errors(name):
            dataset = PreferenceDataset(records, tokenizer, positions=positions, **kwargs)
        dataset.pad_token_id = tokenizer.pad_token_id
        tokenized.append(dataset)
    return tuple(tokenized)


@contextlib.contextmanager
def tokenization_errors(name: str):
    """What only the tokenizer finds in a record (its chat template refusing a conversation, a prompt the two
    sides tokenize differently) as a user error naming the data (data_names), as amapo-eval says it, not a
    traceback."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        yield
    except (ValueError, TemplateError) as error:
        raise UserError(f"{name}: {one_line(error)}") from error


def dry_run(config: TrainConfig, world_size: int) -> dict:
    """What a run would do, checked without downloading anything."""
    config.validate(world_size)
    accumulation = config.gradient_accumulation_steps(world_size)
    plan = {
        "model": config.model,
        "dataset": config.dataset,
        "loss": config.loss,
        "hparams": {**method_defaults(config.loss), **config.hparams},
        "learning_rate": config.learning_rate,
        "world_size": world_size,
        "per_device_batch_size": config.per_device_batch_size,
        "gradient_accumulation_steps": accumulation,
        "effective_batch_size": config.per_device_batch_size * accumulation * world_size,
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "tokenization": config.tokenization,
        "deepspeed_config": config.deepspeed_config_path(),
        "needs_reference_logps": needs_reference(config.loss, config.hparams),
        "eval_data": held_out_plan(config)[1],
    }
    if config.score_columns():
        plan["score_columns"] = list(config.score_columns())
    if config.loss == "amapo":
        plan["amapo_stats_pairs"] = config.amapo_stats_pairs(world_size)
        warning = stats_pool_warning(config, world_size)
        if warning:
            plan["warning"] = warning
    return plan


def stats_pool_warning(config: TrainConfig, world_size: int) -> str | None:
    """A warning when this launch takes AMaPO's batch statistics over another number of pairs than the
    recipe's authors did (the paper's Table 11 shows results moving with that pool)."""
    if config.loss != "amapo" or not config.num_processes or world_size == config.num_processes:
        return None
    return (f"AMaPO's batch mean/std are over {config.amapo_stats_pairs(world_size)} pairs "
            f"({config.per_device_batch_size} per device x {world_size} processes); the recipe's authors used "
            f"{config.amapo_stats_pairs(config.num_processes)} ({config.num_processes} processes). Launch "
            f"{config.num_processes} processes, or change --per-device-batch-size, to match them.")


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def save_checkpoint(accelerator, model, tokenizer, config, step: int, name: str, resumable: bool = True) -> Path:
    """The model (from_pretrained loads it), its tokenizer and STATE_FILE; a resumable checkpoint also holds
    the accelerate state for --resume (optimizer, scheduler, RNGs: AdamW's fp32 weights and moments, 12 bytes a
    parameter), which a finished run's final/ has no use for. After a resumable one, --save-total-limit prunes.
    STATE_FILE marks a finished save: removed first, written last, so that a save interrupted over an earlier
    run's checkpoint of the same name leaves one --resume does not take (run_checkpoints counts none without it).
    It lists the files of state/ and, without DeepSpeed, the model's weights with their sizes (STATE_FILES,
    MODEL_FILES), so that a checkpoint damaged after its save is refused by --resume naming the file. Saved over
    an earlier run's checkpoint of the same name, none of that run's state/ or weights files stays: its
    state/model.safetensors would be loaded in place of this model (save_model_weights_once), a registered
    object it had and this run has not would stop accelerate's load, and its single weights file would be read
    in place of this save's shards."""
    directory = Path(config.output_dir) / name
    if accelerator.is_main_process:
        (directory / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(directory / "state", ignore_errors=True)
        for weights in model_files(directory):
            (directory / weights).unlink()
    accelerator.wait_for_everyone()  # cleared before any process writes
    if resumable:
        accelerator.save_state(str(directory / "state"))
        accelerator.wait_for_everyone()  # every process's files (its RNG state) written before STATE_FILE lists them
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        stored = {"step": step, "world_size": accelerator.num_processes, "config": dataclasses.asdict(config)}
        if resumable:  # what --resume loads, with each file's size: check_resume names one missing or cut short
            stored[STATE_FILES] = state_files(directory / "state")
            if not config.deepspeed_config_path():  # the model's weights: save_model_weights_once
                stored[MODEL_FILES] = model_files(directory)
        (directory / STATE_FILE).write_text(json.dumps(stored, indent=2))
        if resumable and config.save_total_limit:
            for pruned in prune_checkpoints(Path(config.output_dir), config, config.save_total_limit, step):
                accelerator.print(f"deleted {pruned} (--save-total-limit {config.save_total_limit})")
    accelerator.wait_for_everyone()
    return directory


def prune_checkpoints(output_dir: Path, config: TrainConfig, keep: int, step: int) -> list[Path]:
    """Deletes all but the `keep` newest checkpoint-STEP directories of `output_dir`, up to `step` (the one just
    saved), that --resume would accept for this run (its settings, a state/); returns them. Another run's
    checkpoints, an earlier run's past `step`, and final/ are not counted."""
    pruned = [directory for _, directory in run_checkpoints(output_dir, config, up_to_step=step)[:-keep]]
    for directory in pruned:
        shutil.rmtree(directory)
    return pruned


@dataclasses.dataclass
class TrainingRun:
    """What a run holds once set up: the prepared model, optimizer, scheduler and loader, the tokenized
    splits, the length of the schedule and the reference log-prob tables (None for reference-free losses)."""

    accelerator: object
    model: object
    tokenizer: object
    optimizer: object
    scheduler: object
    loader: DataLoader
    train_order: "EpochOrder"  # the loader's dataset: train_set in the order of the epoch being trained
    train_set: PreferenceDataset
    test_set: PreferenceDataset
    steps_per_epoch: int
    total_steps: int
    ref_table: torch.Tensor | None = None
    test_ref_table: torch.Tensor | None = None
    router_weight: float = 0.0  # a mixture of experts' router load-balancing loss, x this, is in the loss
    running: RunningStatistics | None = None  # alpha_dpo's running statistics (decay > 0), checkpointed


def train(config: TrainConfig, resume: str | None = None, stop_after_steps: int | None = None) -> dict:
    """Trains to the end of the schedule (final checkpoint and evaluation), or to --stop-after-steps, or until a
    STOP_SIGNALS signal, each of those two with a resumable checkpoint of the step reached (the result's
    "checkpoint"; after a signal, "stop_signal" its number)."""
    run = set_up(config)
    step = resume_state(run, resume)
    log_path = start_metrics_log(run, config, step)
    last = min(run.total_steps, stop_after_steps or run.total_steps)
    with stop_signals() as received:
        step, stopped = train_steps(run, config, step, last, log_path, received)
        result = {"steps": step, "output_dir": config.output_dir}
        if step >= run.total_steps:
            if config.save_final:
                result["checkpoint"] = str(save_checkpoint(run.accelerator, run.model, run.tokenizer, config, step,
                                                           "final", resumable=False))
            result["eval"] = evaluate(run.accelerator, run.model, run.test_set, config)
        elif saves_at(config, step, run.total_steps):  # train_steps saved it: not again
            result["checkpoint"] = str(Path(config.output_dir) / f"checkpoint-{step}")
        else:
            result["checkpoint"] = str(save_checkpoint(run.accelerator, run.model, run.tokenizer, config, step,
                                                       f"checkpoint-{step}"))
        if stopped and step < run.total_steps:
            result["stop_signal"] = received[0] if received else signal.SIGTERM
            cause = signal.Signals(received[0]).name if received else "another process's stop signal"
            run.accelerator.print(f"stopped by {cause} after step {step} of {run.total_steps}: "
                                  f"{result['checkpoint']} saved; --resume last continues the run")
    run.accelerator.wait_for_everyone()  # every process done before any tears the process group down
    run.accelerator.end_training()
    return result


# What stops a run at the end of its optimizer step, with a resumable checkpoint: SLURM sends SIGTERM at preemption
# and at the time limit (after `sbatch --signal=USR1@120`, SIGUSR1 that long before), launchers pass SIGTERM on.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def stop_signals():
    """A list of the STOP_SIGNALS signals this process receives while the block runs, their handlers restored after
    it. Off the main thread, where Python cannot handle signals, the list stays empty."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in STOP_SIGNALS}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stop_agreed(accelerator, received: list) -> bool:
    """Whether any process has received a stop signal: called by every process after every optimizer step (one
    all-reduce of a flag), so that all of them stop after the same one."""
    if received:
        accelerator.set_trigger()
    return accelerator.check_trigger()


def set_up(config: TrainConfig) -> TrainingRun:
    """Data (checked before the model loads), accelerator, model, optimizer, schedule and reference tables."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from amapo_train.model import enable_checkpointing, load_model_and_tokenizer

    splits = load_splits(config)
    accelerator = make_accelerator(config)
    warning = stats_pool_warning(config, accelerator.num_processes)
    if warning:
        accelerator.print(f"warning: {warning}")
    set_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config)
    if config.loss_impl == "fused":
        try:  # a logit scaling the fused path cannot apply: refused before any step
            fused_logit_softcap(model, "--loss-impl")
        except ValueError as error:
            raise UserError(str(error)) from None
    router_weight, router_line = router_loss_weight(model, config)
    if router_line:
        accelerator.print(router_line)
    if config.disable_dropout and disable_dropout(model):
        accelerator.print("dropout off in the model (--disable-dropout)")
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    train_set, test_set = datasets(config, tokenizer, splits)
    accelerator.print(f"accelerate: {accelerator.distributed_type.value}, {accelerator.num_processes} process(es), "
                      f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}")
    accelerator.print(f"data: {len(train_set)} train / {len(test_set)} test pairs "
                      f"({train_set.dropped} / {test_set.dropped} dropped: {DROPPED})")
    eval_source = splits.source
    if held_out_plan(config)[0]:  # a seeded share of the training file: kept, so the evaluation can be rerun
        if accelerator.is_main_process:
            held_out = Path(config.output_dir) / HELD_OUT_FILE
            held_out.parent.mkdir(parents=True, exist_ok=True)
            held_out.write_text("".join(json.dumps(record) + "\n" for record in splits.test))
        eval_source += f", written to {Path(config.output_dir) / HELD_OUT_FILE}"
    accelerator.print(f"eval data: {eval_source}")
    if len(test_set) == 0:  # the held-out ranking accuracy (and every eval_ metric) would have nothing to rank
        raise UserError(f"held-out data {eval_source}: no usable pair ({test_set.dropped} dropped: "
                        f"{DROPPED})")
    train_order = EpochOrder(train_set, config.seed)
    loader = DataLoader(train_order, batch_size=config.per_device_batch_size, drop_last=True,
                        collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(optimizer_groups(model, config), lr=config.learning_rate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    save_model_weights_once(accelerator)
    steps_per_epoch = len(loader) // accelerator.gradient_accumulation_steps
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    if total_steps == 0:
        raise UserError(f"--dataset {config.dataset}: no optimizer step: {len(train_set)} training pairs are "
                        f"fewer than one batch of --total-batch-size {config.total_batch_size}")
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup_steps,
                              num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)
    running = RunningStatistics() if keeps_running_statistics(config.loss, config.hparams) else None
    if running is not None:  # saved in state/ and loaded by --resume, as the scheduler
        accelerator.register_for_checkpointing(running)
    run = TrainingRun(accelerator, model, tokenizer, optimizer, scheduler, loader, train_order, train_set, test_set,
                      steps_per_epoch, total_steps, router_weight=router_weight, running=running)
    if needs_reference(config.loss, config.hparams):
        run.ref_table = reference_logps_table(accelerator, model, train_set, config)
        if config.eval_steps:
            run.test_ref_table = reference_logps_table(accelerator, model, test_set, config)
    return run


class EpochOrder(torch.utils.data.Dataset):
    """`dataset` in a seeded order drawn anew for each epoch (seed + epoch; epoch 0's is the seed's), as
    transformers' Trainer reshuffles: with one order, every epoch repeated the same micro-batches (so AMaPO's
    batch statistics) and left out the same pairs (drop_last, a partial accumulation window). train_steps sets
    the epoch from the step, so a resumed run draws the order the uninterrupted one did; not through
    accelerate's set_epoch, which its loaders call with their own count of passes."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        self.order = torch.randperm(len(self.dataset), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int):
        return self.dataset[self.order[position]]


def save_model_weights_once(accelerator) -> None:
    """A resumable checkpoint holds the model's weights once: accelerate's save_state would also write them into
    state/, beside the from_pretrained copy that save_checkpoint writes (the weights twice on disk, and twice the
    time to write them). Without DeepSpeed (whose engine saves its own partitions and is left as it is) state/
    gets no model, and --resume loads the from_pretrained copy into the model (transformers' own loading, with
    its conversions of a checkpoint's layout: a mixture of experts' fused expert weights). A checkpoint that
    holds state/model.safetensors (written before) is loaded by accelerate, as then."""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(partial(load_weights_beside_state, accelerator))


def load_weights_beside_state(accelerator, models: list, state_dir: str) -> None:
    """accelerate's load_state pre-hook (save_model_weights_once): the weights of the checkpoint whose state/ is
    `state_dir`, from its from_pretrained copy, into the model, on its device and in its dtype; `models` emptied,
    so that accelerate loads no model of its own."""
    if not models or (Path(state_dir) / "model.safetensors").exists():
        return
    from transformers import AutoModelForCausalLM

    from amapo_train.model import from_pretrained

    model = accelerator.unwrap_model(models[0])
    parameter = next(model.parameters())
    checkpoint = str(Path(state_dir).parent)
    saved = from_pretrained(AutoModelForCausalLM, checkpoint, "--resume", dtype=parameter.dtype,
                            device_map=parameter.device)
    model.load_state_dict(saved.state_dict())
    models.clear()


# Parameters the HF Trainer (the authors') exempts from weight decay, by name (transformers 5's
# Trainer.get_decay_parameter_names; transformers 4 exempted biases and the norm layers it registered): biases and
# normalization weights. tests/test_train.py holds the installed transformers' rule to this copy.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def optimizer_groups(model, config: TrainConfig) -> list[dict]:
    """AdamW's parameter groups, as many as config.optimizer_group_count() says (which --resume checks a
    checkpoint against): weight decay on every trained parameter but biases, normalization weights and LayerNorm
    modules' (NO_DECAY_PATTERNS), as the HF Trainer's; one group when there is no decay."""
    trained = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    weight_decay = config.weight_decay
    if config.optimizer_group_count() == 1:
        return [{"params": [parameter for _, parameter in trained], "weight_decay": 0.0}]
    from transformers.trainer_pt_utils import get_parameter_names

    decayed = set(get_parameter_names(model, [torch.nn.LayerNorm], list(NO_DECAY_PATTERNS)))
    return [{"params": [parameter for name, parameter in trained if name in decayed], "weight_decay": weight_decay},
            {"params": [parameter for name, parameter in trained if name not in decayed], "weight_decay": 0.0}]


def router_loss_weight(model, config: TrainConfig) -> tuple[float, str | None]:
    """(the weight of a mixture of experts' router load-balancing loss in the loss, a line saying where it comes
    from; None for a model without a router). --router-aux-loss-coef, else the model's own rule: its config's
    router_aux_loss_coef where its output_router_logits is on (what its forward adds to its language-modelling
    loss; TRL 0.x's DPO and CPO trainers), else 0. A UserError for a weight the model cannot take, before any
    step: a router loss asked of a model without a router, or one the fused path cannot compute."""
    asked, text_config = config.router_aux_loss_coef, model.config.get_text_config()
    has_router = hasattr(text_config, "output_router_logits")
    if asked and not has_router:
        raise UserError(f"--router-aux-loss-coef {asked}: {type(model).__name__} is not a mixture of experts with "
                        "router logits (its config has no output_router_logits)")
    if not has_router:
        return 0.0, None
    own = getattr(text_config, "router_aux_loss_coef", None)
    if asked is not None:
        weight, source = float(asked), "--router-aux-loss-coef"
    elif text_config.output_router_logits and own:
        weight, source = float(own), "the model config's, whose output_router_logits is on"
    elif own:
        return 0.0, (f"no router load-balancing loss (the model config's output_router_logits is off; TRL 1.16's "
                     f"DPOTrainer adds it x its router_aux_loss_coef={own}, --router-aux-loss-coef {own} adds it here)")
    else:
        return 0.0, f"no router load-balancing loss (the model config's router_aux_loss_coef is {own})"
    if not weight:
        return 0.0, "no router load-balancing loss (--router-aux-loss-coef 0)"
    if config.loss_impl == "fused":
        try:
            router_loss_function(model, "--router-aux-loss-coef", ROUTER_LOSS_WAY_OUT)
        except ValueError as error:
            raise UserError(str(error)) from None
    return weight, f"router load-balancing loss x {weight} ({source}) added to the loss, logged as aux_loss"


def resume_state(run: TrainingRun, resume: str | None) -> int:
    """The optimizer step to start from: 0, or the checkpoint's, whose state (model, optimizer, scheduler,
    RNGs) is loaded."""
    if not resume:
        return 0
    try:
        run.accelerator.load_state(str(Path(resume) / "state"))
    except ValueError as error:  # torch's optimizer refuses another layout of parameter groups (check_resume
        if "parameter group" not in str(error):  # said the number of groups, where it could read them)
            raise
        raise UserError(f"--resume {resume}: its optimizer state does not fit this run's AdamW "
                        f"({len(run.optimizer.param_groups)} parameter group(s)): {one_line(error)}") from None
    step = json.loads((Path(resume) / STATE_FILE).read_text())["step"]
    run.accelerator.print(f"resumed from {resume} at step {step}")
    return step


def start_metrics_log(run: TrainingRun, config: TrainConfig, step: int) -> Path:
    """metrics.jsonl (a fresh run starts a fresh log; a resumed one continues it) and the trackers."""
    log_path = Path(config.output_dir) / "metrics.jsonl"
    if run.accelerator.is_main_process:
        try:  # check_run saw a writable ancestor; a special file system (/proc, a read-only mount) may still refuse
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--output-dir {config.output_dir}: {error.strerror or error}") from None
        earlier = earlier_run(Path(config.output_dir)) if step == 0 else []  # a resume continues its own run
        if earlier:
            others = ("--save-total-limit counts those of this run's settings" if config.save_total_limit
                      else "the others stay")
            run.accelerator.print(f"warning: --output-dir {config.output_dir} holds an earlier run "
                                  f"({', '.join(earlier)}): this run starts metrics.jsonl anew and overwrites "
                                  f"checkpoints of the same names, {others} (--resume continues a run)")
        rewrite_metrics(log_path, up_to_step=step)
    run.accelerator.init_trackers("amapo-train", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
    return log_path


def train_steps(run: TrainingRun, config: TrainConfig, step: int, last: int, log_path: Path,
                received: list | None = None) -> tuple[int, bool]:
    """Optimizer steps from `step` to `last`, epoch by epoch (a resumed epoch skips its done batches): each
    logged, evaluated and checkpointed as the config asks; after a step that some process received a stop signal
    by (`received`, see stop_signals), none more. Returns the step reached and whether a signal stopped it."""
    from accelerate.utils import DistributedType
    from tqdm.auto import tqdm

    accelerator, model = run.accelerator, run.model
    accumulation = accelerator.gradient_accumulation_steps
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    progress = tqdm(total=run.total_steps, initial=step, desc=f"{config.loss} ({config.loss_impl})",
                    disable=not accelerator.is_main_process)
    model.train()
    stopped = False
    while step < last and not stopped:
        epoch, done_in_epoch = divmod(step, run.steps_per_epoch)
        run.train_order.start_epoch(epoch)
        batches = (accelerator.skip_first_batches(run.loader, done_in_epoch * accumulation) if done_in_epoch
                   else run.loader)
        sums, tokens, started = {}, 0, time.perf_counter()
        for batch in batches:
            # keep_gathered: under ZeRO-3 the fused path's lm_head weight stays gathered through the backward
            with accelerator.accumulate(model), contextlib.ExitStack() as keep_gathered:
                loss, metrics = pair_loss(model, batch, config, run.ref_table, keep_gathered, run.router_weight,
                                          run.running)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = gradient_norm(accelerator, model, config.max_grad_norm)
                    if not deepspeed:  # (DeepSpeed skips a loss scale's overflow step itself, its norm then inf)
                        stop_if_diverged(step + 1, "gradient norm", grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.float()
            tokens += int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            learning_rate = run.scheduler.get_last_lr()[0]  # the step's own (transformers' Trainer logs it too)
            run.scheduler.step()
            step += 1
            record = log_step(accelerator, sums, accumulation, tokens, started, step, epoch, learning_rate, grad_norm)
            stop_if_diverged(step, "loss", record["loss"])
            record_step(run, config, step, record, log_path)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            if saves_at(config, step, run.total_steps):
                save_checkpoint(accelerator, model, run.tokenizer, config, step, f"checkpoint-{step}")
            # the next step's clock starts after the evaluation and the checkpoint, which are not its time
            sums, tokens, started = {}, 0, time.perf_counter()
            stopped = stop_agreed(accelerator, received or [])
            if stopped or step >= last or step % run.steps_per_epoch == 0:  # the epoch's last full step
                break
    progress.close()
    return step, stopped


def saves_at(config: TrainConfig, step: int, total_steps: int) -> bool:
    """Whether train_steps saves checkpoint-STEP after `step` (every save_steps, the last step's being final/)."""
    return bool(config.save_steps) and step % config.save_steps == 0 and step < total_steps


def record_step(run: TrainingRun, config: TrainConfig, step: int, record: dict, log_path: Path) -> None:
    """The held-out metrics every eval_steps (added to `record`), then the step's line in metrics.jsonl."""
    accelerator = run.accelerator
    if config.eval_steps and step % config.eval_steps == 0:
        record.update(evaluate_loss(accelerator, run.model, run.test_set, config, run.test_ref_table,
                                    run.router_weight, run.running))
        accelerator.log({k: v for k, v in record.items() if k.startswith("eval_")}, step=step)
    if accelerator.is_main_process:
        with log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def earlier_run(output_dir: Path) -> list[str]:
    """What an earlier run left in `output_dir`: a non-empty metrics.jsonl and its checkpoints (a fresh run there
    replaces the log and mixes its checkpoints with those; said, not refused, so that a rerun of the same command
    still runs)."""
    log = output_dir / "metrics.jsonl"
    found = ["metrics.jsonl"] if log.is_file() and log.stat().st_size else []
    return found + sorted(f"{state.parent.name}/" for state in output_dir.glob(f"*/{STATE_FILE}"))


def rewrite_metrics(log_path: Path, up_to_step: int) -> None:
    """Keeps the records of steps 1..up_to_step of `log_path` (none for a fresh run), so a resumed run
    logs each later step once, whatever the earlier run had logged past its checkpoint."""
    kept = []
    if up_to_step and log_path.exists():
        kept = [line for line in log_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= up_to_step]
    # written beside it, then renamed over it: a job killed meanwhile leaves the old log, not an empty one
    partial = log_path.with_name(log_path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, log_path)


def show_examples(config: TrainConfig, count: int) -> None:
    """Prints `count` tokenized training pairs: the prompt, then each response with its scored tokens
    (the ones the loss sees) between ⟦ and ⟧."""
    from amapo_train.model import load_tokenizer

    tokenizer = load_tokenizer(config)
    splits = load_splits(config)
    records, positions = splits.train[:count], splits.train_positions[:count]
    with tokenization_errors(data_names(config)[0]):
        dataset = PreferenceDataset(records, tokenizer, fmt=config.dataset_format, max_length=config.max_length,
                                    max_prompt_length=config.max_prompt_length, tokenization=config.tokenization,
                                    insert_system_message=config.insert_system_message, positions=positions)
    for index in range(len(dataset)):
        pair = dataset[index]
        print(f"=== pair {index} (record {positions[dataset.record_index[index]]})")  # in its file, as errors say
        for side in ("chosen", "rejected"):
            ids, labels = pair[f"{side}_input_ids"], pair[f"{side}_labels"]
            scored = sum(label != IGNORE_INDEX for label in labels)
            print(f"--- {side}: {len(ids)} tokens, {scored} scored")
            print(marked_text(tokenizer, ids, labels))
    if dataset.dropped:
        print(f"({dataset.dropped} of the first {len(records)} records dropped: {DROPPED})")


def marked_text(tokenizer, ids, labels) -> str:
    """The decoded sequence with each run of scored tokens between ⟦ and ⟧."""
    pieces, start = [], 0
    for position in range(1, len(ids) + 1):
        boundary = position == len(ids) or (labels[position] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX)
        if boundary:
            text = tokenizer.decode(ids[start:position])
            pieces.append(text if labels[start] == IGNORE_INDEX else f"⟦{text}⟧")
            start = position
    return "".join(pieces)


def stop_if_diverged(step: int, name: str, value: float | None) -> None:
    """Stops the run, in one line, at the first step whose gradient norm or loss (`name`, the same on every
    process: reduced) is not finite, before any evaluation or checkpoint of it. train_steps checks the gradient
    norm before the optimizer update, without DeepSpeed (whose engine updates inside the backward, and skips a
    step whose fp16 loss scale overflowed, reporting its norm as inf), and every step's loss after it. Training on
    would turn every weight NaN and end with status 0, NaN checkpoints and a held-out accuracy of 0."""
    if value is not None and not math.isfinite(value):
        raise UserError(f"step {step}: the {name} is {value}: training diverged and stopped (lower --learning-rate, "
                        "or check the data); the checkpoints before it are kept")


def gradient_norm(accelerator, model, max_norm: float | None) -> float | None:
    """The step's total gradient norm before clipping (the HF Trainer's grad_norm), and the clipping to max_norm
    (0 or None: none). DeepSpeed's engine clips by itself (gradient_clipping) in the step it takes inside
    accelerator.backward and keeps that step's norm (None where its optimizer computes none); otherwise
    clip_grad_norm_ returns it (after the fp16 unscaling, over the processes' reduced gradients)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        norm = model.get_global_grad_norm()
    else:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    return None if norm is None else float(norm)


def log_step(accelerator, sums, accumulation, tokens, started, step, epoch, learning_rate, grad_norm=None) -> dict:
    """Metrics of one optimizer step: micro-batch means, averaged over processes; the learning rate and grad_norm
    are the step's."""
    keys = sorted(sums)
    means = accelerator.reduce(torch.stack([sums[k] / accumulation for k in keys]).to(accelerator.device),
                               reduction="mean")
    total_tokens = accelerator.reduce(torch.tensor(float(tokens), device=accelerator.device), reduction="sum")
    record = {"step": step, "epoch": epoch, "learning_rate": learning_rate}
    record.update({key: float(value) for key, value in zip(keys, means)})
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    record["tokens_per_s"] = float(total_tokens) / max(time.perf_counter() - started, 1e-9)
    if accelerator.device.type == "cuda":  # the most any process has held so far (torch's allocator)
        peak = torch.tensor([torch.cuda.max_memory_allocated(accelerator.device) / 2**30], device=accelerator.device)
        record["peak_memory_gib"] = float(accelerator.gather(peak).max())
    accelerator.log(record, step=step)
    return record


def distinct_pairs(accelerator, pairs: int) -> int:
    """How many of this process's `pairs` (its batch of a prepared evaluation loader) are held-out pairs of their
    own, the first ones: accelerate completes the last batch of every process with pairs from the start
    (even_batches), which gather_for_metrics drops: the last round's `remainder` pairs are the real ones, in
    process order."""
    state = accelerator.gradient_state
    if not state.end_of_dataloader or state.remainder <= 0:
        return pairs
    return min(max(state.remainder - accelerator.process_index * pairs, 0), pairs)


@torch.no_grad()
def evaluate_loss(accelerator, model, test_set, config, ref_table, router_weight: float = 0.0,
                  running: RunningStatistics | None = None) -> dict:
    """Held-out metrics during training: eval_loss and the training metrics (eval_ prefix, each micro-batch's
    weighted by its pairs, every held-out pair counted once over the processes; a router load-balancing loss x
    router_weight in eval_loss, as in the training loss; the loss's running statistics read, not updated) and
    the ranking accuracy on summed and length-normalized log-probs."""
    loader = accelerator.prepare(DataLoader(test_set, batch_size=config.eval_batch_size,
                                            collate_fn=partial(collate, pad_token_id=test_set.pad_token_id)))
    sums, counted, ranked = {}, 0, []
    model.eval()
    for batch in loader:
        with contextlib.ExitStack() as keep_gathered:
            input_ids, attention_mask, labels = concatenated(batch)
            summed, _, aux_loss = sequence_logps(model, input_ids, attention_mask, labels, average=False,
                                                 impl=config.loss_impl, keep_gathered=keep_gathered,
                                                 router_loss=bool(router_weight))
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(1).clamp(min=1).to(summed.dtype)
        logps = summed / counts if uses_mean_logps(config.loss) else summed
        pairs = batch["index"].shape[0]
        kept = distinct_pairs(accelerator, pairs)  # the others repeat held-out pairs to even out the processes
        refs = None
        if ref_table is not None:
            ref = ref_table[batch["index"][:kept].cpu()].to(logps.device)
            refs = (ref[:, 0], ref[:, 1])
        hparams = {key: value[:kept] for key, value in batch_hparams(batch, logps.device).items()}
        # every process computes the loss, kept pairs or none: the batch statistics are gathered from all of them
        with running.frozen() if running is not None else contextlib.nullcontext():
            loss, metrics = loss_and_metrics(logps[:kept], logps[pairs:pairs + kept], refs, config, hparams, running)
        _, metrics = with_router_loss(loss, metrics, aux_loss, router_weight)
        for key, value in metrics.items():  # weighted by the pairs: each held-out pair counts once
            sums[key] = sums.get(key, 0.0) + (kept * value.float() if kept else torch.zeros_like(value.float()))
        counted += kept
        means = summed / counts
        ranked.append(accelerator.gather_for_metrics(torch.stack(
            [summed[:pairs] > summed[pairs:], means[:pairs] > means[pairs:]], 1).float()))
    model.train()
    keys = sorted(sums)
    totals = accelerator.reduce(torch.stack([*(sums[k] for k in keys), torch.tensor(float(counted))]).to(
        accelerator.device), "sum")
    result = {f"eval_{key}": float(value / totals[-1]) for key, value in zip(keys, totals)}
    ranked = torch.cat(ranked).mean(0)
    result["eval_ranking_accuracy/summed"] = float(ranked[0])
    result["eval_ranking_accuracy/normalized"] = float(ranked[1])
    return result


def evaluate(accelerator, model, test_set, config) -> dict:
    """Held-out ranking accuracy (summed and length-normalized log-probs) with bootstrap intervals."""
    from amapo_train.eval.ranking import NonFiniteScores, evaluate_ranking

    loader = accelerator.prepare(DataLoader(test_set, batch_size=config.eval_batch_size,
                                            collate_fn=partial(collate, pad_token_id=test_set.pad_token_id)))
    def gather(tensors):
        return accelerator.gather_for_metrics(tuple(t.to(accelerator.device) for t in tensors))

    try:
        result = evaluate_ranking(model, loader, progress=accelerator.is_main_process, gather=gather)
    except NonFiniteScores as error:  # the checkpoints are saved: the run stops in one line, as a diverged step
        raise UserError(f"held-out evaluation: {error}") from None
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


def run(argv=None):
    """Runs the command line `argv`: checks it (check_run, before any model or data is loaded), then
    --dry-run, --show-examples or training; returns train()'s result (None otherwise)."""
    args = build_parser(__doc__).parse_args(argv)
    config = config_from_args(args)
    if args.world_size is not None and not args.dry_run:
        raise UserError("--world-size is for --dry-run: a run's processes are its launcher's (WORLD_SIZE)")
    if args.dry_run:  # the plan for the launch the recipe's authors used, unless told otherwise
        world_size = default_world_size(config) if args.world_size is None else args.world_size
    else:  # this launch's (one process without a launcher; make_accelerator says so to DeepSpeed)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resume = check_run(config, args, world_size)
    if args.dry_run:
        print(json.dumps(dry_run(config, world_size), indent=2))
        return None
    if args.show_examples:
        show_examples(config, args.show_examples)
        return None
    return train(config, resume=resume, stop_after_steps=args.stop_after_steps)


def main(argv=None):
    """run(argv) with the training extras required first (a UserError when one is missing)."""
    require_extras("amapo-train")
    return run(argv)


def cli(argv=None) -> int:
    """The `amapo-train` console script: exit status 0 on success; a user error is one line on stderr
    and exit status 2, a bug a traceback; a run stopped by a signal (STOP_SIGNALS), after its checkpoint,
    128 + the signal's number, as a process the signal ended."""
    outcome = {}
    status = run_console_script("amapo-train", lambda args: outcome.update(result=main(args)), argv)
    stop_signal = (outcome.get("result") or {}).get("stop_signal")
    return 128 + stop_signal if status == 0 and stop_signal else status


if __name__ == "__main__":
    sys.exit(cli())
