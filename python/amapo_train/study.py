"""A miniature AMaPO study: does the adaptive margin raise ranking accuracy in and out of distribution?

    python -m amapo_train.study                      # default size, CPU, well under 30 minutes
    python -m amapo_train.study --quick              # a smoke-sized run (the test suite's)
    python -m amapo_train.study --scale 4 --device cuda

Synthetic task (an oracle decides which response wins):
- A prompt is `prompt_len` tokens from a prompt distribution; its topic is the class of its first token.
  Train prompts and shifted (OOD) prompts draw tokens from different unigram profiles.
- A response comes from one of several response models (each a unigram profile over content tokens);
  train-time models and held-out (OOD) models differ. Responses are 5-10 tokens long.
- The oracle reward is the mean over the response of W[topic, token] (W fixed, random): the winner of two
  responses to one prompt is the one with the higher reward.
- Splits as the AMaPO paper's Table 4: ID (train prompt distribution and response models, unseen pairs),
  Prompt-OOD (shifted prompts, train models), Response-OOD (train prompts, held-out models), Mutual-OOD.
A tiny Llama is first fitted to responses of the train models (SFT), then trained with DPO, SimPO, AMaPO
and AMaPO's four ablations, several seeds each. Ranking accuracy uses length-normalized log-probs, with
a bootstrap 95% interval over the pooled pairs of all seeds. The gradient-allocation view is the paper's
d_theta: per pair, |dL/d chosen_logp| + |dL/d rejected_logp|; we report the share on wrongly ranked pairs.
A second part runs the same methods with `amapo-train`'s tiny default on the bundled HH-RLHF pairs."""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import amapo_kernels as ak
from amapo_train.eval.ranking import ranking_accuracy
from amapo_train.model import tiny_llama

