"""The driver's data: every record format (TRL standard / conversational / implicit prompt, UltraFeedback,
HH-RLHF), a record in none, the held-out split never overlapping training, ODPO's score columns, and
resume logging each step once."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenize import llama3_tokenizer

from amapo_train import data
from amapo_train.cli_errors import UserError
from amapo_train.command_line import build_parser, config_from_args
from amapo_train.train import load_splits, main

SCRIPT = shutil.which("amapo-train", path=str(Path(sys.executable).parent))
SHORT = ["--log-with", "none", "--device", "cpu", "--total-batch-size", "8", "--per-device-batch-size", "4",
         "--max-length", "160", "--max-prompt-length", "96"]
USER = {"role": "user", "content": "What color is the sky?"}
YES, NO = {"role": "assistant", "content": "It is blue."}, {"role": "assistant", "content": "It is green."}
RECORDS = {  # one conversation in every message-list format
    "conversational": {"prompt": [USER], "chosen": [YES], "rejected": [NO]},
    "implicit": {"chosen": [USER, YES], "rejected": [USER, NO]},
    "ultrafeedback": {"prompt": USER["content"], "chosen": [USER, YES], "rejected": [USER, NO],
                      "score_chosen": 8.0, "score_rejected": 4.0},
}


@pytest.fixture(scope="module")
def tok():
    return llama3_tokenizer()


def unscored_prefix(pair, side):
    labels = pair[f"{side}_labels"]
    return pair[f"{side}_input_ids"][:next(i for i, label in enumerate(labels) if label != data.IGNORE_INDEX)]


@pytest.mark.parametrize("use_chat_template", [True, False])
def test_message_list_formats_give_one_pair_with_the_prompt_in_the_unscored_prefix(tok, use_chat_template):
    pairs = {}
    for fmt, record in RECORDS.items():
        assert data.detect_format(record) == fmt
        texts = data.record_texts(record, tok, use_chat_template=use_chat_template)
        pairs[fmt] = data.tokenize_pair(tok, *texts, max_length=512, max_prompt_length=256)
    assert pairs["conversational"] == pairs["implicit"] == pairs["ultrafeedback"]
    for side in ("chosen", "rejected"):  # the prompt is tokenized, not scored, and not dropped
        assert USER["content"] in tok.decode(unscored_prefix(pairs["conversational"], side))
    assert data.record_texts(RECORDS["conversational"], tok, use_chat_template=False)[0] == \
        "\n\nUser: What color is the sky?\n\nAssistant:"


def test_string_formats():
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    assert data.detect_format(hh) == "hh-rlhf"
    assert data.record_texts(hh, None) == ("\n\nHuman: hi\n\nAssistant:", " yes", " no")
    standard = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert data.detect_format(standard) == "pairs"
    assert data.record_texts(standard, None) == ("The sky is", " blue.", " green.")
    implicit = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    assert data.detect_format(implicit) == "implicit-text"
    assert data.record_texts(implicit, None) == ("The sky is", " blue.", " green.")  # as TRL's extract_prompt
    assert data.record_texts({"chosen": "2+2=4", "rejected": "2+2=5"}, None) == ("2+2=", "4", "5")
    with pytest.raises(ValueError, match="share no prefix"):
        data.record_texts({"chosen": "Yes.", "rejected": "No."}, None)


def test_conversations_that_differ_before_the_answer_are_an_error(tok):
    record = {"chosen": [USER, YES], "rejected": [{"role": "user", "content": "Other?"}, NO]}
    with pytest.raises(ValueError, match="differ before their last message"):
        data.record_texts(record, tok)
    with pytest.raises(ValueError, match="'hh-rlhf' format where dataset_format is 'pairs'"):
        data.record_texts({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
                          tok, "pairs")


@pytest.mark.parametrize("record", [{"question": "q", "answer": "a"}, {"chosen": 1, "rejected": 2},
                                    {"prompt": [USER], "chosen": "x", "rejected": "y"}])
def test_record_in_no_known_format_names_its_columns_and_the_formats(record):
    with pytest.raises(ValueError) as error:
        data.detect_format(record)
    message = str(error.value)
    assert all(column in message for column in record) and "formats accepted" in message
    assert all(description in message for description in data.FORMATS.values())


@pytest.mark.skipif(SCRIPT is None, reason="the amapo-train console script is not installed in this venv")
def test_file_in_no_known_format_is_a_one_line_error_before_the_model_loads(tmp_path):
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"question": "r", "answer": "b"}))
    run = subprocess.run([SCRIPT, "--dataset", str(odd), "--eval-dataset", str(odd.with_name("x.jsonl")),
                          "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert (run.returncode, "Traceback" in run.stderr) == (2, False), run.stderr
    assert "--eval-dataset" in run.stderr and "no such file" in run.stderr
    run = subprocess.run([SCRIPT, "--dataset", str(odd), "--output-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in run.stderr.splitlines() if line.startswith("amapo-train: error:")]
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "['answer', 'question']" in lines[0] and "formats accepted" in lines[0]
    assert not (tmp_path / "run").exists()


def test_records_not_in_the_named_format_are_a_one_line_error_before_the_model_loads(tmp_path, capsys):
    from amapo_train.train import cli

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": f"b{i}"}) for i in range(20)))
    status = cli(["--dataset", str(pairs), "--dataset-format", "hh-rlhf", "--output-dir", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert "record 0: a record in the 'pairs' format where dataset_format is 'hh-rlhf'" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, text, message", [
    ("broken.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{bad\n', "line 3: not JSON: Expecting property name"),
    ("numbers.json", "[1, 2]", "item 0: a record must be a JSON object, got int 1"),
    ("strings.jsonl", '{"prompt": "a"}\n"text"\n', "line 2: a record must be a JSON object, got str 'text'"),
    ("deep.json", "[" * 100_000, "nested deeper than Python's recursion limit"),  # was a RecursionError traceback
])
def test_file_that_is_not_json_records_names_the_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        data.read_json_records(path)


def test_line_separators_inside_json_strings_stay_in_their_record(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 raw (json.dumps(ensure_ascii=False) writes them so, as
    amapo-eval splits does); a JSONL line ends at a newline only (str.splitlines cut the record there)."""
    records = [{"prompt": "p", "chosen": f"a{separator}b", "rejected": "c"} for separator in "\u2028\u2029\x85"]
    path = tmp_path / "separators.jsonl"
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\r\n" for record in records), encoding="utf-8")
    assert data.read_json_records(path) == records


