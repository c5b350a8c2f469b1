"""Entry point: ``python -m deit_jax.main --config=configs/deit_ti.py --workdir=DIR``.

Parses flags and the config, initialises JAX's multi-process runtime when asked, and calls
``train.train_and_evaluate``. A mistake the user can fix (config, data, workdir, checkpoints)
ends in one line and exit status 2; ``--debug`` (or ``DEIT_JAX_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import os
import signal
import sys


def _sigterm_before_training(signum, frame):
    # Until the training loop installs its own handler (which saves first), nothing is unsaved
    # and nothing is half-written (a damaged checkpoint is set aside by an atomic rename).
    # os._exit, not SystemExit: the handler may run inside a gc callback, which swallows
    # exceptions, and the workdir lock goes with the process.
    print("SIGTERM before training started: nothing to save, exiting (status 0)",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(0)


def install_early_sigterm_handler() -> None:
    """Until training starts, SIGTERM exits 0 (called first, before the slow imports)."""
    signal.signal(signal.SIGTERM, _sigterm_before_training)


if __name__ == "__main__":  # first, so that a SIGTERM during the slow imports exits 0 as well
    install_early_sigterm_handler()

# tf.data runs on the host only; keep TensorFlow off the accelerators JAX uses.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from deit_jax import cli, errors  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, argv: list[str] | None = None) -> None:
    """The training command's flags; ``argv`` is where ``--config.KEY=VALUE`` overrides are."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_ti.py"
                                    "[:variant].", lock_config=True, flag_values=flag_values,
                                    sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, metrics.",
                        flag_values=flag_values)
    cli.define_distributed_flags(flag_values)
    flags.DEFINE_bool("debug", False, "Show tracebacks of user errors (also DEIT_JAX_DEBUG=1).",
                      flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.initialize_from_flags(FLAGS)
    cli.hide_accelerators_from_tensorflow()
    from deit_jax import train

    train.quiet_library_logs(tracebacks=errors.debug_enabled())
    logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    logging.info("config:\n%s", FLAGS.config)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run() -> None:
    """The console entry point ``deit-train`` (= ``python -m deit_jax.main``)."""
    install_early_sigterm_handler()
    cli.run(main, define_flags)


if __name__ == "__main__":
    cli.run(main, define_flags)
