"""Tokenization as the AMaPO authors' trainer (TRL 0.9's DPO rule) on an offline tokenizer with Llama-3's chat
template (the tiny BPE tokenizer plus the template's special tokens): the response boundary (the assistant
header is scored), joint tokenization, the truncation rule, system messages; expectations worked out by hand
from the template, token by token."""

import copy

import pytest

from amapo_train import data
from amapo_train.model import train_tiny_tokenizer

LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's chat template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_tokenizer():
    """The tiny tokenizer with Llama-3's special tokens and chat template: built offline."""
    records = data.load_records("bundled:hh-rlhf", "train", 200)
    tokenizer = train_tiny_tokenizer([r[side] for r in records for side in ("chosen", "rejected")], vocab_size=600)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tok():
    return llama3_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def turn(tok, role, content):
    """<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>, token by token."""
    start, end = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>"])
    return [start] + ids(tok, role) + [end] + ids(tok, "\n\n" + content) + [tok.eos_token_id]


def record(user, chosen, rejected, system=None):
    history = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"chosen": [*history, {"role": "assistant", "content": chosen}],
            "rejected": [*history, {"role": "assistant", "content": rejected}]}


def tokenized(tok, rec, **lengths):
    return data.tokenize_pair(tok, *data.record_texts(rec, tok), **lengths)


def scored(labels):
    return [label for label in labels if label != data.IGNORE_INDEX]


def test_short_pair_scores_the_assistant_header(tok):
    pair = tokenized(tok, record("How are you?", "Fine, thanks.", "No."), max_length=512, max_prompt_length=256)
    prompt = [tok.bos_token_id] + turn(tok, "user", "How are you?")  # no generation prompt, no system turn
    chosen, rejected = turn(tok, "assistant", "Fine, thanks."), turn(tok, "assistant", "No.")
    assert pair["chosen_input_ids"] == prompt + chosen and pair["rejected_input_ids"] == prompt + rejected
    assert pair["chosen_labels"] == [-100] * len(prompt) + chosen  # header and <|eot_id|> scored, no 2nd EOS
    assert scored(pair["rejected_labels"]) == rejected


def test_overflowing_responses_cut_prompt_then_responses(tok):
    long_answer = "That is a long answer " * 20
    rec = record("Tell me a story about a dog", long_answer, "Short one.")
    prompt = [tok.bos_token_id] + turn(tok, "user", "Tell me a story about a dog")
    chosen = turn(tok, "assistant", long_answer.strip())
    max_length, max_prompt = 40, 8
    assert len(prompt) > max_prompt and len(chosen) > max_length - max_prompt
    pair = tokenized(tok, rec, max_length=max_length, max_prompt_length=max_prompt)
    # prompt + longer response > 40: the prompt keeps its last 8 tokens (BOS goes, as in TRL's keep_end),
    # then both responses are cut to 40 - 8 = 32 tokens; the short one (under 32) is left whole.
    assert pair["chosen_input_ids"] == prompt[-8:] + chosen[:32]
    assert scored(pair["chosen_labels"]) == chosen[:32]
    assert pair["rejected_input_ids"] == prompt[-8:] + turn(tok, "assistant", "Short one.")


def test_long_prompt_that_fits_is_not_cut(tok):
    question = "Please explain how a bicycle stays upright while moving"
    rec = record(question, "Gyroscopic effects and steering.", "Magic.")
    prompt = [tok.bos_token_id] + turn(tok, "user", question)
    chosen = turn(tok, "assistant", "Gyroscopic effects and steering.")
    max_prompt = 4  # far below the prompt's length, but the pair fits max_length exactly
    pair = tokenized(tok, rec, max_length=len(prompt) + len(chosen), max_prompt_length=max_prompt)
    assert pair["chosen_input_ids"] == prompt + chosen
    assert pair["chosen_labels"] == [-100] * len(prompt) + chosen
    # the older "separate" rule cuts every prompt over max_prompt_length, and masks the assistant header
    old = data.tokenize_pair(tok, *data.record_texts(rec, tok, tokenization="separate"),
                             max_length=len(prompt) + len(chosen), max_prompt_length=max_prompt,
                             tokenization="separate")
    assert len(old["chosen_input_ids"]) - len(scored(old["chosen_labels"])) == max_prompt


