"""The miniature study's command, end to end at smoke size: table, JSON and both plots."""

import json

from amapo_train import study


def test_quick_study_writes_table_and_plots(tmp_path):
    out = tmp_path / "study"
    result = study.main(["--quick", "--out-dir", str(out), "--runs-dir", str(tmp_path / "runs")])
    report = (out / "results.md").read_text()
    for name, _, _ in study.METHODS:
        assert f"| {name} |" in report
    for split in study.SPLITS:
        assert split in report
    assert "HH-RLHF" in report and set(result["hh_rlhf"]) == {"SimPO", "AMaPO"}
    saved = json.loads((out / "results.json").read_text())
    for name, _, _ in study.METHODS:
        entry = saved["synthetic"][name]
        assert len(entry["wrong_share"]) == saved["config"]["pref_steps"]
        assert all(0.0 <= share <= 1.0 for share in entry["wrong_share"])
        for split in study.SPLITS:
            assert entry[split]["ci_low"] <= entry[split]["accuracy"] <= entry[split]["ci_high"]
    for png in ("accuracy.png", "gradient_allocation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_decides_the_winner():
    task = study.Task(study.StudyConfig())
    import torch

    for pair in task.pairs(50, "ood", "ood", torch.Generator().manual_seed(3)):
        prompt = torch.tensor(pair["prompt"])
        assert task.reward(prompt, torch.tensor(pair["chosen"])) > task.reward(prompt, torch.tensor(pair["rejected"]))
