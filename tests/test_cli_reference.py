"""The README's CLI reference is the current `--help` of the console scripts (tools/cli_reference.py)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_cli_reference_is_current():
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "cli_reference.py"), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr + "\n(run: python tools/cli_reference.py)"


def cli_reference_tool():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_fails_on_a_stale_readme_and_a_plain_run_rewrites_it(tmp_path, monkeypatch, capsys):
    tool = cli_reference_tool()
    monkeypatch.setattr(tool, "block", lambda: f"{tool.BEGIN}\ncurrent\n{tool.END}")  # no --help builds: fast
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{tool.BEGIN}\nstale\n{tool.END}\noutro\n", encoding="utf-8")
    monkeypatch.setattr(tool, "README", readme)
    assert tool.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert tool.main([]) == 0
    assert readme.read_text(encoding="utf-8") == f"intro\n{tool.BEGIN}\ncurrent\n{tool.END}\noutro\n"
    assert tool.main(["--check"]) == 0


@pytest.mark.parametrize("readme", ["no markers", "<!-- cli-reference: end -->\n<!-- cli-reference: begin "
                                                  "(tools/cli_reference.py) -->"])
def test_missing_or_misordered_markers_stop_the_tool(readme):
    with pytest.raises(SystemExit, match="markers"):
        cli_reference_tool().updated(readme)
