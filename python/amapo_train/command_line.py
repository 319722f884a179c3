"""amapo-train's command line: the flags (one per TrainConfig field, with help, default and choices),
the config they make, and the one validation step run before any model or data is loaded (and by
--dry-run). Every mistake is a UserError: one line, exit status 2 (amapo_train.cli_errors)."""

import argparse
import dataclasses
import importlib.util
import json
import os
import typing
from pathlib import Path

from amapo_kernels.preference import METHODS
from amapo_train.cli_errors import (HelpFormatter, OneLineParser, UserError, check_device, check_output_path,
                                    check_range, expanded_path, home_expanded)
from amapo_train.config import (BOOLEANS, CHAT_TEMPLATES, CONFIGS, DATASET_FORMATS, DEFAULT_SCORE_COLUMNS, DEVICES,
                                LOSS_IMPLS, LR_SCHEDULERS, RECIPES, TOKENIZATIONS, TRACKERS, TrainConfig,
                                hparam_value)
from amapo_train.data import check_bundled, looks_local

STATE_FILE = "trainer_state.json"
STATE_FILES = "state_files"  # STATE_FILE's key: {path under state/: size in bytes} of what --resume loads
# STATE_FILE's key: {file name: size in bytes} of the from_pretrained weights that --resume loads into the model
# (without DeepSpeed, state/ holds no model of its own: train.save_model_weights_once)
MODEL_FILES = "model_files"
LAST = "last"  # --resume last: the newest checkpoint of this run's settings in --output-dir
# Settings a resumed run may change: where and how often it writes, evaluates and logs, and how it computes the
# same steps. Every other one (model, data, loss, optimisation, schedule, seed, precision, DeepSpeed) must be
# the checkpoint's, or the restored optimizer, scheduler and data position would belong to another run.
RESUME_MAY_CHANGE = ("output_dir", "save_steps", "save_total_limit", "save_final", "log_with", "eval_steps",
                     "eval_batch_size", "eval_dataset", "test_split", "max_test_pairs", "device", "loss_impl",
                     "gradient_checkpointing", "attn_implementation", "num_processes")
CHOICES = {"loss": METHODS, "loss_impl": LOSS_IMPLS, "tokenization": TOKENIZATIONS, "chat_template": CHAT_TEMPLATES,
           "log_with": TRACKERS, "dataset_format": DATASET_FORMATS, "device": DEVICES, "lr_scheduler": LR_SCHEDULERS}
