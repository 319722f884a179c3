"""results.md and the plots, from the summary that statistics.summarize builds."""

from pathlib import Path

import torch

from amapo_train.study.task import SPLITS

DEFAULT_COMMAND = "python -m amapo_train.study"  # results.json written before it recorded its command line


def setting_text(setting: dict) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in setting.items())


def cell(stats: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{100 * stats['mean']:{sign}.1f} [{100 * stats['ci_low']:{sign}.1f}, {100 * stats['ci_high']:{sign}.1f}]"


def mean_share(entry: dict) -> str:
    return f"{sum(entry['wrong_share']) / len(entry['wrong_share']):.2f}" if "wrong_share" in entry else "-"


def markdown(result: dict) -> str:
    config, summary, timing = result["config"], result["summary"], result["timing"]
    baseline, pools = summary["baseline"], summary["pools"]
    header = "| " + " | ".join(SPLITS) + " |"
    rule = "---|" * len(SPLITS)
    lines = [
        "# Miniature AMaPO study",
        "",
        f"Synthetic task (`python/amapo_train/study/task.py`), seeds {list(config['seeds'])}. Per seed, every method "
        f"starts from one shared SFT policy and trains {config['pref_steps']} steps of {config['batch_pairs']} pairs "
        f"with each setting of its {len(next(iter(summary['grid'].values())))}-setting grid; the setting with the best "
        f"validation accuracy (fresh pairs of ID prompts, mean over seeds) is reported on the test splits "
        f"({config['eval_pairs']} pairs each per seed). Cells: ranking accuracy (%) on length-normalized log-probs, "
        f"mean over seeds [95% bootstrap interval, resampling seeds and then pairs]. `wrong share`: the share of "
        f"d_theta (|dL/d chosen logp| + |dL/d rejected logp|) on wrongly ranked pairs, mean over steps and seeds.",
        "",
        "## Tuned methods",
        "",
        "| method | chosen setting | valid " + header + " wrong share |",
        "|---|---|---|" + rule + "---|",
    ]
    for name, entry in summary["tuned"].items():
        setting = setting_text(entry["setting"]) if "setting" in entry else "-"
        valid = f"{100 * entry['valid']:.1f}" if "valid" in entry else "-"
        lines.append(f"| {name} | {setting} | {valid} | " + " | ".join(cell(entry[s]) for s in SPLITS)
                     + f" | {mean_share(entry)} |")
    lines += ["", f"## Paired differences against {baseline}", "",
              f"Accuracy minus {baseline}'s (points), both at their tuned settings: mean over seeds of the per-seed "
              "difference on the same test pairs [95% bootstrap interval over seeds and pairs]; per-seed differences "
              "in results.json.", "", "| comparison " + header, "|---|" + rule]
    for name, by_split in summary["paired"].items():
        lines.append(f"| {name} - {baseline} | " + " | ".join(cell(by_split[s], signed=True) for s in SPLITS) + " |")
    lines += ["", "## Statistics pool", "",
              f"{pools['method']} at its tuned setting ({setting_text(pools['setting'])}) with the batch statistics "
              f"computed over pools of 4-32 pairs: each optimizer step still sums the gradients of "
              f"{config['batch_pairs']} pairs (gradient accumulation over micro-batches of one pool). The paper's "
              "Table 11 in miniature.", "", "| pool (pairs) " + header + " wrong share |", "|---|" + rule + "---|"]
    for pool, entry in pools["by_pool"].items():
        lines.append(f"| {pool} | " + " | ".join(cell(entry[s]) for s in SPLITS) + f" | {mean_share(entry)} |")
    lines += ["", f"Difference to {baseline} (points, paired as above):", "",
              "| pool (pairs) " + header, "|---|" + rule]
    for pool, entry in pools["by_pool"].items():
        lines.append(f"| {pool} | " + " | ".join(cell(entry["vs_baseline"][s], signed=True) for s in SPLITS) + " |")
    lines += ["", "## Grid", "", "Validation accuracy (%) of every setting, mean over seeds; **bold**: chosen.", ""]
    for name, rows in summary["grid"].items():
        chosen = summary["tuned"][name]["setting"]
        parts = [(f"**{setting_text(r['setting'])}: {100 * r['valid']:.1f}**" if r["setting"] == chosen
                  else f"{setting_text(r['setting'])}: {100 * r['valid']:.1f}") for r in rows]
        lines.append(f"- {name}: " + "; ".join(parts))
    lines += ["", f"Run time: {timing['total_seconds'] / 60:.1f} min on {timing['device']} with {timing['workers']} "
              f"worker process(es); {timing['runs']} preference runs, {timing['run_seconds_mean']:.1f} s each on "
              f"average (wall time inside a worker). Regenerate: `{result.get('command', DEFAULT_COMMAND)}`."]
    return "\n".join(lines) + "\n"


def plots(summary: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def errors(entries):
        return [[100 * (e["mean"] - e["ci_low"]) for e in entries], [100 * (e["ci_high"] - e["mean"]) for e in entries]]

    tuned = summary["tuned"]
    names = list(tuned)
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        entries = [tuned[name][s] for s in SPLITS]
        ax.bar([j + i * width for j in range(len(SPLITS))], [100 * e["mean"] for e in entries], width,
               yerr=errors(entries), label=name, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SPLITS))], SPLITS)
    ax.set_ylabel("ranking accuracy (%)")
    low = min(100 * tuned[n][s]["ci_low"] for n in names for s in SPLITS)
    ax.set_ylim(max(0, low - 5), 100)
    ax.legend(ncol=5, fontsize=8)
    ax.set_title("Tuned methods: ranking accuracy by split (mean over seeds, bootstrap 95% intervals)")
    paths = [save(fig, "accuracy.png")]

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        if "wrong_share" in tuned[name]:
            share = torch.tensor(tuned[name]["wrong_share"])
            smooth = torch.nn.functional.avg_pool1d(share[None, None], 9, 1, 4, count_include_pad=False)[0, 0]
            ax.plot(smooth.tolist(), label=name)
    ax.set_xlabel("preference step")
    ax.set_ylabel("share of d_theta on wrongly ranked pairs")
    ax.legend(fontsize=8)
    ax.set_title("Gradient allocation, tuned settings (mean over seeds)")
    paths.append(save(fig, "gradient_allocation.png"))

    fig, ax = plt.subplots(figsize=(10, 4))
    baseline = summary["baseline"]
    series = {f"{name} - {baseline}": summary["paired"][name] for name in summary["paired"]}
    series.update({f"{summary['pools']['method']}, pool {pool} - {baseline}": entry["vs_baseline"]
                   for pool, entry in summary["pools"]["by_pool"].items()
                   if int(pool) != summary["pools"]["batch_pairs"]})  # the full batch is the tuned row
    width = 0.8 / len(series)
    for i, (name, by_split) in enumerate(series.items()):
        entries = [by_split[s] for s in SPLITS]
        ax.errorbar([j + i * width for j in range(len(SPLITS))], [100 * e["mean"] for e in entries],
                    yerr=errors(entries), fmt="o", capsize=3, label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SPLITS))], SPLITS)
    ax.set_ylabel(f"accuracy minus {baseline} (points)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Paired differences (mean over seeds, bootstrap 95% intervals)")
    paths.append(save(fig, "paired_difference.png"))
    return paths
