"""Preference data, the one implementation shared by training (``amapo-train``) and evaluation
(``amapo-eval``): reading records (bundled HH-RLHF, the Hub, local JSON/JSONL, optionally gzipped), the
three record formats, chat rendering, tokenization and truncation as the AMaPO/SimPO setup, and the padded
batch the trainer and the evaluation use.

Texts. A record becomes (prompt, chosen response, rejected response) strings (``record_texts``):
HH-RLHF dialogues are split at the last '\\n\\nAssistant:' the two share; message lists are rendered with
the tokenizer's chat template (the response is the rendered conversation minus the rendered prompt) or,
without one (or ``use_chat_template=False``), as plain dialogue '\\n\\nUser: ...\\n\\nAssistant:' with
responses ' ' + content (``render_prompt``, ``chat_texts``).

Tokens (``tokenize_pair``, following TRL's DPO tokenization): the prompt and each response are tokenized
separately, so chosen and rejected share the prompt tokens. The prompt gets the tokenizer's special tokens
(BOS) unless its text already starts with ``tokenizer.bos_token`` (a rendered chat template: no double BOS)
and is cut from the LEFT to ``max_prompt_length`` tokens, keeping a leading BOS token; each response gets
no special tokens, the EOS id appended (when the tokenizer has one and the text does not end with it) and
is cut from the RIGHT to fit ``max_length``. A pair with an empty (or whitespace-only) response is dropped.

Batch format (the contract between data, training and evaluation; ``collate``), every tensor int64
[N, L], right-padded to one length L across chosen and rejected:
    chosen_input_ids, chosen_attention_mask, chosen_labels,
    rejected_input_ids, rejected_attention_mask, rejected_labels,
input_ids = prompt tokens then response tokens then padding; attention_mask 1 on prompt and response, 0
on padding; labels = input_ids on response tokens, -100 on prompt and padding, not shifted (labels[:, t]
is scored by the logits of position t - 1); plus `index` [N], the pair's position in its dataset (for
precomputed reference log-probs). ``amapo_train.eval.ranking.pair_logps`` also accepts chosen and
rejected of different lengths."""

import gzip
import json
import os
from pathlib import Path

import torch

BUNDLED = Path(__file__).parent / "data"
IGNORE_INDEX = -100
HH_ASSISTANT = "\n\nAssistant:"
BATCH_KEYS = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels",
              "rejected_input_ids", "rejected_attention_mask", "rejected_labels")
FORMATS = {
    "ultrafeedback": "UltraFeedback-binarized: 'chosen' and 'rejected' are message lists "
    "[{role, content}, ...] ending with the assistant's answer ('prompt' optional)",
    "hh-rlhf": "HH-RLHF: 'chosen' and 'rejected' are dialogue strings sharing a prefix, "
    "split at the last '\\n\\nAssistant:'",
    "pairs": "pairs: 'prompt', 'chosen' and 'rejected' strings",
}


def load_records(source: str, split: str, limit: int | None = None) -> list[dict]:
    """Raw records of `split` from "bundled:hh-rlhf", a local .json/.jsonl(.gz) file or a Hub dataset."""
    if source.startswith("bundled:"):
        name = source.removeprefix("bundled:")
        if name != "hh-rlhf":
            raise ValueError(f"no bundled dataset {name!r}; the bundled one is 'bundled:hh-rlhf'")
        records = read_json_records(BUNDLED / f"hh_rlhf_harmless_{split}.jsonl.gz")
    elif Path(source).exists():
        records = read_json_records(source)
    else:
        try:
            import datasets
        except ImportError as error:
            raise ImportError(f"loading {source!r} from the Hub needs `pip install datasets`") from error
        records = list(datasets.load_dataset(source, split=split))
    return records[:limit] if limit else records


def read_json_records(path) -> list[dict]:
    """The records of a JSON list or JSONL file (gzipped when the name ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def detect_format(record: dict) -> str:
    chosen, rejected = record.get("chosen"), record.get("rejected")
    missing = [column for column in ("chosen", "rejected") if column not in record]
    if missing:
        raise ValueError(f"preference record has no column {missing[0]!r} (columns: {sorted(record)}); "
                         f"formats accepted: " + "; ".join(FORMATS.values()))
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "ultrafeedback"
    if isinstance(record.get("prompt"), str) and isinstance(chosen, str):
        return "pairs"
    if isinstance(chosen, str) and HH_ASSISTANT in chosen:
        return "hh-rlhf"
    raise ValueError(f"cannot tell the format of a record with columns {sorted(record)}; formats accepted: "
                     + "; ".join(FORMATS.values()))


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two HH-RLHF dialogues: the prompt runs through the last
    '\n\nAssistant:' inside the prefix both dialogues share (so a marker inside a response stays there)."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("HH-RLHF dialogues must share a prefix ending in '\n\nAssistant:'")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, messages: list[dict], use_chat_template: bool = True) -> str:
    """Prompt text of `messages` with the assistant turn opened: the tokenizer's chat template
    (add_generation_prompt=True) when it has one and `use_chat_template`, else plain dialogue,
    '\n\n<Role>: content' per message then '\n\nAssistant:'."""
    if use_chat_template and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"\n\n{m['role'].capitalize()}: {m['content']}" for m in messages) + HH_ASSISTANT


def chat_texts(history: list[dict], chosen_message: dict, rejected_message: dict, tokenizer,
               use_chat_template: bool = True) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of a chat pair: with a chat template a response is the
    rendering of history + [message] minus the rendered prompt (so it carries the end-of-turn text);
    without one, the plain prompt of `render_prompt` and ' ' + content."""
    prompt = render_prompt(tokenizer, history, use_chat_template)
    if use_chat_template and has_chat_template(tokenizer):

        def response(message):
            full = tokenizer.apply_chat_template([*history, message], tokenize=False)
            return full[len(prompt):] if full.startswith(prompt) else message["content"]

        return prompt, response(chosen_message), response(rejected_message)
    return prompt, " " + chosen_message["content"], " " + rejected_message["content"]