# The importable module each tracker needs (accelerate's tensorboard tracker: torch.utils.tensorboard).
TRACKER_MODULES = {"wandb": "wandb", "tensorboard": "tensorboard"}
HELP = {  # one line per TrainConfig field; a recipe sets the same keys
    "model": "Hub name or local directory of a causal LM, 'tiny' (random tiny Llama, no download), or "
             "random:SHAPE (a random model of a real shape: llama3-1b, llama3-vocab-tiny)",
    "dataset": "'bundled:hh-rlhf', a local .json/.jsonl(.gz) file, or a Hub dataset (needs `datasets`)",
    "dataset_format": "record format (README, Data formats); auto: detected per record",
    "eval_dataset": "held-out data from another source (its --test-split); default: see --eval-fraction",
    "eval_fraction": "hold out this seeded share of the training records (default for a single local file: 0.1)",
    "chosen_score_column": f"odpo: column of the chosen response's score (built-in default: {DEFAULT_SCORE_COLUMNS[0]})",
    "rejected_score_column": f"odpo: column of the rejected response's score (built-in default: {DEFAULT_SCORE_COLUMNS[1]})",
    "train_split": "split to train on (Hub / bundled data)",
    "test_split": "held-out split (Hub / bundled data, or --eval-dataset)",
    "max_train_pairs": "use the first N training records only",
    "max_test_pairs": "use the first N held-out records only",
    "max_length": "prompt + response tokens",
    "max_prompt_length": "prompt tokens kept when a pair overflows --max-length",
    "tokenization": "trl: the authors' joint tokenization (TRL 0.9's tokenize_row, not TRL 1.16's DPOTrainer: "
                    "README, Training driver); separate: the older rule",
    "chat_template": "override the tokenizer's chat template (mistral: the authors' Mistral-Instruct one)",
    "insert_system_message": "an empty system turn when a chat has none (on/off)",
    "loss": "preference loss (amapo_kernels.preference_loss method)",
    "loss_impl": "fused: lm_head fused with the loss (no logits); ops: this library's op on logits; eager: torch",
    "router_aux_loss_coef": "mixture of experts: weight of the router load-balancing loss added to the loss (logged "
                            "as aux_loss; 0: none); default: the model config's router_aux_loss_coef where its "
                            "output_router_logits is on (the model's own loss), else none",
    "learning_rate": "AdamW learning rate (peak, after the warm-up)",
    "total_batch_size": "pairs per optimizer step (per-device batch x accumulation x processes)",
    "per_device_batch_size": "pairs per micro-batch and process",
    "num_processes": "the processes the recipe's authors launched (a different launch is warned about)",
    "epochs": "passes over the training data",
    "max_steps": "cap on optimizer steps (unset: --epochs decide)",
    "warmup_ratio": "share of the steps with a linear warm-up",
    "lr_scheduler": "the learning rate after the warm-up: cosine to 0 (the recipes'), linear to 0, or constant",
    "weight_decay": "AdamW weight decay, on all weights but biases and norms (as the HF Trainer)",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "seed": "seed of the model init, the data order (drawn anew each epoch) and the --eval-fraction split",
    "bf16": "bf16 mixed precision (on/off)",
    "gradient_checkpointing": "recompute activations in the backward (on/off)",
    "disable_dropout": "dropout off in the model (on/off), as the authors' trainer and TRL's DPOTrainer",
    "attn_implementation": "transformers' attention (eager, sdpa, flash_attention_2 with flash-attn installed, "
                           "flex_attention, ...; default: transformers', sdpa)",
    "deepspeed": "zero2, zero3 or a DeepSpeed JSON config path",
    "output_dir": "checkpoints, metrics.jsonl and eval.json go here",
    "save_steps": "checkpoint every N steps (0: none but the final one)",
    "save_total_limit": "keep the N newest checkpoint-STEP directories of this run's settings, deleting older "
                        "ones (0: all; final/ is not counted)",
    "save_final": "the final checkpoint (off: a throughput run that keeps no model)",
    "log_with": "experiment tracker",
    "eval_batch_size": "pairs per held-out forward pass",
    "eval_steps": "held-out loss and ranking accuracy every N steps (0: none during training)",
    "device": "default: accelerate's choice, the GPU when there is one (CUDA_VISIBLE_DEVICES picks which)",
}


def parse_bool(text: str) -> bool:
    try:
        return BOOLEANS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected one of {list(BOOLEANS)}, got {text!r}") from None


PARSERS = {int: int, float: float, bool: parse_bool, str: str}


