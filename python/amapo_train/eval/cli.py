"""``amapo-eval``: ranking accuracy, RM-Bench, UltraFeedback generalization splits, and generation for
AlpacaEval 2 / MT-Bench.

    amapo-eval rank     --model DIR --data SOURCE [--split test] [--batch-size 4] [--output out.json]
                        [--tokenization trl|separate --insert-system-message on|off --max-length N ...]
    amapo-eval rmbench  --model DIR --data total_dataset.json [--output out.json]
    amapo-eval splits   --data ultrafeedback.jsonl --output DIR [--seed 0]
    amapo-eval generate --model DIR --instructions FILE --format alpacaeval|mtbench --output FILE
                        [--preset llama3-8b-base] [--batch-size 8] [--max-new-tokens N --temperature T --top-p P]

SOURCE is what the training driver reads (``amapo_train.data.load_records``): ``bundled:hh-rlhf``, a
local ``.json``/``.jsonl(.gz)`` file, or a Hub dataset name (needs ``datasets``). Models and tokenizers
load from local directories only (``local_files_only=True``). The output flag is ``--output`` everywhere
(``--out`` and ``--out-dir``, the old spellings, still work). A user error (a missing file or model
directory, a record in no known format, a flag combination that means nothing) prints one line and exits
with status 2; without the training extras the command says which ``pip install`` adds them.

Data formats of ``rank`` are the driver's, read, rendered and tokenized by its code
(``amapo_train.data``) with the token settings (--tokenization, --insert-system-message, --max-length,
--max-prompt-length) of the checkpoint's training config (``trainer_state.json``, written by
``amapo-train``) unless a flag sets one, so a policy is scored on the tokens it was trained on; the line
it prints first says which settings it used and where each came from. ``rmbench`` treats each
prompt as one user message and each response as the assistant's reply (the tokenizer's chat template,
or plain ``"\\n\\nUser: ...\\n\\nAssistant:"`` dialogue without one); ``generate`` renders instructions
the same way (``amapo_train.data.render_prompt``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path

from amapo_train.cli_errors import HelpFormatter as _HelpFormatter
from amapo_train.cli_errors import OneLineParser as _Parser
from amapo_train.cli_errors import (UserError, check_device, check_output_path, check_range, expanded_path,
                                    home_expanded, run_console_script)
from amapo_train.cli_errors import one_line as _one_line
from amapo_train.cli_errors import require_extras as _require_extras
from amapo_train.command_line import STATE_FILE, parse_bool
from amapo_train.config import NUMBER_RANGES, TOKENIZATIONS, TrainConfig, check_length_flags
from amapo_train.data import (
    PreferenceDataset,
    RecordError,
    chat_texts,
    check_detected_formats,
    has_chat_template,
    load_records,
    looks_local,
    render_prompt,
)


# --------------------------------------------------------------------------------------------------
# checks run before any model or data is loaded
# --------------------------------------------------------------------------------------------------


def require_extras(command: str) -> None:
    """The model subcommands need the training extras (transformers, tqdm); say how to get them."""
    _require_extras(f"amapo-eval {command}", ("transformers", "tqdm"))


def check_model_dir(path: str) -> None:
    model = Path(path)
    if not model.is_dir():
        raise UserError(f"--model {path}: no such directory (amapo-eval loads local models only; "
                        "download one first, e.g. `huggingface-cli download NAME --local-dir DIR`)")
    if not (model / "config.json").is_file():
        raise UserError(f"--model {path}: no config.json there (not a saved Hugging Face model directory)")


def read_records(flag: str, source: str, split: str, limit: int | None = None) -> list[dict]:
    """``amapo_train.data.load_records`` with its failures as one-line user errors naming ``flag``."""
    local = not source.startswith("bundled:") and looks_local(source)
    path = expanded_path(flag, source) if local else None
    if local and not path.exists():
        raise UserError(f"{flag} {source}: no such file")
    try:
        records = load_records(str(path) if local else source, split, limit)
    except (OSError, ValueError, ImportError) as error:  # missing/corrupt file, bad JSON, no `datasets`
        raise UserError(f"{flag} {source}: {_one_line(error)}") from error
    if not records:
        raise UserError(f"{flag} {source}: no records")
    return records


# The settings that decide a pair's tokens: rank takes each from its flag, else from the training config saved
# with the checkpoint (amapo-train's trainer_state.json), else amapo-train's default, so that a policy is
# scored on the tokens it was trained on. (The chat template needs no entry: amapo-train saves the tokenizer
# with the template it trained with, and dataset_format only checks records, it changes no text.)
TOKEN_SETTINGS = ("tokenization", "insert_system_message", "max_length", "max_prompt_length")


def training_config(model: str) -> tuple[dict | None, Path]:
    """(the amapo-train config saved with the checkpoint `model`, or None when it has none; its file)."""
    path = Path(model) / STATE_FILE
    if not path.is_file():
        return None, path
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # unreadable, not JSON
        problem = _one_line(error)
    else:
        config = state.get("config") if isinstance(state, dict) else None
        if isinstance(config, dict):
            return config, path
        problem = "no 'config' object in it"
    raise UserError(f"--model {model}: {STATE_FILE} cannot be read ({problem}); give --tokenization, "
                    "--insert-system-message, --max-length and --max-prompt-length, or remove the file")


def resolve_token_settings(args) -> None:
    """Fills each of TOKEN_SETTINGS left unset by its flag (None) from the checkpoint's training config, else
    amapo-train's default; `args.settings_from` says where each came from (printed and saved by rank)."""
    unset = any(getattr(args, name) is None for name in TOKEN_SETTINGS)
    config, path = training_config(args.model) if unset else (None, None)  # all four given: not read
    defaults = TrainConfig()
    args.settings_from = {}
    for name in TOKEN_SETTINGS:
        flag = "--" + name.replace("_", "-")
        if getattr(args, name) is not None:
            args.settings_from[name] = flag
        elif config is not None and name in config:
            setattr(args, name, config[name])
            args.settings_from[name] = "training config"
        else:
            setattr(args, name, getattr(defaults, name))
            args.settings_from[name] = "default"
    args.training_config = str(path) if config is not None else None
    if args.tokenization not in TOKENIZATIONS or not isinstance(args.insert_system_message, bool):
        raise UserError(f"--model {args.model}: {path} has tokenization {args.tokenization!r} and "
                        f"insert_system_message {args.insert_system_message!r} (expected one of {TOKENIZATIONS}, "
                        "and true or false); give --tokenization and --insert-system-message")
    for name in ("max_length", "max_prompt_length"):  # a flag's value is an int already: only the file's can be off
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"--model {args.model}: {path} has {name} {value!r} (expected an integer); give {flag}")
    try:
        check_length_flags(args.max_length, args.max_prompt_length)
    except UserError as error:  # say which length the user did not give
        unset = [f"{flag} from the {args.settings_from[name]}" for flag, name in
                 (("--max-length", "max_length"), ("--max-prompt-length", "max_prompt_length"))
                 if args.settings_from[name] != flag]
        raise UserError(f"{error} ({', '.join(unset)})" if unset else str(error)) from None


