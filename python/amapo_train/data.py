"""Preference data, the one implementation shared by training (``amapo-train``) and evaluation
(``amapo-eval``): reading records (bundled HH-RLHF, the Hub, local JSON/JSONL, optionally gzipped), the
three record formats, chat rendering, tokenization and truncation as the AMaPO/SimPO setup, and the padded
batch the trainer and the evaluation use.

Texts. A record becomes (prompt, chosen response, rejected response) strings (``record_texts``):
HH-RLHF dialogues are split at the last '\n\nAssistant:' the two share; message lists with a chat
template are rendered as the AMaPO authors do (``authors_chat_texts``: the prompt without a generation
prompt, an empty system message inserted when the template knows one, each response the template of the
assistant message alone, so the assistant header is part of the response and scored; the authors'
Mistral-Instruct template is ``CHAT_TEMPLATES["mistral"]``); without a template (or
``use_chat_template=False``) as plain dialogue '\n\nUser: ...\n\nAssistant:' with responses
' ' + content (``render_prompt``, ``chat_texts``).

Tokens (``tokenize_pair``). ``tokenization="trl"`` (default; the authors' trainer and TRL 0.9's
DPOTrainer.tokenize_row, keep_end; not TRL 1.16's DPOTrainer, see the README): prompt + response
tokenized jointly and split at the prompt's tokens (``split_answer``),
BOS before the prompt and EOS after each response unless there; only a pair whose prompt + longer response
exceeds ``max_length`` is truncated: the prompt to its last ``max_prompt_length`` tokens, then, if still
too long, both responses to ``max_length - max_prompt_length``. ``tokenization="separate"`` (the driver's
older rule, kept as an option): prompt and responses tokenized apart, the prompt always cut from the left
to ``max_prompt_length`` (BOS kept), each response cut to the room left; with a chat template the
assistant header ends the prompt and is not scored (the empty system message is inserted as for "trl").
Either way a pair with an empty (or whitespace-only) response text, or a blank answer message (which a chat
template would render as a non-blank header and end-of-turn: ``record_texts`` returns it as it is), is dropped.

Batch format (the contract between data, training and evaluation; ``collate``), every tensor int64
[N, L], right-padded to one length L across chosen and rejected:
    chosen_input_ids, chosen_attention_mask, chosen_labels,
    rejected_input_ids, rejected_attention_mask, rejected_labels,
input_ids = prompt tokens then response tokens then padding; attention_mask 1 on prompt and response, 0
on padding; labels = input_ids on response tokens, -100 on prompt and padding, not shifted (labels[:, t]
is scored by the logits of position t - 1); plus `index` [N], the pair's position in its dataset (for
precomputed reference log-probs), and `chosen_scores` / `rejected_scores` float64 [N] when the dataset
carries per-pair scores (ODPO). ``amapo_train.eval.ranking.pair_logps`` also accepts chosen and
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
FORMATS = {  # name -> what a record of it looks like (the README's "Data formats" table has examples)
    "pairs": "TRL standard: 'prompt', 'chosen' and 'rejected' strings",
    "conversational": "TRL conversational: 'prompt' a message list [{role, content}, ...], 'chosen' and "
    "'rejected' message lists with the assistant turn",
    "implicit": "TRL implicit prompt: no 'prompt'; 'chosen' and 'rejected' full conversations (message lists) "
    "sharing every message but the last, the assistant's answer",
    "ultrafeedback": "UltraFeedback-binarized: 'prompt' a string, 'chosen' and 'rejected' full conversations "
    "[user, assistant]",
    "hh-rlhf": "HH-RLHF: no 'prompt'; 'chosen' and 'rejected' dialogue strings sharing a prefix, split at the "
    "last '\\n\\nAssistant:'",
    "implicit-text": "TRL implicit prompt, standard: no 'prompt'; 'chosen' and 'rejected' strings whose shared "
    "prefix is the prompt (TRL's extract_prompt rule)",
}
LOCAL_SUFFIXES = (".json", ".jsonl", ".gz")


def looks_local(source: str) -> bool:
    """Whether `source` names a local file (a path or a JSON/JSONL name), not a Hub dataset."""
    return source.endswith(LOCAL_SUFFIXES) or source.startswith(("/", ".", "~")) or Path(source).exists()


def load_records(source: str, split: str, limit: int | None = None) -> list[dict]:
    """Raw records of `split` from "bundled:hh-rlhf", a local .json/.jsonl(.gz) file or a Hub dataset."""
    if source.startswith("bundled:"):
        check_bundled(source, split)
        records = read_json_records(BUNDLED / f"hh_rlhf_harmless_{split}.jsonl.gz")
    elif looks_local(source):
        try:
            path = Path(source).expanduser()
        except RuntimeError:  # "~nosuchuser/x.json": pathlib finds no home to expand it to
            raise FileNotFoundError(f"{source}: no user {Path(source).parts[0][1:]!r} here to expand it") from None
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such file")
        records = read_json_records(path)
    else:
        try:
            import datasets
        except ImportError as error:
            raise ImportError(f"loading {source!r} from the Hub needs `pip install datasets`") from error
        records = list(datasets.load_dataset(source, split=split))
    return records[:limit] if limit else records


def check_bundled(source: str, split: str) -> None:
    """`source` ("bundled:NAME") names a bundled dataset that has `split`; else a ValueError saying which do."""
    name = source.removeprefix("bundled:")
    if name != "hh-rlhf":
        raise ValueError(f"no bundled dataset {name!r}; the bundled one is 'bundled:hh-rlhf'")
    if split not in ("train", "test"):
        raise ValueError(f"bundled:hh-rlhf has the splits 'train' and 'test', not {split!r}")


def read_json_records(path) -> list[dict]:
    """The records of a JSON list or JSONL file (gzipped when the name ends in .gz), each a JSON object; a
    ValueError names the file line (JSONL) or list position (JSON) of the first one that is not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    try:
        if text.lstrip().startswith("["):
            placed = [(f"item {position}", record) for position, record in enumerate(json.loads(text))]
        else:  # split at "\n" alone: str.splitlines also splits at U+2028, U+2029 and U+0085, which JSON strings
            # may hold raw (json.dumps(ensure_ascii=False) writes them so, as amapo-eval splits does)
            placed = [(f"line {number}", json_line(number, line))
                      for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    except RecursionError:
        raise ValueError("not JSON that can be read: nested deeper than Python's recursion limit") from None
    for place, record in placed:
        if not isinstance(record, dict):
            raise ValueError(f"{place}: a record must be a JSON object, got {type(record).__name__} {record!r:.60}")
    return [record for _, record in placed]


def json_line(number: int, line: str):
    """Line `number` of a JSONL file, parsed; a ValueError naming the file line (the decoder's is the record's)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"line {number}: not JSON: {error.msg} (column {error.colno})") from None


def detect_format(record: dict) -> str:
    """The name (a key of FORMATS) of `record`'s format; a ValueError naming its columns and the formats
    accepted when it is in none."""
    prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
    accepted = "formats accepted: " + "; ".join(FORMATS.values())
    missing = [column for column in ("chosen", "rejected") if column not in record]
    if missing:
        raise ValueError(f"preference record has no column {missing[0]!r} (columns: {sorted(record)}); {accepted}")
    if isinstance(chosen, list) and isinstance(rejected, list):
        if isinstance(prompt, list):
            return "conversational"
        return "ultrafeedback" if isinstance(prompt, str) else "implicit"
    if isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(prompt, str):
            return "pairs"
        if prompt is None and HH_ASSISTANT in chosen:
            return "hh-rlhf"
        if prompt is None:
            return "implicit-text"
    raise ValueError(f"cannot tell the format of a record with columns {sorted(record)} "
                     f"(types: {', '.join(f'{k}: {type(v).__name__}' for k, v in sorted(record.items()))}); {accepted}")


def chat_pair(record: dict, fmt: str) -> tuple[list[dict], dict, dict]:
    """(history, chosen assistant message, rejected assistant message) of a message-list record: the
    history is 'prompt' (conversational, whose 'chosen' and 'rejected' hold one assistant message each)
    or the messages the two conversations share before their last one, which must be the assistant's (a
    UltraFeedback conversation without its user turn takes its string 'prompt' as the user message)."""
    chosen, rejected = record["chosen"], record["rejected"]
    if not (chosen and rejected and all(isinstance(m, dict) for m in (*chosen, *rejected))
            and chosen[-1].get("role") == "assistant" and rejected[-1].get("role") == "assistant"):
        raise ValueError(f"{fmt} record: 'chosen' and 'rejected' must be lists of {{role, content}} messages "
                         "ending with an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError(f"{fmt} record: 'chosen' and 'rejected' differ before their last message (the "
                         "prompt they share)")
    if fmt == "conversational" and (len(chosen) != 1 or len(rejected) != 1):
        raise ValueError(f"{fmt} record: 'chosen' and 'rejected' must each hold one assistant message (the answer), "
                         f"got {len(chosen)} and {len(rejected)} messages; put earlier turns in 'prompt'")
    history = list(chosen[:-1])
    if fmt == "conversational":
        history = [*record["prompt"], *history]
    elif not history and isinstance(record.get("prompt"), str):
        history = [{"role": "user", "content": record["prompt"]}]
    if not history:
        raise ValueError(f"{fmt} record: no prompt (no message before the assistant's answer)")
    return history, chosen[-1], rejected[-1]


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two HH-RLHF dialogues: the prompt runs through the last
    '\n\nAssistant:' inside the prefix both dialogues share (so a marker inside a response stays there)."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("HH-RLHF dialogues must share a prefix ending in '\n\nAssistant:'")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_implicit_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of two strings whose shared prefix is the prompt, by TRL's
    extract_prompt rule: the prefix up to the first differing character, less a space just before it (the
    space stays with the answers)."""
    cut = len(os.path.commonprefix([chosen, rejected]))
    if cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    if cut == 0:
        raise ValueError("implicit-text record: 'chosen' and 'rejected' share no prefix (the prompt)")
    return chosen[:cut], chosen[cut:], rejected[cut:]