def field_type(field: dataclasses.Field):
    """The type of a TrainConfig field without its `| None`."""
    return next(t for t in typing.get_args(field.type) or (field.type,) if t is not type(None))


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="amapo-train", description=description, formatter_class=HelpFormatter)
    parser.add_argument("--recipe", default="tiny",
                        help=f"recipe name ({', '.join(sorted(p.stem for p in RECIPES.glob('*.yaml')))}) or YAML path;"
                             " the flags below override its keys (a key it lacks: the flag's built-in default)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the command line and recipe and print the plan; load and download nothing")
    parser.add_argument("--world-size", type=int,
                        help="for --dry-run: the number of processes to plan for (default: $WORLD_SIZE, else the "
                             "recipe's num_processes, else 1)")
    parser.add_argument("--show-examples", type=int, metavar="N",
                        help="print N tokenized training pairs with the scored tokens marked, and exit")
    parser.add_argument("--resume", metavar="DIR", help="a checkpoint directory of an earlier run of the same recipe, "
                                                        f"or '{LAST}': the newest of --output-dir (./{LAST}: a "
                                                        "directory of that name)")
    parser.add_argument("--stop-after-steps", type=int, help="stop (and checkpoint) early, keeping the schedule")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name == "hparams":
            continue
        kind = field_type(field)
        default = getattr(defaults, field.name)
        shown = "" if default is None else f" (built-in default: {'on' if default is True else 'off' if default is False else default})"
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=PARSERS[kind], dest=field.name,
                            choices=CHOICES.get(field.name), metavar="on|off" if kind is bool else None,
                            help=HELP[field.name] + shown + "; recipe key " + field.name)
    parser.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE",
                        help="loss hyperparameter, e.g. --hparam beta=3.0 (repeatable; names: the --loss's, "
                             "see README; a --loss other than the recipe's drops the recipe's hparams)")
    return parser


# The config's paths, by the flag that sets them: a leading ~ is expanded once, whether it came from the command
# line (quoted) or from the recipe file.
PATH_FLAGS = {"output_dir": "--output-dir", "dataset": "--dataset", "eval_dataset": "--eval-dataset",
              "model": "--model", "deepspeed": "--deepspeed"}


def config_from_args(args) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "hparams"}
    config = TrainConfig.from_recipe(home_expanded("--recipe", args.recipe), **overrides)
    for name, flag in PATH_FLAGS.items():
        setattr(config, name, home_expanded(flag, getattr(config, name)))
    for item in args.hparam:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise UserError(f"--hparam {item!r}: expected NAME=VALUE")
        config.hparams[name] = hparam_value(config.loss, name, value)
    return config


def check_run(config: TrainConfig, args, world_size: int) -> str | None:
    """Everything checkable before a model or data set is loaded (run by --dry-run too). Returns the checkpoint
    directory to resume from, if any."""
    check_range("--world-size", world_size, 1)
    for flag, value in (("--show-examples", args.show_examples), ("--stop-after-steps", args.stop_after_steps)):
        if value is not None:
            check_range(flag, value, 1)
    config.validate(world_size)
    test_from_dataset = not config.eval_dataset and not held_out_plan(config)[0]  # the source's test split
    check_source("--dataset", config.dataset, (config.train_split, config.test_split) if test_from_dataset
                 else (config.train_split,))
    if config.eval_dataset:
        check_source("--eval-dataset", config.eval_dataset, (config.test_split,))
        same_file = looks_local(config.dataset) and looks_local(config.eval_dataset) and \
            expanded_path("--dataset", config.dataset).resolve() == \
            expanded_path("--eval-dataset", config.eval_dataset).resolve()
        if same_file or (config.eval_dataset == config.dataset and config.test_split == config.train_split):
            raise UserError(f"--eval-dataset {config.eval_dataset} is the training data; give other data, or "
                            "--eval-fraction to hold out a share of it")
    check_model(config.model)
    check_deepspeed(config, world_size)
    check_output_path("--output-dir", config.output_dir, directory=True)
    resume = check_resume(args.resume, config, world_size) if args.resume else None
    if resume and args.stop_after_steps is not None:  # else no step ran, and the resumed checkpoint was saved anew
        reached = json.loads((Path(resume) / STATE_FILE).read_text()).get("step", 0)
        if args.stop_after_steps <= reached:
            raise UserError(f"--stop-after-steps {args.stop_after_steps}: --resume {args.resume} continues from step "
                            f"{reached}; give a later step")
    check_device(config.device)
    module = TRACKER_MODULES.get(config.log_with)
    if module and importlib.util.find_spec(module) is None:
        raise UserError(f"--log-with {config.log_with}: `{module}` is not installed (pip install {module}, "
                        "or --log-with none)")
    return resume


