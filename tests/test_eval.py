"""Evaluation tools (python/amapo_train/eval): ranking accuracy, bootstrap, RM-Bench, splits, CLI."""

import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from amapo_train import data  # noqa: E402
from amapo_train.data import IGNORE_INDEX, PreferenceDataset, collate  # noqa: E402
from amapo_train.eval import cli, generation  # noqa: E402
from amapo_train.eval.generation import generate_batch, stop_token_ids  # noqa: E402
from amapo_train.eval.ranking import evaluate_ranking, make_batches, pair_logps, ranking_accuracy  # noqa: E402
from amapo_train.eval.rmbench import load_rmbench, rmbench_accuracy, rmbench_report, score_rmbench  # noqa: E402
from amapo_train.eval.splits import (  # noqa: E402
    best_worst, build_generalization_splits, normalize_record, random_split)

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
    for n_boot in (0, 2**24 + 1):  # none, or more than MAX_RESAMPLES (8 bytes each, held at once)
        with pytest.raises(ValueError, match=r"n_boot must be in \[1, 16777216\]"):
            ranking_accuracy(correct, n_boot=n_boot)
    # Chunked resampling (n * n_boot above the chunk bound) still gives a sane interval.
    big = ranking_accuracy(torch.arange(20000) % 5 != 0, n_boot=300, seed=1)
    assert big["ci_low"] < 0.8 < big["ci_high"]
    with pytest.raises(ValueError):
        ranking_accuracy(torch.zeros(0, dtype=torch.bool))


def test_bootstrap_interval_is_the_2_5_and_97_5_percent_quantiles_of_pair_resamples():
    # Three pairs, two right: a resample's accuracy is 0, 1/3, 2/3 or 1 with probability 1/27, 6/27, 12/27, 8/27.
    # 1/27 = 3.7% lies above 2.5% and below 5%: the 95% interval starts at 0, a 90% one (or 5/95 quantiles) at 1/3.
    # With 20000 resamples the counts are ~740 zeros and ~4440 thirds, far from the quantile positions 500 and 1000.
    two_of_three = ranking_accuracy(torch.tensor([True, True, False]), n_boot=20000, seed=0)
    assert (two_of_three["ci_low"], two_of_three["ci_high"]) == (0.0, 1.0)
    assert ranking_accuracy(torch.tensor([True, True, False]), n_boot=20000, confidence=0.9)["ci_low"] == \
        pytest.approx(1 / 3, rel=1e-12)
    one_of_three = ranking_accuracy(torch.tensor([True, False, False]), n_boot=20000, seed=0)  # the mirror image
    assert (one_of_three["ci_low"], one_of_three["ci_high"]) == (0.0, 1.0)
    assert ranking_accuracy(torch.tensor([True, False, False]), n_boot=20000, confidence=0.9)["ci_high"] == \
        pytest.approx(2 / 3, rel=1e-12)
    # The seed picks the resamples: the documented draw (torch.Generator seeded with `seed`, pairs drawn with
    # replacement, linear-interpolation quantiles), and another seed gives another interval.
    correct = torch.arange(400) % 3 != 0
    draws = torch.randint(0, 400, (199, 400), generator=torch.Generator().manual_seed(7))
    quantiles = torch.tensor([(1 - 0.95) / 2, (1 + 0.95) / 2], dtype=torch.float64)
    low, high = torch.quantile(correct.double()[draws].mean(1), quantiles).tolist()
    seven = ranking_accuracy(correct, n_boot=199, seed=7)
    assert (seven["ci_low"], seven["ci_high"]) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert seven != ranking_accuracy(correct, n_boot=199, seed=8) and seven != ranking_accuracy(correct, n_boot=199)


