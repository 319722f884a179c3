"""Loads the compiled extension amapo_kernels._C, and says what is wrong when it cannot.

Three causes account for nearly every failed import, and each has a different fix:
- the repository's source tree shadows an installed copy (Python puts the working directory first on
  sys.path, and the source tree has no compiled _C after a non-editable `pip install .`);
- the extension was never built;
- it was built against another torch than the one running (torch's C++ ABI changes between releases:
  undefined symbols, or a library path into a build folder that no longer exists).
The extension records the torch version it was compiled against; a mismatch that still loads warns.
"""

import importlib
import importlib.machinery
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
REBUILD = "pip install --no-build-isolation -e ."


class TorchMismatchWarning(UserWarning):
    """The extension was compiled against another torch than the running one."""


def _installed_elsewhere() -> Path | None:
    """Another amapo_kernels package on sys.path that has a compiled _C (the one this tree shadows)."""
    for entry in sys.path:
        candidate = Path(entry or os.getcwd()).resolve() / "amapo_kernels"
        if candidate == PACKAGE_DIR or not candidate.is_dir():
            continue
        if any(candidate.glob("_C*" + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES):
            return candidate
    return None


def _built_here() -> list[Path]:
    return [path for suffix in importlib.machinery.EXTENSION_SUFFIXES for path in PACKAGE_DIR.glob("_C*" + suffix)]


def explain_import_error(error: ImportError) -> str:
    """The cause of a failed `import amapo_kernels._C` and its fix, as one message."""
    if not _built_here():
        shadowed = _installed_elsewhere()
        if shadowed is not None:
            return (
                f"amapo_kernels: the source tree {PACKAGE_DIR} shadows the installed package {shadowed} "
                "(Python imports the directory you run from first, and the source tree has no compiled "
                "extension). Run from another directory, or build the source tree in place with "
                f"`{REBUILD}` (from {PACKAGE_DIR.parent})."
            )
        return (
            f"amapo_kernels: the compiled extension is missing from {PACKAGE_DIR} (it was never built). "
            f"Build it from the repository root with `{REBUILD}`, or run `bash scripts/test.sh`, which sets "
            "up everything."
        )
    return (
        f"amapo_kernels: the compiled extension in {PACKAGE_DIR} does not load under torch "
        f"{torch.__version__} ({error}). It was most likely built against another torch, or in an isolated "
        f"build environment that is gone; rebuild it against this interpreter's torch with `{REBUILD}` "
        "(from the repository root)."
    )


def check_torch_version(built_with: str | None, running: str = torch.__version__) -> None:
    if built_with is not None and built_with != running:
        warnings.warn(
            f"amapo_kernels was compiled against torch {built_with} but torch {running} is running; "
            f"its C++ ABI may differ. Rebuild with `{REBUILD}`.",
            TorchMismatchWarning,
            stacklevel=3,
        )


def load() -> ModuleType:
    """Imports amapo_kernels._C (which registers torch.ops.amapo_kernels.*)."""
    try:
        extension = importlib.import_module("amapo_kernels._C")
    except ImportError as error:
        raise ImportError(explain_import_error(error)) from error
    check_from_this_package(extension)
    check_torch_version(getattr(extension, "torch_version", None))
    return extension


def check_from_this_package(extension: ModuleType) -> None:
    """The compiled _C must be this package's own: an editable install of another checkout in the same
    environment resolves `amapo_kernels._C` through its import hook when this tree has no build, and its
    kernels (another revision, maybe another torch) would run under this tree's Python code."""
    origin = Path(extension.__file__).resolve().parent
    if origin != PACKAGE_DIR:
        raise ImportError(
            f"amapo_kernels: the package {PACKAGE_DIR} loaded the compiled extension of another copy, {origin} "
            "(an editable install of that copy in this environment): build this tree in place with "
            f"`{REBUILD}` (from {PACKAGE_DIR.parent}), or run from the other copy."
        )