@settings(max_examples=int(os.environ.get("AMAPO_HYPOTHESIS_EXAMPLES", 25)), deadline=None)
@given(n=st.integers(2, 300), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_holdout_never_overlaps_training(n, fraction, seed):
    train, held_out = data.holdout_positions(n, fraction, seed)
    assert not set(train) & set(held_out) and set(train) | set(held_out) == set(range(n)) and train and held_out
    assert data.holdout_positions(n, fraction, seed) == (train, held_out)  # seeded


@pytest.mark.parametrize("n, fraction, held", [(9, 0.3, 3), (7, 0.5, 4), (5, 0.99, 4), (50, 0.001, 1), (40, 0.1, 4)])
def test_holdout_holds_out_the_rounded_share(n, fraction, held):
    # round(fraction * n) records (9 x 0.3 = 2.7 -> 3, 7 x 0.5 = 3.5 -> 4), at least one, at most n - 1
    train, held_out = data.holdout_positions(n, fraction, seed=0)
    assert (len(train), len(held_out)) == (n - held, held)
    assert train == sorted(train) and held_out == sorted(held_out)  # the file's order


def test_holdout_is_the_seeds_permutation():
    # held out: the first round(0.25 * 20) = 5 positions of torch.randperm(20) under the given seed
    held = set(torch.randperm(20, generator=torch.Generator().manual_seed(5)).tolist()[:5])
    train, held_out = data.holdout_positions(20, 0.25, seed=5)
    assert held_out == sorted(held) and train == sorted(set(range(20)) - held)
    assert data.holdout_positions(20, 0.25, seed=6) != (train, held_out)


def test_score_columns_give_each_pair_its_chosen_and_rejected_score(tok):
    records = [{"prompt": "Is the sky blue?", "chosen": " Yes.", "rejected": " No.", "good": 9.0, "bad": 2.0},
               {"prompt": "Is grass red?", "chosen": " No.", "rejected": " Yes.", "good": 7, "bad": 6}]
    dataset = data.PreferenceDataset(records, tok, max_length=64, max_prompt_length=32, score_columns=("good", "bad"))
    assert [(dataset[i]["chosen_score"], dataset[i]["rejected_score"]) for i in range(2)] == [(9.0, 2.0), (7.0, 6.0)]
    batch = data.collate([dataset[0], dataset[1]], tok.pad_token_id)
    assert batch["chosen_scores"].tolist() == [9.0, 7.0] and batch["rejected_scores"].tolist() == [2.0, 6.0]


def config_for(argv):
    return config_from_args(build_parser("").parse_args(argv))


def write_pairs(path, count, **extra):
    records = data.load_records("bundled:hh-rlhf", "train", count)
    with open(path, "w") as handle:
        for i, record in enumerate(records):
            handle.write(json.dumps({**record, **{k: f(i) for k, f in extra.items()}}) + "\n")
    return path


def test_a_file_in_the_home_of_no_user_is_a_missing_file():
    """load_records("~nosuchuser/x.jsonl"), called from Python: pathlib's RuntimeError ("Could not determine
    home directory") is the FileNotFoundError of any other missing file, naming the path."""
    with pytest.raises(FileNotFoundError, match=r"^~nosuchuser-amapo/pairs.jsonl: no user 'nosuchuser-amapo'"):
        data.load_records("~nosuchuser-amapo/pairs.jsonl", "train")


def test_records_and_their_positions_go_one_for_one():
    assert list(data.positioned(["a", "b"])) == [("a", 0), ("b", 1)]
    assert list(data.positioned(["a", "b"], [4, 9])) == [("a", 4), ("b", 9)]
    with pytest.raises(ValueError):
        list(data.positioned(["a", "b"], [4]))


def test_single_local_file_is_split_and_the_log_says_so(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 40)
    train, test, source, *_ = load_splits(config_for(["--dataset", str(pairs)]))
    assert (len(train), len(test)) == (36, 4) and "0.1 of" in source and "disjoint" in source
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in test}
    train, test, source, *_ = load_splits(config_for(["--dataset", str(pairs), "--eval-fraction", "0.25",
                                                      "--seed", "3"]))
    assert (len(train), len(test)) == (30, 10) and "seed 3" in source
    other = write_pairs(tmp_path / "other.jsonl", 5)
    train, test, source, *_ = load_splits(config_for(["--dataset", str(pairs), "--eval-dataset", str(other)]))
    assert (len(train), len(test)) == (40, 5) and source.startswith(str(other))
    with pytest.raises(UserError, match="is the training data"):
        main(["--dataset", str(pairs), "--eval-dataset", str(pairs), "--dry-run"])