class TableLM(torch.nn.Module):
    """A causal "LM" whose logits at a position are row `token` of a fixed table: log-probs by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Embedding.from_pretrained(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return type("Output", (), {"logits": self.table(input_ids)})()


def test_a_tie_is_wrong_and_the_margin_is_chosen_minus_rejected():
    table = torch.zeros(6, 6)
    table[1, 2] = 5.0  # after token 1, token 2 is 5 nats above token 3
    table[4, 2] = 2.0  # after token 4, token 2 is 2 nats above token 3

    def pair(prompt, chosen, rejected):
        return {"chosen_input_ids": [prompt, chosen], "chosen_labels": [IGNORE_INDEX, chosen],
                "rejected_input_ids": [prompt, rejected], "rejected_labels": [IGNORE_INDEX, rejected]}
    # margins (chosen - rejected log-prob): +5 (right), 0 (identical responses: a tie), -2 (wrong)
    pairs = [pair(1, 2, 3), pair(1, 2, 2), pair(4, 3, 2)]
    res = evaluate_ranking(TableLM(table), [collate(pairs, 0)], progress=False, n_boot=50)
    for name in ("summed", "normalized"):  # one-token responses: the sum is the mean
        stats = res[name]
        assert (stats["accuracy"], stats["ties"], stats["n"]) == (pytest.approx(1 / 3), 1, 3)
        assert stats["mean_margin"] == pytest.approx((5 + 0 - 2) / 3, rel=1e-6)


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
    # The driver's "separate" tokenization rule (amapo_train.data; the default "trl" rule is tested with data.py).
    pairs = PreferenceDataset(records, tok, max_length=8, max_prompt_length=4, tokenization="separate")
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
    again = PreferenceDataset([{"prompt": "<s> the cat", "chosen": "yes", "rejected": "no"}], tok, tokenization="separate")
    assert again[0]["chosen_input_ids"][:2] == [bos, tok.convert_tokens_to_ids("the")]
    # ... and keeps that single BOS when cut from the left.
    cut = data.tokenize_pair(tok, "<s> the cat sat on the mat", "yes", "no", max_length=8, max_prompt_length=3,
                             tokenization="separate")
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
    with pytest.raises(ValueError):
        rmbench_accuracy([[1, 2]], [[0, 1]])


# The five released subsets, scores chosen by hand (style order [concise, plain, markdown]), with ties.
RMBENCH_FIXTURE = [
    # chat: M = [[1,0,0],[1,1,0],[1,1,1]] -> easy 1, normal 1, hard 0
    ("chat", [1, 5, 9], [0, 4, 8]),
    # math: 5 > 5 is a tie (wrong); every row [0,1,1] -> easy 1/3, normal 2/3, hard 1
    ("math", [5, 5, 5], [5, 1, 1]),
    # code: all nine cells tied (0), then all nine right (1) -> easy = normal = hard = 1/2
    ("code", [2, 2, 2], [2, 2, 2]),
    ("code", [3, 3, 3], [1, 1, 1]),
    # safety-refuse: all right
    ("safety-refuse", [9, 9, 9], [0, 0, 0]),
    # safety-response: all wrong; then equal scores per style: M = [[0,0,0],[1,0,0],[1,1,0]]
    ("safety-response", [0, 0, 0], [1, 1, 1]),
    ("safety-response", [1, 2, 3], [1, 2, 3]),
]


def rmbench_reference(records):
    """RM-Bench's scorer for total_dataset.json, transcribed as plain loops over Python floats: split by
    domain prefix (safety-refuse/-response -> safety), per domain the 3x3 count of score_chosen[i] >
    score_rejected[j] divided by the number of prompts, hard = upper-right triangle mean, normal =
    diagonal mean, easy = lower-left mean; then the mean over domains."""
    per_domain = {}
    for name in ("chat", "math", "code", "safety"):
        rows = [r for r in records if r["domain"].startswith(name)]
        m = [[sum(r["score_chosen"][i] > r["score_rejected"][j] for r in rows) / len(rows) for j in range(3)]
             for i in range(3)]
        per_domain[name] = {"hard": (m[0][1] + m[0][2] + m[1][2]) / 3, "normal": (m[0][0] + m[1][1] + m[2][2]) / 3,
                            "easy": (m[1][0] + m[2][0] + m[2][1]) / 3}
    head = {level: sum(d[level] for d in per_domain.values()) / 4 for level in ("easy", "normal", "hard")}
    head["average"] = sum(sum(d.values()) / 3 for d in per_domain.values()) / 4
    return head, per_domain


def test_rmbench_headline_is_rmbench_scorer():
    domains = [d for d, _, _ in RMBENCH_FIXTURE]
    chosen = [c for _, c, _ in RMBENCH_FIXTURE]
    rejected = [r for _, _, r in RMBENCH_FIXTURE]
    rep = rmbench_report(chosen, rejected, domains)
    head = rep["headline"]
    # Worked numbers. Per domain (easy, normal, hard): chat (1, 1, 0); math (1/3, 2/3, 1); code (1/2, 1/2, 1/2);
    # safety = the three safety prompts pooled: easy (1+0+1)/3 = 2/3, normal (1+0+0)/3 = 1/3, hard 1/3.
    # Headline = mean over the four domains: easy (1 + 1/3 + 1/2 + 2/3)/4 = 5/8, normal 5/8,
    # hard (0 + 1 + 1/2 + 1/3)/4 = 11/24, average (5/8 + 5/8 + 11/24)/3 = 41/72.
    assert (head["easy"], head["normal"], head["hard"]) == pytest.approx((5 / 8, 5 / 8, 11 / 24))
    assert head["average"] == pytest.approx(41 / 72)
    assert head["domains"] == ["chat", "math", "code", "safety"] and head["complete"] is True
    safety = rep["domains"]["safety"]
    assert (safety["easy"], safety["normal"], safety["hard"], safety["n"]) == pytest.approx((2 / 3, 1 / 3, 1 / 3, 3))
    # Merging pools prompts: averaging the two safety subsets instead would give easy 3/4, normal 1/2.
    assert rep["subsets"]["safety-response"]["easy"] == pytest.approx(1 / 2)
    assert rep["subsets"]["safety-refuse"]["normal"] == 1.0
    assert set(rep["subsets"]) == {"chat", "math", "code", "safety-refuse", "safety-response"}
    # Pooled (secondary line): the 7 prompts together: easy 13/21, normal 11/21, hard 9/21, average 11/21.
    pooled = rep["pooled"]
    assert (pooled["easy"], pooled["normal"], pooled["hard"], pooled["average"], pooled["n"]) == pytest.approx(
        (13 / 21, 11 / 21, 9 / 21, 11 / 21, 7))
    # The same numbers as the transcription of RM-Bench's own code.
    records = [{"domain": d, "score_chosen": c, "score_rejected": r} for d, c, r in RMBENCH_FIXTURE]
    ref_head, ref_domains = rmbench_reference(records)
    for level in ("easy", "normal", "hard", "average"):
        assert head[level] == pytest.approx(ref_head[level], abs=1e-12)
    for name, ref in ref_domains.items():
        for level in ("easy", "normal", "hard"):
            assert rep["domains"][name][level] == pytest.approx(ref[level], abs=1e-12)


def test_rmbench_headline_partial_and_outside_domains():
    rep = rmbench_report([[1, 5, 9], [9, 9, 9]], [[0, 4, 8], [0, 0, 0]], ["chat", "unknown"])
    assert rep["headline"]["domains"] == ["chat"] and rep["headline"]["complete"] is False
    assert rep["headline"]["average"] == pytest.approx(2 / 3)  # the unknown-domain prompt is not in it
    assert rep["n_outside_domains"] == 1 and rep["pooled"]["n"] == 2
    assert rmbench_report([[1, 2, 3]], [[0, 0, 0]], ["other"])["headline"] is None
    with pytest.raises(ValueError, match="one entry per prompt"):
        rmbench_report([[1, 2, 3]], [[0, 0, 0]], ["chat", "math"])


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


def test_completions_without_a_finite_score_are_dropped():
    record = {"instruction": "q", "completions": [
        {"model": "A", "response": "a", "overall_score": "N/A"},
        {"model": "B", "response": "b", "overall_score": "nan"},
        {"model": "C", "response": "c", "overall_score": float("inf")},
        {"model": "D", "response": "d", "overall_score": "7"},
        {"model": "E", "response": "e", "score": -float("inf")}]}
    assert normalize_record(record)["completions"] == [{"model": "D", "response": "d", "score": 7.0}]


def test_random_split_sizes_seed_and_order():
    # At least one item on each side, whatever the fraction rounds to.
    assert random_split(["b", "a", "c"], 0.1, seed=0)[1] != [] and len(random_split(["b", "a", "c"], 0.1)[1]) == 1
    train, valid = random_split(["a", "b"], 0.9, seed=0)
    assert len(train) == 1 and len(valid) == 1 and sorted(train + valid) == ["a", "b"]
    # The documented draw: the unique items sorted, shuffled by random.Random(seed), the first round(f * n) valid;
    # so the input's order and repeats do not matter, and the seed does.
    items = [f"p{i}" for i in range(20)]
    expected = sorted(items)
    random.Random(7).shuffle(expected)
    given = items[::-1] + items[:5]
    assert random_split(given, 0.25, seed=7) == (sorted(expected[5:]), sorted(expected[:5]))
    assert random_split(items, 0.25, seed=7) != random_split(items, 0.25, seed=8)


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
    # With a template, "separate" rule: the response is the rendered conversation minus the rendered prompt.
    assert data.record_texts(msgs, templated, tokenization="separate") == ("user: q assistant:", " good ", " bad ")
    assert data.record_texts(msgs, templated, use_chat_template=False)[0] == "\n\nUser: q\n\nAssistant:"
    question = [{"role": "user", "content": "q"}]
    assert data.render_prompt(templated, question) == "user: q assistant:"
    assert data.render_prompt(templated, question, use_chat_template=False) == "\n\nUser: q\n\nAssistant:"
    assert data.render_prompt(tok, question) == "\n\nUser: q\n\nAssistant:"


def test_cli_rmbench(tmp_path, saved_model, capsys):
    texts = [("the cat", ["sat", "sat on the mat", "yes the cat sat"], ["ran", "ran far away", "no the dog ran"]),
             ("a dog", ["good", "good answer", "yes good answer"], ["bad", "bad answer", "no"])]
    subsets = ["chat", "math", "code", "safety-refuse", "safety-response", "safety-response"]
    records = [{"id": i, "prompt": texts[i % 2][0], "chosen": texts[i % 2][1], "rejected": texts[i % 2][2],
                "domain": domain} for i, domain in enumerate(subsets)]
    data = tmp_path / "total_dataset.json"  # the released layout: one JSON list
    data.write_text(json.dumps(records, indent=2))
    out = tmp_path / "rmb_out.json"
    assert cli.main(["rmbench", "--model", str(saved_model), "--data", str(data), "--output", str(out),
                     "--device", "cpu", "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["n_records"] == 6 and res["n_dropped"] == 0
    assert list(res["domains"]) == ["chat", "math", "code", "safety"] and res["domains"]["safety"]["n"] == 3
    assert set(res["subsets"]) == set(subsets) and res["pooled"]["n"] == 6
    head = res["headline"]
    assert head["complete"] is True
    for level in ("easy", "normal", "hard", "average"):  # the headline is the mean of the four domain rows
        assert head[level] == pytest.approx(sum(d[level] for d in res["domains"].values()) / 4)
    printed = capsys.readouterr().out
    assert "RM-Bench (mean over domains chat, math, code, safety)" in printed
    assert "pooled over all 6 prompts (secondary)" in printed and "safety-response" in printed


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


def test_cli_paths_in_the_home_are_expanded_once(tmp_path, saved_model, monkeypatch, capsys):
    """Quoted (or from a Python caller), `--output '~/x'` was checked as $HOME/x and written to ./~/x, and
    `--model '~/m'` was "no such directory": every path flag is expanded once, before its check and its use."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    shutil.copytree(saved_model, home / "model")
    (home / "pairs.jsonl").write_text(json.dumps({"prompt": "the cat", "chosen": "sat", "rejected": "ran"}) + "\n")
    (home / "uf.jsonl").write_text("\n".join(json.dumps(r) for r in uf_records()) + "\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert cli.main(["rank", "--model", "~/model", "--data", "~/pairs.jsonl", "--output", "~/rank.json",
                     "--device", "cpu", "--no-progress", "--n-boot", "10"]) == 0
    assert json.loads((home / "rank.json").read_text())["model"] == str(home / "model")
    assert cli.main(["splits", "--data", "~/uf.jsonl", "--output", "~/splits", "--valid-models", "C,D"]) == 0
    assert (home / "splits" / "split.json").is_file()
    assert list(cwd.iterdir()) == [], "nothing is written to ./~"