def test_system_message(tok):
    pair = tokenized(tok, record("Hi", "Hello!", "Go away.", system="Be brief."), max_length=512,
                     max_prompt_length=256)
    prompt = [tok.bos_token_id] + turn(tok, "system", "Be brief.") + turn(tok, "user", "Hi")
    assert pair["chosen_input_ids"] == prompt + turn(tok, "assistant", "Hello!")
    assert pair["chosen_labels"][:len(prompt)] == [-100] * len(prompt)


ZEPHYR_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' %}<|system|>{% endif %}"
                   "{{ message['content'] }}{% endfor %}")
GEMMA_TEMPLATE = (  # Gemma's chat template refuses a system turn from inside the template
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] "
    "+ '<end_of_turn>\n' }}{% endfor %}")


def with_template(tok, template):
    tokenizer = copy.deepcopy(tok)
    tokenizer.chat_template = template
    return tokenizer


def test_empty_system_message_inserted_when_the_template_has_system_turns(tok):
    messages = [{"role": "user", "content": "Hi"}]
    assert data.with_system_message(messages, tok) == messages  # Llama-3's template names no system role
    zephyr = with_template(tok, ZEPHYR_TEMPLATE)
    assert data.with_system_message(messages, zephyr) == [{"role": "system", "content": ""}, *messages]
    system_first = [{"role": "system", "content": "x"}, *messages]
    assert data.with_system_message(system_first, zephyr) == system_first


def test_record_texts_insert_the_empty_system_turn_unless_told_not_to(tok):
    zephyr = with_template(tok, ZEPHYR_TEMPLATE)
    rec = record("Hi", "Hello!", "Go away.")
    assert data.record_texts(rec, zephyr) == ("<|system|>Hi", "Hello!", "Go away.")  # "" system content, then Hi
    assert data.record_texts(rec, zephyr, insert_system_message=False) == ("Hi", "Hello!", "Go away.")


def test_no_system_message_where_the_template_refuses_one(tok):
    # Gemma's template names the system role only to raise "System role not supported": no system turn is
    # inserted (it used to be, and rendering the prompt raised jinja2's TemplateError).
    gemma = with_template(tok, GEMMA_TEMPLATE)
    messages = [{"role": "user", "content": "Hi"}]
    assert data.with_system_message(messages, gemma) == messages
    rec = record("Hi", "Hello!", "Go away.")
    prompt, chosen, _ = data.record_texts(rec, gemma)
    assert prompt == "<|begin_of_text|><start_of_turn>user\nHi<end_of_turn>\n"
    assert chosen == "<start_of_turn>assistant\nHello!<end_of_turn>\n"


def test_mistral_template_override():
    from jinja2 import Template

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}]
    text = Template(data.CHAT_TEMPLATES["mistral"]).render(messages=messages, eos_token="</s>")
    assert text == "[INST] Be brief.\n\nHi [/INST] Hello </s>"


def test_joint_tokenization_split_when_the_answer_merges_into_the_prompt():
    class Merging:
        """One id per character, except that 'ab' is one token: joint tokenization merges across the boundary."""

        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=False):
            out, i = [], 0
            while i < len(text):
                if text.startswith("ab", i):
                    out.append(99)
                    i += 2
                else:
                    out.append(ord(text[i]))
                    i += 1
            return {"input_ids": out}

    pair = data.tokenize_pair(Merging(), "xa", "bc", "dd", max_length=20, max_prompt_length=10)
    # "xa"+"bc" -> [x, ab, c]: the prompt's last token merged, so the answer starts one token earlier (TRL)
    assert pair["chosen_input_ids"] == [1, ord("x"), 99, ord("c"), 2]
    assert pair["chosen_labels"] == [-100, -100, 99, ord("c"), 2]
    assert pair["rejected_input_ids"] == [1, ord("x"), ord("a"), ord("d"), ord("d"), 2]


