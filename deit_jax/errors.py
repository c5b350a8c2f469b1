"""Errors the user can fix, and how the command lines report them.

Every problem a user can fix (the configuration, the data, the workdir, a checkpoint) raises a
subclass of :class:`UserError`. The command lines (``deit_jax.main``, ``.convert``,
``.teacher_logits``, ``.benchmark``, ``.quickstart``) print such an error as one line naming the
problem and the fix and exit with status 2; ``--debug`` or ``DEIT_JAX_DEBUG=1`` shows the
traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

USER_ERROR_EXIT = 2
DEBUG_ENV = "DEIT_JAX_DEBUG"


class UserError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (``batch_size=0``, an unknown key, ...)."""


class MissingPathError(UserError, FileNotFoundError):
    """A path in the config or on the command line that does not exist or is not what it says."""


class WorkdirError(UserError, OSError):
    """The workdir is not a writable directory, or another run is writing it."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or restored (full disk, another model's checkpoint...)."""


class DivergedError(UserError, FloatingPointError):
    """Training produced a non-finite loss or state; the message names the last good step."""


def debug_enabled(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def report(error: BaseException) -> str:
    """The one line printed for a user error: its type and message, continuation lines joined."""
    message = " ".join(str(error).split("\n")).strip()
    return f"error ({type(error).__name__}): {message}"


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a command line's ``main``: a :class:`UserError` becomes one line and exit 2.

    The traceback is kept with ``--debug`` / ``DEIT_JAX_DEBUG=1`` (the error is re-raised).
    """

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if debug_enabled():
                raise
            print(report(e), file=sys.stderr, flush=True)
            # absl's app.run turns SystemExit into the process's exit status.
            raise SystemExit(USER_ERROR_EXIT) from None

    return wrapped


# ------------------------------------------------------------------- command-line config


def _load_config(path: str, variant: str | None):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_deit_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant is not None else module.get_config()


def _suggest(name: str, known: list[str]) -> str:
    """' Did you mean optim.lr?' for a mistyped key, matched in full or by its initials."""
    import difflib

    leaf = name.rsplit(".", 1)[-1]
    initials = "".join(w[:1] for w in leaf.split("_"))
    parent = name.rsplit(".", 1)[0] + "." if "." in name else ""
    siblings = [k for k in known if k.startswith(parent) and "." not in k[len(parent):]]
    by_initials = [k for k in siblings if k[len(parent):] in (initials, leaf[:2]) or
                   "".join(w[:1] for w in k[len(parent):].split("_")) == leaf]
    close = by_initials or difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if close:
        return f" Did you mean {' or '.join(close)}?"
    names = [k[len(parent):] for k in siblings]
    return f" Keys{' of ' + parent[:-1] if parent else ''}: {', '.join(names)}" if names else ""


def config_flag_error(argv: list[str], error: Exception, flag: str = "config") -> str | None:
    """One line for a ``--config=FILE[:variant]`` / ``--config.KEY=VALUE`` mistake, else None.

    Called when flag parsing failed with ``error``: the config is loaded again here to name
    what is wrong (a missing file, a bad variant, an unknown key with a suggestion).
    """
    import os

    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            spec = arg.split("=", 1)[1]
        elif arg == f"--{flag}" and i + 1 < len(argv):
            spec = argv[i + 1]
    if spec is None:
        return None
    path, sep, variant = spec.partition(":")
    if not os.path.isfile(path):
        return (f"--{flag}={spec}: no config file {path!r} (from {os.getcwd()}); give a path "
                "such as configs/deit_ti.py[:variant]")
    try:
        config = _load_config(path, variant if sep else None)
    except Exception as e:  # noqa: BLE001 - the config file's own error, on one line
        return f"--{flag}={spec}: {type(e).__name__}: {e}"
    known = sorted(_flat_keys(config))
    for arg in argv:
        if arg.startswith(f"--{flag}."):
            key = arg[len(flag) + 3:].split("=", 1)[0]
            if key not in known and not any(k.startswith(key + ".") for k in known):
                return f"unknown config key {key!r} in {arg!r}.{_suggest(key, known)}"
    return f"{type(error).__name__}: {error}" if isinstance(error, ValueError) else None


def _flat_keys(config, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        name = prefix + key
        out.append(name)
        if hasattr(value, "items"):
            out += _flat_keys(value, name + ".")
    return out