def test_cli_splits_and_generate(tmp_path, saved_model):
    data = tmp_path / "uf.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in uf_records()) + "\n")
    out_dir = tmp_path / "splits"
    assert cli.main(["splits", "--data", str(data), "--out-dir", str(out_dir), "--valid-models", "C,D",
                     "--valid-prompt-fraction", "0.25", "--seed", "0"]) == 0  # --out-dir: the old spelling of --output
    manifest = json.loads((out_dir / "split.json").read_text())
    assert manifest["valid_models"] == ["C", "D"] and manifest["train_models"] == ["A", "B", "E"]
    assert len(manifest["valid_prompts"]) == 1 and len(manifest["train_prompts"]) == 3
    for name in ("train", "id", "prompt_ood", "response_ood", "mutual_ood"):
        rows = [json.loads(x) for x in (out_dir / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == manifest["stats"][name]["n_pairs"] > 0
        expected_prompts = manifest["valid_prompts"] if name in ("prompt_ood", "mutual_ood") else manifest["train_prompts"]
        assert all(r["prompt_id"] in expected_prompts for r in rows)

    inst = tmp_path / "alpaca.json"
    inst.write_text(json.dumps([{"instruction": "the cat", "dataset": "helpful_base"}, {"instruction": "a dog"}]))
    out = tmp_path / "alpaca_out.json"
    assert cli.main(["generate", "--model", str(saved_model), "--instructions", str(inst), "--format", "alpacaeval",
              "--out", str(out), "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu",
              "--model-id", "tiny", "--no-progress"]) == 0
    rows = json.loads(out.read_text())
    assert [set(r) for r in rows] == [{"instruction", "output", "generator", "dataset"}] * 2
    assert rows[0]["generator"] == "tiny" and rows[0]["dataset"] == "helpful_base"
    meta = json.loads((tmp_path / "alpaca_out.json.meta.json").read_text())
    assert meta["decoding"]["max_new_tokens"] == 3 and meta["decoding"]["do_sample"] is False

    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["the cat", "a dog"]}) + "\n")
    out2 = tmp_path / "answers.jsonl"
    assert cli.main(["generate", "--model", str(saved_model), "--instructions", str(questions), "--format", "mtbench",
                     "--out", str(out2), "--max-new-tokens", "2", "--device", "cpu", "--no-progress"]) == 0
    (answer,) = [json.loads(x) for x in out2.read_text().splitlines()]
    assert answer["question_id"] == 81 and answer["model_id"] == saved_model.name
    assert len(answer["choices"]) == 1 and answer["choices"][0]["index"] == 0
    assert len(answer["choices"][0]["turns"]) == 2 and math.isfinite(answer["tstamp"])


# ------------------------------------------------------------------------------------------------ generation


GEN_PROMPTS = ["the cat", "a dog ran far away from the big red house", "yes no maybe good bad answer question", "hello"]


def test_batched_greedy_equals_unbatched(tiny_model, tiny_tokenizer):
    from amapo_train.eval.generation import generate_batch, left_padded

    tok = tiny_tokenizer
    prompts = [data.render_prompt(tok, [{"role": "user", "content": p}]) for p in GEN_PROMPTS]
    ids, mask = left_padded(tok, prompts, tok.pad_token_id)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == len(prompts)  # every row is padded differently
    assert all(mask[i, -n:].all() and not mask[i, :-n].any() for i, n in enumerate(lengths))  # pads on the left
    stop = [tok.eos_token_id]
    kwargs = dict(temperature=0.0, top_p=1.0, max_new_tokens=6, stop_ids=stop, seed=0)
    batched = generate_batch(tiny_model, tok, prompts, **kwargs)
    alone = [generate_batch(tiny_model, tok, [p], **kwargs)[0] for p in prompts]
    assert batched == alone
    assert any(batched)  # the comparison is over real text



def test_cli_generate_batched_and_mtbench(tmp_path, saved_model):
    inst = tmp_path / "alpaca.jsonl"
    inst.write_text("\n".join(json.dumps({"instruction": p}) for p in GEN_PROMPTS) + "\n")
    answers = {}
    for bs in (1, 3):  # 3: two uneven batches
        out = tmp_path / f"alpaca_bs{bs}.json"
        assert cli.main(["generate", "--model", str(saved_model), "--instructions", str(inst), "--format", "alpacaeval",
                         "--output", str(out), "--max-new-tokens", "5", "--temperature", "0", "--batch-size", str(bs),
                         "--device", "cpu", "--no-progress"]) == 0
        answers[bs] = [row["output"] for row in json.loads(out.read_text())]
        meta = json.loads(Path(f"{out}.meta.json").read_text())
        assert meta["padding"] == "left" and meta["decoding"]["batch_size"] == bs
    assert answers[1] == answers[3] and len(answers[1]) == 4

    # MT-Bench: FastChat's per-category temperatures; math and coding are greedy, so batching changes nothing.
    questions = tmp_path / "question.jsonl"
    qs = [{"question_id": 101, "category": "math", "turns": ["the cat", "a dog"]},
          {"question_id": 102, "category": "coding", "turns": ["yes no maybe good bad answer question"]},
          {"question_id": 103, "category": "math", "turns": ["hello", "the big red house"]}]
    questions.write_text("\n".join(json.dumps(q) for q in qs) + "\n")
    turns = {}
    for bs in (1, 3):
        out = tmp_path / f"mt_bs{bs}.jsonl"
        assert cli.main(["generate", "--model", str(saved_model), "--instructions", str(questions), "--format",
                         "mtbench", "--output", str(out), "--max-new-tokens", "3", "--batch-size", str(bs),
                         "--device", "cpu", "--no-progress"]) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["question_id"] for r in rows] == [101, 102, 103]
        turns[bs] = [r["choices"][0]["turns"] for r in rows]
        meta = json.loads(Path(f"{out}.meta.json").read_text())["decoding"]
        assert meta["temperature"] is None and meta["max_new_tokens"] == 3
        assert meta["temperature_by_category"]["math"] == 0.0 and meta["temperature_by_category"]["writing"] == 0.7
        assert meta["temperature_by_category"]["stem"] == 0.1 and "FastChat" in meta["source"]
    assert turns[1] == turns[3] and [len(t) for t in turns[1]] == [2, 1, 2]


def test_generation_presets_and_mtbench_temperatures():
    from amapo_train.eval.generation import MTBENCH_TEMPERATURES, PRESETS, mtbench_temperature

    expected = {"llama3-8b-base": (0.9, 4096), "llama3-8b-instruct": (0.9, 4096),
                "mistral-7b-base": (0.7, 2048), "mistral-7b-instruct": (0.5, 2048)}
    assert {name: (p["temperature"], p["max_new_tokens"]) for name, p in PRESETS.items()} == expected
    assert all(p["top_p"] == 1.0 and "eval/alpacaeval2/configs/" in p["source"] for p in PRESETS.values())
    assert MTBENCH_TEMPERATURES == {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                                    "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
    assert mtbench_temperature("unlisted") == 0.7 and mtbench_temperature(None) == 0.7
    llama3_stops = ["<|end_of_text|>", "<|eot_id|>"]  # the Llama-3 configs' stop ids 128001 and 128009
    assert {name: p["stop_tokens"] for name, p in PRESETS.items()} == {
        "llama3-8b-base": llama3_stops, "llama3-8b-instruct": llama3_stops, "mistral-7b-base": [],
        "mistral-7b-instruct": []}

    def decoding(*flags):
        return cli.resolve_decoding(cli.build_parser().parse_args(
            ["generate", "--model", "m", "--instructions", "i", "--output", "o", *flags]))

    d = decoding("--format", "alpacaeval", "--preset", "mistral-7b-instruct")
    assert (d["temperature"], d["max_new_tokens"], d["top_p"], d["preset"]) == (0.5, 2048, 1.0, "mistral-7b-instruct")
    d = decoding("--format", "alpacaeval", "--preset", "llama3-8b-base", "--max-new-tokens", "16")  # a flag wins
    assert (d["temperature"], d["max_new_tokens"], d["stop_tokens"]) == (0.9, 16, ["<|end_of_text|>", "<|eot_id|>"])
    d = decoding("--format", "alpacaeval")
    assert (d["temperature"], d["max_new_tokens"], d["preset"]) == (0.7, 512, None)
    d = decoding("--format", "mtbench")
    assert (d["temperature"], d["max_new_tokens"]) == (None, 1024)
    assert decoding("--format", "mtbench", "--temperature", "0")["temperature"] == 0.0
    with pytest.raises(cli.UserError, match="--preset"):
        decoding("--format", "mtbench", "--preset", "llama3-8b-base")
    with pytest.raises(cli.UserError, match="--top-p"):
        decoding("--format", "alpacaeval", "--top-p", "0")


# ------------------------------------------------------------------------------------------------ user errors


def run_console(*args, env_extra=None):
    """``amapo-eval`` as a user runs it: the installed console script, in a subprocess."""
    script = Path(sys.executable).parent / "amapo-eval"
    if not script.exists():
        pytest.skip("the amapo-eval console script is not installed in this environment")
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amapo-eval: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_console_user_errors(tmp_path, saved_model):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "the cat", "chosen": "sat", "rejected": "ran"}) + "\n")
    assert_user_error(run_console("rank", "--model", tmp_path / "no_such_model", "--data", pairs),
                      "--model", "no such directory")
    assert_user_error(run_console("rank", "--model", saved_model, "--data", tmp_path / "missing.jsonl"),
                      "--data", "no such file")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert_user_error(run_console("rank", "--model", saved_model, "--data", odd, "--device", "cpu"),
                      "--data", "question")
    assert_user_error(run_console("generate", "--model", saved_model, "--instructions", pairs, "--format", "mtbench",
                                  "--output", tmp_path / "a.jsonl", "--preset", "llama3-8b-base"), "--preset")
    assert_user_error(run_console("rank", "--model", saved_model), "--data")  # argparse's own errors: one line too


