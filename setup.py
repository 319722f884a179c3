"""Builds amapo_kernels._C through CMake (CMakeLists.txt), as vLLM and sgl-kernel do.

The CPU kernels are always built. The CUDA kernels are built when a CUDA toolkit of torch's CUDA major
version is found (CUDA_HOME, or nvcc on PATH), for TORCH_CUDA_ARCH_LIST or else this machine's GPU or else 9.0.
Environment:
  AMAPO_CUDA=0   never build the CUDA kernels
  AMAPO_CUDA=1   require them: a missing toolkit is an error (CI sets this)
  MAX_JOBS=N     parallel compile jobs
  CMAKE_ARGS     extra CMake arguments, e.g. "-DCMAKE_CUDA_FLAGS=-Xptxas=-v" (scripts/gpu_check.sh)
Build with `pip install --no-build-isolation .` so the extension compiles against the installed torch:
the extension links to torch's C++ API, whose ABI changes between releases, so it must be compiled
against the very torch that will import it. pip's default isolated build would compile against a
temporary torch (whichever is newest) and leave a library path into a deleted folder; torch is therefore
not a build requirement, and an isolated build stops here at once with that explanation.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    import torch  # the torch this interpreter will run with, hence the one to compile against
except ImportError:
    sys.exit(
        "amapo-kernels: torch is not importable by the Python that builds the extension. Install torch "
        "first, then build against it with `pip install --no-build-isolation .` (pip's default isolated build "
        "cannot see your torch, and an extension compiled against another torch fails to load)."
    )

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCH = "9.0"
MIN_TORCH = (2, 9)  # pyproject.toml's bound, checked here too: `--no-deps` and existing-torch installs skip pip's


def check_torch_minimum(version: str) -> None:
    """Stops the build on a torch older than MIN_TORCH: eager mode would work, but under torch.compile the ops'
    in-graph checks do not fire (torch 2.8: an out-of-range label gave a finite log-prob), a silent wrong result."""
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < MIN_TORCH:
        sys.exit(f"amapo-kernels needs torch >= {'.'.join(map(str, MIN_TORCH))}, this Python has torch {version} "
                 "(older ones skip the ops' argument checks under torch.compile): upgrade torch, then build again")


check_torch_minimum(torch.__version__)


def cuda_toolkit_root() -> Path | None:
    """The toolkit root, asked of nvcc itself: on some machines `nvcc` on PATH is a wrapper script."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    if shutil.which("nvcc"):
        candidates.append(Path(shutil.which("nvcc")))
    for nvcc in candidates:
        if not nvcc.exists():
            continue
        dryrun = subprocess.run(
            [str(nvcc), "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
        )
        match = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
        if match:
            return Path(match.group(1).strip()).resolve()
    return None


CUDA_CHOICES = {"0": False, "off": False, "false": False, "no": False,
                "1": True, "on": True, "true": True, "yes": True, "auto": None}


def want_cuda() -> Path | None:
    choice = (os.environ.get("AMAPO_CUDA") or "auto").strip().lower()  # set but empty: unset, as ${AMAPO_CUDA:-auto}
    if choice not in CUDA_CHOICES:  # a typo must not silently mean "auto"
        sys.exit(f"amapo_kernels: AMAPO_CUDA must be 1 (build the CUDA kernels), 0 (do not) or auto, "
                 f"got {os.environ['AMAPO_CUDA']!r}")
    if CUDA_CHOICES[choice] is False:
        return None
    required = CUDA_CHOICES[choice] is True
    if torch.version.cuda is None:  # a CPU-only torch has no libtorch_cuda to link the CUDA kernels to
        if required:
            sys.exit(f"AMAPO_CUDA=1 but torch {torch.__version__} is a CPU-only build (no CUDA kernels possible)")
        print(f"amapo_kernels: torch {torch.__version__} is a CPU-only build: building the CPU kernels only")
        return None
    root = cuda_toolkit_root()
    if root is None and required:
        sys.exit("AMAPO_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
    toolkit_major = cuda_major(root) if root else None
    torch_major = int(torch.version.cuda.split(".")[0])
    if toolkit_major is not None and toolkit_major != torch_major:
        # As torch's cpp_extension refuses: the kernels would compile against one CUDA and run on another
        # (PyPI's torch 2.6.0+cu124 with nvcc 13.0 stopped in the compiler: "cusparse.h: No such file").
        mismatch = (f"the CUDA toolkit at {root} is CUDA {toolkit_major}, torch {torch.__version__} is built "
                    f"for CUDA {torch.version.cuda}")
        if required:
            sys.exit(f"AMAPO_CUDA=1 but {mismatch}: point CUDA_HOME to a CUDA {torch_major} toolkit, or install a "
                     f"torch built for CUDA {toolkit_major}")
        print(f"amapo_kernels: {mismatch}: building the CPU kernels only (AMAPO_CUDA=1 makes this an error)")
        return None
    return root


def cuda_major(root: Path) -> int | None:
    """The CUDA major version of the toolkit at root (`nvcc --version`'s release), None when it cannot say."""
    try:
        run = subprocess.run([str(root / "bin" / "nvcc"), "--version"], capture_output=True, text=True)
    except OSError:
        return None
    match = re.search(r"release (\d+)\.", run.stdout)
    return int(match.group(1)) if match else None


def cuda_architectures() -> str:
    """TORCH_CUDA_ARCH_LIST ('9.0;8.0', '9.0a', '8.6+PTX') as CMAKE_CUDA_ARCHITECTURES ('90;80')."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch_list:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            arch_list = f"{major}.{minor}"
        else:
            arch_list = DEFAULT_CUDA_ARCH
    archs = []
    for arch in re.split(r"[;\s,]+", arch_list.strip()):
        if not arch:
            continue
        number = arch.removesuffix("+PTX").replace(".", "")
        archs.append(number if arch.endswith("+PTX") else f"{number}-real")
    return ";".join(archs)


def python_env_tool(module_name: str, attribute: str, program: str) -> str | None:
    """A build tool installed as a Python package (cmake, ninja) beside this interpreter, else PATH's."""
    try:
        module = __import__(module_name)
        path = Path(getattr(module, attribute)) / program
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which(program)


MIN_CMAKE = (3, 26)  # CMakeLists.txt's cmake_minimum_required


def cmake_version(cmake: str) -> tuple[int, ...]:
    """`cmake --version`'s (major, minor), (0, 0) when it cannot say (a system cmake too old for the build
    would otherwise fail inside CMake with a traceback of the whole command)."""
    run = subprocess.run([cmake, "--version"], capture_output=True, text=True)
    match = re.search(r"version (\d+)\.(\d+)", run.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        cuda_root = want_cuda()
        # A persistent build tree, so that rebuilds (pip install -e . again) are incremental.
        flavour = "cuda" if cuda_root else "cpu"
        build_dir = ROOT / "build" / f"{ext.name}-{sys.implementation.cache_tag}-{flavour}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DAMAPO_WITH_CUDA={'ON' if cuda_root else 'OFF'}",
        ]
        if cuda_root:
            args += [
                f"-DCMAKE_CUDA_COMPILER={cuda_root / 'bin' / 'nvcc'}",
                f"-DAMAPO_CUDA_ARCHITECTURES={cuda_architectures()}",
            ]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        ninja = python_env_tool("ninja", "BIN_DIR", "ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        cmake = python_env_tool("cmake", "CMAKE_BIN_DIR", "cmake")
        version = cmake_version(cmake) if cmake else (0, 0)
        if version < MIN_CMAKE:
            found = f" (found {cmake}, version {'.'.join(map(str, version))})" if cmake else ""
            sys.exit(f"amapo_kernels: cmake >= {'.'.join(map(str, MIN_CMAKE))} is needed to build{found}: "
                     "pip install cmake")
        print(f"amapo_kernels: building the CPU kernels{' and the CUDA kernels with ' + str(cuda_root) if cuda_root else ''}")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("amapo_kernels._C")], cmdclass={"build_ext": CMakeBuild})