def test_a_bad_record_is_named_by_its_position_in_its_file(tmp_path, capsys):
    """With a held-out share of one file, a bad record was named by its position in the training (or held-out)
    share, which the seed decides ("training record 6" for the file's record 7), and one in --eval-dataset under
    --dataset's name; --show-examples numbered the pairs of the share, not of the file."""
    from amapo_train.train import cli

    pairs = write_pairs(tmp_path / "pairs.jsonl", 10)
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    records[7] = {"prompt": "x", "chosen": 1, "rejected": "y"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in records))
    for seed in range(4):  # the record lands in the training share for some seeds, in the held-out one for others
        with pytest.raises(UserError, match=rf"^--dataset {re.escape(str(bad))}: record 7: cannot tell the format"):
            load_splits(config_for(["--dataset", str(bad), "--eval-fraction", "0.5", "--seed", str(seed)]))
    with pytest.raises(UserError, match=rf"^--eval-dataset {re.escape(str(bad))}: record 7: "):
        load_splits(config_for(["--dataset", str(pairs), "--eval-dataset", str(bad)]))
    with pytest.raises(UserError, match=r"^--dataset bundled:hh-rlhf split 'train': record 0: a record in the "
                                        r"'hh-rlhf' format where dataset_format is 'pairs'"):  # a source of splits
        load_splits(config_for(["--dataset", "bundled:hh-rlhf", "--dataset-format", "pairs"]))
    splits = load_splits(config_for(["--dataset", str(pairs), "--eval-fraction", "0.5", "--seed", "0"]))
    assert [records[i] for i in splits.train_positions] == splits.train and splits.train_positions != list(range(5))
    assert cli(["--dataset", str(pairs), "--eval-fraction", "0.5", "--seed", "0", "--show-examples", "5"]) == 0
    shown = re.findall(r"=== pair \d+ \(record (\d+)\)", capsys.readouterr().out)
    assert [int(i) for i in shown] == splits.train_positions