def record_texts(record: dict, tokenizer, fmt: str = "auto", *,
                 use_chat_template: bool = True) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) as text, chat template applied where there is one
    (message lists only; `use_chat_template=False` renders them as plain dialogue)."""
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "hh-rlhf":
        return split_hh_pair(record["chosen"], record["rejected"])
    if fmt == "pairs":
        return record["prompt"], record["chosen"], record["rejected"]
    if fmt == "ultrafeedback":
        chosen, rejected = record["chosen"], record["rejected"]
        if not (chosen and rejected and chosen[-1].get("role") == "assistant"
                and rejected[-1].get("role") == "assistant"):
            raise ValueError("message-list record: chosen and rejected must end with an assistant message")
        history = chosen[:-1]
        if not history and isinstance(record.get("prompt"), str):  # UltraFeedback with the prompt apart
            history = [{"role": "user", "content": record["prompt"]}]
        return chat_texts(history, chosen[-1], rejected[-1], tokenizer, use_chat_template)
    raise ValueError(f"dataset_format must be one of {['auto', *FORMATS]}, got {fmt!r}")


def prompt_needs_special_tokens(tokenizer, prompt: str) -> bool:
    """Whether `prompt` should be tokenized with the tokenizer's special tokens: not when its text
    already starts with the BOS token (a rendered chat template), to avoid a double BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and prompt.startswith(bos))


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, *, max_length: int,
                  max_prompt_length: int) -> dict | None:
    """Token ids of one pair (conventions in the module docstring): the prompt cut from the left to
    max_prompt_length (a leading BOS kept), each response from the right to fit max_length; None if a
    response is or ends up empty."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=prompt_needs_special_tokens(tokenizer, prompt))["input_ids"])
    if len(prompt_ids) > max_prompt_length:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is not None and max_prompt_length > 0 and prompt_ids[0] == bos_id:
            prompt_ids = [bos_id] + prompt_ids[len(prompt_ids) - max_prompt_length + 1:]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length:]
    room = max_length - len(prompt_ids)
    pair = {}
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        response_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None and (not response_ids or response_ids[-1] != tokenizer.eos_token_id):
            response_ids = response_ids + [tokenizer.eos_token_id]
        response_ids = response_ids[:max(room, 0)]
        if not response_ids or not text.strip():
            return None
        pair[f"{side}_input_ids"] = prompt_ids + response_ids
        pair[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return pair


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized pairs of `records` (any format of FORMATS); `dropped` counts pairs left with an empty
    response, `record_index[i]` is the position in `records` of item i, `stats` sums it up. Item i is
    tokenize_pair's dict plus `index` i."""

    def __init__(self, records, tokenizer, *, fmt="auto", max_length=2048, max_prompt_length=1800,
                 use_chat_template=True):
        self.pairs, self.record_index, self.dropped = [], [], 0
        for position, record in enumerate(records):
            texts = record_texts(record, tokenizer, fmt, use_chat_template=use_chat_template)
            pair = tokenize_pair(tokenizer, *texts, max_length=max_length, max_prompt_length=max_prompt_length)
            if pair is None:
                self.dropped += 1
            else:
                self.pairs.append(pair)
                self.record_index.append(position)

    @property
    def stats(self) -> dict:
        return {"n_records": len(self.pairs) + self.dropped, "n_kept": len(self.pairs),
                "n_dropped_empty": self.dropped}

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        return {**self.pairs[index], "index": index}


def collate(pairs: list[dict], pad_token_id: int | None) -> dict:
    """The padded batch described in the module docstring (pad_token_id None pads with 0: padding is
    masked and scores nothing); `index` is there when every pair carries one."""
    if not pairs:
        raise ValueError("collate needs at least one pair")
    pad = 0 if pad_token_id is None else int(pad_token_id)
    length = max(len(p[f"{side}_input_ids"]) for p in pairs for side in ("chosen", "rejected"))
    batch = {}
    if all("index" in p for p in pairs):
        batch["index"] = torch.tensor([p["index"] for p in pairs], dtype=torch.long)
    for side in ("chosen", "rejected"):
        ids = torch.full((len(pairs), length), pad, dtype=torch.long)
        labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(pairs), length), dtype=torch.long)
        for row, pair in enumerate(pairs):
            n = len(pair[f"{side}_input_ids"])
            if len(pair[f"{side}_labels"]) != n:
                raise ValueError(f"pair {row}: {side}_input_ids and {side}_labels differ in length")
            ids[row, :n] = torch.tensor(pair[f"{side}_input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(pair[f"{side}_labels"], dtype=torch.long)
            mask[row, :n] = 1
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def concatenated(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) [2N, L]: chosen rows first, as the losses expect."""
    return tuple(torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
                 for key in ("input_ids", "attention_mask", "labels"))
