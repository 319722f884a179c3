"""User errors of the console scripts (``amapo-train``, ``amapo-eval``), in one place: a mistake in the
command line or its inputs is one line on stderr and exit status 2, never a traceback (tracebacks are
for bugs). Standard library only, so it works before (and when) the training extras are missing."""

import argparse
import math
import os
import sys
from pathlib import Path

INSTALL_EXTRAS = 'pip install "amapo-kernels[train]"'
# What the console scripts import: the `train` extra of pyproject.toml (import names).
TRAIN_EXTRAS = ("transformers", "accelerate", "tokenizers", "yaml", "tqdm")


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2, no traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``UserError``) instead of the usage block."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default unless it has none or its help text already says it; the description's
    own line breaks are kept."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def require_extras(command: str, modules=TRAIN_EXTRAS) -> None:
    """`command` needs the training extras; without one, say which is missing and how to install them."""
    for module in modules:
        try:
            __import__(module)
        except ImportError as error:
            raise UserError(f"{command} needs the training extras ({error.name or module} is missing): "
                            f"{INSTALL_EXTRAS}") from error


def run_console_script(prog: str, main, argv=None) -> int:
    """Runs ``main(argv)`` for the console script `prog`: 0 on success, 2 and one line on stderr on a
    UserError (argparse's own exits, --help included, pass through)."""
    try:
        main(argv)
    except UserError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


def check_range(flag: str, value, low=None, high=None) -> None:
    """A UserError naming `flag` unless `value` is a finite number with low <= value <= high (None: no
    bound). Called by the console scripts on their numeric flags before anything is loaded."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{flag} {value!r}: must be a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise UserError(f"{flag} {value}: must be {bounds}")


def expanded_path(flag: str, path: str) -> Path:
    """Path(path) with a leading ~ or ~user expanded, as the shell does unquoted. A user with no home is a
    UserError naming `flag`: a shell leaves `~nosuchuser/x` as it is, and pathlib raises a RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        head = Path(path).parts[0]
        raise UserError(f"{flag} {path}: no user {head[1:]!r} here to expand {head}") from None


def home_expanded(flag: str, value):
    """`value` with a leading ~ or ~user expanded (expanded_path), as a string; any other value (a relative or
    absolute path, a Hub or bundled name, None) as it is. For the paths that reach a program unexpanded (quoted,
    from a recipe file, from a Python caller), applied once where the command line is read: checked as
    $HOME/run, such a path was then written to ./~/run."""
    if isinstance(value, str) and value.startswith("~"):
        return str(expanded_path(flag, value))
    return value


def check_output_path(flag: str, path: str, *, directory: bool) -> None:
    """`path` (a directory, or a file when not `directory`) can be written: its folder exists or can be made,
    its nearest existing ancestor being a writable directory. Checked without creating anything (--dry-run
    leaves no trace), before the work whose results would go there."""
    if not str(path).strip():  # `--output "$OUT"` with OUT unset: Path("") is the working directory
        raise UserError(f"{flag} is empty: give a {'directory' if directory else 'file'} path")
    if "\0" in str(path):  # (only from a Python caller: a shell cannot pass one) pathlib's exists() says False
        raise UserError(f"{flag} {path!r}: a path cannot hold a NUL character")
    target = expanded_path(flag, path).absolute()
    if not directory and target.is_dir():
        raise UserError(f"{flag} {path}: is a directory, not a file")
    folder = target if directory else target.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable")


def check_device(device: str | None, flag: str = "--device") -> None:
    """`device` is cpu, cuda or cuda:N of a GPU this machine has (never a silent CPU fallback)."""
    import torch

    if not device:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"{flag} {device}: not a device name (cpu, cuda or cuda:N)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {device}: only cpu and cuda are supported")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {device}: no CUDA device is available here (use --device cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