# The authors' override of Mistral-Instruct's chat template (scripts/run_AMaPO.py, applied when the model
# name contains "mistral"): a system message is folded into the first user turn.
MISTRAL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'].strip() + '\n\n' %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 %}"
    "{% set content = system_message + message['content'] %}{% else %}{% set content = message['content'] %}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
CHAT_TEMPLATES = {"mistral": MISTRAL_CHAT_TEMPLATE}
TOKENIZATIONS = ("trl", "separate")


def with_system_message(messages: list[dict], tokenizer) -> list[dict]:
    """`messages` with an empty system turn first when they have none and the chat template knows system
    turns (alignment-handbook's maybe_insert_system_message, on by default in the authors' runs): its text
    names them (the authors' test, so Llama-3's template, which does not, gets none) and it renders them.
    The rendering decides for templates that name the system role only to refuse it (Gemma's "System role
    not supported" is raised from the template): those get no system turn instead of an error."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    template = tokenizer.chat_template or ""
    if messages and messages[0].get("role") == "system" or not ("system" in template or "<|im_start|>" in template):
        return list(messages)
    inserted = [{"role": "system", "content": ""}, *messages]
    try:
        tokenizer.apply_chat_template(inserted, tokenize=False)
    except TemplateError:
        return list(messages)
    return inserted


def authors_chat_texts(history: list[dict], chosen_message: dict, rejected_message: dict, tokenizer,
                       insert_system_message: bool = True) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as the authors render a chat pair (run_AMaPO.py, task "simpo"): the
    prompt is the template of the history with NO generation prompt; each response is the template of
    [that assistant message] alone, without a leading BOS text, so the assistant header
    ('<|start_header_id|>assistant<|end_header_id|>\n\n' on Llama-3) belongs to the response: scored,
    and counted in its length."""
    if insert_system_message:
        history = with_system_message(history, tokenizer)
    prompt = tokenizer.apply_chat_template(history, tokenize=False)

    def response(message):
        text = tokenizer.apply_chat_template([message], tokenize=False)
        bos = tokenizer.bos_token
        return text[len(bos):] if bos and text.startswith(bos) else text

    return prompt, response(chosen_message), response(rejected_message)


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
               use_chat_template: bool = True, insert_system_message: bool = True) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of a chat pair: with a chat template (and an empty
    system message when `insert_system_message`, as ``authors_chat_texts``) a response is the rendering of
    history + [message] minus the rendered prompt (so it carries the end-of-turn text); without one, the
    plain prompt of `render_prompt` and ' ' + content."""
    if use_chat_template and has_chat_template(tokenizer) and insert_system_message:
        history = with_system_message(history, tokenizer)
    prompt = render_prompt(tokenizer, history, use_chat_template)
    if use_chat_template and has_chat_template(tokenizer):

        def response(message):
            full = tokenizer.apply_chat_template([*history, message], tokenize=False)
            return full[len(prompt):] if full.startswith(prompt) else message["content"]

        return prompt, response(chosen_message), response(rejected_message)
    return prompt, " " + chosen_message["content"], " " + rejected_message["content"]


def record_texts(record: dict, tokenizer, fmt: str = "auto", *, use_chat_template: bool = True,
                 tokenization: str = "trl", insert_system_message: bool = True) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) as text, chat template applied where there is one
    (message lists only; `use_chat_template=False` renders them as plain dialogue). With a chat template,
    `tokenization="trl"` renders as the authors do (``authors_chat_texts``: the assistant header in the
    response), "separate" as ``chat_texts`` (the header in the prompt, masked); either inserts an empty
    system message when `insert_system_message`."""
    fmt = record_format(record, fmt)
    if fmt == "hh-rlhf":
        return split_hh_pair(record["chosen"], record["rejected"])
    if fmt == "pairs":
        return record["prompt"], record["chosen"], record["rejected"]
    if fmt == "implicit-text":
        return split_implicit_text(record["chosen"], record["rejected"])
    if fmt in ("conversational", "implicit", "ultrafeedback"):
        history, chosen, rejected = chat_pair(record, fmt)
        if not chosen["content"].strip() or not rejected["content"].strip():
            # a template renders a blank answer as its header and end-of-turn, never blank: the answers as
            # they are, so that tokenize_pair drops the pair as it drops a blank string response
            return render_prompt(tokenizer, history, use_chat_template), chosen["content"], rejected["content"]
        if tokenization == "trl" and use_chat_template and has_chat_template(tokenizer):
            return authors_chat_texts(history, chosen, rejected, tokenizer, insert_system_message)
        return chat_texts(history, chosen, rejected, tokenizer, use_chat_template, insert_system_message)
    raise ValueError(f"dataset_format must be one of {['auto', *FORMATS]}, got {fmt!r}")


