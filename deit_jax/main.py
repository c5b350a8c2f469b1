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


if __name__ == "__main__":  # first, so that a SIGTERM during the slow imports exits 0 as well
    signal.signal(signal.SIGTERM, _sigterm_before_training)

# tf.data runs on the host only; keep TensorFlow off the accelerators JAX uses.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from deit_jax import errors  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit_ti.py[:variant].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, metrics.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Initialise jax.distributed: 'on' always (TPU pods, SLURM, explicit flags), "
                  "'auto' when a coordinator is given or SLURM/TPU-pod variables are present.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit clusters).")
flags.DEFINE_integer("num_processes", None, "Number of processes (explicit clusters).")
flags.DEFINE_integer("process_id", None, "This process's id (explicit clusters).")
flags.DEFINE_bool("debug", False, "Show tracebacks of user errors (also DEIT_JAX_DEBUG=1).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config mistakes reported as one line and exit status 2."""
    try:
        remaining = FLAGS(argv)
        if type(FLAGS["config"].value).__name__ == "_ErrorConfig":  # failed to load: diagnosed
            raise OSError(f"cannot load --config={FLAGS['config'].config_filename}")
        return remaining
    except Exception as e:  # noqa: BLE001 - diagnosed below; anything else is re-raised
        line = errors.config_flag_error(argv, e)
        if line is None and isinstance(e, flags.Error):
            line = str(e)
        if line is None or errors.debug_enabled(argv):
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(errors.USER_ERROR_EXIT) from None


def _cluster_detected() -> bool:
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env
    return slurm or tpu_pod


def initialize_distributed(mode: str, coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Starts JAX's multi-controller runtime (before any other JAX call)."""
    if mode == "off" or (mode == "auto" and not coordinator and not _cluster_detected()):
        return
    if coordinator and jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


@errors.exit_on_user_error
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id)
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from deit_jax import train

    train.quiet_library_logs(tracebacks=errors.debug_enabled())
    logging.info("process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    logging.info("config:\n%s", FLAGS.config)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