@pytest.mark.parametrize("tokenization", ["trl", "separate"])
@pytest.mark.parametrize("max_length, max_prompt_length", [(8, 8), (8, 12), (8, 0), (0, -5)])
def test_lengths_that_leave_no_response_token_are_refused(tok, tokenization, max_length, max_prompt_length):
    """Both rules cut responses to max_length - max_prompt_length tokens: with none left (or a negative
    count, which Python's slicing would read from the end) the pair is refused, never silently garbled."""
    rec = record("Tell me a story about a dog", "That is a long answer " * 20, "Short one.")
    with pytest.raises(ValueError, match=r"max_prompt_length must lie in \[1, max_length\)"):
        data.tokenize_pair(tok, *data.record_texts(rec, tok, tokenization=tokenization), max_length=max_length,
                           max_prompt_length=max_prompt_length, tokenization=tokenization)


def test_separate_rule_keeps_the_end_of_a_long_prompt_without_bos():
    class Chars:
        """One id per character, no BOS token, EOS 2."""

        bos_token, bos_token_id, eos_token_id = None, None, 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    pair = data.tokenize_pair(Chars(), "abcdef", "xy", "z", max_length=6, max_prompt_length=3, tokenization="separate")
    # the prompt cut from the left to its last 3 characters, each response (EOS added) to the 3 tokens left
    assert pair["chosen_input_ids"] == [ord("d"), ord("e"), ord("f"), ord("x"), ord("y"), 2]
    assert pair["chosen_labels"] == [-100] * 3 + [ord("x"), ord("y"), 2]
    assert pair["rejected_input_ids"] == [ord("d"), ord("e"), ord("f"), ord("z"), 2]


@pytest.mark.parametrize("tokenization", ["trl", "separate"])
def test_blank_assistant_message_is_dropped_under_a_chat_template(tok, tokenization):
    # README: "Pairs with an empty response text are dropped and counted". With a chat template the rendered
    # response is never blank (header + <|eot_id|>), so the blank answer used to be kept and trained on.
    blank = record("Hi", "Hello!", "   ")
    dataset = data.PreferenceDataset([blank], tok, tokenization=tokenization)
    assert dataset.stats == {"n_records": 1, "n_kept": 0, "n_dropped_empty": 1}
    assert data.PreferenceDataset([blank], tok, use_chat_template=False).stats == dataset.stats  # as without one


def test_separate_rule_inserts_the_empty_system_turn_unless_told_not_to(tok):
    # --insert-system-message is documented without restriction; "separate" used to ignore it
    zephyr = with_template(tok, ZEPHYR_TEMPLATE)
    rec = record("Hi", "Hello!", "Go away.")
    assert data.record_texts(rec, zephyr, tokenization="separate") == ("<|system|>Hi", "Hello!", "Go away.")
    assert data.record_texts(rec, zephyr, tokenization="separate", insert_system_message=False) == \
        ("Hi", "Hello!", "Go away.")


def test_conversational_completion_of_several_messages_is_refused(tok):
    # the messages before the last one of a several-message completion used to be moved, silently, into the
    # unscored prompt (the authors and TRL score the whole completion)
    rec = {"prompt": [{"role": "user", "content": "Hi"}],
           "chosen": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sky?"},
                      {"role": "assistant", "content": "Blue."}],
           "rejected": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sky?"},
                        {"role": "assistant", "content": "Green."}]}
    for check in (data.check_record, lambda r: data.record_texts(r, tok)):
        with pytest.raises(ValueError, match="one assistant message"):
            check(rec)


def test_docs_say_which_trl_the_trl_rule_is():
    # the rule is TRL 0.9's tokenize_row, not the DPOTrainer of the TRL the project pins (1.16, the one
    # PreferenceTrainer uses): the help and the README must say so and name the differences
    from pathlib import Path

    from amapo_train.command_line import HELP

    assert "TRL 0.9" in HELP["tokenization"] and "1.16" in HELP["tokenization"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    paragraph = readme[readme.index("- Tokenization (`tokenization: trl`"):readme.index("- Loss: `--loss`")]
    assert "TRL 1.16" in paragraph and "keep_start" in paragraph
