"""``amapo-eval``: ranking accuracy, RM-Bench, UltraFeedback generalization splits, and generation for
AlpacaEval 2 / MT-Bench.

    amapo-eval rank     --model PATH --data pairs.jsonl [--batch-size 4] [--max-length 2048] [--output out.json]
    amapo-eval rmbench  --model PATH --data total_dataset.json [--output out.json]
    amapo-eval splits   --data ultrafeedback.jsonl --out-dir DIR [--seed 0]
    amapo-eval generate --model PATH --instructions FILE --format alpacaeval|mtbench --out FILE
                        [--max-new-tokens 512 --temperature 0.7 --top-p 1.0 --seed 0]

Models and tokenizers load from local paths only (``local_files_only=True``).

Data formats of ``rank`` (a JSON list or one JSON object per line, optionally gzipped; the format is
read per record), read, rendered and tokenized by the training driver's code (``amapo_train.data``), so
a policy is scored on the tokens it was trained on:

- ``{"prompt": str, "chosen": str, "rejected": str}``: texts used as they are (already formatted);
- ``{"chosen": [messages], "rejected": [messages]}`` (UltraFeedback-binarized style, ``prompt``
  optional, used as the user message when the lists hold only the answer): the prompt is
  ``chosen[:-1]`` rendered with the tokenizer's chat template (``--chat-template auto``, when it has
  one), the responses the rest of each rendered conversation;
- ``{"chosen": str, "rejected": str}`` (HH-RLHF): split at the last ``"\\n\\nAssistant:"`` the two
  strings share; the prompt ends with ``"Assistant:"``, the response is the rest (leading space kept);
  no chat template (the text already is a dialogue).

Message lists without a chat template (or with ``--chat-template none``) are rendered as plain
dialogue, ``"\\n\\nUser: ...\\n\\nAssistant:"``, responses ``" " + content``. ``rmbench`` treats each
prompt as one user message and each response as the assistant's reply (same rendering); ``generate``
renders instructions the same way (``amapo_train.data.render_prompt``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from amapo_train.data import (
    PreferenceDataset,
    chat_texts,
    has_chat_template,
    prompt_needs_special_tokens,
    read_json_records,
    render_prompt,
)


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

    device, torch_dtype = _device_dtype(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    model.to(device).eval()
    return model, tokenizer


def _pad_id(tokenizer):
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)


def _fmt(stats: dict) -> str:
    return f"{stats['accuracy']:.4f} [{stats['ci_low']:.4f}, {stats['ci_high']:.4f}]"


def _write_json(path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# subcommands
# --------------------------------------------------------------------------------------------------


def cmd_rank(args) -> dict:
    from amapo_train.eval.ranking import evaluate_ranking, make_batches

    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    use_template = args.chat_template == "auto"
    dataset = PreferenceDataset(read_json_records(args.data), tokenizer, max_length=args.max_length,
                                max_prompt_length=args.max_prompt_length, use_chat_template=use_template)
    if not len(dataset):
        raise SystemExit("rank: no pair left after tokenization")
    batches = make_batches(dataset, args.batch_size, _pad_id(tokenizer))
    res = evaluate_ranking(model, batches, progress=not args.no_progress, n_boot=args.n_boot, seed=args.seed)
    level = int(round(100 * res["confidence"]))
    print(f"pairs: {res['n_pairs']} (dropped with an empty response: {dataset.dropped})")
    print(f"ranking accuracy, summed log-probs (Eq. 4):  {_fmt(res['summed'])}")
    print(f"ranking accuracy, length-normalized log-probs: {_fmt(res['normalized'])}")
    print(f"({level}% percentile bootstrap, {res['n_boot']} resamples, seed {res['seed']}; ties count as wrong)")
    out = {
        "model": str(args.model),
        "data": str(args.data),
        "tokenization": dataset.stats,
        "settings": {"max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
                     "batch_size": args.batch_size, "chat_template": use_template and has_chat_template(tokenizer)},
        **res,
    }
    if args.output:
        _write_json(args.output, out)
    return out


def cmd_rmbench(args) -> dict:
    from amapo_train.eval.rmbench import load_rmbench, rmbench_by_domain, score_rmbench

    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    records = load_rmbench(args.data)
    use_template = args.chat_template == "auto" and has_chat_template(tokenizer)

    def fmt(prompt, chosen, rejected):
        return chat_texts([{"role": "user", "content": prompt}], {"role": "assistant", "content": chosen},
                          {"role": "assistant", "content": rejected}, tokenizer, use_template)

    chosen, rejected, kept = score_rmbench(
        model, tokenizer, records, batch_size=args.batch_size, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length, format_pair=fmt, progress=not args.no_progress,
    )
    if not kept.any():
        raise SystemExit("rmbench: no scorable prompt")
    domains = [r["domain"] for r, k in zip(records, kept.tolist()) if k]
    res = rmbench_by_domain(chosen[kept], rejected[kept], domains)
    for name, acc in res.items():
        print(f"{name:>16}: easy {acc['easy']:.4f}  normal {acc['normal']:.4f}  hard {acc['hard']:.4f}  "
              f"average {acc['average']:.4f}  (n={acc['n']})")
    out = {"model": str(args.model), "data": str(args.data), "n_records": len(records),
           "n_dropped": int((~kept).sum()), "score": "length-normalized response log-prob",
           "chat_template": use_template, "results": res}
    if args.output:
        _write_json(args.output, out)
    return out


def cmd_splits(args) -> dict:
    from amapo_train.eval.splits import SETS, build_generalization_splits, normalize_record, random_split

    records = [normalize_record(r, args.score_key) for r in read_json_records(args.data)]
    prompt_ids = [r["prompt_id"] for r in records]
    models = sorted({c["model"] for r in records for c in r["completions"]})
    train_p, valid_p = random_split(prompt_ids, args.valid_prompt_fraction, args.seed)
    if args.valid_models:
        valid_m = sorted(set(args.valid_models.split(",")))
        unknown = sorted(set(valid_m) - set(models))
        if unknown:
            raise SystemExit(f"splits: --valid-models names models not in the data: {unknown}")
        train_m = [m for m in models if m not in valid_m]
    else:
        train_m, valid_m = random_split(models, args.valid_model_fraction, args.seed)
    res = build_generalization_splits(records, train_prompts=train_p, valid_prompts=valid_p,
                                      train_models=train_m, valid_models=valid_m)
    out_dir = Path(args.out_dir)
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


def _encode_prompt(tokenizer, text: str):
    return tokenizer(text, add_special_tokens=prompt_needs_special_tokens(tokenizer, text), return_tensors="pt")


def _generate_one(model, tokenizer, prompt_text: str, decoding: dict, seed: int) -> str:
    import torch

    enc = _encode_prompt(tokenizer, prompt_text).to(model.device)
    kwargs = {"max_new_tokens": decoding["max_new_tokens"], "pad_token_id": _pad_id(tokenizer)}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    if decoding["temperature"] > 0:
        kwargs.update(do_sample=True, temperature=decoding["temperature"], top_p=decoding["top_p"])
    else:
        kwargs.update(do_sample=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
    new = out[0, enc["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def cmd_generate(args) -> dict:
    from tqdm.auto import tqdm

    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    items = read_json_records(args.instructions)
    model_id = args.model_id or Path(args.model).resolve().name
    decoding = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "do_sample": args.temperature > 0, "seed": args.seed,
                "seeding": "torch.manual_seed(seed + item index [+ 1000003 * turn index for MT-Bench]) before each generate call"}
    use_template = args.chat_template == "auto" and has_chat_template(tokenizer)
    bar = tqdm(items, desc="generate", disable=args.no_progress)
    if args.format == "alpacaeval":
        outputs = []
        for i, item in enumerate(bar):
            prompt = render_prompt(tokenizer, [{"role": "user", "content": item["instruction"]}], use_template)
            outputs.append({
                "instruction": item["instruction"],
                "output": _generate_one(model, tokenizer, prompt, decoding, args.seed + i),
                "generator": model_id,
                "dataset": item.get("dataset", "alpaca_eval"),
            })
        _write_json(args.out, outputs)
    else:
        outputs = []
        for i, item in enumerate(bar):
            messages, turns = [], []
            for t, question in enumerate(item["turns"]):
                messages.append({"role": "user", "content": question})
                prompt = render_prompt(tokenizer, messages, use_template)
                answer = _generate_one(model, tokenizer, prompt, decoding, args.seed + i + 1_000_003 * t)
                messages.append({"role": "assistant", "content": answer})
                turns.append(answer)
            answer_id = hashlib.sha1(f"{model_id}:{item['question_id']}:{args.seed}".encode()).hexdigest()[:22]
            outputs.append({"question_id": item["question_id"], "answer_id": answer_id, "model_id": model_id,
                            "choices": [{"index": 0, "turns": turns}], "tstamp": time.time()})
        write_jsonl(args.out, outputs)
    meta = {"model": str(args.model), "model_id": model_id, "format": args.format, "n": len(outputs),
            "instructions": str(args.instructions), "chat_template": use_template,
            "prompt_format": "tokenizer chat template" if use_template else "plain '\\n\\nUser: ...\\n\\nAssistant:'",
            "decoding": decoding}
    _write_json(str(args.out) + ".meta.json", meta)
    print(f"wrote {len(outputs)} {args.format} answers to {args.out} (settings in {args.out}.meta.json)")
    return meta


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amapo-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", required=True, help="local model directory (AutoModelForCausalLM + AutoTokenizer)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on GPU, float32 on CPU")
        p.add_argument("--chat-template", default="auto", choices=["auto", "none"],
                       help="auto: render prompts with the tokenizer's chat template when it has one")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def scoring_args(p):
        p.add_argument("--data", required=True)
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--max-length", type=int, default=2048)
        p.add_argument("--max-prompt-length", type=int, default=1800)
        p.add_argument("--output", default=None, help="write the results as JSON here")

    p = sub.add_parser("rank", help="ranking accuracy on preference pairs (JSONL)")
    model_args(p)
    scoring_args(p)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% interval")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("rmbench", help="RM-Bench easy/normal/hard accuracy (length-normalized log-prob score)")
    model_args(p)
    scoring_args(p)
    p.set_defaults(func=cmd_rmbench)

    p = sub.add_parser("splits", help="UltraFeedback ID / Prompt-OOD / Response-OOD / Mutual-OOD sets")
    p.add_argument("--data", required=True, help="UltraFeedback-style JSONL (prompt/instruction + scored completions)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--valid-prompt-fraction", type=float, default=0.1)
    p.add_argument("--valid-model-fraction", type=float, default=0.5)
    p.add_argument("--valid-models", default=None, help="comma-separated unseen models (overrides the fraction)")
    p.add_argument("--score-key", default=None, help="completion score field (default: score, else overall_score)")
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser("generate", help="answers for AlpacaEval 2 (JSON) or MT-Bench (JSONL)")
    model_args(p)
    p.add_argument("--instructions", required=True,
                   help="alpacaeval: JSON/JSONL of {instruction, dataset?}; mtbench: question.jsonl {question_id, turns}")
    p.add_argument("--format", required=True, choices=["alpacaeval", "mtbench"])
    p.add_argument("--out", required=True)
    p.add_argument("--model-id", default=None, help="generator / model_id name (default: the model directory name)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