DEFAULT_EVAL_FRACTION = 0.1  # held out of a single local file given without --eval-dataset / --eval-fraction


def held_out_plan(config: TrainConfig) -> tuple[float | None, str]:
    """(the share of the training records to hold out, or None, and where the held-out records come from):
    --eval-dataset, else a seeded --eval-fraction of the training records (DEFAULT_EVAL_FRACTION for a
    single local file), else the source's --test-split. Never the training records themselves."""
    if config.eval_dataset:
        return None, f"{config.eval_dataset} (split {config.test_split})"
    fraction = config.eval_fraction
    if fraction is None and looks_local(config.dataset):
        fraction = DEFAULT_EVAL_FRACTION
    if fraction:
        return fraction, (f"{fraction:g} of {config.dataset} held out (seed {config.seed}), disjoint from the "
                          "training records")
    return None, f"{config.dataset} split {config.test_split} (training: split {config.train_split})"


def check_source(flag: str, source: str, splits: tuple[str, ...]) -> None:
    """A local file exists; a bundled dataset exists and has each of the `splits` this run reads of it (a Hub
    dataset's are known only once it is loaded)."""
    if source.startswith("bundled:"):
        for split in splits:
            try:
                check_bundled(source, split)
            except ValueError as error:
                raise UserError(f"{flag} {source} split {split!r}: {error}") from None
    elif looks_local(source) and not expanded_path(flag, source).is_file():
        raise UserError(f"{flag} {source}: no such file")


def check_model(model: str) -> None:
    if model.startswith("random:"):
        from amapo_train.model import random_shape
        try:
            random_shape(model)
        except ValueError as error:
            raise UserError(str(error)) from None
        return
    if model == "tiny" or not model.startswith(("/", ".", "~")) and not Path(model).exists():
        return  # the built-in tiny model, or a Hub name
    path = expanded_path("--model", model)
    if not path.is_dir():
        raise UserError(f"--model {model}: no such directory")
    if not (path / "config.json").is_file():
        raise UserError(f"--model {model}: no config.json there (not a saved Hugging Face model directory)")


def check_deepspeed(config: TrainConfig, world_size: int | None = None) -> None:
    """--deepspeed names a bundled config (zero2, zero3) or a JSON DeepSpeed config that agrees with the run on
    `world_size` processes (not checked where None: the run's batch is not known yet). accelerate fills only its
    "auto" values: a batch size, accumulation or clipping of its own replaced the run's (the recipe's batch of 128
    became another, with one log line; the HF Trainer refuses such a mismatch). ZeRO-3 must gather the weights to
    save them, else the first checkpoint failed after the steps before it."""
    path = config.deepspeed_config_path()
    if path is None:
        return
    names = sorted(p.stem.removeprefix("ds_") for p in CONFIGS.glob("ds_*.json"))
    if not Path(path).is_file():
        raise UserError(f"--deepspeed {config.deepspeed}: no such file, and not one of {names} or none")
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"--deepspeed {config.deepspeed}: not a JSON DeepSpeed config: {error}") from None
    if not isinstance(settings, dict):
        raise UserError(f"--deepspeed {config.deepspeed}: not a JSON DeepSpeed config: a {type(settings).__name__}, "
                        "not an object")
    zero = settings.get("zero_optimization")
    if isinstance(zero, dict) and str(zero.get("stage")) == "3" and \
            zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise UserError(f"--deepspeed {config.deepspeed}: ZeRO-3 without stage3_gather_16bit_weights_on_model_save: "
                        "true, whose checkpoints cannot gather the weights; set it")
    if world_size is None:
        return
    runs = {"train_micro_batch_size_per_gpu": config.per_device_batch_size, "train_batch_size": config.total_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps(world_size),
            "gradient_clipping": float(config.max_grad_norm or 0)}
    for key, value in runs.items():
        if settings.get(key, "auto") not in ("auto", value):
            raise UserError(f"--deepspeed {config.deepspeed}: {key} is {settings[key]!r} where this run's is {value!r} "
                            f"({world_size} process(es)); set it to \"auto\"")