def prompt_needs_special_tokens(tokenizer, prompt: str) -> bool:
    """Whether `prompt` should be tokenized with the tokenizer's special tokens: not when its text
    already starts with the BOS token (a rendered chat template), to avoid a double BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and prompt.startswith(bos))


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    """A ValueError unless 1 <= max_prompt_length < max_length: both truncation rules leave the responses
    max_length - max_prompt_length tokens, which must be at least one."""
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length must lie in [1, max_length), got max_prompt_length="
                         f"{max_prompt_length} and max_length={max_length}")


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, *, max_length: int,
                  max_prompt_length: int, tokenization: str = "trl") -> dict | None:
    """Token ids and labels of one pair (conventions in the module docstring); None when a response text is
    empty or whitespace (a pair that would score only EOS).

    "trl" (default): the authors' / TRL 0.9's DPO rule (``tokenize_pair_trl``); "separate": the driver's older
    rule (``tokenize_pair_separate``)."""
    check_lengths(max_length, max_prompt_length)
    if tokenization == "separate":
        return tokenize_pair_separate(tokenizer, prompt, chosen, rejected, max_length=max_length,
                                      max_prompt_length=max_prompt_length)
    if tokenization != "trl":
        raise ValueError(f"tokenization must be one of {TOKENIZATIONS}, got {tokenization!r}")
    return tokenize_pair_trl(tokenizer, prompt, chosen, rejected, max_length=max_length,
                             max_prompt_length=max_prompt_length)


def split_answer(tokenizer, prompt: str, prompt_ids: list[int], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of `prompt + answer` tokenized jointly (TRL's build_tokenized_answer): the
    answer starts after the prompt's own tokens, one token earlier when the joint tokenization merged the
    prompt's last token with the answer's first."""
    full = list(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


def tokenize_pair_trl(tokenizer, prompt: str, chosen: str, rejected: str, *, max_length: int,
                      max_prompt_length: int) -> dict | None:
    """The authors' (TRL 0.9 DPOTrainer.tokenize_row, truncation_mode keep_end) rule: each response is
    tokenized jointly with the prompt and split (``split_answer``); BOS is put before the prompt and EOS
    after each response unless already there. Only when prompt + the LONGER response exceed max_length
    is the prompt cut from the left to its last max_prompt_length tokens (a leading BOS goes too) and,
    if still too long, both responses cut to max_length - max_prompt_length. A prompt that fits is never
    cut."""
    if not chosen.strip() or not rejected.strip():
        return None
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    sides = {side: split_answer(tokenizer, prompt, prompt_ids, text)
             for side, text in (("chosen", chosen), ("rejected", rejected))}
    (chosen_prompt, _), (rejected_prompt, _) = sides["chosen"], sides["rejected"]
    differing = sum(a != b for a, b in zip(chosen_prompt, rejected_prompt))
    if differing > 1 or abs(len(chosen_prompt) - len(rejected_prompt)) > 1:
        raise ValueError("chosen and rejected tokenize the shared prompt differently beyond its last token")
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    tokens = {}
    for side, (side_prompt, answer) in sides.items():
        if bos is not None and (not side_prompt or side_prompt[0] != bos):
            side_prompt = [bos] + side_prompt
        if eos is not None and (not answer or answer[-1] != eos):
            answer = answer + [eos]
        tokens[side] = (side_prompt, answer)
    longer = max(len(answer) for _, answer in tokens.values())
    pair = {}
    for side, (side_prompt, answer) in tokens.items():
        if len(side_prompt) + longer > max_length:
            side_prompt = side_prompt[-max_prompt_length:]
        if len(side_prompt) + longer > max_length:
            answer = answer[:max_length - max_prompt_length]
        pair[f"{side}_input_ids"] = side_prompt + answer
        pair[f"{side}_labels"] = [IGNORE_INDEX] * len(side_prompt) + answer
    return pair


def tokenize_pair_separate(tokenizer, prompt: str, chosen: str, rejected: str, *, max_length: int,
                           max_prompt_length: int) -> dict | None:
    """tokenize_pair's "separate" rule: prompt and responses tokenized apart, every prompt longer than
    max_prompt_length cut from the left (a leading BOS kept), each response cut from the right to the
    room left by its prompt; None if a response is or ends up empty."""
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


def holdout_positions(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training positions, held-out positions) of `count` records: a seeded random `fraction` of them (at
    least one) held out, the rest for training; disjoint, each in increasing order (the file's)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    if count < 2:
        raise ValueError(f"cannot hold out a share of {count} record(s)")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:min(max(1, round(fraction * count)), count - 1)])
    return [i for i in range(count) if i not in held_out], sorted(held_out)


