"""What every command line shares: absl flags, ``--config`` errors, the distributed start-up.

Each command (``deit_jax.main``, ``.teacher_logits``, ``.convert``, ``.benchmark``,
``.analyze``, ``.quickstart``, ``.reproduce``) defines its flags with absl (and
``ml_collections.config_flags`` for ``--config``). A command whose body tests call directly
(``convert.main(argv)``, ``benchmark.main(argv)``) parses into its own ``FlagValues`` with
:func:`parse`; the others run under :func:`run`. A ``--config=configs/NAME.py`` that does not
exist where the command runs is looked up in the packaged configs (``deit_jax/configs``), so an
installed package runs the default configs from any directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from deit_jax import errors

PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


# ------------------------------------------------------------------------------- --config


def resolve_config_path(spec: str) -> str:
    """``configs/deit_ti.py[:variant]`` -> the packaged file when no such file is here."""
    path, sep, variant = spec.partition(":")
    if os.path.isfile(path) or os.path.dirname(path) not in ("configs", "./configs"):
        return spec
    packaged = os.path.join(PACKAGE_CONFIGS, os.path.basename(path))
    return packaged + sep + variant if os.path.isfile(packaged) else spec


def resolve_config_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
    """``argv`` with the value of ``--config`` passed through :func:`resolve_config_path`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith(f"--{flag}="):
            out[i] = f"--{flag}=" + resolve_config_path(arg.split("=", 1)[1])
        elif arg == f"--{flag}" and i + 1 < len(out):
            out[i + 1] = resolve_config_path(out[i + 1])
    return out


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl flag parsing, with config mistakes reported as one line and exit status 2."""
    try:
        remaining = flag_values(argv)
        config = flag_values["config"] if "config" in flag_values else None
        if config is not None and type(config.value).__name__ == "_ErrorConfig":
            raise OSError(f"cannot load --config={config.config_filename}")  # diagnosed below
        return remaining
    except Exception as e:  # noqa: BLE001 - diagnosed below; anything else is re-raised
        line = errors.config_flag_error(argv, e) if "config" in flag_values else None
        if line is None and isinstance(e, flags.Error):
            line = str(e)
        if line is None or errors.debug_enabled(argv):
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(errors.USER_ERROR_EXIT) from None


def run(main: Callable[[list[str]], object], define: Callable[..., object] | None = None
        ) -> None:
    """Runs a command line: ``define(flags.FLAGS, argv)`` its flags, parse ``sys.argv``, and
    call ``main(argv)`` with user errors as one line and exit status 2.

    ``--help`` prints the docstring of ``main``'s module and the command's own flags (not
    absl's) and exits 0, also from a console script, whose ``__main__`` is a stub.
    """
    argv = resolve_config_argv(sys.argv)
    sys.argv[:] = argv  # ml_collections reads --config.KEY=VALUE overrides from sys.argv
    if define is not None:
        define(flags.FLAGS, argv)
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(command_help(sys.modules[main.__module__].__doc__ or "", flags.FLAGS), flush=True)
        raise SystemExit(0)
    app.run(errors.exit_on_user_error(main), argv=argv, flags_parser=parse_flags)


def command_help(doc: str, flag_values: flags.FlagValues) -> str:
    """``doc`` and the help of every flag not defined by absl itself."""
    parts = [doc.strip(), "", "flags:"]
    for module, module_flags in sorted(flag_values.flags_by_module_dict().items()):
        if module.startswith("absl."):
            continue
        for flag in sorted(module_flags, key=lambda f: f.name):
            parts.append(f"  --{flag.name}: {flag.help} (default: {flag.default!r})")
    return "\n".join(parts)


def parse(define: Callable[[flags.FlagValues, list[str]], object], argv: Sequence[str],
          prog: str, doc: str = "") -> flags.FlagValues:
    """Parses ``argv`` (no program name) into a fresh ``FlagValues`` that ``define`` fills.

    ``--help`` prints ``doc`` and the flags and exits 0; a bad flag prints one line and exits 2.
    """
    full = [prog, *resolve_config_argv(argv)]
    flag_values = flags.FlagValues()
    define(flag_values, full)
    if any(a in HELP_FLAGS for a in full[1:]):
        print(command_help(doc, flag_values), flush=True)
        raise SystemExit(0)
    parse_flags(full, flag_values)
    return flag_values


def usage_error(message: str) -> None:
    """A flag combination that cannot work: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(errors.USER_ERROR_EXIT)


# ------------------------------------------------------------------------------ distributed


def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """``--distributed`` and the explicit-cluster flags, for every multi-host command."""
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                      "Initialise jax.distributed: 'on' always (TPU pods, SLURM, explicit "
                      "flags), 'auto' when a coordinator is given or SLURM/TPU-pod variables "
                      "are present.", flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit "
                        "clusters).", flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Number of processes (explicit clusters).",
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's id (explicit clusters).",
                         flag_values=flag_values)


def _cluster_detected() -> bool:
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env
    return slurm or tpu_pod


def initialize_distributed(mode: str, coordinator: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts JAX's multi-controller runtime (before any other JAX call)."""
    import jax

    if mode == "off" or (mode == "auto" and not coordinator and not _cluster_detected()):
        return
    if coordinator and jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def initialize_from_flags(flag_values: flags.FlagValues) -> None:
    """:func:`initialize_distributed` as ``define_distributed_flags``' flags say."""
    initialize_distributed(flag_values.distributed, flag_values.coordinator_address,
                           flag_values.num_processes, flag_values.process_id)


def hide_accelerators_from_tensorflow() -> None:
    """tf.data runs on the host only: TensorFlow must not take the GPUs JAX uses."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
