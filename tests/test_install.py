"""Install diagnostics: a failed import names its cause and fix, a torch other than the one the extension
was compiled against warns, and an isolated build stops at once with the --no-build-isolation message.
The end-to-end install paths (fresh venv, other torch) are exercised by scripts/check_install.sh in CI."""

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from amapo_kernels import _C, _extension

ROOT = Path(__file__).resolve().parents[1]


def test_extension_records_the_torch_it_was_built_against():
    assert _C.torch_version == torch.__version__


# libstdc++'s own stream and locale symbols (never instantiated from its headers: extern templates).
RUNTIME_SYMBOL = re.compile(r"_ZNK?St6locale|_ZNK?So|_ZNK?Si|_ZNK?St8ios_base")


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_module_exports_no_copy_of_the_cpp_runtime():
    """A toolchain that links parts of libstdc++ statically must not export them (CMakeLists.txt,
    --exclude-libs): on the GPU image they interposed with the process's libstdc++ and the first error
    message with a number in it segfaulted."""
    symbols = subprocess.run(["nm", "-D", "--defined-only", _C.__file__], capture_output=True, text=True,
                             check=True).stdout
    exported = [line.split()[-1] for line in symbols.splitlines() if RUNTIME_SYMBOL.search(line)]
    assert not exported, f"{len(exported)} libstdc++ symbols exported, e.g. {exported[:3]}"


def test_torch_mismatch_warns_and_names_both_versions():
    with pytest.warns(_extension.TorchMismatchWarning, match=r"compiled against torch 2\.0\.0 .* torch 9\.9\.9"):
        _extension.check_torch_version("2.0.0", running="9.9.9")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _extension.check_torch_version(torch.__version__)


def fake_package(directory: Path, *, built: bool) -> Path:
    package = directory / "amapo_kernels"
    package.mkdir(parents=True)
    if built:
        (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    return package


def explain(monkeypatch, package_dir: Path, sys_path: list[str]) -> str:
    monkeypatch.setattr(_extension, "PACKAGE_DIR", package_dir)
    monkeypatch.setattr(sys, "path", sys_path)
    return _extension.explain_import_error(ImportError("cannot import name '_C'"))


def test_source_tree_shadowing_an_install_is_named(tmp_path, monkeypatch):
    tree = fake_package(tmp_path / "repo", built=False)
    installed = fake_package(tmp_path / "site-packages", built=True)
    message = explain(monkeypatch, tree, [str(tree.parent), str(installed.parent)])
    assert f"source tree {tree} shadows the installed package {installed}" in message
    assert "Run from another directory" in message and "pip install --no-build-isolation -e ." in message


def test_missing_build_is_named(tmp_path, monkeypatch):
    tree = fake_package(tmp_path / "repo", built=False)
    message = explain(monkeypatch, tree, [str(tree.parent)])
    assert "compiled extension is missing" in message and "pip install --no-build-isolation -e ." in message


def test_build_that_does_not_load_names_the_torch(tmp_path, monkeypatch):
    tree = fake_package(tmp_path / "repo", built=True)
    message = explain(monkeypatch, tree, [str(tree.parent)])
    assert f"does not load under torch {torch.__version__}" in message and "another torch" in message


def test_failed_import_raises_the_explanation(monkeypatch):
    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(_extension.importlib, "import_module", broken)
    with pytest.raises(ImportError, match="does not load under torch") as caught:
        _extension.load()
    assert "undefined symbol" in str(caught.value)


def test_another_copys_extension_is_refused(tmp_path, monkeypatch):
    """With an editable install of another checkout in the environment, this tree's `amapo_kernels._C`
    resolved to that checkout's build, silently (its kernels under this tree's Python code)."""
    other = fake_package(tmp_path / "other-checkout", built=True)
    monkeypatch.setattr(_extension.importlib, "import_module", lambda name: _module_at(other))
    with pytest.raises(ImportError, match="loaded the compiled extension of another copy") as caught:
        _extension.load()
    assert str(other) in str(caught.value) and str(_extension.PACKAGE_DIR) in str(caught.value)
    _extension.check_from_this_package(_C)  # this package's own build passes


def _module_at(package: Path):
    module = type(sys)("amapo_kernels._C")
    module.__file__ = str(next(package.glob("_C*.so")))
    return module


def test_isolated_build_stops_at_once_with_the_reason():
    """Under pip's build isolation torch is not importable (it is no build requirement): setup.py exits."""
    blocked_torch = "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; " \
                    "runpy.run_path('setup.py', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", blocked_torch], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "pip install --no-build-isolation ." in result.stderr and "Traceback" not in result.stderr


def test_numpy_is_a_declared_dependency():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.split()[0].startswith("numpy") for dep in project["dependencies"])
    assert "torch" not in str(tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"])



@pytest.mark.parametrize("interpreter", ["/nonexistent/python3", shutil.which("true") or "/bin/true"])
def test_test_command_refuses_an_interpreter_that_is_not_python(interpreter):
    """AMAPO_PYTHON names the interpreter to test with: one that is missing, or exits 0 without being Python,
    must stop the test command with exit status 2, never pass it with no test run."""
    run = subprocess.run(["bash", str(ROOT / "scripts" / "test.sh"), "-q"], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "AMAPO_PYTHON": interpreter})
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"AMAPO_PYTHON={interpreter} is not a Python interpreter" in run.stderr


@pytest.mark.parametrize("value, builds", [("maybe", None), ("no", False), ("yes", True), ("0", False)])
def test_amapo_cuda_takes_only_known_values(value, builds):
    """AMAPO_CUDA: 1/on/true/yes, 0/off/false/no or auto; anything else once meant "auto" silently (so "no"
    built the CUDA kernels). Checked through setup.py's own want_cuda, without building."""
    code = ("import sys, runpy; sys.argv = ['setup.py', '--name']; "
            "env = runpy.run_path('setup.py', run_name='not_main'); print('choice', env['want_cuda']())")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "AMAPO_CUDA": value})
    if builds is None:
        assert result.returncode != 0 and "AMAPO_CUDA must be 1" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    elif builds is False:
        assert "choice None" in result.stdout, result.stdout + result.stderr
    else:  # required: a toolkit is found here (CI's nvcc) and torch is a CUDA build, or it says why not
        assert ("choice /" in result.stdout) or "AMAPO_CUDA=1 but" in result.stderr, result.stdout + result.stderr


def test_a_cmake_too_old_is_named(tmp_path):
    """A cmake older than CMakeLists.txt's minimum (the system's 3.25 here) was run anyway: CMake's own error
    and a traceback of the whole command, never the fix. setup.py now reads its version first."""
    fake = tmp_path / "cmake"
    fake.write_text("#!/bin/sh\necho 'cmake version 3.25.1'\n")
    fake.chmod(0o755)
    code = ("import sys, runpy; sys.argv = ['setup.py', '--name']; env = runpy.run_path('setup.py', "
            f"run_name='not_main'); print('version', env['cmake_version']({str(fake)!r}), env['MIN_CMAKE'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "version (3, 25) (3, 26)" in result.stdout, result.stdout + result.stderr
    assert "cmake_minimum_required(VERSION 3.26)" in (ROOT / "CMakeLists.txt").read_text()