EVAL_ARGUMENT_MISTAKES = {  # a value outside what its flag takes: one line, status 2, before the model loads
    "results under a file": (["rank", "--output", "/dev/null/rank.json"],
                             "--output /dev/null/rank.json: /dev/null is not a directory"),
    "split files into a file": (["splits", "--output", "/dev/null"], "--output /dev/null: /dev/null is not a directory"),
    "no such device": (["rank", "--device", "gpu0"], "--device gpu0: not a device name (cpu, cuda or cuda:N)"),
    "a device type the scripts do not run on": (["rank", "--device", "mps"], "--device mps: only cpu and cuda"),
    "no bootstrap resample": (["rank", "--n-boot", "0"], "--n-boot 0: must be in [1, 16777216]"),
    # 2**32 resamples took 32 GiB (the machine's memory was gone), after every pair had been scored
    "too many bootstrap resamples": (["rank", "--n-boot", str(2**24 + 1)],
                                     f"--n-boot {2**24 + 1}: must be in [1, 16777216]"),
    "no response token": (["rank", "--max-length", "0"], "--max-prompt-length 1800 must lie in [1, --max-length 0)"),
    "prompt as long as the pair": (["rmbench", "--max-length", "64", "--max-prompt-length", "64"],
                                   "--max-prompt-length 64 must lie in [1, --max-length 64)"),
    "no prompt held out": (["splits", "--valid-prompt-fraction", "0"], "--valid-prompt-fraction 0.0: must be in (0, 1)"),
    "NaN model share": (["splits", "--valid-model-fraction", "nan"], "--valid-model-fraction nan: must be in (0, 1)"),
    "infinite temperature": (["generate", "--format", "alpacaeval", "--temperature", "inf"],
                             "--temperature inf: must be a finite number >= 0"),
    "bootstrap seed too large": (["rank", "--seed", str(2**64)], f"--seed {2**64}: must be in [0, 4294967295]"),
    "sampling seed too large": (["generate", "--format", "alpacaeval", "--seed", str(2**32)],
                                f"--seed {2**32}: must be in [0, 4294967295]"),
    "negative seed": (["generate", "--format", "alpacaeval", "--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
    # random.Random(-1) is random.Random(1): a negative split seed silently repeated another seed's split
    "negative split seed": (["splits", "--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
    # an empty --output (`--output "$OUT"`, OUT unset): rank wrote no file and exited 0, splits wrote into the
    # working directory, generate failed with IsADirectoryError after generating every answer
    "empty results file": (["rank", "--output", ""], "--output is empty: give a file path"),
    "empty split directory": (["splits", "--output", ""], "--output is empty: give a directory path"),
    "empty answers file": (["generate", "--format", "alpacaeval", "--output", ""],
                           "--output is empty: give a file path"),
    # a NUL character (a Python caller's: a shell cannot pass one): splits failed with a ValueError traceback
    "NUL in a directory": (["splits", "--output", "a\0b"],
                           "--output 'a\\x00b': a path cannot hold a NUL character"),
    # a ~user that names nobody (a shell leaves it as it is): pathlib's RuntimeError was a traceback
    "home of no user": (["splits", "--output", "~nosuchuser-amapo/splits"],
                        "--output ~nosuchuser-amapo/splits: no user 'nosuchuser-amapo' here to expand "
                        "~nosuchuser-amapo"),
    "data in the home of no user": (["rank", "--data", "~nosuchuser-amapo/pairs.jsonl"],
                                    "--data ~nosuchuser-amapo/pairs.jsonl: no user 'nosuchuser-amapo' here"),
    "no such tokenization": (["rank", "--tokenization", "joint"], "argument --tokenization: invalid choice: 'joint'"),
    "no new token": (["generate", "--format", "alpacaeval", "--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
}


@pytest.mark.parametrize("name", sorted(EVAL_ARGUMENT_MISTAKES))
def test_console_argument_outside_its_range(name, tmp_path, capsys):
    args, message = EVAL_ARGUMENT_MISTAKES[name]
    command, flags = args[0], args[1:]
    # a model directory that would fail to load: the check must come first
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    inputs = {"rank": ["--model", model, "--data", "bundled:hh-rlhf"],
              "rmbench": ["--model", model, "--data", "bundled:hh-rlhf"],
              "splits": ["--data", "bundled:hh-rlhf", "--output", tmp_path / "splits"],
              "generate": ["--model", model, "--instructions", tmp_path / "i.json", "--output", tmp_path / "a.json"]}
    assert cli.main([command, *map(str, inputs[command]), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amapo-eval: error: ") and message in lines[0], lines


def test_console_without_extras(tmp_path, saved_model):
    stubs = tmp_path / "stubs"  # shadows transformers the way a plain `pip install .` leaves it: not importable
    stubs.mkdir()
    (stubs / "transformers.py").write_text("raise ModuleNotFoundError(\"No module named 'transformers'\", "
                                           "name='transformers')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")])}
    proc = run_console("rank", "--model", saved_model, "--data", "bundled:hh-rlhf", env_extra=env)
    assert_user_error(proc, 'pip install "amapo-kernels[train]"', "transformers")


def test_cli_rank_bundled_source(tmp_path, saved_model):
    out = tmp_path / "rank.json"
    assert cli.main(["rank", "--model", str(saved_model), "--data", "bundled:hh-rlhf", "--limit", "6",
                     "--out", str(out), "--device", "cpu", "--no-progress", "--n-boot", "20", "--seed", "5"]) == 0
    res = json.loads(out.read_text())
    assert res["tokenization"]["n_records"] == 6 and res["split"] == "test"
    assert res["n_boot"] == 20 and res["seed"] == 5  # the bootstrap flags reach the statistics
    assert cli.main(["rank", "--model", str(saved_model), "--data", "bundled:nope", "--device", "cpu"]) == 2


def test_splits_of_data_with_one_model_is_a_user_error(tmp_path, capsys):
    data = tmp_path / "uf.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "completions": [{"model": "m1", "response": "x", "score": 1}]})
                              for p in ("A", "B", "C")))
    assert cli.main(["splits", "--data", str(data), "--output", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot split its response models: need at least two distinct items" in lines[0], lines


SPLITS_REFUSED = {  # arguments -> the message: each would have written an empty set (exit 0 before)
    "one seen model left": (["--valid-models", "A,B,C,D"], "splits its 5 response models into 1 seen ['E'] and 4 "
                            "unseen ['A', 'B', 'C', 'D']; a pair is two responses by models of one side"),
    "every model unseen": (["--valid-models", "A,B,C,D,E"], "into 0 seen [] and 5 unseen"),
    "one unseen model": (["--valid-models", "C"], "and 1 unseen ['C']"),
    # seed 1 holds out p4, which has responses of A and B only: no Mutual-OOD pair
    "an empty set": (["--valid-models", "C,D", "--valid-prompt-fraction", "0.25", "--seed", "1"],
                     "no pair in mutual_ood (1 prompts with fewer than 2 scored responses of its models, 0 with all "
                     "scores tied); nothing written"),
}


@pytest.mark.parametrize("name", sorted(SPLITS_REFUSED))
def test_splits_refuse_to_write_an_empty_set(name, tmp_path, capsys):
    args, message = SPLITS_REFUSED[name]
    data = tmp_path / "uf.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in uf_records()) + "\n")
    out_dir = tmp_path / "splits"
    assert cli.main(["splits", "--data", str(data), "--output", str(out_dir), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amapo-eval: error: ") and message in lines[0], lines
    assert not out_dir.exists()


def test_splits_of_two_models_is_a_user_error(tmp_path, capsys):
    # The random model split of two models leaves one on each side: no pair anywhere.
    data = tmp_path / "uf.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "completions": [
        {"model": "m0", "response": "x", "score": 1}, {"model": "m1", "response": "y", "score": 2}]}) for p in "ABCD"))
    assert cli.main(["splits", "--data", str(data), "--output", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--valid-model-fraction 0.5 splits its 2 response models into 1 seen" in lines[0]
    assert "(the data has fewer than 4 models)" in lines[0] and not (tmp_path / "out").exists()


def test_cli_rank_scores_the_tokens_the_checkpoint_was_trained_on(tmp_path, capsys):
    """rank on a checkpoint of amapo-train gives the training run's own held-out numbers (eval.json), exactly:
    the token settings come from the checkpoint's training config (here --tokenization separate and the tiny
    recipe's 192 / 128 lengths, none of them rank's defaults), and the statistics are in dataset order
    whatever rank's batching (its --batch-size 4, sorted by length; the trainer's batches of 32)."""
    from amapo_train.train import main as train_main

    run = tmp_path / "run"
    train_main(["--tokenization", "separate", "--max-train-pairs", "32", "--max-test-pairs", "40", "--max-steps", "1",
                "--total-batch-size", "16", "--per-device-batch-size", "16", "--log-with", "none", "--device", "cpu",
                "--output-dir", str(run)])
    expected = json.loads((run / "eval.json").read_text())
    capsys.readouterr()
    out = tmp_path / "rank.json"
    rank = ["rank", "--model", str(run / "final"), "--data", "bundled:hh-rlhf", "--limit", "40", "--device", "cpu",
            "--no-progress"]
    assert cli.main([*rank, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("tokens: tokenization separate (training config), insert-system-message on (training config), "
            "max-length 192 (training config), max-prompt-length 128 (training config); training config: "
            f"{run / 'final' / 'trainer_state.json'}") in printed
    result = json.loads(out.read_text())
    for key in ("n_pairs", "summed", "normalized", "n_boot", "seed", "confidence"):
        assert result[key] == expected[key], key
    assert result["settings"]["tokenization"] == "separate" and result["settings"]["max_length"] == 192

    # A flag overrides the checkpoint's setting, and says so; these are other tokens, so other numbers.
    assert cli.main([*rank, "--output", str(out), "--tokenization", "trl", "--insert-system-message", "off"]) == 0
    assert "tokenization trl (--tokenization), insert-system-message off (--insert-system-message)" in \
        capsys.readouterr().out
    other = json.loads(out.read_text())
    assert other["settings"]["from"]["max_length"] == "training config"
    assert other["summed"]["mean_margin"] != expected["summed"]["mean_margin"]
    # A length the checkpoint gives that does not fit one the user gives: the error says where it came from.
    assert cli.main([*rank, "--max-length", "100"]) == 2
    assert "--max-prompt-length 128 must lie in [1, --max-length 100) (--max-prompt-length from the training " \
           "config)" in capsys.readouterr().err


def test_cli_rank_unreadable_training_config(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "trainer_state.json").write_text('{"step": 3}')
    assert cli.main(["rank", "--model", str(model), "--data", "bundled:hh-rlhf"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "trainer_state.json cannot be read (no 'config' object in it)" in lines[0], lines
    # All four settings given: the file is not needed, so not read (the model then fails to load, later).
    flags = ["--tokenization", "trl", "--insert-system-message", "on", "--max-length", "64",
             "--max-prompt-length", "32"]
    assert cli.main(["rank", "--model", str(model), "--data", "bundled:hh-rlhf", "--limit", "2", *flags]) == 2
    assert "cannot be loaded" in capsys.readouterr().err


@pytest.mark.parametrize("length", [None, "192", 12.5])
def test_cli_rank_training_config_with_a_non_integer_length(length, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "trainer_state.json").write_text(json.dumps({"config": {"max_length": length}}))
    assert cli.main(["rank", "--model", str(model), "--data", "bundled:hh-rlhf"]) == 2  # not a TypeError
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"has max_length {length!r} (expected an integer); give --max-length" in lines[0], lines


GEMMA_TEMPLATE = (  # Gemma's chat template: no system turn, roles must alternate starting with the user
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ message['role'] + ' ' + message['content'] + ' ' }}{% endfor %}"
)


def one_error_line(capsys):
    """The one error line on stderr (a model that loaded first may have shown its loading bar there too)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("amapo-eval: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def save_model(path, tiny_model, tiny_tokenizer, template=None):
    """The tiny model and tokenizer saved in `path`, the tokenizer with `template` as its chat template."""
    tiny_model.save_pretrained(path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return str(path)


def test_cli_rank_chat_template_refusing_a_system_turn(tmp_path, tiny_model, tiny_tokenizer, capsys):
    conversation = {"prompt": [{"role": "user", "content": "the cat"}],
                    "chosen": [{"role": "assistant", "content": "sat on the mat"}],
                    "rejected": [{"role": "assistant", "content": "ran far away"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(conversation) + "\n")
    rank = ["rank", "--data", str(data), "--device", "cpu", "--no-progress", "--n-boot", "10"]

    def model_with(template):
        return save_model(tmp_path / f"model{len(template)}", tiny_model, tiny_tokenizer, template)

    # A template that refuses only a system turn: no empty one is inserted (it was, and rendering raised
    # jinja2's TemplateError, a traceback).
    system_refused = model_with(GEMMA_TEMPLATE.replace("(message['role'] == 'user') != (loop.index0 % 2 == 0)",
                                                       "false"))
    gemma = model_with(GEMMA_TEMPLATE)
    assert cli.main([*rank, "--model", system_refused]) == 0
    capsys.readouterr()
    # Gemma's whole template also refuses an assistant message rendered alone (how --tokenization trl renders
    # a response): one line naming the cause, and the way out (the model loads first: its loading bar may show).
    assert cli.main([*rank, "--model", gemma]) == 2
    error = one_error_line(capsys)
    assert f"--data {data}: record 0: Conversation roles must alternate" in error, error
    assert f"the chat template of --model {gemma} refuses it" in error and "--tokenization separate" in error
    assert cli.main([*rank, "--model", gemma, "--tokenization", "separate"]) == 0


def test_ranking_statistics_do_not_depend_on_the_batching(tiny_model, tiny_tokenizer):
    # The bootstrap draws positions: pairs are put in index order first, so rank's length-sorted batches and the
    # trainer's batches in dataset order give one interval (they differed: rank's eval.json could not be reproduced).
    correct = [True, False, False, True, True, True, False, True, False, False, True, True]
    pairs = []
    for i, good in enumerate(correct):  # lengths vary with i: the length sort reorders the pairs
        long = ("the cat sat on the mat " * (1 + i % 3)).strip()
        chosen, rejected = ("sat", long) if good else (long, "sat")
        pairs.append({"prompt": "a dog", "chosen": chosen, "rejected": rejected})
    dataset = PreferenceDataset(pairs, tiny_tokenizer)
    results = [evaluate_ranking(tiny_model, make_batches(dataset, size, 0, sort_by_length=sort), progress=False,
                                n_boot=200, return_logps=True)
               for size, sort in ((1, False), (5, True), (12, True))]
    assert results[0]["logps"]["index"] == list(range(len(pairs)))
    assert results[1] == results[0] and results[2] == results[0]


# ------------------------------------------------------------------------------------------------ CLI glue


SIMPLE_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                   "{% if add_generation_prompt %}assistant{% endif %}")


def test_cli_model_directory_without_config_json(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert cli.main(["rank", "--model", str(tmp_path / "model"), "--data", "bundled:hh-rlhf"]) == 2
    assert "no config.json there" in one_error_line(capsys)


def test_cli_empty_data_file(tmp_path, saved_model, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["rank", "--model", str(saved_model), "--data", str(empty), "--device", "cpu"]) == 2
    assert f"--data {empty}: no records" in one_error_line(capsys)


def test_cli_rank_every_pair_dropped(tmp_path, saved_model, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "the cat", "chosen": "", "rejected": "ran"}) + "\n")
    assert cli.main(["rank", "--model", str(saved_model), "--data", str(data), "--device", "cpu",
                     "--no-progress"]) == 2
    assert "no pair left after tokenization" in one_error_line(capsys)


def test_cli_rank_training_config_with_a_non_boolean_system_message(tmp_path, tiny_model, tiny_tokenizer, capsys):
    model = save_model(tmp_path / "model", tiny_model, tiny_tokenizer)
    # "on" is truthy: taken as is, it would silently mean True
    config = {"tokenization": "trl", "insert_system_message": "on", "max_length": 64, "max_prompt_length": 32}
    (tmp_path / "model" / "trainer_state.json").write_text(json.dumps({"config": config}))
    assert cli.main(["rank", "--model", model, "--data", "bundled:hh-rlhf", "--limit", "2", "--device", "cpu",
                     "--no-progress", "--n-boot", "10"]) == 2
    line = one_error_line(capsys)
    assert "insert_system_message 'on'" in line and "give --tokenization and --insert-system-message" in line


@pytest.mark.parametrize("dtype, expected", [("auto", torch.float32), ("float32", torch.float32),
                                             ("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_load_model_dtype(saved_model, dtype, expected):
    model, _ = cli.load_model_and_tokenizer(str(saved_model), "cpu", dtype)  # auto: float32 on the CPU
    assert next(model.parameters()).dtype == expected and not model.training


RMBENCH_TEXTS = [
    ("the cat", ["sat", "sat on the mat", "yes the cat sat on the mat"],
     ["ran", "ran far away", "no the dog ran far away from the big red house"]),
    ("a dog", ["good", "good answer", "yes good answer question"], ["bad", "bad answer", "no maybe bad"]),
    ("hello there", ["hi", "hi how can I help you", "yes hello"], ["no", "bad answer", "maybe no"]),
]


def rmbench_records(domains):
    return [{"id": i, "prompt": RMBENCH_TEXTS[i % 3][0], "chosen": list(RMBENCH_TEXTS[i % 3][1]),
             "rejected": list(RMBENCH_TEXTS[i % 3][2]), "domain": domain} for i, domain in enumerate(domains)]


def rmbench_expected(model_dir, records, use_template, **lengths):
    """RM-Bench's numbers of `records` by the library: prompt = a user message, each response the assistant's."""
    model, tok = cli.load_model_and_tokenizer(model_dir, "cpu")

    def fmt(prompt, chosen, rejected):
        return data.chat_texts([{"role": "user", "content": prompt}], {"role": "assistant", "content": chosen},
                               {"role": "assistant", "content": rejected}, tok, use_template)

    chosen, rejected, kept = score_rmbench(model, tok, records, format_pair=fmt, progress=False, **lengths)
    return rmbench_report(chosen[kept], rejected[kept], [r["domain"] for r, k in zip(records, kept.tolist()) if k])


def assert_same_rmbench(got, expected):
    for key in ("headline", "domains", "subsets", "pooled"):  # fractions of counts: equal, not close
        assert got[key] == expected[key], key


def test_cli_rmbench_numbers_template_and_lengths(tmp_path, tiny_model, tiny_tokenizer):
    records = rmbench_records(["chat", "math", "code", "safety-refuse", "safety-response", "chat"])
    data_file = tmp_path / "total_dataset.json"
    data_file.write_text(json.dumps(records))
    model = save_model(tmp_path / "model", tiny_model, tiny_tokenizer, SIMPLE_TEMPLATE)
    out = tmp_path / "rmb.json"

    def rmbench(*flags):
        assert cli.main(["rmbench", "--model", model, "--data", str(data_file), "--output", str(out),
                         "--device", "cpu", "--no-progress", *flags]) == 0
        return json.loads(out.read_text())

    templated = rmbench()
    assert templated["chat_template"] is True
    assert_same_rmbench(templated, rmbench_expected(model, records, True))
    plain = rmbench("--chat-template", "none")
    assert plain["chat_template"] is False
    assert_same_rmbench(plain, rmbench_expected(model, records, False))
    assert plain["pooled"] != templated["pooled"]  # the template changes the tokens, so the numbers
    cut = rmbench("--chat-template", "none", "--max-length", "4", "--max-prompt-length", "2")
    assert_same_rmbench(cut, rmbench_expected(model, records, False, max_length=4, max_prompt_length=2))
    assert cut["pooled"] != plain["pooled"]
    first_two = rmbench("--limit", "2")
    assert first_two["n_records"] == 2 and first_two["pooled"]["n"] == 2


def test_cli_rmbench_drops_a_prompt_with_an_empty_response(tmp_path, saved_model, capsys):
    records = rmbench_records(["chat", "math", "code", "safety-refuse"])
    records[1]["rejected"][2] = ""
    data_file = tmp_path / "total_dataset.json"
    data_file.write_text(json.dumps(records))
    out = tmp_path / "rmb.json"
    rmbench = ["rmbench", "--model", str(saved_model), "--data", str(data_file), "--device", "cpu", "--no-progress"]
    assert cli.main([*rmbench, "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["n_records"], res["n_dropped"], res["pooled"]["n"]) == (4, 1, 3)
    assert list(res["domains"]) == ["chat", "code", "safety"] and res["headline"]["complete"] is False
    # every prompt unscorable: a user error, not a traceback
    data_file.write_text(json.dumps([records[1]]))
    assert cli.main(rmbench) == 2
    assert "no scorable prompt" in one_error_line(capsys)


def test_rmbench_record_checks(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "rmb.json"
    records = rmbench_records(["chat", "math"])
    del records[1]["id"], records[1]["domain"]
    path.write_text(json.dumps(records))
    loaded = load_rmbench(path)
    assert loaded[0]["id"] == 0 and "id" not in loaded[1] and loaded[1]["domain"] == "unknown"
    path.write_text(json.dumps([{**records[0], "chosen": ["a", "b", "c", "d"]}]))  # one response too many
    with pytest.raises(ValueError, match="3 strings"):
        load_rmbench(path)
    # an empty rejected response makes its prompt unscorable too
    holed = [{**loaded[0], "rejected": ["ran", "", "no"]}]
    chosen, rejected, kept = score_rmbench(tiny_model, tiny_tokenizer, holed, progress=False)
    assert kept.tolist() == [False] and torch.isnan(rejected[0, 1])


def test_eval_package_exports():
    import amapo_train.eval as eval_package

    assert all(hasattr(eval_package, name) for name in eval_package.__all__)
    assert eval_package.rmbench_report is rmbench_report


def splits_records(n_prompts, n_models, score_key="score"):
    return [{"prompt_id": f"p{i}", "prompt": f"P{i}", "completions": [
        {"model": f"m{m}", "response": f"r{i}.{m}", score_key: (i + m) % n_models} for m in range(n_models)]}
        for i in range(n_prompts)]


def test_cli_splits_fractions_seed_and_score_key(tmp_path):
    data_file = tmp_path / "uf.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in splits_records(20, 8, "rating")) + "\n")
    out_dir = tmp_path / "splits"
    assert cli.main(["splits", "--data", str(data_file), "--output", str(out_dir), "--score-key", "rating",
                     "--valid-prompt-fraction", "0.25", "--valid-model-fraction", "0.5", "--seed", "3"]) == 0
    manifest = json.loads((out_dir / "split.json").read_text())
    assert manifest["seed"] == 3
    assert manifest["valid_prompts"] == random_split([f"p{i}" for i in range(20)], 0.25, seed=3)[1]
    assert manifest["valid_models"] == random_split([f"m{m}" for m in range(8)], 0.5, seed=3)[1]
    assert len(manifest["valid_prompts"]) == 5 and len(manifest["valid_models"]) == 4
    assert all(manifest["stats"][name]["n_pairs"] > 0 for name in ("train", "prompt_ood", "response_ood", "mutual_ood"))


def test_cli_splits_unknown_valid_model(tmp_path, capsys):
    data_file = tmp_path / "uf.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in uf_records()) + "\n")
    out_dir = tmp_path / "splits"
    assert cli.main(["splits", "--data", str(data_file), "--output", str(out_dir), "--valid-models", "C,D,Z"]) == 2
    assert "--valid-models names models not in the data: ['Z']" in one_error_line(capsys)
    assert not out_dir.exists()


# ------------------------------------------------------------------------------------------------ generation glue


class ScriptedLM(torch.nn.Module):
    """generate() appends the tokens `tail` to every row; it records its keyword arguments and one draw of the RNG."""

    def __init__(self, tail):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tail = tail
        self.calls = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append({**kwargs, "draw": torch.rand(1).item()})
        return torch.cat([input_ids, torch.tensor(self.tail).expand(input_ids.shape[0], -1)], 1)


def test_generate_batch_decoding_cut_and_seed(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.convert_tokens_to_ids
    eos = tok.eos_token_id
    lm = ScriptedLM([ids("good"), ids("answer"), eos, ids("bad")])
    prompts = ["the cat", "a dog ran"]
    kwargs = dict(top_p=0.5, max_new_tokens=4, stop_ids=[eos], seed=3)
    # only the new tokens, cut at the first stop token
    assert generate_batch(lm, tok, prompts, temperature=0.8, **kwargs) == ["good answer"] * 2
    call = lm.calls[-1]
    assert (call["do_sample"], call["temperature"], call["top_p"], call["max_new_tokens"]) == (True, 0.8, 0.5, 4)
    assert call["eos_token_id"] == [eos] and call["pad_token_id"] == tok.pad_token_id
    generate_batch(lm, tok, prompts, temperature=5e-5, **kwargs)  # FastChat: below 1e-4 is greedy
    assert lm.calls[-1]["do_sample"] is False
    torch.manual_seed(3)
    assert lm.calls[0]["draw"] == lm.calls[1]["draw"] == torch.rand(1).item()  # seeded before each call
    assert generate_batch(lm, tok, prompts, temperature=0.0, top_p=1.0, max_new_tokens=4,
                          stop_ids=[eos, ids("answer")], seed=0) == ["good"] * 2


def test_stop_token_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert stop_token_ids(tok, []) == [tok.eos_token_id]
    assert stop_token_ids(tok, ["</s>", "<pad>"]) == [tok.eos_token_id, tok.pad_token_id]
    with pytest.raises(ValueError, match="no stop token <\\|eot_id\\|>"):
        stop_token_ids(tok, ["<|eot_id|>"])


@pytest.fixture
def generate_calls(monkeypatch):
    """The arguments of every generate_batch call the CLI makes; answer k of call n is "answer n.k"."""
    calls = []

    def fake(model, tokenizer, prompts, *, temperature, top_p, max_new_tokens, stop_ids, seed):
        calls.append({"prompts": list(prompts), "temperature": temperature, "top_p": top_p,
                      "max_new_tokens": max_new_tokens, "stop_ids": list(stop_ids), "seed": seed})
        return [f"answer {len(calls)}.{k}" for k in range(len(prompts))]

    monkeypatch.setattr(generation, "generate_batch", fake)
    return calls


def test_cli_generate_alpacaeval_flags_reach_generation(tmp_path, tiny_model, tiny_tokenizer, generate_calls):
    model = save_model(tmp_path / "model", tiny_model, tiny_tokenizer, SIMPLE_TEMPLATE)
    inst = tmp_path / "alpaca.json"
    instructions = [*GEN_PROMPTS[:3], "hi", "bye"]
    inst.write_text(json.dumps([{"instruction": i, **({"dataset": "koala"} if i == "hi" else {})}
                                for i in instructions]))
    out = tmp_path / "out.json"
    generate = ["generate", "--model", model, "--instructions", str(inst), "--format", "alpacaeval",
                "--output", str(out), "--device", "cpu", "--no-progress"]
    assert cli.main([*generate, "--chat-template", "none", "--batch-size", "2", "--seed", "7", "--temperature", "0.3",
                     "--top-p", "0.5", "--max-new-tokens", "4"]) == 0
    assert [c["prompts"] for c in generate_calls] == [[f"\n\nUser: {i}\n\nAssistant:" for i in instructions[k:k + 2]]
                                                      for k in (0, 2, 4)]
    assert [c["seed"] for c in generate_calls] == [7, 9, 11]  # seed + index of the batch's first item
    eos = tiny_tokenizer.eos_token_id
    assert all((c["temperature"], c["top_p"], c["max_new_tokens"], c["stop_ids"]) == (0.3, 0.5, 4, [eos])
               for c in generate_calls)
    rows = json.loads(out.read_text())
    assert [r["output"] for r in rows] == ["answer 1.0", "answer 1.1", "answer 2.0", "answer 2.1", "answer 3.0"]
    assert [r["dataset"] for r in rows] == ["alpaca_eval"] * 3 + ["koala", "alpaca_eval"]
    # Defaults: the chat template, one batch of up to 8, temperature 0.7, 512 new tokens, seed 0.
    generate_calls.clear()
    assert cli.main(generate) == 0
    (call,) = generate_calls
    assert call["prompts"][0] == "user the cat assistant"
    assert (call["temperature"], call["top_p"], call["max_new_tokens"], call["seed"]) == (0.7, 1.0, 512, 0)
    assert json.loads(Path(f"{out}.meta.json").read_text())["chat_template"] is True


def test_cli_generate_mtbench_turns_temperatures_and_seeds(tmp_path, saved_model, generate_calls):
    questions = tmp_path / "question.jsonl"
    qs = [{"question_id": 1, "category": "writing", "turns": ["the cat", "a dog"]},
          {"question_id": 2, "category": "math", "turns": ["hello", "the mat"]},
          {"question_id": 3, "category": "math", "turns": ["yes"]}]
    questions.write_text("\n".join(json.dumps(q) for q in qs) + "\n")
    out = tmp_path / "answers.jsonl"
    assert cli.main(["generate", "--model", str(saved_model), "--instructions", str(questions), "--format", "mtbench",
                     "--output", str(out), "--max-new-tokens", "5", "--seed", "7", "--device", "cpu",
                     "--no-progress"]) == 0
    # Greedy (math) first, then writing at 0.7; each turn one call, its seed offset by 1000003 per turn.
    got = [(c["temperature"], c["seed"], c["prompts"]) for c in generate_calls]
    assert got == [
        (0.0, 8, ["\n\nUser: hello\n\nAssistant:", "\n\nUser: yes\n\nAssistant:"]),
        (0.0, 8 + 1_000_003, ["\n\nUser: hello\n\nAssistant: answer 1.0\n\nUser: the mat\n\nAssistant:"]),
        (0.7, 7, ["\n\nUser: the cat\n\nAssistant:"]),
        (0.7, 7 + 1_000_003, ["\n\nUser: the cat\n\nAssistant: answer 3.0\n\nUser: a dog\n\nAssistant:"]),
    ]
    assert all(c["max_new_tokens"] == 5 for c in generate_calls)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["choices"][0]["turns"] for r in rows] == [["answer 3.0", "answer 4.0"], ["answer 1.0", "answer 2.0"],
                                                       ["answer 1.1"]]


def test_cli_generate_preset_for_another_model_family(tmp_path, saved_model, capsys):
    inst = tmp_path / "alpaca.json"
    inst.write_text(json.dumps([{"instruction": "the cat"}]))
    assert cli.main(["generate", "--model", str(saved_model), "--instructions", str(inst), "--format", "alpacaeval",
                     "--output", str(tmp_path / "out.json"), "--preset", "llama3-8b-base", "--device", "cpu"]) == 2
    assert "--preset llama3-8b-base: the tokenizer has no stop token <|end_of_text|>, <|eot_id|>" in \
        one_error_line(capsys)


def test_python_dash_m_runs_amapo_eval():
    """`python -m amapo_train.train` is amapo-train; `python -m amapo_train.eval` was 'cannot be directly executed'."""
    run = subprocess.run([sys.executable, "-m", "amapo_train.eval", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "rank" in run.stdout and "rmbench" in run.stdout, run.stderr


def test_cli_rank_a_message_without_string_content_is_a_user_error(tmp_path, saved_model, capsys):
    """A null content was a TypeError traceback after the model had loaded."""
    records = [{"prompt": [{"role": "user", "content": "the cat"}], "chosen": [{"role": "assistant", "content": None}],
                "rejected": [{"role": "assistant", "content": "ran"}]}]
    data_file = tmp_path / "conv.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in records))
    assert cli.main(["rank", "--model", str(saved_model), "--data", str(data_file), "--device", "cpu"]) == 2
    assert "every message needs a string 'role' and 'content'" in one_error_line(capsys)


def test_cli_rank_reproduces_eval_json_of_a_local_file_run(tmp_path, capsys):
    """A single local file trains on 90% and evaluates on a seeded 10% (eval.json); those records are written beside
    it, so rank scores the pairs eval.json scored (ranking the whole file would count the training pairs too)."""
    from amapo_train.train import load_splits, main as train_main
    from amapo_train.command_line import build_parser, config_from_args

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in data.load_records("bundled:hh-rlhf", "train", 40)))
    run = tmp_path / "run"
    argv = ["--dataset", str(pairs), "--max-steps", "1", "--total-batch-size", "8", "--per-device-batch-size", "8",
            "--log-with", "none", "--device", "cpu", "--output-dir", str(run)]
    train_main(argv)
    held_out = run / "held_out.jsonl"
    assert [json.loads(line) for line in held_out.read_text().splitlines()] == \
        load_splits(config_from_args(build_parser("").parse_args(argv)))[1]
    expected = json.loads((run / "eval.json").read_text())
    out = tmp_path / "rank.json"
    assert cli.main(["rank", "--model", str(run / "final"), "--data", str(held_out), "--device", "cpu",
                     "--no-progress", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_pairs"] == expected["n_pairs"] == 4
    for key in ("summed", "normalized"):
        assert result[key] == expected[key], key


# ------------------------------------------------------------------------------------------------ audit findings


def damage(model_dir: Path, name: str) -> None:
    """Breaks one file of a saved model the way a truncated download or a hand edit does."""
    if name == "truncated weights":
        weights = model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif name == "pickled weights that are not":
        (model_dir / "model.safetensors").unlink()
        (model_dir / "pytorch_model.bin").write_bytes(b"garbage\n")
    elif name == "tokenizer.json of another layout":
        (model_dir / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Bogus"}}))
    elif name == "config.json with an impossible shape":
        config = json.loads((model_dir / "config.json").read_text())
        config["hidden_size"] = config["num_attention_heads"] * 8 + 1
        (model_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name", ["truncated weights", "pickled weights that are not",
                                  "tokenizer.json of another layout", "config.json with an impossible shape"])
def test_cli_a_damaged_model_directory_is_a_user_error(name, tmp_path, saved_model, capsys):
    # Only OSError and ValueError were caught: safetensors' SafetensorError, torch.load's UnpicklingError, the
    # tokenizer's KeyError and huggingface_hub's validation error were tracebacks (exit 1).
    import shutil

    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    damage(model, name)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "the cat", "chosen": "sat", "rejected": "ran"}) + "\n")
    assert cli.main(["rank", "--model", str(model), "--data", str(data), "--device", "cpu", "--no-progress"]) == 2
    assert f"--model {model}: cannot be loaded" in one_error_line(capsys)


@pytest.mark.parametrize("completions", [None, [1, 2], "a1 a2", {"model": "A", "response": "x", "score": 1}])
def test_cli_splits_malformed_completions_are_a_user_error(completions, tmp_path, capsys):
    # null and non-object entries were a TypeError traceback; a string or an object was silently read as no
    # completion at all (iterated as characters or keys).
    data = tmp_path / "uf.jsonl"
    records = [*uf_records(), {"prompt": "p9", "completions": completions}]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert cli.main(["splits", "--data", str(data), "--output", str(tmp_path / "out"), "--valid-models", "C,D"]) == 2
    line = one_error_line(capsys)
    assert f"record {len(records) - 1}" in line and "'completions'" in line, line
    assert not (tmp_path / "out").exists()


def refuse_to_load(monkeypatch):
    monkeypatch.setattr(cli, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model loaded"))


def test_cli_generate_mtbench_category_not_a_string(tmp_path, saved_model, capsys, monkeypatch):
    # An unhashable category was a TypeError traceback (dict lookup of FastChat's temperatures), after the model
    # had loaded; it is a malformed question, found with the others before anything loads.
    refuse_to_load(monkeypatch)
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 81, "category": ["math"], "turns": ["2+2?"]}) + "\n")
    assert cli.main(["generate", "--model", str(saved_model), "--instructions", str(questions), "--format", "mtbench",
                     "--output", str(tmp_path / "answers.jsonl"), "--device", "cpu", "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "record 0" in line and "category" in line, line


def test_cli_generate_mtbench_duplicate_question_id(tmp_path, saved_model, capsys, monkeypatch):
    # Two questions with one id got one answer_id; FastChat's judge keys answers by question_id and kept one.
    refuse_to_load(monkeypatch)
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps({"question_id": 81, "category": "writing", "turns": [turn]}) + "\n"
                                 for turn in ("a poem", "a song")))
    assert cli.main(["generate", "--model", str(saved_model), "--instructions", str(questions), "--format", "mtbench",
                     "--output", str(tmp_path / "answers.jsonl"), "--device", "cpu", "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "record 1" in line and "question_id 81" in line, line


def test_cli_rmbench_drops_an_empty_response_with_a_chat_template_too(tmp_path, tiny_model, tiny_tokenizer):
    # With a chat template the empty response was rendered as the template's end-of-turn text and scored as an
    # answer: the prompt stayed in the headline, while the same file scored without a template dropped it.
    records = rmbench_records(["chat", "math", "code", "safety-refuse"])
    records[1]["chosen"][0] = ""
    data_file = tmp_path / "total_dataset.json"
    data_file.write_text(json.dumps(records))
    end_of_turn = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                   "{% if add_generation_prompt %}assistant{% endif %}")  # each turn ends with EOS, as Llama-3's
    model = save_model(tmp_path / "model", tiny_model, tiny_tokenizer, end_of_turn)
    out = tmp_path / "rmb.json"
    for template in ("auto", "none"):
        assert cli.main(["rmbench", "--model", model, "--data", str(data_file), "--output", str(out), "--device", "cpu",
                         "--no-progress", "--chat-template", template]) == 0
        res = json.loads(out.read_text())
        assert (res["chat_template"], res["n_dropped"], res["pooled"]["n"]) == (template == "auto", 1, 3), template


def test_cli_a_model_scoring_nan_is_a_user_error(tmp_path, tiny_model, tiny_tokenizer, capsys):
    """A model whose outputs are not finite (a NaN lm_head row here; an fp16 overflow alike) is a one-line error
    naming it, in rank and rmbench: ranked, its pairs counted as wrong (accuracy 0, a zero-width interval, exit
    0), and rmbench took its NaN scores for empty responses ("no scorable prompt")."""
    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        broken.lm_head.weight[5] = float("nan")
    model = save_model(tmp_path / "model", broken, tiny_tokenizer)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "the cat", "chosen": "sat on the mat", "rejected": "ran far away"}) + "\n")
    data_file = tmp_path / "total_dataset.json"
    data_file.write_text(json.dumps(rmbench_records(["chat", "math"])))
    for command, data in (("rank", pairs), ("rmbench", data_file)):
        assert cli.main([command, "--model", str(model), "--data", str(data), "--device", "cpu", "--no-progress"]) == 2
        assert f"--model {model}: " in (line := one_error_line(capsys)), line
        assert "pairs scored a non-finite log-prob (NaN or inf)" in line, (command, line)


def test_cli_rank_prints_the_ties(tmp_path, saved_model, capsys):
    """A pair whose two responses are the same text ties, counted wrong: the printed accuracy says so (before,
    only the JSON's `ties` did, and a tie looked like a wrong ranking)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "the cat", "chosen": "sat on the mat", "rejected": "sat on the mat"}) + "\n"
                    + json.dumps({"prompt": "a dog", "chosen": "good answer", "rejected": "bad"}) + "\n")
    assert cli.main(["rank", "--model", str(saved_model), "--data", str(data), "--device", "cpu", "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ranking accuracy")]
    assert len(lines) == 2 and all(line.endswith(" (1 tie(s), counted wrong)") for line in lines), lines