def describe_token_settings(args) -> str:
    """One line: each setting that decides the tokens, with where it came from."""
    values = {name: ("on" if value is True else "off" if value is False else value)
              for name in TOKEN_SETTINGS for value in [getattr(args, name)]}
    text = ", ".join(f"{name.replace('_', '-')} {values[name]} ({args.settings_from[name]})" for name in TOKEN_SETTINGS)
    if args.training_config:
        return f"tokens: {text}; training config: {args.training_config}"
    if "default" in args.settings_from.values():
        return f"tokens: {text}; no training config in {args.model} ({STATE_FILE}): amapo-train's defaults"
    return f"tokens: {text}"


def write_jsonl(path, rows) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------
# model loading
# --------------------------------------------------------------------------------------------------


def _device_dtype(device: str | None, dtype: str):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return device, torch_dtype


def load_model_and_tokenizer(path: str, device: str | None = None, dtype: str = "auto"):
    """``AutoModelForCausalLM`` / ``AutoTokenizer`` from a local path, eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amapo_train.model import from_pretrained

    device, torch_dtype = _device_dtype(device, dtype)
    tokenizer = from_pretrained(AutoTokenizer, path, local_files_only=True)
    model = from_pretrained(AutoModelForCausalLM, path, local_files_only=True, dtype=torch_dtype)
    model.to(device).eval()
    return model, tokenizer


def _pad_id(tokenizer):
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)


def _fmt(stats: dict) -> str:
    ties = f" ({stats['ties']} tie(s), counted wrong)" if stats.get("ties") else ""  # else seen in the JSON only
    return f"{stats['accuracy']:.4f} [{stats['ci_low']:.4f}, {stats['ci_high']:.4f}]{ties}"


def _write_json(path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# subcommands
# --------------------------------------------------------------------------------------------------


def cmd_rank(args) -> dict:
    from amapo_train.eval.ranking import evaluate_ranking, make_batches

    records = read_records("--data", args.data, args.split, args.limit)
    try:  # a record in no known format, or one that splits into no pair, fails here, before the model loads
        check_detected_formats(records, "record")
    except ValueError as error:
        raise UserError(f"--data {args.data}: {_one_line(error)}") from error
    from jinja2 import TemplateError

    print(describe_token_settings(args))
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    use_template = args.chat_template == "auto"
    try:
        dataset = PreferenceDataset(records, tokenizer, max_length=args.max_length,
                                    max_prompt_length=args.max_prompt_length, use_chat_template=use_template,
                                    tokenization=args.tokenization, insert_system_message=args.insert_system_message)
    except RecordError as error:  # a record in no known format, or one the template refuses (Gemma: a system turn)
        way_out = ""
        if isinstance(error.__cause__, TemplateError):
            way_out = (f" (the chat template of --model {args.model} refuses it; --tokenization separate renders "
                       "each response after its prompt, --chat-template none as plain dialogue)")
        raise UserError(f"--data {args.data}: {_one_line(error)}{way_out}") from error
    if not len(dataset):
        raise UserError(f"--data {args.data}: no pair left after tokenization")
    batches = make_batches(dataset, args.batch_size, _pad_id(tokenizer))
    with finite_scores(args):
        res = evaluate_ranking(model, batches, progress=not args.no_progress, n_boot=args.n_boot, seed=args.seed)
    level = int(round(100 * res["confidence"]))
    print(f"pairs: {res['n_pairs']} (dropped with an empty response: {dataset.dropped})")
    print(f"ranking accuracy, summed log-probs (Eq. 4):  {_fmt(res['summed'])}")
    print(f"ranking accuracy, length-normalized log-probs: {_fmt(res['normalized'])}")
    print(f"({level}% percentile bootstrap, {res['n_boot']} resamples, seed {res['seed']}; ties count as wrong)")
    out = {
        "model": str(args.model),
        "data": str(args.data),
        "split": args.split,
        "tokenization": dataset.stats,
        "settings": {**{name: getattr(args, name) for name in TOKEN_SETTINGS},
                     "batch_size": args.batch_size, "chat_template": use_template and has_chat_template(tokenizer),
                     "from": {**args.settings_from, "training_config": args.training_config}},
        **res,
    }
    if args.output:
        _write_json(args.output, out)
    return out


def _levels(acc: dict) -> str:
    return "  ".join(f"{level} {acc[level]:.4f}" for level in ("easy", "normal", "hard", "average"))


def print_rmbench(report: dict) -> None:
    """Headline (RM-Bench's: mean over domains), the pooled line, then one row per domain and subset."""
    from amapo_train.eval.rmbench import DOMAINS

    head = report["headline"]
    if head is None:
        print(f"RM-Bench headline: none (no prompt in the domains {', '.join(DOMAINS)})")
    else:
        print(f"RM-Bench (mean over domains {', '.join(head['domains'])}): {_levels(head)}")
        if not head["complete"]:
            missing = [d for d in DOMAINS if d not in head["domains"]]
            print(f"  warning: no prompt in {', '.join(missing)}; this is not comparable to RM-Bench's headline")
    pooled = report["pooled"]
    print(f"pooled over all {pooled['n']} prompts (secondary): {_levels(pooled)}")
    for title, table in (("domain", report["domains"]), ("subset", report["subsets"])):
        print(f"{title:>16}  {'easy':>7} {'normal':>7} {'hard':>7} {'average':>7}  {'n':>6}")
        for name, acc in table.items():
            print(f"{name:>16}  {acc['easy']:7.4f} {acc['normal']:7.4f} {acc['hard']:7.4f} {acc['average']:7.4f}  "
                  f"{acc['n']:>6}")


@contextlib.contextmanager
def finite_scores(args):
    """A model that scores a NaN or infinite log-prob is a one-line error naming it (evaluate_ranking's
    NonFiniteScores), not an accuracy."""
    from amapo_train.eval.ranking import NonFiniteScores

    try:
        yield
    except NonFiniteScores as error:
        advice = "; try --dtype float32 or bfloat16" if args.dtype == "float16" else ""
        raise UserError(f"--model {args.model}: {error}{advice}") from None


def cmd_rmbench(args) -> dict:
    from amapo_train.eval.rmbench import check_rmbench_records, rmbench_report, score_rmbench

    try:
        records = check_rmbench_records(read_records("--data", args.data, args.split, args.limit))
    except ValueError as error:
        raise UserError(f"--data {args.data}: {_one_line(error)}") from error
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    use_template = args.chat_template == "auto" and has_chat_template(tokenizer)

    def fmt(prompt, chosen, rejected):
        return chat_texts([{"role": "user", "content": prompt}], {"role": "assistant", "content": chosen},
                          {"role": "assistant", "content": rejected}, tokenizer, use_template)

    with finite_scores(args):
        chosen, rejected, kept = score_rmbench(
            model, tokenizer, records, batch_size=args.batch_size, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, format_pair=fmt, progress=not args.no_progress,
        )
    if not kept.any():
        raise UserError(f"--data {args.data}: no scorable prompt (every prompt has an empty response)")
    domains = [r["domain"] for r, k in zip(records, kept.tolist()) if k]
    report = rmbench_report(chosen[kept], rejected[kept], domains)
    print_rmbench(report)
    out = {"model": str(args.model), "data": str(args.data), "n_records": len(records),
           "n_dropped": int((~kept).sum()), "score": "length-normalized response log-prob",
           "chat_template": use_template, **report}
    if args.output:
        _write_json(args.output, out)
    return out


def cmd_splits(args) -> dict:
    from amapo_train.eval.splits import SETS, build_generalization_splits, normalize_record, random_split

    try:
        raw = read_records("--data", args.data, args.split, args.limit)
        records = []
        for i, record in enumerate(raw):
            try:
                records.append(normalize_record(record, args.score_key))
            except ValueError as error:
                raise ValueError(f"record {i}: {error}") from None
    except ValueError as error:
        raise UserError(f"--data {args.data}: {_one_line(error)}") from error
    prompt_ids = [r["prompt_id"] for r in records]
    models = sorted({c["model"] for r in records for c in r["completions"]})

    def split(items, fraction, what):  # it needs two distinct items
        try:
            return random_split(items, fraction, args.seed)
        except ValueError as error:
            raise UserError(f"--data {args.data}: cannot split its {what}: {_one_line(error)}") from None

    train_p, valid_p = split(prompt_ids, args.valid_prompt_fraction, "prompts")
    if args.valid_models:
        valid_m = sorted(set(args.valid_models.split(",")))
        unknown = sorted(set(valid_m) - set(models))
        if unknown:
            raise UserError(f"--valid-models names models not in the data: {unknown} (models: {models})")
        train_m = [m for m in models if m not in valid_m]
    else:
        train_m, valid_m = split(models, args.valid_model_fraction, "response models")
    # A pair is two responses written by models of one side, so a side with one model gives no pair at all.
    chosen_by = "--valid-models" if args.valid_models else f"--valid-model-fraction {args.valid_model_fraction:g}"
    if len(train_m) < 2 or len(valid_m) < 2:
        raise UserError(f"--data {args.data}: {chosen_by} splits its {len(models)} response models into "
                        f"{len(train_m)} seen {train_m} and {len(valid_m)} unseen {valid_m}; a pair is two "
                        "responses by models of one side, so each side needs at least 2"
                        + (" (the data has fewer than 4 models)" if len(models) < 4 else ""))
    res = build_generalization_splits(records, train_prompts=train_p, valid_prompts=valid_p,
                                      train_models=train_m, valid_models=valid_m)
    empty = [name for name in ("train", *SETS[1:]) if not res[name]]  # SETS[0], id, is train
    if empty:
        stats = res["stats"]
        raise UserError(f"--data {args.data}: no pair in " + ", ".join(
            f"{name} ({stats[name]['n_skipped_too_few']} prompts with fewer than 2 scored responses of its models, "
            f"{stats[name]['n_skipped_tied']} with all scores tied)" for name in empty)
            + f"; nothing written (change --seed, --valid-prompt-fraction or {chosen_by.split()[0]}, or use more data)")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("train", *SETS):
        write_jsonl(out_dir / f"{name}.jsonl", res[name])
    manifest = {"data": str(args.data), "seed": args.seed, "valid_prompt_fraction": args.valid_prompt_fraction,
                "train_models": train_m, "valid_models": valid_m, "train_prompts": train_p,
                "valid_prompts": valid_p, "stats": res["stats"]}
    _write_json(out_dir / "split.json", manifest)
    for name in ("train", *SETS):
        print(f"{name:>13}: {res['stats'][name]['n_pairs']} pairs")
    return manifest


def resolve_decoding(args) -> dict:
    """Decoding settings: the flags given, else the preset's, else the defaults of ``args.format``."""
    from amapo_train.eval.generation import (
        DEFAULT_DECODING, GREEDY_BELOW, MTBENCH_MAX_NEW_TOKENS, MTBENCH_TEMPERATURES, PRESETS)

    if args.preset and args.format == "mtbench":
        raise UserError("--preset sets the AlpacaEval 2 decoding of a paper setting; MT-Bench uses FastChat's "
                        "per-category temperatures (drop --preset, or use --format alpacaeval)")
    if args.format == "mtbench":
        base = {"temperature": None, "max_new_tokens": MTBENCH_MAX_NEW_TOKENS, "top_p": 1.0, "stop_tokens": []}
    else:
        base = PRESETS[args.preset] if args.preset else DEFAULT_DECODING
    decoding = {key: base[key] if getattr(args, key) is None else getattr(args, key)
                for key in ("temperature", "max_new_tokens", "top_p")}
    if decoding["temperature"] is not None and not 0 <= decoding["temperature"] < float("inf"):
        raise UserError(f"--temperature {decoding['temperature']}: must be a finite number >= 0 (0 = greedy)")
    if not 0.0 < decoding["top_p"] <= 1.0:
        raise UserError(f"--top-p {decoding['top_p']}: must be in (0, 1]")
    if decoding["max_new_tokens"] < 1:
        raise UserError(f"--max-new-tokens {decoding['max_new_tokens']}: must be >= 1")
    if decoding["temperature"] is not None:
        decoding["do_sample"] = decoding["temperature"] >= GREEDY_BELOW
    decoding.update(stop_tokens=list(base["stop_tokens"]), preset=args.preset,
                    source=base.get("source", "amapo-eval defaults"), seed=args.seed, batch_size=args.batch_size)
    if args.format == "mtbench":
        decoding["source"] = "FastChat fastchat/llm_judge/common.py temperature_config, gen_model_answer.py"
        if decoding["temperature"] is None:
            decoding["temperature_by_category"] = dict(MTBENCH_TEMPERATURES)
    return decoding


def _batches(n: int, batch_size: int):
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _check_items(items: list[dict], fmt: str, source: str) -> None:
    seen = {}  # MT-Bench question_id -> record: FastChat's judge keys answers by it, a duplicate would be lost
    for i, item in enumerate(items):
        if fmt == "alpacaeval" and not isinstance(item.get("instruction"), str):
            raise UserError(f"--instructions {source}: record {i} has no string 'instruction' "
                            f"(columns: {sorted(item)}); AlpacaEval records are {{instruction, dataset?}}")
        if fmt == "mtbench" and not (isinstance(item.get("turns"), list) and item["turns"]
                                     and all(isinstance(t, str) for t in item["turns"]) and "question_id" in item):
            raise UserError(f"--instructions {source}: record {i} is not an MT-Bench question "
                            f"{{question_id, category?, turns: [str, ...]}} (columns: {sorted(item)})")
        if fmt != "mtbench":
            continue
        if not isinstance(item.get("category"), (str, type(None))):  # it picks the question's temperature
            raise UserError(f"--instructions {source}: record {i} has category {item['category']!r}; an MT-Bench "
                            "category is a string (writing, math, ...)")
        key = json.dumps(item["question_id"])
        if key in seen:
            raise UserError(f"--instructions {source}: record {i} repeats question_id {item['question_id']} of "
                            f"record {seen[key]}; each question needs its own id")
        seen[key] = i


def generate_alpacaeval(model, tokenizer, items, decoding, stop_ids, use_template, bar) -> list[dict]:
    from amapo_train.eval.generation import generate_batch

    prompts = [render_prompt(tokenizer, [{"role": "user", "content": item["instruction"]}], use_template)
               for item in items]
    answers = [None] * len(items)
    for batch in _batches(len(items), decoding["batch_size"]):
        outs = generate_batch(model, tokenizer, [prompts[i] for i in batch], temperature=decoding["temperature"],
                              top_p=decoding["top_p"], max_new_tokens=decoding["max_new_tokens"],
                              stop_ids=stop_ids, seed=decoding["seed"] + batch[0])
        for i, out in zip(batch, outs):
            answers[i] = out
        bar.update(len(batch))
    return answers


def generate_mtbench(model, tokenizer, items, decoding, stop_ids, use_template, bar) -> list[list[str]]:
    """Every turn of every question; questions of one temperature are batched, turn by turn."""
    from amapo_train.eval.generation import generate_batch, mtbench_temperature

    temps = [decoding["temperature"] if decoding["temperature"] is not None
             else mtbench_temperature(item.get("category")) for item in items]
    messages = [[] for _ in items]
    answers = [[] for _ in items]
    for temperature in sorted(set(temps)):
        group = [i for i, t in enumerate(temps) if t == temperature]
        for chunk in _batches(len(group), decoding["batch_size"]):
            ids = [group[k] for k in chunk]
            for turn in range(max(len(items[i]["turns"]) for i in ids)):
                active = [i for i in ids if turn < len(items[i]["turns"])]
                for i in active:
                    messages[i].append({"role": "user", "content": items[i]["turns"][turn]})
                prompts = [render_prompt(tokenizer, messages[i], use_template) for i in active]
                outs = generate_batch(model, tokenizer, prompts, temperature=temperature, top_p=decoding["top_p"],
                                      max_new_tokens=decoding["max_new_tokens"], stop_ids=stop_ids,
                                      seed=decoding["seed"] + active[0] + 1_000_003 * turn)
                for i, out in zip(active, outs):
                    messages[i].append({"role": "assistant", "content": out})
                    answers[i].append(out)
            bar.update(len(ids))
    return answers


def cmd_generate(args) -> dict:
    from tqdm.auto import tqdm

    from amapo_train.eval.generation import stop_token_ids

    decoding = resolve_decoding(args)
    items = read_records("--instructions", args.instructions, args.split)
    _check_items(items, args.format, args.instructions)
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    try:
        stop_ids = stop_token_ids(tokenizer, decoding["stop_tokens"])
    except ValueError as error:
        raise UserError(f"--preset {args.preset}: {_one_line(error)}") from error
    decoding["stop_token_ids"] = stop_ids
    model_id = args.model_id or Path(args.model).resolve().name
    use_template = args.chat_template == "auto" and has_chat_template(tokenizer)
    with tqdm(total=len(items), desc="generate", disable=args.no_progress) as bar:
        if args.format == "alpacaeval":
            answers = generate_alpacaeval(model, tokenizer, items, decoding, stop_ids, use_template, bar)
            outputs = [{"instruction": item["instruction"], "output": answer, "generator": model_id,
                        "dataset": item.get("dataset", "alpaca_eval")} for item, answer in zip(items, answers)]
            _write_json(args.output, outputs)
        else:
            answers = generate_mtbench(model, tokenizer, items, decoding, stop_ids, use_template, bar)
            outputs = []
            for item, turns in zip(items, answers):
                answer_id = hashlib.sha1(f"{model_id}:{item['question_id']}:{args.seed}".encode()).hexdigest()[:22]
                outputs.append({"question_id": item["question_id"], "answer_id": answer_id, "model_id": model_id,
                                "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()})
            write_jsonl(args.output, outputs)
    decoding["seeding"] = ("torch.manual_seed(seed + index of the batch's first item [+ 1000003 * turn index for "
                           "MT-Bench]) before each batched generate call; sampled text depends on --batch-size")
    meta = {"model": str(args.model), "model_id": model_id, "format": args.format, "n": len(outputs),
            "instructions": str(args.instructions), "chat_template": use_template,
            "prompt_format": "tokenizer chat template" if use_template else "plain '\\n\\nUser: ...\\n\\nAssistant:'",
            "padding": "left", "decoding": decoding}
    _write_json(str(args.output) + ".meta.json", meta)
    print(f"wrote {len(outputs)} {args.format} answers to {args.output} (settings in {args.output}.meta.json)")
    return meta


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from amapo_train.eval.generation import PRESETS

    parser = _Parser(prog="amapo-eval", description=__doc__.split("\n\n")[0],
                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text,
                              formatter_class=_HelpFormatter)

    def model_args(p):
        p.add_argument("--model", required=True, help="local model directory (AutoModelForCausalLM + AutoTokenizer)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on GPU, float32 on CPU")
        p.add_argument("--chat-template", default="auto", choices=["auto", "none"],
                       help="auto: render prompts with the tokenizer's chat template when it has one")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def data_arg(p, split, help_text):
        p.add_argument("--data", required=True, help=help_text)
        p.add_argument("--split", default=split, help="split of a Hub dataset or bundled source (a local file has one)")
        p.add_argument("--limit", type=int, default=None, help="use the first N records only")

    defaults = TrainConfig()

    def scoring_args(p, from_checkpoint=None):
        """from_checkpoint: the text saying where an unset length comes from (rank); else the default is fixed."""
        p.add_argument("--batch-size", type=int, default=4, help="pairs per forward pass")
        lengths = (("--max-length", "max_length", "prompt + response tokens"),
                   ("--max-prompt-length", "max_prompt_length", "prompt tokens (cut from the left)"))
        for flag, name, help_text in lengths:
            default = getattr(defaults, name)
            p.add_argument(flag, type=int, default=None if from_checkpoint else default,
                           help=f"{help_text}; default: {from_checkpoint}{default}" if from_checkpoint else help_text)
        p.add_argument("--output", "--out", default=None, help="write the results as JSON here")

    p = add("rank", "ranking accuracy on preference pairs (AMaPO Eq. 4)")
    model_args(p)
    data_arg(p, "test", "bundled:hh-rlhf, a local .json/.jsonl(.gz) file or a Hub dataset, in any of the "
                        "driver's record formats")
    from_checkpoint = "the checkpoint's training config (trainer_state.json), else "
    scoring_args(p, from_checkpoint)
    p.add_argument("--tokenization", default=None, choices=TOKENIZATIONS,
                   help=f"as amapo-train's --tokenization; default: {from_checkpoint}{defaults.tokenization}")
    on_off = "on" if defaults.insert_system_message else "off"
    p.add_argument("--insert-system-message", type=parse_bool, default=None, metavar="on|off",
                   help="an empty system turn when a chat has none, as amapo-train's flag; "
                        f"default: {from_checkpoint}{on_off}")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% interval, 1 to 2**24")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_rank)

    p = add("rmbench", "RM-Bench easy/normal/hard accuracy (length-normalized log-prob score)")
    model_args(p)
    data_arg(p, "train", "RM-Bench's total_dataset.json (or JSONL / Hub dataset of the same records)")
    scoring_args(p)
    p.set_defaults(func=cmd_rmbench)

    p = add("splits", "UltraFeedback ID / Prompt-OOD / Response-OOD / Mutual-OOD sets")
    data_arg(p, "train", "UltraFeedback-style records (prompt/instruction + scored completions)")
    p.add_argument("--output", "--out-dir", required=True, help="directory for the split files")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt / model split")
    p.add_argument("--valid-prompt-fraction", type=float, default=0.1, help="share of prompts held out")
    p.add_argument("--valid-model-fraction", type=float, default=0.5, help="share of response models held out")
    p.add_argument("--valid-models", default=None, help="comma-separated unseen models (overrides the fraction)")
    p.add_argument("--score-key", default=None, help="completion score field (default: score, else overall_score)")
    p.set_defaults(func=cmd_splits)

    p = add("generate", "answers for AlpacaEval 2 (JSON) or MT-Bench (JSONL), batched")
    model_args(p)
    p.add_argument("--instructions", required=True,
                   help="alpacaeval: JSON/JSONL of {instruction, dataset?}; mtbench: question.jsonl "
                        "{question_id, category, turns}")
    p.add_argument("--split", default="eval", help="split, when --instructions names a Hub dataset")
    p.add_argument("--format", required=True, choices=["alpacaeval", "mtbench"], help="output format")
    p.add_argument("--output", "--out", required=True, help="answers file; settings go to OUTPUT.meta.json")
    p.add_argument("--model-id", default=None, help="generator / model_id name (default: the model directory name)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="AlpacaEval 2 decoding of a paper setting (README, Evaluation); flags given override it")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (left-padded)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the preset's; else 512 (alpacaeval) or 1024 (mtbench, FastChat's)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the preset's; else 0.7 (alpacaeval) or FastChat's per category (mtbench)")
    p.add_argument("--top-p", type=float, default=None, help="default: the preset's, else 1.0")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per batch, see the .meta.json)")
    p.set_defaults(func=cmd_generate)
    return parser


MODEL_COMMANDS = ("rank", "rmbench", "generate")


def check_args(args) -> None:
    """Everything that can be checked before a model or data set is loaded."""
    for flag, name in (("--batch-size", "batch_size"), ("--limit", "limit")):
        if getattr(args, name, None) is not None:
            check_range(flag, getattr(args, name), 1)
    if args.command == "rank":
        from amapo_train.eval.ranking import MAX_RESAMPLES

        check_range("--n-boot", args.n_boot, 1, MAX_RESAMPLES)
        check_model_dir(args.model)  # before its training config is read
        resolve_token_settings(args)
    if hasattr(args, "max_prompt_length"):
        check_length_flags(args.max_length, args.max_prompt_length)
    if args.command in ("rank", "generate", "splits"):
        # amapo-train's seed range (for splits, random.Random(-n) is random.Random(n): another seed's split).
        # torch's generators take seeds up to 2**64 - 1, so generate's offsets (the batch's first item, 1000003
        # per MT-Bench turn) added to a seed below 2**32 stay far inside them.
        check_range("--seed", args.seed, *NUMBER_RANGES["seed"])
    if args.output is not None:  # "" too: rank wrote nothing, splits wrote into the working directory
        check_output_path("--output", args.output, directory=args.command == "splits")
    if args.command == "splits":
        for flag, fraction in (("--valid-prompt-fraction", args.valid_prompt_fraction),
                               ("--valid-model-fraction", args.valid_model_fraction)):
            if not 0.0 < fraction < 1.0:  # also NaN
                raise UserError(f"{flag} {fraction}: must be in (0, 1)")
    if args.command in MODEL_COMMANDS:
        require_extras(args.command)
        check_model_dir(args.model)
        check_device(args.device)
    if args.command == "generate":
        resolve_decoding(args)


# The path flags of the subcommands (each has some): a leading ~ is expanded once, before any check or use.
PATH_FLAGS = {"model": "--model", "data": "--data", "output": "--output", "instructions": "--instructions"}


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    for name, flag in PATH_FLAGS.items():
        if hasattr(args, name):
            setattr(args, name, home_expanded(flag, getattr(args, name)))
    check_args(args)
    args.func(args)


def main(argv=None) -> int:
    """The ``amapo-eval`` console script: 0 on success, 2 (and one line on stderr) on a user error."""
    return run_console_script("amapo-eval", run, argv)


if __name__ == "__main__":
    sys.exit(main())