def record_format(record: dict, fmt: str = "auto") -> str:
    """`record`'s format (detect_format), which must be `fmt` unless that is "auto"; else a ValueError."""
    found = detect_format(record)
    if fmt not in ("auto", found):
        raise ValueError(f"a record in the {found!r} format where dataset_format is {fmt!r} "
                         f"(columns: {sorted(record)})")
    return found


def check_record(record: dict, fmt: str = "auto") -> str:
    """`record`'s format (record_format), and what record_texts needs of it that no tokenizer decides: the
    prompt the two sides share (HH-RLHF's marker, implicit-text's prefix, a conversation's history) and
    every message a {role, content} dict of strings. Without it, such a record fails only once the model
    is loaded, with a traceback (None content: a TypeError), or a list content is rendered as its Python
    repr and trained on."""
    fmt = record_format(record, fmt)
    if fmt == "hh-rlhf":
        split_hh_pair(record["chosen"], record["rejected"])
    elif fmt == "implicit-text":
        split_implicit_text(record["chosen"], record["rejected"])
    elif fmt in ("conversational", "implicit", "ultrafeedback"):
        if fmt == "conversational" and not all(isinstance(m, dict) for m in record["prompt"]):
            raise ValueError(f"{fmt} record: 'prompt' must be a list of {{role, content}} messages")
        history, chosen, rejected = chat_pair(record, fmt)
        for message in (*history, chosen, rejected):
            if not (isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
                raise ValueError(f"{fmt} record: every message needs a string 'role' and 'content', got "
                                 f"{message!r:.80}")
    return fmt


def positioned(records: list, positions=None):
    """(record, position) pairs: each record with its position in its source (`positions`; default: its
    position in `records`), one for one (a length mismatch is an error, not a silent truncation)."""
    return zip(records, range(len(records)) if positions is None else positions, strict=True)


def check_detected_formats(records: list[dict], where: str, fmt: str = "auto", positions=None) -> None:
    """Every record is in a known format, and in `fmt` unless "auto", and splits into a prompt and two
    responses (check_record); a ValueError naming the first that is not, before any tokenizer or model is
    needed: "{where} {position}" (where: e.g. "record"; positions: each record's position in its source, so
    that the message points into the file; default: its position in `records`)."""
    for record, position in positioned(records, positions):
        try:
            check_record(record, fmt)
        except ValueError as error:
            raise ValueError(f"{where} {position}: {error}") from None


def check_scores(records: list[dict], columns: tuple[str, str], where: str, positions=None) -> None:
    """Every record has numeric `columns` (chosen's score, rejected's), the chosen one higher (ODPO's
    offset is the log of their gap); a ValueError naming the first record that has not (as
    check_detected_formats)."""
    for record, position in positioned(records, positions):
        values = [record.get(column) for column in columns]
        for column, value in zip(columns, values):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where} {position}: no numeric score column {column!r} "
                                 f"(columns: {sorted(record)})")
        if not values[0] > values[1]:
            raise ValueError(f"{where} {position}: {columns[0]} {values[0]} is not above {columns[1]} "
                             f"{values[1]} (ODPO needs the chosen response scored higher)")