def test_odpo_through_the_driver(tmp_path):
    pairs = write_pairs(tmp_path / "scored.jsonl", 20, good=lambda i: 5.0 + i % 3, bad=lambda i: 1.0 + i % 2)
    out = tmp_path / "run"
    argv = [*SHORT, "--loss", "odpo", "--dataset", str(pairs), "--eval-fraction", "0.2", "--max-steps", "2",
            "--output-dir", str(out)]
    with pytest.raises(UserError, match="no numeric score column 'score_chosen'"):  # UltraFeedback's, by default
        main(argv)
    assert not out.exists()  # checked at start: nothing trained
    result = main([*argv, "--chosen-score-column", "good", "--rejected-score-column", "bad"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result["steps"] == 2 and [m["step"] for m in metrics] == [1, 2]
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in metrics)
    reversed_scores = write_pairs(tmp_path / "reversed.jsonl", 20, good=lambda i: 1.0, bad=lambda i: 2.0)
    with pytest.raises(UserError, match="good 1.0 is not above bad 2.0"):
        main([*argv, "--dataset", str(reversed_scores), "--chosen-score-column", "good", "--rejected-score-column",
              "bad"])


def test_other_loss_drops_the_recipes_hparams_and_hparam_values_reach_the_config():
    assert config_for(["--loss", "dpo"]).hparams == {}  # tiny.yaml's beta 2.0 is AMaPO's
    assert config_for(["--loss", "dpo", "--hparam", "beta=0.1"]).hparams == {"beta": 0.1}
    assert config_for(["--hparam", "variant=paper"]).hparams == {"beta": 2.0, "variant": "paper"}
    with pytest.raises(UserError, match=r"'gamma' is not a hyperparameter of amapo; it takes \['ablation'"):
        main(["--hparam", "gamma=1.0", "--dry-run"])


def test_resume_logs_each_step_once(tmp_path):
    out = tmp_path / "run"
    common = [*SHORT, "--max-train-pairs", "48", "--max-test-pairs", "8", "--max-steps", "4", "--save-steps", "2",
              "--output-dir", str(out)]
    main([*common, "--stop-after-steps", "3"])  # logged steps 1-3, checkpoints at 2 and 3
    main([*common, "--resume", str(out / "checkpoint-2")])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_without_the_training_extras_the_script_names_the_install_command(tmp_path):
    stubs = tmp_path / "stubs"  # tqdm not importable, as after a plain `pip install .`
    stubs.mkdir()
    (stubs / "tqdm.py").write_text("raise ModuleNotFoundError(\"No module named 'tqdm'\", name='tqdm')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", "import sys; from amapo_train.train import cli; sys.exit(cli())",
                          "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip() == ('amapo-train: error: amapo-train needs the training extras (tqdm is missing): '
                                  'pip install "amapo-kernels[train]"')


@pytest.mark.parametrize("fmt", ["auto", *data.FORMATS])
def test_every_format_is_a_dataset_format_choice(fmt):
    """--dataset-format takes every format the data layer knows (implicit-text was refused as a choice)."""
    config = config_for(["--dataset-format", fmt])
    config.validate()
    assert config.dataset_format == fmt


GOOD = {"prompt": "Hi", "chosen": "a", "rejected": "b"}
SPLIT_MISTAKES = {  # a record in a known format that splits into no (prompt, chosen, rejected)
    "hh-rlhf without a shared assistant turn": ({"chosen": "\n\nHuman: a\n\nAssistant: yes", "rejected": "no"},
                                                "must share a prefix ending in"),
    "implicit-text without a shared prompt": ({"chosen": "Alpha", "rejected": "Beta"}, "share no prefix"),
    "implicit conversations differing before the answer": (
        {"chosen": [USER, YES], "rejected": [{"role": "user", "content": "Other?"}, NO]}, "differ before their last"),
    "a null content": ({"prompt": [USER], "chosen": [{"role": "assistant", "content": None}], "rejected": [NO]},
                       "every message needs a string 'role' and 'content'"),
    "a multi-part content": ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
                              "chosen": [YES], "rejected": [NO]}, "every message needs a string 'role' and 'content'"),
}


@pytest.mark.parametrize("name", sorted(SPLIT_MISTAKES))
def test_a_record_that_splits_into_no_pair_is_a_one_line_error_before_the_model_loads(name, tmp_path, monkeypatch,
                                                                                      capsys):
    """Such a record was found only once the model had loaded, with a traceback (a null content: a TypeError), or,
    a list content, rendered as its Python repr and trained on."""
    from amapo_train import model as models
    from amapo_train.train import cli

    def no_model(config):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(models, "load_model_and_tokenizer", no_model)
    record, message = SPLIT_MISTAKES[name]
    pairs, held_out = tmp_path / "pairs.jsonl", tmp_path / "held_out.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [GOOD, record, GOOD]))
    held_out.write_text(json.dumps(GOOD))
    status = cli(["--dataset", str(pairs), "--eval-dataset", str(held_out), "--output-dir", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"amapo-train: error: --dataset {pairs}: record 1: ") and message in lines[0]
    assert not (tmp_path / "run").exists()