BOS, EOS, PAD, FIRST_CONTENT = 0, 1, 2, 3
IGNORE = -100
SPLITS = ("ID", "Prompt-OOD", "Response-OOD", "Mutual-OOD")
METHODS = (
    ("DPO", "dpo", None),
    ("SimPO", "simpo", None),
    ("AMaPO", "amapo", None),
    ("w/o z-norm", "amapo", "no_znorm"),
    ("w/o exp", "amapo", "no_exp"),
    ("w/o adaptive", "amapo", "no_adaptive"),
    ("w/o zero", "amapo", "no_zero"),
)
HPARAMS = {"dpo": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma": 1.0}, "amapo": {"beta": 2.0}}


@dataclasses.dataclass
class StudyConfig:
    vocab: int = 48
    topics: int = 4
    prompt_len: int = 6
    response_len: tuple = (5, 10)
    train_models: int = 4
    ood_models: int = 2
    train_pairs: int = 8192
    eval_pairs: int = 1024
    sft_steps: int = 300
    pref_steps: int = 400
    batch_pairs: int = 64
    sft_lr: float = 2e-3
    pref_lr: float = 5e-4
    seeds: tuple = (0, 1, 2, 3, 4)
    hh_pairs: int | None = None  # HH-RLHF part: train pairs (None: all of the bundled train split)
    hh_methods: tuple = tuple(name for name, _, _ in METHODS)
    device: str = "cpu"


# ----------------------------------------------------------------------------------------------------
# The synthetic task
# ----------------------------------------------------------------------------------------------------


class Task:
    """The fixed world of the study: token profiles, response models and the oracle."""

    def __init__(self, config: StudyConfig, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        content = config.vocab - FIRST_CONTENT
        self.config = config
        self.oracle = torch.randn(config.topics, config.vocab, generator=g)
        self.prompt_profiles = {
            "train": torch.distributions.Dirichlet(torch.full((content,), 0.5)).sample(),
            "ood": torch.distributions.Dirichlet(torch.full((content,), 0.5)).sample(),
        }
        self.model_profiles = {
            "train": [torch.distributions.Dirichlet(torch.full((content,), 0.3)).sample()
                      for _ in range(config.train_models)],
            "ood": [torch.distributions.Dirichlet(torch.full((content,), 0.3)).sample()
                    for _ in range(config.ood_models)],
        }

    def topic(self, prompt: torch.Tensor) -> int:
        return int(prompt[0]) % self.config.topics

    def reward(self, prompt: torch.Tensor, response: torch.Tensor) -> float:
        return self.oracle[self.topic(prompt), response].mean().item()

    def pairs(self, count: int, prompts: str, models: str, generator: torch.Generator) -> list[dict]:
        """`count` (prompt, chosen, rejected) token lists; chosen has the higher oracle reward."""
        low, high = self.config.response_len
        out = []
        while len(out) < count:
            prompt = FIRST_CONTENT + torch.multinomial(self.prompt_profiles[prompts], self.config.prompt_len,
                                                       replacement=True, generator=generator)
            picks = torch.randperm(len(self.model_profiles[models]), generator=generator)[:2]
            responses = []
            for model in picks.tolist():
                length = int(torch.randint(low, high + 1, (1,), generator=generator))
                responses.append(FIRST_CONTENT + torch.multinomial(self.model_profiles[models][model], length,
                                                                   replacement=True, generator=generator))
            rewards = [self.reward(prompt, r) for r in responses]
            if rewards[0] == rewards[1]:
                continue
            chosen, rejected = (responses[0], responses[1]) if rewards[0] > rewards[1] else (responses[1], responses[0])
            out.append({"prompt": prompt.tolist(), "chosen": chosen.tolist(), "rejected": rejected.tolist()})
        return out

    def splits(self, generator: torch.Generator) -> dict:
        n = self.config.eval_pairs
        return {
            "ID": self.pairs(n, "train", "train", generator),
            "Prompt-OOD": self.pairs(n, "ood", "train", generator),
            "Response-OOD": self.pairs(n, "train", "ood", generator),
            "Mutual-OOD": self.pairs(n, "ood", "ood", generator),
        }


def encode(pairs: list[dict], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [2N, L]: chosen rows first; labels -100 on bos, prompt and padding."""
    rows = [[BOS, *p["prompt"], *p[side], EOS] for side in ("chosen", "rejected") for p in pairs]
    prompt_lens = [1 + len(p["prompt"]) for _ in ("chosen", "rejected") for p in pairs]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), PAD)
    labels = torch.full((len(rows), length), IGNORE)
    for i, (row, start) in enumerate(zip(rows, prompt_lens)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, start: len(row)] = torch.tensor(row[start:])
    return ids.to(device), labels.to(device)


def logps_of(model, ids, labels, average=True):
    # Right padding under a causal mask: no real token attends to a pad, so no attention mask is needed.
    return ak.sequence_logps(model(input_ids=ids).logits, labels, shift=True, average=average)


# ----------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------


def sft(task: Task, config: StudyConfig, seed: int):
    """The starting policy: a tiny Llama fitted to responses of the train-time models."""
    torch.manual_seed(seed)
    model = tiny_llama(config.vocab, seed=seed).to(config.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.sft_lr)
    generator = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(config.sft_steps):
        ids, labels = encode(task.pairs(config.batch_pairs, "train", "train", generator), config.device)
        loss = -logps_of(model, ids, labels).mean()  # NLL per token, chosen and rejected alike
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def preference_train(model, train_pairs, config: StudyConfig, method: str, ablation, seed: int, reference=None):
    """Trains in place; returns the per-step share of d_theta on wrongly ranked pairs."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.pref_lr)
    order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(seed))
    average = method != "dpo"
    shares = []
    for step in range(config.pref_steps):
        start = (step * config.batch_pairs) % len(train_pairs)
        index = order[start: start + config.batch_pairs]
        ids, labels = encode([train_pairs[i] for i in index.tolist()], config.device)
        logps = logps_of(model, ids, labels, average=average)
        logps.retain_grad()
        n = len(index)
        kwargs = dict(HPARAMS[method])
        if ablation:
            kwargs["ablation"] = ablation
        if reference is not None:
            kwargs.update(ref_chosen_logps=reference[index, 0], ref_rejected_logps=reference[index, 1])
        loss = ak.preference_loss(logps[:n], logps[n:], method=method, **kwargs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weight = logps.grad[:n].abs() + logps.grad[n:].abs()
        wrong = logps.detach()[:n] <= logps.detach()[n:]
        shares.append((weight[wrong].sum() / weight.sum().clamp_min(1e-30)).item())
    return shares


@torch.no_grad()
def reference_table(model, pairs, config):
    rows = []
    for start in range(0, len(pairs), 256):
        ids, labels = encode(pairs[start: start + 256], config.device)
        logps = logps_of(model, ids, labels, average=False)
        half = logps.shape[0] // 2
        rows.append(torch.stack([logps[:half], logps[half:]], 1))
    return torch.cat(rows)


@torch.no_grad()
def correct_pairs(model, pairs, config) -> torch.Tensor:
    table = []
    for start in range(0, len(pairs), 256):
        ids, labels = encode(pairs[start: start + 256], config.device)
        logps = logps_of(model, ids, labels, average=True)
        half = logps.shape[0] // 2
        table.append(logps[:half] > logps[half:])
    return torch.cat(table).cpu()


def synthetic_study(config: StudyConfig, log=print) -> dict:
    task = Task(config)
    results = {name: {"correct": {s: [] for s in SPLITS}, "shares": []} for name, _, _ in METHODS}
    results["SFT"] = {"correct": {s: [] for s in SPLITS}, "shares": []}
    for seed in config.seeds:
        generator = torch.Generator().manual_seed(seed)
        train_pairs = task.pairs(config.train_pairs, "train", "train", generator)
        eval_splits = task.splits(generator)
        start = time.perf_counter()
        base = sft(task, config, seed)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for split, pairs in eval_splits.items():
            results["SFT"]["correct"][split].append(correct_pairs(base, pairs, config))
        reference = reference_table(base, train_pairs, config)
        for name, method, ablation in METHODS:
            base.load_state_dict(state)
            shares = preference_train(base, train_pairs, config, method, ablation, seed,
                                      reference if method == "dpo" else None)
            results[name]["shares"].append(shares)
            for split, pairs in eval_splits.items():
                results[name]["correct"][split].append(correct_pairs(base, pairs, config))
        log(f"seed {seed}: SFT + {len(METHODS)} methods in {time.perf_counter() - start:.0f} s")
    return summarize(results)


def summarize(results: dict) -> dict:
    summary = {}
    for name, result in results.items():
        entry = {split: ranking_accuracy(torch.cat(result["correct"][split])) for split in SPLITS}
        entry["per_seed"] = {split: [c.float().mean().item() for c in result["correct"][split]] for split in SPLITS}
        if result["shares"]:
            entry["wrong_share"] = torch.tensor(result["shares"]).mean(0).tolist()
        summary[name] = entry
    return summary


def hh_rlhf_study(config: StudyConfig, runs_dir: Path, log=print) -> dict:
    """The same comparison with amapo-train's tiny default on the bundled HH-RLHF pairs (one seed)."""
    from amapo_train.config import TrainConfig
    from amapo_train.train import train

    summary = {}
    for name, method, ablation in METHODS:
        if name not in config.hh_methods:
            continue
        hparams = {"ablation": ablation} if ablation else {}
        run = TrainConfig.from_recipe("tiny", loss=method, hparams={**HPARAMS[method], **hparams},
                                      output_dir=str(runs_dir / name.replace("/", "").replace(" ", "-")),
                                      max_train_pairs=config.hh_pairs, log_with="none", save_steps=None,
                                      device="cpu" if config.device == "cpu" else None)
        start = time.perf_counter()
        summary[name] = train(run)["eval"]
        log(f"HH-RLHF {name}: {time.perf_counter() - start:.0f} s")
    return summary


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def cell(stats: dict) -> str:
    return f"{100 * stats['accuracy']:.1f} [{100 * stats['ci_low']:.1f}, {100 * stats['ci_high']:.1f}]"


def markdown(summary: dict, hh: dict, config: StudyConfig, seconds: float) -> str:
    lines = [
        "# Miniature AMaPO study",
        "",
        f"Synthetic task, seeds {list(config.seeds)}; ranking accuracy (%) on length-normalized log-probs with a "
        f"bootstrap 95% interval over the {config.eval_pairs} pairs per split of every seed pooled; "
        f"`wrong share`: the share of d_theta on wrongly ranked pairs over preference training (mean of steps).",
        "",
        "| method | " + " | ".join(SPLITS) + " | wrong share |",
        "|---|" + "---|" * (len(SPLITS) + 1),
    ]
    for name, entry in summary.items():
        share = f"{sum(entry['wrong_share']) / len(entry['wrong_share']):.2f}" if "wrong_share" in entry else "-"
        lines.append(f"| {name} | " + " | ".join(cell(entry[s]) for s in SPLITS) + f" | {share} |")
    if hh:
        lines += ["", "Bundled HH-RLHF (312 held-out pairs), tiny default model, one seed: held-out ranking "
                  "accuracy (%) with bootstrap 95% interval.", "",
                  "| method | length-normalized | summed |", "|---|---|---|"]
        for name, result in hh.items():
            lines.append(f"| {name} | {cell(result['normalized'])} | {cell(result['summed'])} |")
    lines += ["", f"Total time: {seconds / 60:.1f} min. Regenerate: `python -m amapo_train.study`."]
    return "\n".join(lines) + "\n"


def plots(summary: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        acc = [100 * summary[name][s]["accuracy"] for s in SPLITS]
        err = [[100 * (summary[name][s]["accuracy"] - summary[name][s]["ci_low"]) for s in SPLITS],
               [100 * (summary[name][s]["ci_high"] - summary[name][s]["accuracy"]) for s in SPLITS]]
        ax.bar([j + i * width for j in range(len(SPLITS))], acc, width, yerr=err, label=name, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SPLITS))], SPLITS)
    ax.set_ylabel("ranking accuracy (%)")
    low = min(100 * summary[n][s]["ci_low"] for n in names for s in SPLITS)
    ax.set_ylim(max(0, low - 5), 100)
    ax.legend(ncol=4, fontsize=8)
    ax.set_title("Ranking accuracy by split (bootstrap 95% intervals)")
    fig.tight_layout()
    accuracy_png = out_dir / "accuracy.png"
    fig.savefig(accuracy_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        if "wrong_share" in summary[name]:
            share = torch.tensor(summary[name]["wrong_share"])
            smooth = torch.nn.functional.avg_pool1d(share[None, None], 9, 1, 4, count_include_pad=False)[0, 0]
            ax.plot(smooth.tolist(), label=name)
    ax.set_xlabel("preference step")
    ax.set_ylabel("share of d_theta on wrongly ranked pairs")
    ax.legend(fontsize=8)
    ax.set_title("Gradient allocation (mean over seeds)")
    fig.tight_layout()
    share_png = out_dir / "gradient_allocation.png"
    fig.savefig(share_png, dpi=120)
    plt.close(fig)
    return [accuracy_png, share_png]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="benchmarks/study")
    parser.add_argument("--runs-dir", default="runs/study-hh-rlhf", help="checkpoints of the HH-RLHF runs")
    parser.add_argument("--quick", action="store_true", help="smoke size: 1 seed, few steps, 2 HH-RLHF methods")
    parser.add_argument("--scale", type=int, default=1, help="multiply pairs and steps (e.g. 4 on a GPU)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--no-hh", action="store_true", help="skip the HH-RLHF part")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    config = StudyConfig(device=args.device)
    if args.quick:
        config = dataclasses.replace(config, train_pairs=256, eval_pairs=128, sft_steps=10, pref_steps=10,
                                     seeds=(0,), hh_pairs=64, hh_methods=("SimPO", "AMaPO"))
    if args.scale > 1:
        config = dataclasses.replace(config, train_pairs=config.train_pairs * args.scale,
                                     sft_steps=config.sft_steps * args.scale, pref_steps=config.pref_steps * args.scale)
    if args.seeds:
        config = dataclasses.replace(config, seeds=tuple(args.seeds))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = synthetic_study(config)
    hh = {} if args.no_hh else hh_rlhf_study(config, Path(args.runs_dir))
    seconds = time.perf_counter() - start
    report = markdown(summary, hh, config, seconds)
    (out_dir / "results.md").write_text(report)
    (out_dir / "results.json").write_text(json.dumps({"config": dataclasses.asdict(config), "synthetic": summary,
                                                      "hh_rlhf": hh}, indent=1))
    pngs = plots(summary, out_dir)
    print(report)
    print("wrote", out_dir / "results.md", *pngs)
    return {"synthetic": summary, "hh_rlhf": hh, "report": report}


if __name__ == "__main__":
    main()