class RecordError(ValueError):
    """A record PreferenceDataset cannot make into a pair, named by its position in its source ("record N: ...");
    its __cause__ is what was raised about it (a ValueError, a KeyError, or the chat template's jinja2
    TemplateError when the template refuses the conversation)."""


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized pairs of `records` (any format of FORMATS); `dropped` counts pairs left with an empty
    response (a blank answer message too, chat template or not), `record_index[i]` is the position in
    `records` of item i, `stats` sums it up. Item i is
    tokenize_pair's dict plus `index` i, and `chosen_score` / `rejected_score` (the record's columns
    `score_columns`) when given. A record that cannot be tokenized is a RecordError naming its position in
    `positions` (each record's position in its source, e.g. its file; default: its position in `records`)."""

    def __init__(self, records, tokenizer, *, fmt="auto", max_length=2048, max_prompt_length=1800,
                 use_chat_template=True, tokenization="trl", insert_system_message=True,
                 score_columns: tuple[str, str] | None = None, positions=None):
        from jinja2 import TemplateError  # transformers renders chat templates with jinja2

        self.pairs, self.record_index, self.dropped = [], [], 0
        for index, (record, position) in enumerate(positioned(records, positions)):
            try:
                texts = record_texts(record, tokenizer, fmt, use_chat_template=use_chat_template,
                                     tokenization=tokenization, insert_system_message=insert_system_message)
                pair = tokenize_pair(tokenizer, *texts, max_length=max_length, max_prompt_length=max_prompt_length,
                                     tokenization=tokenization)
            except (ValueError, KeyError, TemplateError) as error:
                raise RecordError(f"record {position}: {error}") from error
            if pair is None:
                self.dropped += 1
            else:
                if score_columns:
                    pair["chosen_score"], pair["rejected_score"] = (float(record[c]) for c in score_columns)
                self.pairs.append(pair)
                self.record_index.append(index)

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
    if all("chosen_score" in p for p in pairs):  # per-pair scores (ODPO): float64 [N]
        for side in ("chosen", "rejected"):
            batch[f"{side}_scores"] = torch.tensor([p[f"{side}_score"] for p in pairs], dtype=torch.float64)
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
