"""Install diagnostics: a failed import names its cause and fix, a torch other than the one the extension
was compiled against warns, and an isolated build stops at once with the --no-build-isolation message.
The end-to-end install paths (fresh venv, other torch) are exercised by scripts/check_install.sh in CI."""

import contextlib
import io
import os
import re
import runpy
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from setuptools import Distribution

import amapo_kernels
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


def lower_bound(requirements: list[str], name: str) -> tuple[int, ...]:
    (bound,) = [re.fullmatch(rf"{name}>=([\d.]+)", req.replace(" ", "")).group(1) for req in requirements
                if re.match(rf"{name}\b", req)]
    return tuple(int(part) for part in bound.split("."))


def test_declared_lower_bounds_are_the_measured_ones(setup_py):
    """torch>=2.6 and transformers>=4.50 were declared, never run. Measured (this suite's kernel tests,
    each torch from PyPI in a fresh venv): torch 2.6 fails 9 torch.compile(fullgraph=True) tests (it cannot
    trace the from-hidden functions); 2.8 fails 4: the in-graph label and ODPO-score checks never fire, so
    an out-of-range label gives a finite log-prob instead of the RuntimeError; 2.9 and 2.10 pass them all.
    transformers 4.50 to 4.55 refuse from_pretrained(dtype=) (amapo-train --model, amapo-eval); 4.56 works.
    The README's "any torch >= X" must say the same as pyproject.toml."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_minimum = lower_bound(project["dependencies"], "torch")
    assert torch_minimum >= (2, 9) and setup_py["MIN_TORCH"] == torch_minimum  # --no-deps installs: setup.py checks
    assert lower_bound(project["optional-dependencies"]["train"], "transformers") >= (4, 56)
    readme = re.search(r"keep the torch you have \(any >= ([\d.]+)", (ROOT / "README.md").read_text()).group(1)
    assert readme == ".".join(map(str, torch_minimum))


@pytest.mark.parametrize("version, builds", [("2.8.0+cu128", False), ("2.6.0", False), ("2.9.0+cu128", True),
                                             ("2.10.0a0+git1234", True), ("3.0.0", True)])
def test_the_build_refuses_a_torch_older_than_the_bound(setup_py, version, builds):
    """`pip install --no-build-isolation --no-deps .` and AMAPO_USE_EXISTING_TORCH=1 never ask pip about torch's
    bound: setup.py stops on an older torch, naming both versions (2.8 compiled the ops without their checks)."""
    if builds:
        setup_py["check_torch_minimum"](version)
        return
    with pytest.raises(SystemExit, match=rf"amapo-kernels needs torch >= 2\.9, this Python has torch {re.escape(version)}"):
        setup_py["check_torch_minimum"](version)


def test_the_readmes_python_minimum_installs_the_pinned_requirements():
    """The README's two commands install requirements.txt: they promised Python >= 3.10, but its pins of
    transformers 5.23.0 and trl 1.16.0 declare Requires-Python >= 3.11 (pip on 3.10: "No matching
    distribution"). Every installed pin's Requires-Python must admit the README's minimum."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    promised = re.search(r"## Two commands\n.*?Python >= (3\.\d+)", (ROOT / "README.md").read_text(), re.DOTALL)
    assert promised, "the README's two commands name no Python minimum"
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==\S+", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    refusing = {}
    for name in pins:
        try:
            requires = metadata.metadata(name).get("Requires-Python") or ""
        except metadata.PackageNotFoundError:  # not installed here: nothing to read
            continue
        if not SpecifierSet(requires).contains(f"{promised.group(1)}.99"):
            refusing[name] = requires
    assert not refusing, f"README promises Python >= {promised.group(1)}, but {refusing}"


def test_sdist_holds_everything_the_build_and_the_tests_need(tmp_path):
    """An sdist of only the Python packages (setuptools' default: the extension has no listed sources) built
    into a wheel that stopped in CMake ("does not appear to contain CMakeLists.txt"). MANIFEST.in adds the
    build's inputs and the tests' helpers; built here with setup.py itself (no `build` package needed), its
    egg-info under tmp_path so the tree is left as it was."""
    import tarfile

    run = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                          "--dist-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (sdist,) = tmp_path.glob("amapo_kernels-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = {"setup.py", "pyproject.toml", "CMakeLists.txt", "tools/torch_build_info.py", "README.md", "LICENSE"}
    needed |= {str(path.relative_to(ROOT)) for path in (ROOT / "csrc").iterdir()}
    needed |= {f"tests/{name}" for name in ("conftest.py", "helpers.py", "emulated_cuda.py")}
    needed |= {str(path.relative_to(ROOT)) for path in (ROOT / "tests" / "cuda_emulation").iterdir()}
    data = ROOT / "python" / "amapo_train"
    needed |= {str(path.relative_to(ROOT)) for pattern in ("recipes/*.yaml", "configs/*.json", "data/*")
               for path in data.glob(pattern)}
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    assert not [name for name in names if name.endswith((".so", ".pyc"))]


@pytest.mark.parametrize("interpreter", ["/nonexistent/python3", shutil.which("true") or "/bin/true"])
def test_test_command_refuses_an_interpreter_that_is_not_python(interpreter):
    """AMAPO_PYTHON names the interpreter to test with: one that is missing, or exits 0 without being Python,
    must stop the test command with exit status 2, never pass it with no test run."""
    run = subprocess.run(["bash", str(ROOT / "scripts" / "test.sh"), "-q"], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "AMAPO_PYTHON": interpreter})
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"AMAPO_PYTHON={interpreter} is not a Python interpreter" in run.stderr


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's globals, loaded in this process (its setup() call with --name only prints the name): the
    functions look their helpers up there, so a test can replace them (monkeypatch.setitem)."""
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = ["setup.py", "--name"]
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            namespace = runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return namespace["want_cuda"].__globals__


@pytest.mark.parametrize("value, builds", [("maybe", None), ("no", False), ("yes", True), ("0", False)])
def test_amapo_cuda_takes_only_known_values(setup_py, monkeypatch, value, builds):
    """AMAPO_CUDA: 1/on/true/yes, 0/off/false/no or auto; anything else once meant "auto" silently (so "no"
    built the CUDA kernels). Checked through setup.py's own want_cuda, without building: a refusal is its
    sys.exit message (one line, no traceback)."""
    monkeypatch.setenv("AMAPO_CUDA", value)
    if builds is None:
        with pytest.raises(SystemExit, match="AMAPO_CUDA must be 1"):
            setup_py["want_cuda"]()
    elif builds is False:
        assert setup_py["want_cuda"]() is None
    else:  # required: a toolkit is found here (CI's nvcc) and torch is a CUDA build, or it says why not
        try:
            assert isinstance(setup_py["want_cuda"](), Path)
        except SystemExit as refusal:
            assert "AMAPO_CUDA=1 but" in str(refusal), refusal


def test_a_cmake_too_old_is_named(setup_py, tmp_path):
    """A cmake older than CMakeLists.txt's minimum (the system's 3.25 here) was run anyway: CMake's own error
    and a traceback of the whole command, never the fix. setup.py now reads its version first."""
    fake = tmp_path / "cmake"
    fake.write_text("#!/bin/sh\necho 'cmake version 3.25.1'\n")
    fake.chmod(0o755)
    assert (setup_py["cmake_version"](str(fake)), setup_py["MIN_CMAKE"]) == ((3, 25), (3, 26))
    assert "cmake_minimum_required(VERSION 3.26)" in (ROOT / "CMakeLists.txt").read_text()


def test_load_warns_when_the_extension_was_built_against_another_torch(monkeypatch):
    stale = types.ModuleType("amapo_kernels._C")
    stale.__file__, stale.torch_version = _C.__file__, "0.0.1"
    monkeypatch.setattr(_extension.importlib, "import_module", lambda name: stale)
    with pytest.warns(_extension.TorchMismatchWarning, match=r"compiled against torch 0\.0\.1"):
        assert _extension.load() is stale
    del stale.torch_version  # a build that does not record its torch: nothing to compare, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _extension.load()
        _extension.check_torch_version(None)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_has_cuda_kernels_says_whether_the_build_has_them():
    needed = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert amapo_kernels.has_cuda_kernels() == ("libtorch_cuda" in needed)


@pytest.mark.parametrize("arch_list, architectures", [
    ("9.0;8.0", "90-real;80-real"), ("9.0a", "90a-real"), ("8.6+PTX", "86"), (" 8.0 9.0,", "80-real;90-real"),
    ("9.0;", "90-real")])
def test_torch_cuda_arch_list_becomes_cmake_architectures(setup_py, monkeypatch, arch_list, architectures):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert setup_py["cuda_architectures"]() == architectures


def test_cuda_architectures_default_to_this_gpu_else_hopper(setup_py, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup_py["cuda_architectures"]() == "90-real"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert setup_py["cuda_architectures"]() == "89-real"


def test_amapo_cuda_auto_builds_the_cuda_kernels_where_it_can(setup_py, monkeypatch):
    want_cuda, toolkit = setup_py["want_cuda"], Path("/opt/cuda")
    monkeypatch.setitem(setup_py, "cuda_toolkit_root", lambda: toolkit)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("AMAPO_CUDA", raising=False)
    assert want_cuda() == toolkit
    for value, expected in [("auto", toolkit), (" On ", toolkit), ("OFF", None), ("false", None), ("true", toolkit)]:
        monkeypatch.setenv("AMAPO_CUDA", value)
        assert want_cuda() == expected, value
    monkeypatch.setitem(setup_py, "cuda_toolkit_root", lambda: None)
    monkeypatch.setenv("AMAPO_CUDA", "auto")
    assert want_cuda() is None
    monkeypatch.setenv("AMAPO_CUDA", "1")
    with pytest.raises(SystemExit, match="AMAPO_CUDA=1 but no CUDA toolkit was found"):
        want_cuda()


def test_a_cpu_only_torch_builds_no_cuda_kernels(setup_py, monkeypatch):
    monkeypatch.setitem(setup_py, "cuda_toolkit_root", lambda: Path("/opt/cuda"))
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setenv("AMAPO_CUDA", "auto")
    assert setup_py["want_cuda"]() is None
    monkeypatch.setenv("AMAPO_CUDA", "yes")
    with pytest.raises(SystemExit, match="is a CPU-only build"):
        setup_py["want_cuda"]()


def test_a_toolkit_of_another_cuda_major_than_torchs_is_not_used(setup_py, tmp_path, monkeypatch):
    """PyPI's torch 2.6.0+cu124 with nvcc 13.0 on PATH: auto built the CUDA kernels and stopped in the compiler
    ("cusparse.h: No such file or directory"). Auto now builds the CPU kernels only and says why; AMAPO_CUDA=1
    refuses, naming both versions. Through setup.py's own functions and an nvcc that answers as 13.0 does."""
    home = tmp_path / "cuda-13.0"
    nvcc = fake_nvcc(home / "bin", home)
    nvcc.write_text(nvcc.read_text() + "echo 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert setup_py["cuda_major"](home) == 13 and setup_py["cuda_major"](tmp_path / "none") is None
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("AMAPO_CUDA", "auto")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert setup_py["want_cuda"]() is None
    assert "is CUDA 13, torch" in printed.getvalue() and "building the CPU kernels only" in printed.getvalue()
    monkeypatch.setenv("AMAPO_CUDA", "1")
    with pytest.raises(SystemExit, match=r"AMAPO_CUDA=1 but the CUDA toolkit at .* is CUDA 13, torch .* CUDA 12\.4"):
        setup_py["want_cuda"]()
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # the same major: built
    assert setup_py["want_cuda"]() == home.resolve()


def fake_nvcc(bin_dir: Path, top: Path) -> Path:
    """An nvcc whose -dryrun names its toolkit root on stderr between other lines, as nvcc's does."""
    bin_dir.mkdir(parents=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _NVVM_BRANCH_=nvvm' >&2\necho '#$ TOP={top}/bin/..' >&2\n"
                    "echo '#$ PATH=/somewhere' >&2\n")
    nvcc.chmod(0o755)
    return nvcc


def test_toolkit_root_is_asked_of_nvcc_cuda_home_first(setup_py, tmp_path, monkeypatch):
    home, on_path = tmp_path / "cuda-home", tmp_path / "cuda-path"
    fake_nvcc(home / "bin", home)
    fake_nvcc(on_path / "bin", on_path)
    monkeypatch.setenv("PATH", str(on_path / "bin"))
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert setup_py["cuda_toolkit_root"]() == home.resolve()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit-here"))  # then PATH's nvcc
    assert setup_py["cuda_toolkit_root"]() == on_path.resolve()
    monkeypatch.setenv("PATH", str(tmp_path))
    assert setup_py["cuda_toolkit_root"]() is None


def test_build_tools_beside_the_interpreter_come_first(setup_py, tmp_path, monkeypatch):
    package_bin, path_bin = tmp_path / "package", tmp_path / "path"
    for directory in (package_bin, path_bin):
        directory.mkdir()
        (directory / "cmake").write_text("#!/bin/sh\n")
        (directory / "cmake").chmod(0o755)
    monkeypatch.setenv("PATH", str(path_bin))
    monkeypatch.setitem(sys.modules, "fake_cmake", types.SimpleNamespace(BIN_DIR=str(package_bin)))
    tool = setup_py["python_env_tool"]
    assert tool("fake_cmake", "BIN_DIR", "cmake") == str(package_bin / "cmake")
    (package_bin / "cmake").unlink()  # the package without the program: PATH's
    assert tool("fake_cmake", "BIN_DIR", "cmake") == str(path_bin / "cmake")
    monkeypatch.setitem(sys.modules, "fake_cmake", None)  # not installed
    assert tool("fake_cmake", "BIN_DIR", "cmake") == str(path_bin / "cmake")


def build_commands(setup_py, monkeypatch, tmp_path, cuda_root, cmake_version=(3, 26), tools=True) -> list[list[str]]:
    """The cmake command lines CMakeBuild runs (recorded, none run), in a build tree under tmp_path."""
    commands = []
    monkeypatch.setitem(setup_py, "ROOT", tmp_path)
    monkeypatch.setitem(setup_py, "want_cuda", lambda: cuda_root)
    monkeypatch.setitem(setup_py, "python_env_tool", lambda module, attribute, program: f"/tools/{program}" if tools else None)
    monkeypatch.setitem(setup_py, "cmake_version", lambda cmake: cmake_version)
    monkeypatch.setitem(setup_py, "subprocess", types.SimpleNamespace(run=lambda command, **kw: commands.append(command)))
    extension = setup_py["CMakeExtension"]("amapo_kernels._C")
    build = setup_py["CMakeBuild"](Distribution({"ext_modules": [extension]}))
    build.ensure_finalized()
    build.build_extension(extension)
    return commands


def test_build_passes_cmake_the_toolkit_architectures_and_cmake_args(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    monkeypatch.setenv("CMAKE_ARGS", '-DCMAKE_CUDA_FLAGS="-Xptxas -v" -DEXTRA=1')
    monkeypatch.setenv("MAX_JOBS", "3")
    configure, build = build_commands(setup_py, monkeypatch, tmp_path, Path("/opt/cuda"))
    assert configure[:3] == ["/tools/cmake", "-S", str(tmp_path)]
    build_dir = configure[configure.index("-B") + 1]
    assert Path(build_dir).parent == tmp_path / "build" and build_dir.endswith("-cuda")
    for arg in ["-DAMAPO_WITH_CUDA=ON", "-DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc",
                "-DAMAPO_CUDA_ARCHITECTURES=90a-real", "-DCMAKE_CUDA_FLAGS=-Xptxas -v", "-DEXTRA=1",
                "-DCMAKE_MAKE_PROGRAM=/tools/ninja", f"-DPython3_EXECUTABLE={sys.executable}"]:
        assert arg in configure, (arg, configure)
    assert configure[configure.index("-G") + 1] == "Ninja"
    output = next(arg for arg in configure if arg.startswith("-DCMAKE_LIBRARY_OUTPUT_DIRECTORY="))
    assert output.endswith("/amapo_kernels")  # the package's folder: the library lands as amapo_kernels/_C*.so
    assert build == ["/tools/cmake", "--build", build_dir, "--parallel", "3"]


def test_build_without_a_toolkit_is_cpu_only(setup_py, tmp_path, monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    configure, _ = build_commands(setup_py, monkeypatch, tmp_path, None)
    assert "-DAMAPO_WITH_CUDA=OFF" in configure and configure[configure.index("-B") + 1].endswith("-cpu")
    assert not any(arg.startswith(("-DCMAKE_CUDA_COMPILER", "-DAMAPO_CUDA_ARCHITECTURES")) for arg in configure)


def test_build_refuses_a_cmake_too_old_before_running_it(setup_py, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"cmake >= 3\.26 is needed to build \(found /tools/cmake, version 3\.25\)"):
        build_commands(setup_py, monkeypatch, tmp_path, None, cmake_version=(3, 25))
    with pytest.raises(SystemExit, match="cmake >= 3.26"):
        build_commands(setup_py, monkeypatch, tmp_path, None, cmake_version=(2, 99))
    with pytest.raises(SystemExit, match="cmake >= 3.26 is needed to build: pip install cmake"):
        build_commands(setup_py, monkeypatch, tmp_path, None, tools=False)  # no cmake at all


def test_a_cmake_that_does_not_say_its_version_is_too_old(setup_py, tmp_path):
    silent = tmp_path / "cmake"
    silent.write_text("#!/bin/sh\necho 'cmake: error while loading shared libraries' >&2\nexit 127\n")
    silent.chmod(0o755)
    assert setup_py["cmake_version"](str(silent)) == (0, 0)


def test_torch_build_info_describes_the_running_torch():
    from torch.utils import cpp_extension

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        runpy.run_path(str(ROOT / "tools" / "torch_build_info.py"), run_name="__main__")
    includes, library_dir, cxx11_abi, cuda_include, version = printed.getvalue().split(";")
    assert includes.split("|") == cpp_extension.include_paths()
    assert library_dir == cpp_extension.library_paths()[0] and (Path(library_dir) / "libtorch_cpu.so").exists()
    assert cxx11_abi == str(int(torch._C._GLIBCXX_USE_CXX11_ABI)) and version == torch.__version__
    wheels = Path(torch.__file__).parents[1] / "nvidia"  # torch's CUDA wheels' headers, where installed
    if torch.version.cuda is not None and any(wheels.glob("*/include/cublas_v2.h")):
        assert (Path(cuda_include) / "cublas_v2.h").exists(), cuda_include
    else:
        assert cuda_include == ""


# A python for scripts/setup_env.sh that runs nothing: it logs each call, and the requirement (-r) and constraint
# (-c) files given to pip (temporary files, gone afterwards); its torch is $FAKE_TORCH (distribution $FAKE_DIST).
FAKE_PYTHON = r"""#!/bin/bash
echo "call: $*" >>"$FAKE_LOG"
if [ "$1" = -m ] && [ "$2" = pip ]; then
  previous=""
  for arg in "$@"; do
    case "$previous" in -r | -c) echo "file $previous:"; cat "$arg";; esac
    previous="$arg"
  done >>"$FAKE_LOG"
  exit 0
fi
case "$2" in
  *sys.prefix*) echo /fake/prefix ;;
  *"print(torch.__version__)"*) echo "$FAKE_TORCH" ;;
  *"m.version("*) echo "$FAKE_DIST" ;;
  *startswith*) [[ $2 =~ startswith\(\'([^\']*)\'\) ]] && [[ $FAKE_TORCH == "${BASH_REMATCH[1]}"* ]] ;;
  *version_info*) [ -z "${FAKE_OLD_PYTHON:-}" ] ;;
  *python_version*) echo "$FAKE_OLD_PYTHON" ;;
esac
"""

PINNED_TORCH = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)


def write_fake_python(path: Path, script: str = FAKE_PYTHON) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    return path


def setup_env(tmp_path, torch_version=PINNED_TORCH + "+cu130", dist_version=PINNED_TORCH, python_in="", **env):
    """Runs scripts/setup_env.sh, copied into a tree of its own under tmp_path (so that it never touches this
    checkout's .venv: the tree's .venv holds a decoy), with the fake python (AMAPO_PYTHON, or python_in=a
    venv's bin/python). Returns the run and the calls logged."""
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_env.sh", tree / "scripts")
    shutil.copy(ROOT / "requirements.txt", tree)
    write_fake_python(tree / ".venv" / "bin" / "python", '#!/bin/sh\necho "decoy: $*" >>"$FAKE_LOG"\n')
    python = write_fake_python(Path(python_in) if python_in else tmp_path / "python")
    log = tmp_path / "calls.log"
    log.touch()
    env = {"PATH": "/usr/bin:/bin", "FAKE_LOG": str(log), "FAKE_TORCH": torch_version, "FAKE_DIST": dist_version,
           **({} if python_in else {"AMAPO_PYTHON": str(python)}), **env}
    run = subprocess.run(["bash", str(tree / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                         timeout=60, env=env)
    return run, log.read_text().replace(str(tree), "TREE")


def test_setup_env_installs_the_pinned_torch_by_default(tmp_path):
    run, calls = setup_env(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "call: -m pip install -q -r TREE/requirements.txt\n" in calls
    assert "call: -m pip install -q --no-build-isolation --no-deps -e TREE\n" in calls
    # Another torch than requirements.txt's pin (the pip install kept it): stop, naming the way to keep it.
    run, _ = setup_env(tmp_path / "other", torch_version="2.13.0+cpu", dist_version="2.13.0")
    assert run.returncode == 1 and "did not install (AMAPO_USE_EXISTING_TORCH=1 keeps yours)" in run.stdout


@pytest.mark.parametrize("value", ["1", "yes"])
def test_setup_env_keeps_the_existing_torch(tmp_path, value):
    run, calls = setup_env(tmp_path, torch_version="2.13.0+cu130", dist_version="2.13.0",
                           AMAPO_USE_EXISTING_TORCH=value)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "using the existing torch 2.13.0+cu130" in run.stdout
    requirements = calls.split("file -r:\n")[1].split("file -c:\n")[0]
    assert "numpy" in requirements and not re.search(r"^torch\b", requirements, re.MULTILINE)
    # The pin is the distribution's version, which pip matches (a pin on torch.__version__'s "+cu130" did not).
    assert calls.split("file -c:\n")[1].startswith("torch==2.13.0\n")
    assert "-r TREE/requirements.txt" not in calls
    assert "call: -m pip install -q --no-build-isolation --no-deps -e TREE\n" in calls


def test_setup_env_refuses_an_unknown_torch_mode(tmp_path):
    run, calls = setup_env(tmp_path, AMAPO_USE_EXISTING_TORCH="maybe")
    assert run.returncode == 2 and "AMAPO_USE_EXISTING_TORCH must be 1 or 0, got 'maybe'" in run.stdout
    assert "pip install" not in calls


def test_setup_env_uses_the_venv_amapo_venv_names(tmp_path):
    venv = tmp_path / "elsewhere"
    run, calls = setup_env(tmp_path, python_in=str(venv / "bin" / "python"), AMAPO_VENV=str(venv))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "creating" not in run.stdout and "-e TREE" in calls and "decoy" not in calls


def test_setup_env_refuses_a_python_older_than_3_11(tmp_path):
    """The pinned transformers and trl need Python 3.11: on 3.10 pip said "no matching distribution" after a
    venv was made. Now one line naming the interpreter, exit 2, before any venv or pip: for AMAPO_PYTHON, for the
    python3 a new venv would be made of, and for an existing venv."""
    run, calls = setup_env(tmp_path / "given", FAKE_OLD_PYTHON="3.10.12")
    python = tmp_path / "given" / "python"
    assert run.returncode == 2 and "pip" not in calls
    assert run.stderr == f"amapo_kernels: {python} is Python 3.10.12; the pinned requirements need Python >= 3.11\n"
    venv = tmp_path / "venv"
    run, calls = setup_env(tmp_path / "venv-run", python_in=str(venv / "bin" / "python"), AMAPO_VENV=str(venv),
                           FAKE_OLD_PYTHON="3.10.12")
    assert run.returncode == 2 and "pip" not in calls and f"(remove {venv} to make it anew)" in run.stderr
    path = tmp_path / "path"  # no venv yet: the python3 on PATH is asked before `python3 -m venv`
    write_fake_python(path / "python3")
    run, calls = setup_env(tmp_path / "new-run", python_in=str(tmp_path / "unused"), AMAPO_VENV=str(tmp_path / "new"),
                           PATH=f"{path}:/usr/bin:/bin", FAKE_OLD_PYTHON="3.10.12")
    assert run.returncode == 2 and "creating" not in run.stdout and not (tmp_path / "new").exists()
    assert "python3 is Python 3.10.12; the pinned requirements need Python >= 3.11 (AMAPO_PYTHON=" in run.stderr


def test_an_empty_amapo_cuda_means_auto(setup_py, monkeypatch):
    """`AMAPO_CUDA= pip install ...` (or `export AMAPO_CUDA=`) is the shell's way to unset it, and setup_env.sh
    announces it as auto (${AMAPO_CUDA:-auto}): the build must not then stop on "got ''"."""
    monkeypatch.setitem(setup_py, "cuda_toolkit_root", lambda: Path("/opt/cuda"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("AMAPO_CUDA", "")
    assert setup_py["want_cuda"]() == Path("/opt/cuda")
