"""The README's main command runs the demo; a small version of it here."""

from amapo_kernels import demo


def test_demo_runs_and_agrees(capsys):
    demo.main(["--pairs", "2", "--steps", "16", "--vocab", "64", "--repeats", "1"])
    out = capsys.readouterr().out
    for method in ("dpo", "simpo", "amapo"):
        assert f"\n{method} " in out
    worst = float(out.split("worst relative loss difference, op (fp32) vs reference (fp64): ")[1].split()[0])
    assert worst < 1e-5
