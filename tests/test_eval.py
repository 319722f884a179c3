"""Evaluation tools (python/amapo_train/eval): ranking accuracy, bootstrap, RM-Bench, splits, CLI."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from amapo_train import data  # noqa: E402
from amapo_train.data import IGNORE_INDEX, PreferenceDataset, collate  # noqa: E402
from amapo_train.eval import cli  # noqa: E402
from amapo_train.eval.ranking import evaluate_ranking, make_batches, pair_logps, ranking_accuracy  # noqa: E402
from amapo_train.eval.rmbench import load_rmbench, rmbench_accuracy, rmbench_by_domain, score_rmbench  # noqa: E402
from amapo_train.eval.splits import best_worst, build_generalization_splits, random_split  # noqa: E402

CORPUS = [
    "the cat sat on the mat",
    "a dog ran far away from the big red house",
    "Human: hello there Assistant: hi how can I help you today",
    "yes no maybe good bad answer question",
]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_tokenizer():
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>")
    assert len(hf) <= 64
    return hf


def plain_logps(model, ids, labels):
    """Summed and mean response log-prob of one unpadded row with plain torch (float64 log_softmax)."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0].double()
    logp = logits.log_softmax(-1)
    terms = [logp[t - 1, labels[t]] for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    total = torch.stack(terms).sum().item()
    return total, total / len(terms)


def hand_batch():
    """Three pairs, prompts of length 3/2/4, responses of various lengths, right-padded by collate."""
    prompts = [[2, 10, 11], [2, 12], [2, 13, 14, 15]]
    chosen = [[20, 21, 3], [22, 3], [23, 24, 25, 26, 3]]
    rejected = [[30, 3], [31, 32, 33, 3], [34, 3]]
    pairs = []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        pairs.append({
            "index": i,
            "chosen_input_ids": p + c, "chosen_labels": [IGNORE_INDEX] * len(p) + c,
            "rejected_input_ids": p + r, "rejected_labels": [IGNORE_INDEX] * len(p) + r,
        })
    return pairs


# ------------------------------------------------------------------------------------------------ ranking


def test_pair_logps_matches_plain_torch(tiny_model):
    pairs = hand_batch()
    batch = collate(pairs, pad_token_id=0)
    # One length across chosen and rejected (the training driver's batch contract).
    assert batch["chosen_input_ids"].shape == (3, 9) and batch["rejected_input_ids"].shape == (3, 9)
    assert batch["chosen_attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["chosen_labels"][1].tolist() == [-100, -100, 22, 3] + [-100] * 5
    assert batch["rejected_labels"][0].tolist() == [-100] * 3 + [30, 3] + [-100] * 4
    c_sum, r_sum, c_mean, r_mean = pair_logps(tiny_model, batch)
    # pair_logps also takes chosen and rejected of different lengths: the same numbers.
    trimmed = {**batch, **{f"rejected_{k}": batch[f"rejected_{k}"][:, :6] for k in ("input_ids", "attention_mask", "labels")}}
    for got, want in zip(pair_logps(tiny_model, trimmed), (c_sum, r_sum, c_mean, r_mean)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    expected = {"chosen": [], "rejected": []}
    for p in pairs:
        for side in expected:
            expected[side].append(plain_logps(tiny_model, torch.tensor(p[f"{side}_input_ids"]),
                                              torch.tensor(p[f"{side}_labels"])))
    exp_c = torch.tensor(expected["chosen"], dtype=torch.float64)
    exp_r = torch.tensor(expected["rejected"], dtype=torch.float64)
    torch.testing.assert_close(c_sum.double(), exp_c[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r_sum.double(), exp_r[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_mean.double(), exp_c[:, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r_mean.double(), exp_r[:, 1], atol=1e-5, rtol=1e-5)

    # Accuracy of evaluate_ranking over two batches = the hand-computed correctness.
    res = evaluate_ranking(tiny_model, [collate(pairs[:2], 0), collate(pairs[2:], 0)], progress=False,
                           n_boot=50, return_logps=True)
    assert res["n_pairs"] == 3
    assert res["summed"]["accuracy"] == pytest.approx((exp_c[:, 0] > exp_r[:, 0]).double().mean().item())
    assert res["normalized"]["accuracy"] == pytest.approx((exp_c[:, 1] > exp_r[:, 1]).double().mean().item())
    assert res["logps"]["index"] == [0, 1, 2]

    # Swapping chosen and rejected flips every (untied) pair.
    swapped = [{**p, **{f"chosen_{k}": p[f"rejected_{k}"] for k in ("input_ids", "labels")},
                **{f"rejected_{k}": p[f"chosen_{k}"] for k in ("input_ids", "labels")}} for p in pairs]
    res2 = evaluate_ranking(tiny_model, [collate(swapped, 0)], progress=False, n_boot=50)
    assert res2["summed"]["accuracy"] == pytest.approx(1 - res["summed"]["accuracy"])
    assert res2["normalized"]["accuracy"] == pytest.approx(1 - res["normalized"]["accuracy"])


def test_bootstrap_interval():
    correct = torch.tensor([True] * 300 + [False] * 100)
    a = ranking_accuracy(correct, n_boot=1000, seed=0)
    b = ranking_accuracy(correct, n_boot=1000, seed=0)
    assert a == b  # deterministic with a seed
    assert a["accuracy"] == 0.75 and a["n"] == 400
    assert 0.0 <= a["ci_low"] < 0.75 < a["ci_high"] <= 1.0
    # Binomial standard error sqrt(.75 * .25 / 400) = 0.0217: the 95% interval is about +-0.042.
    assert 0.06 < a["ci_high"] - a["ci_low"] < 0.11
    assert ranking_accuracy(torch.ones(7, dtype=torch.bool))[ "ci_low"] == 1.0
    assert ranking_accuracy(torch.ones(7, dtype=torch.bool)) == {"accuracy": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 7}
    zero = ranking_accuracy(torch.zeros(5, dtype=torch.bool))
    assert (zero["accuracy"], zero["ci_low"], zero["ci_high"]) == (0.0, 0.0, 0.0)
    # Chunked resampling (n * n_boot above the chunk bound) still gives a sane interval.
    big = ranking_accuracy(torch.arange(20000) % 5 != 0, n_boot=300, seed=1)
    assert big["ci_low"] < 0.8 < big["ci_high"]
    with pytest.raises(ValueError):
        ranking_accuracy(torch.zeros(0, dtype=torch.bool))


def test_dataset_truncation_and_drop(tiny_tokenizer):
    tok = tiny_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    records = [
        {"prompt": "the cat sat on the mat", "chosen": "yes good", "rejected": "no"},
        {"prompt": "a dog", "chosen": "", "rejected": "bad"},  # empty response: dropped
        {"prompt": "the cat", "chosen": "a dog ran far away from the big red house", "rejected": "no"},
        {"prompt": "a dog", "chosen": "good", "rejected": "  "},  # whitespace only: dropped
        {"prompt": "a dog", "chosen": "good </s>", "rejected": "bad"},  # ends with EOS: no second one
    ]
    pairs = PreferenceDataset(records, tok, max_length=8, max_prompt_length=4)
    assert pairs.stats == {"n_records": 5, "n_kept": 3, "n_dropped_empty": 2}
    assert pairs.dropped == 2 and pairs.record_index == [0, 2, 4]
    first, third, fifth = (pairs[i] for i in range(len(pairs)))
    assert fifth["chosen_input_ids"][-2:] == [tok.convert_tokens_to_ids("good"), eos]
    assert fifth["rejected_input_ids"][-1] == eos
    # Prompt "<s> the cat sat on the mat" (7 tokens) cut from the left to 4, BOS kept: "<s> on the mat".
    assert first["chosen_input_ids"][:4] == [bos] + tok("on the mat", add_special_tokens=False)["input_ids"]
    assert first["chosen_input_ids"][4:] == tok("yes good", add_special_tokens=False)["input_ids"] + [eos]
    assert first["chosen_labels"] == [IGNORE_INDEX] * 4 + first["chosen_input_ids"][4:]
    assert first["rejected_input_ids"][:4] == first["chosen_input_ids"][:4]
    # Response cut from the right to max_length - prompt length = 5 tokens (no room for EOS).
    assert third["index"] == 1 and len(third["chosen_input_ids"]) == 8
    assert third["chosen_input_ids"][3:] == tok("a dog ran far away", add_special_tokens=False)["input_ids"]
    # A prompt already starting with the BOS text gets no second BOS.
    again = PreferenceDataset([{"prompt": "<s> the cat", "chosen": "yes", "rejected": "no"}], tok)
    assert again[0]["chosen_input_ids"][:2] == [bos, tok.convert_tokens_to_ids("the")]
    # ... and keeps that single BOS when cut from the left.
    cut = data.tokenize_pair(tok, "<s> the cat sat on the mat", "yes", "no", max_length=8, max_prompt_length=3)
    assert cut["chosen_input_ids"][:3] == [bos] + tok("the mat", add_special_tokens=False)["input_ids"]
    batches = make_batches(pairs, 1, tok.pad_token_id)
    assert [b["index"].item() for b in batches] == [2, 0, 4]  # longest first; index = position in records


# ------------------------------------------------------------------------------------------------ RM-Bench


def test_rmbench_accuracy_hand_case():
    # Style order [concise, detailed_plain, detailed_markdown]; M[i][j] = chosen_i > rejected_j.
    # Prompt A (style-biased scores): chosen [1, 5, 9], rejected [0, 4, 8]
    #   M = [[1,0,0],[1,1,0],[1,1,1]]: diagonal 3/3 -> normal 1; upper (i<j) 0/3 -> hard 0;
    #   lower (i>j) 3/3 -> easy 1.
    # Prompt B: chosen [5, 5, 5], rejected [5, 1, 1] (5 > 5 is a tie: wrong)
    #   every row [0,1,1]: diagonal (0,1,1) -> 2/3; upper (0,1),(0,2),(1,2) = 1,1,1 -> 1;
    #   lower (1,0),(2,0),(2,1) = 0,0,1 -> 1/3.
    # Over both: easy (1 + 1/3)/2 = 2/3, normal (1 + 2/3)/2 = 5/6, hard (0 + 1)/2 = 1/2,
    # average (2/3 + 5/6 + 1/2)/3 = 2/3 = the mean of all nine cells.
    chosen = [[1, 5, 9], [5, 5, 5]]
    rejected = [[0, 4, 8], [5, 1, 1]]
    res = rmbench_accuracy(chosen, rejected)
    assert res["easy"] == pytest.approx(2 / 3)
    assert res["normal"] == pytest.approx(5 / 6)
    assert res["hard"] == pytest.approx(1 / 2)
    assert res["average"] == pytest.approx(2 / 3)
    assert res["n"] == 2
    assert res["matrix"] == [[0.5, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 1.0, 1.0]]
    by = rmbench_by_domain(chosen, rejected, ["chat", "math"])
    assert (by["chat"]["easy"], by["chat"]["normal"], by["chat"]["hard"]) == (1.0, 1.0, 0.0)
    assert by["math"]["easy"] == pytest.approx(1 / 3) and by["math"]["hard"] == 1.0
    assert by["all"] == res
    with pytest.raises(ValueError):
        rmbench_accuracy([[1, 2]], [[0, 1]])


def test_rmbench_load_and_score(tmp_path, tiny_model, tiny_tokenizer):
    records = [
        {"id": 1, "prompt": "the cat", "chosen": ["sat", "sat on the mat", "yes the cat sat"],
         "rejected": ["ran", "ran far away", "no the dog ran"], "domain": "chat"},
        {"prompt": "a dog", "chosen": ["good", "good answer", "yes good answer"], "rejected": ["bad", "bad answer", "no"]},
    ]
    path = tmp_path / "rmb.json"
    path.write_text(json.dumps(records))
    loaded = load_rmbench(path)
    assert [r["domain"] for r in loaded] == ["chat", "unknown"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "chosen": ["a", "b"], "rejected": ["a", "b", "c"]}]))
    with pytest.raises(ValueError, match="3 strings"):
        load_rmbench(bad)
    chosen, rejected, kept = score_rmbench(tiny_model, tiny_tokenizer, loaded, batch_size=4, progress=False)
    assert kept.all() and chosen.shape == (2, 3)
    for i, rec in enumerate(loaded):  # each score is the pair's own length-normalized log-prob
        for k in range(3):
            one = PreferenceDataset([{"prompt": rec["prompt"], "chosen": rec["chosen"][k],
                                      "rejected": rec["rejected"][k]}], tiny_tokenizer)
            _, _, c_mean, r_mean = pair_logps(tiny_model, collate([one[0]], 0))
            assert chosen[i, k].item() == pytest.approx(c_mean.item(), abs=1e-5)
            assert rejected[i, k].item() == pytest.approx(r_mean.item(), abs=1e-5)
    # A prompt with an empty response is not scorable; the other rows keep their own scores.
    holed = [loaded[0], {**loaded[1], "chosen": ["good", "", "yes good answer"]}, loaded[1]]
    c2, r2, kept2 = score_rmbench(tiny_model, tiny_tokenizer, holed, batch_size=2, progress=False)
    assert kept2.tolist() == [True, False, True] and torch.isnan(c2[1]).any()
    torch.testing.assert_close(c2[[0, 2]], chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r2[[0, 2]], rejected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ splits


def uf_records():
    return [
        {"prompt_id": "p1", "prompt": "P1", "completions": [
            {"model": "A", "response": "a1", "score": 5}, {"model": "B", "response": "b1", "score": 2},
            {"model": "C", "response": "c1", "score": 4}, {"model": "D", "response": "d1", "score": 1}]},
        # UltraFeedback raw keys; A/B tie (no train pair); valid side: D "N/A" ignored, E in no model set.
        {"prompt_id": "p2", "instruction": "P2", "completions": [
            {"model": "A", "response": "a2", "overall_score": 3}, {"model": "B", "response": "b2", "overall_score": 3},
            {"model": "C", "response": "c2", "overall_score": 7}, {"model": "D", "response": "d2", "overall_score": "N/A"},
            {"model": "E", "response": "e2", "overall_score": 9}]},
        {"prompt_id": "p3", "prompt": "P3", "completions": [
            {"model": "A", "response": "a3", "score": 1}, {"model": "B", "response": "b3", "score": 4},
            {"model": "C", "response": "c3", "score": 2}, {"model": "D", "response": "d3", "score": 6}]},
        {"prompt_id": "p4", "prompt": "P4", "completions": [
            {"model": "A", "response": "a4", "score": 1}, {"model": "B", "response": "b4", "score": 4}]},
    ]


def test_generalization_splits_memberships():
    res = build_generalization_splits(uf_records(), train_prompts=["p1", "p2"], valid_prompts=["p3"],
                                      train_models=["A", "B"], valid_models=["C", "D"])
    pairs = {name: [(p["prompt_id"], p["chosen"], p["rejected"]) for p in res[name]]
             for name in ("train", "id", "prompt_ood", "response_ood", "mutual_ood")}
    assert pairs["train"] == [("p1", "a1", "b1")]          # seen prompt, seen models (p2: A/B tied)
    assert pairs["id"] == pairs["train"]                   # D_ID = D_train
    assert pairs["prompt_ood"] == [("p3", "b3", "a3")]      # unseen prompt, seen models
    assert pairs["response_ood"] == [("p1", "c1", "d1")]    # seen prompt, unseen models (p2: only C usable)
    assert pairs["mutual_ood"] == [("p3", "d3", "c3")]      # unseen prompt, unseen models
    assert res["prompt_ood"][0]["chosen_model"] == "B" and res["prompt_ood"][0]["rejected_score"] == 1.0
    st = res["stats"]
    assert st["train"] == {"n_pairs": 1, "n_skipped_too_few": 0, "n_skipped_tied": 1}
    assert st["response_ood"] == {"n_pairs": 1, "n_skipped_too_few": 1, "n_skipped_tied": 0}
    assert st["n_records"] == 4 and st["n_prompts_unassigned"] == 1 and st["n_completions_unassigned_model"] == 1
    with pytest.raises(ValueError, match="overlap"):
        build_generalization_splits([], train_prompts=["p1"], valid_prompts=["p1"], train_models=[], valid_models=[])
    with pytest.raises(ValueError, match="overlap"):
        build_generalization_splits([], train_prompts=[], valid_prompts=[], train_models=["A"], valid_models=["A"])


def test_best_worst_ties_and_random_split():
    comps = [{"model": m, "score": s} for m, s in (("x", 5), ("y", 5), ("z", 1), ("w", 1))]
    chosen, rejected = best_worst(comps)
    assert (chosen["model"], rejected["model"]) == ("x", "w")  # first highest, last lowest
    assert best_worst(comps[:1]) is None and best_worst(comps[:2]) is None
    items = [f"p{i}" for i in range(20)]
    train, valid = random_split(items, 0.1, seed=3)
    assert (train, valid) == random_split(items, 0.1, seed=3)
    assert len(valid) == 2 and sorted(train + valid) == sorted(items)


# ------------------------------------------------------------------------------------------------ CLI helpers


def test_split_hh():
    c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you"
    r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: go away"
    assert data.split_hh_pair(c, r) == ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:", " see you", " go away")
    # A response that itself contains the marker: the split stays at the shared prompt.
    c2 = "\n\nHuman: q\n\nAssistant: ok\n\nAssistant: more"
    assert data.split_hh_pair(c2, "\n\nHuman: q\n\nAssistant: no") == ("\n\nHuman: q\n\nAssistant:", " ok\n\nAssistant: more", " no")
    with pytest.raises(ValueError):
        data.split_hh_pair("Human: a", "Human: b")


def test_record_texts_formats(tiny_tokenizer):
    tok = tiny_tokenizer
    plain = {"prompt": "the cat", "chosen": "sat", "rejected": "ran"}
    assert data.record_texts(plain, tok) == ("the cat", "sat", "ran")  # pairs format: texts as they are
    msgs = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}
    # No chat template: the plain dialogue format.
    assert data.record_texts(msgs, tok) == ("\n\nUser: q\n\nAssistant:", " good", " bad")
    # UltraFeedback with the prompt apart: the 'prompt' string is the user message.
    uf = {"prompt": "q", "chosen": [{"role": "assistant", "content": "good"}],
          "rejected": [{"role": "assistant", "content": "bad"}]}
    assert data.record_texts(uf, tok) == ("\n\nUser: q\n\nAssistant:", " good", " bad")
    with pytest.raises(ValueError, match="assistant"):
        data.record_texts({"chosen": msgs["chosen"][:1], "rejected": msgs["rejected"][:1]}, tok)
    templated = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    templated.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    assert data.record_texts(plain, templated) == ("the cat", "sat", "ran")
    # With a template: the response is the rendered conversation minus the rendered prompt.
    assert data.record_texts(msgs, templated) == ("user: q assistant:", " good ", " bad ")
    assert data.record_texts(msgs, templated, use_chat_template=False)[0] == "\n\nUser: q\n\nAssistant:"
    question = [{"role": "user", "content": "q"}]
    assert data.render_prompt(templated, question) == "user: q assistant:"
    assert data.render_prompt(templated, question, use_chat_template=False) == "\n\nUser: q\n\nAssistant:"
    assert data.render_prompt(tok, question) == "\n\nUser: q\n\nAssistant:"


def test_cli_rmbench(tmp_path, saved_model, capsys):
    records = [
        {"prompt": "the cat", "chosen": ["sat", "sat on the mat", "yes the cat sat"],
         "rejected": ["ran", "ran far away", "no the dog ran"], "domain": "chat"},
        {"prompt": "a dog", "chosen": ["good", "good answer", "yes good answer"],
         "rejected": ["bad", "bad answer", "no"], "domain": "math"},
    ]
    data = tmp_path / "rmb.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "rmb_out.json"
    cli.main(["rmbench", "--model", str(saved_model), "--data", str(data), "--output", str(out),
              "--device", "cpu", "--no-progress"])
    res = json.loads(out.read_text())
    assert res["n_records"] == 2 and res["n_dropped"] == 0
    assert set(res["results"]) == {"all", "chat", "math"}
    acc = res["results"]["all"]
    assert acc["n"] == 2 and acc["average"] == pytest.approx((acc["easy"] + acc["normal"] + acc["hard"]) / 3)
    assert "easy" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ CLI end to end


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_model, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_cli_rank_end_to_end(tmp_path, saved_model, tiny_tokenizer, capsys):
    records = [
        {"prompt": "the cat", "chosen": "sat on the mat", "rejected": "ran far away"},
        {"prompt": "a dog", "chosen": "good answer", "rejected": "bad"},
        {"chosen": "\n\nHuman: hello there\n\nAssistant: hi how can I help",
         "rejected": "\n\nHuman: hello there\n\nAssistant: no"},
        {"prompt": "question", "chosen": "", "rejected": "bad"},  # empty response: dropped
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "out.json"
    assert cli.main(["rank", "--model", str(saved_model), "--data", str(data), "--batch-size", "2",
                     "--output", str(out), "--device", "cpu", "--no-progress", "--n-boot", "200"]) == 0
    printed = capsys.readouterr().out
    assert "length-normalized" in printed and "summed" in printed
    res = json.loads(out.read_text())
    assert res["n_pairs"] == 3
    assert res["tokenization"] == {"n_records": 4, "n_kept": 3, "n_dropped_empty": 1}

    # Expected from the reloaded model with plain torch on the same strings.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(saved_model, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(saved_model, local_files_only=True)
    correct_sum, correct_mean = [], []
    for p in PreferenceDataset(records, tok):
        c = plain_logps(model, torch.tensor(p["chosen_input_ids"]), torch.tensor(p["chosen_labels"]))
        r = plain_logps(model, torch.tensor(p["rejected_input_ids"]), torch.tensor(p["rejected_labels"]))
        correct_sum.append(c[0] > r[0])
        correct_mean.append(c[1] > r[1])
    assert res["summed"]["accuracy"] == pytest.approx(sum(correct_sum) / 3)
    assert res["normalized"]["accuracy"] == pytest.approx(sum(correct_mean) / 3)
    for key in ("summed", "normalized"):
        assert res[key]["ci_low"] <= res[key]["accuracy"] <= res[key]["ci_high"]


def test_cli_splits_and_generate(tmp_path, saved_model):
    data = tmp_path / "uf.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in uf_records()) + "\n")
    out_dir = tmp_path / "splits"
    cli.main(["splits", "--data", str(data), "--out-dir", str(out_dir), "--valid-models", "C,D",
              "--valid-prompt-fraction", "0.25", "--seed", "1"])
    manifest = json.loads((out_dir / "split.json").read_text())
    assert manifest["valid_models"] == ["C", "D"] and manifest["train_models"] == ["A", "B", "E"]
    assert len(manifest["valid_prompts"]) == 1 and len(manifest["train_prompts"]) == 3
    for name in ("train", "id", "prompt_ood", "response_ood", "mutual_ood"):
        rows = [json.loads(x) for x in (out_dir / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == manifest["stats"][name]["n_pairs"]
        expected_prompts = manifest["valid_prompts"] if name in ("prompt_ood", "mutual_ood") else manifest["train_prompts"]
        assert all(r["prompt_id"] in expected_prompts for r in rows)

    inst = tmp_path / "alpaca.json"
    inst.write_text(json.dumps([{"instruction": "the cat", "dataset": "helpful_base"}, {"instruction": "a dog"}]))
    out = tmp_path / "alpaca_out.json"
    cli.main(["generate", "--model", str(saved_model), "--instructions", str(inst), "--format", "alpacaeval",
              "--out", str(out), "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu",
              "--model-id", "tiny", "--no-progress"])
    rows = json.loads(out.read_text())
    assert [set(r) for r in rows] == [{"instruction", "output", "generator", "dataset"}] * 2
    assert rows[0]["generator"] == "tiny" and rows[0]["dataset"] == "helpful_base"
    meta = json.loads((tmp_path / "alpaca_out.json.meta.json").read_text())
    assert meta["decoding"]["max_new_tokens"] == 3 and meta["decoding"]["do_sample"] is False

    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["the cat", "a dog"]}) + "\n")
    out2 = tmp_path / "answers.jsonl"
    cli.main(["generate", "--model", str(saved_model), "--instructions", str(questions), "--format", "mtbench",
              "--out", str(out2), "--max-new-tokens", "2", "--device", "cpu", "--no-progress"])
    (answer,) = [json.loads(x) for x in out2.read_text().splitlines()]
    assert answer["question_id"] == 81 and answer["model_id"] == saved_model.name
    assert len(answer["choices"]) == 1 and answer["choices"][0]["index"] == 0
    assert len(answer["choices"][0]["turns"]) == 2 and math.isfinite(answer["tstamp"])