def check_resume(directory: str, config: TrainConfig, world_size: int | None = None) -> str:
    """--resume names a checkpoint of amapo-train whose run had this run's settings (RESUME_MAY_CHANGE aside), or
    LAST; returns the checkpoint's directory. Also the files that --resume loads (its state/, its model's weights)
    and, under DeepSpeed, its number of processes (ZeRO's optimizer state is partitioned over them), when
    `world_size` is given."""
    if directory == LAST:
        checkpoints = run_checkpoints(Path(config.output_dir), config)
        if not checkpoints:
            raise UserError(f"--resume {LAST}: --output-dir {config.output_dir} holds no checkpoint-STEP directory "
                            "of this run's settings")
        check_stored_state(LAST, checkpoints[-1][1], config, world_size)
        return str(checkpoints[-1][1])
    directory = home_expanded("--resume", directory)
    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"--resume {directory}: no such directory")
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {directory}: not a checkpoint of amapo-train (no {STATE_FILE} and state/)")
    if not (path / "state").is_dir():
        raise UserError(f"--resume {directory}: a model without the training state (state/) to resume from: the "
                        "final checkpoint of a finished run has none; resume from a checkpoint-STEP directory")
    try:
        saved = dict(json.loads((path / STATE_FILE).read_text())["config"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"--resume {directory}: unreadable {STATE_FILE}: {error}") from None
    changed = changed_settings(saved, config)
    if changed:
        was = ", ".join(f"{name}={old!r}" for name, (old, _) in changed.items())
        now = ", ".join(f"{name}={new!r}" for name, (_, new) in changed.items())
        raise UserError(f"--resume {directory}: the checkpoint's run had {was}; this one has {now} (resume with "
                        f"the checkpoint's settings)")
    check_stored_state(directory, path, config, world_size)
    return directory


def state_files(state: Path) -> dict[str, int]:
    """{path under `state`: size in bytes} of the files of a checkpoint's state/ (stored in its STATE_FILE)."""
    return {file.relative_to(state).as_posix(): file.stat().st_size for file in sorted(state.rglob("*"))
            if file.is_file()}


def model_files(checkpoint: Path) -> dict[str, int]:
    """{file name: size in bytes} of the weights that save_pretrained wrote in `checkpoint` (model.safetensors,
    or its shards and their index), stored in its STATE_FILE."""
    return {file.name: file.stat().st_size for file in sorted(checkpoint.glob("model*.safetensors*"))}


def check_stored_state(flag_value: str, path: Path, config: TrainConfig, world_size: int | None) -> None:
    """What the checkpoint's STATE_FILE records of its state beyond the settings, read once: the number of
    processes of a DeepSpeed checkpoint and the files --resume loads (state/'s and the model's weights)."""
    stored = json.loads((path / STATE_FILE).read_text())
    check_resume_processes(flag_value, path, stored.get("world_size"), config, world_size)
    check_saved_files(flag_value, path / "state", stored.get(STATE_FILES), state_files(path / "state"))
    check_saved_files(flag_value, path, stored.get(MODEL_FILES), model_files(path))
    check_optimizer_groups(flag_value, path, config)


def check_optimizer_groups(flag_value: str, path: Path, config: TrainConfig) -> None:
    """The checkpoint's AdamW has this run's parameter groups (1; 2 with weight decay: decayed and spared), said
    before the model, the data and the reference log-probs are set up, after which torch would refuse it: a
    checkpoint written before --weight-decay spared biases and norms has 1 group with weight decay on. Its
    optimizer.bin is mapped, not read (only the group list is touched); DeepSpeed's optimizer state, in a format
    of its own, is left to the load."""
    optimizer_file = path / "state" / "optimizer.bin"
    if config.deepspeed_config_path() or not optimizer_file.is_file():
        return
    import torch

    try:
        saved = len(torch.load(optimizer_file, map_location="cpu", mmap=True, weights_only=True)["param_groups"])
    except Exception:  # not torch's format, or types it will not unpickle here: the load says what is wrong
        return
    groups = config.optimizer_group_count()
    if saved != groups:
        raise UserError(f"--resume {flag_value}: {path}'s AdamW has {saved} parameter group(s), this run's {groups} "
                        "(weight decay on: decayed parameters and spared biases and norms); a checkpoint written "
                        "before --weight-decay spared them has 1: resume it with the version that wrote it")


def check_saved_files(flag_value: str, folder: Path, saved: dict[str, int] | None, found: dict[str, int]) -> None:
    """The files of a checkpoint's `folder` that --resume loads (its state/, its model weights) are those its save
    wrote (`saved`), of their sizes (`found`: what is there now): one deleted or cut short after the save (a full
    disk, a copy stopped half-way) is refused naming it, before accelerate fails on it with a traceback or, for an
    RNG state, silently goes on without it. Checkpoints older than the list pass."""
    for name, size in (saved or {}).items():
        if name not in found:
            raise UserError(f"--resume {flag_value}: {folder / name} is missing (the checkpoint was damaged "
                            "after its save): resume from another checkpoint")
        if found[name] != size:
            raise UserError(f"--resume {flag_value}: {folder / name} is {found[name]} bytes, saved as {size} "
                            "(the checkpoint was damaged after its save): resume from another checkpoint")


def check_resume_processes(flag_value: str, path: Path, saved: int | None, config: TrainConfig,
                           world_size: int | None) -> None:
    """A DeepSpeed checkpoint resumes on the number of processes that saved it (`saved`; DeepSpeed cannot
    repartition ZeRO's optimizer state); without DeepSpeed any number does. Checkpoints older than the stored
    count pass."""
    if world_size is None or not config.deepspeed_config_path():
        return
    if saved is not None and saved != world_size:
        raise UserError(f"--resume {flag_value}: {path} is a DeepSpeed checkpoint of {saved} process(es), this launch "
                        f"has {world_size} (DeepSpeed cannot repartition ZeRO's optimizer state): launch {saved}")


def run_checkpoints(output_dir: Path, config: TrainConfig, up_to_step: int | None = None) -> list[tuple[int, Path]]:
    """(step, directory) of the checkpoint-STEP directories of `output_dir` (up to `up_to_step`) that --resume
    would accept for this run (its settings, a state/), oldest first. A directory whose STATE_FILE does not
    read as one is not counted."""
    found = []
    for state_file in output_dir.glob(f"checkpoint-*/{STATE_FILE}"):
        try:
            stored = json.loads(state_file.read_text())
            step, saved = int(stored["step"]), dict(stored["config"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if ((up_to_step is None or step <= up_to_step) and (state_file.parent / "state").is_dir()
                and not changed_settings(saved, config)):
            found.append((step, state_file.parent))
    return sorted(found)


def changed_settings(saved: dict, config: TrainConfig) -> dict[str, tuple]:
    """{name: (the checkpoint's value, this run's)} of the settings, RESUME_MAY_CHANGE aside, in which a
    checkpoint's stored config differs from `config`: empty for a checkpoint of this run."""
    current = json.loads(json.dumps(dataclasses.asdict(config)))  # as the checkpoint stored it
    # a setting newer than the checkpoint (not in `saved`) is not compared
    return {name: (saved[name], current[name]) for name in sorted(current)
            if name not in RESUME_MAY_CHANGE and name in saved and saved[name] != current[name]}


def default_world_size(config: TrainConfig) -> int:
    """The processes a --dry-run plans for: the launcher's WORLD_SIZE, else the recipe's authors', else 1."""
    return int(os.environ.get("WORLD_SIZE", config.num_processes or 1))
