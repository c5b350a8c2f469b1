"""The training loop: setup checks, checkpoints, metrics, evaluation.

The teacher comes from ``teacher.py``, pretrained weights from ``pretrained.py``.
"""

from __future__ import annotations

import functools
import math
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from flax import jax_utils
from jax.experimental import multihost_utils

from deit_jax import checkpoint, input_pipeline, models, optim, pretrained, steps, teacher_store
from deit_jax import teacher as teacher_lib
from deit_jax.augment import device as device_aug
from deit_jax.errors import ConfigError, DivergedError
from deit_jax.models import AXIS
from deit_jax.teacher import build_teacher
from deit_jax.workdir import WorkdirLock, check_writable

# A logged loss this many times its running value (and 1 nat above it) is a divergence: warned.
DIVERGENCE_FACTOR = 4.0


def quiet_library_logs(tracebacks: bool = False) -> None:
    """Drops INFO chatter of Orbax/TFDS internals (lines per file written) from the absl log.

    Orbax also logs each failure of a background save with its traceback (a full disk gives
    four); the run's own one-line error says it, so those keep their first line only, unless
    ``tracebacks`` (``--debug``).
    """

    class _Filter:
        def filter(self, record) -> bool:
            library = any(part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/"))
            if library and record.exc_info and not tracebacks:
                error = record.exc_info[1]
                record.msg = f"{record.getMessage()}: {type(error).__name__}: " + " ".join(
                    str(error).split())[:300]
                record.args, record.exc_info, record.exc_text = None, None, None
            return record.levelno >= 30 or not library

    logging.get_absl_handler().addFilter(_Filter())


# ------------------------------------------------------------------------------ setup checks


def check_config(config: ml_collections.ConfigDict) -> None:
    """Values that cannot work, named with the fix, before anything is built or written."""
    devices = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        value = config[name]
        fit = max(devices, value // devices * devices)
        if value <= 0:
            raise ConfigError(f"{name}={value} must be positive (a multiple of the device "
                              f"count, {devices}): e.g. --config.{name}={fit}")
        if value % devices:
            raise ConfigError(f"{name}={value} is not divisible by the device count "
                              f"({devices}): e.g. --config.{name}={fit}")
    for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[name] < 1:
            raise ConfigError(f"{name}={config[name]} must be at least 1")
    if config.max_steps < 0 or config.num_epochs <= 0:
        raise ConfigError(f"num_epochs={config.num_epochs} must be > 0 and max_steps="
                          f"{config.max_steps} >= 0 (0 = no limit)")
    if config.checkpoint_on_damage not in checkpoint.ON_DAMAGE:
        raise ConfigError(f"checkpoint_on_damage={config.checkpoint_on_damage!r} must be one of "
                          f"{checkpoint.ON_DAMAGE}")
    if not config.optim.lr > 0:
        raise ConfigError(f"optim.lr={config.optim.lr} must be > 0")
    device_aug.DeviceAugment.from_config(config.aug)  # the device half of the recipe exists
    teacher_lib.check_config(config)


def open_training_data(config: ml_collections.ConfigDict):
    """The start-up every command that trains on ``config`` shares: the student, its input size,
    the training source, with the class count checked against ``dataset.num_classes``.

    Returns ``(model, image_size, train_source)``; the model predicts the source's classes.
    """
    image_size = models.image_size(config)
    train_source = input_pipeline.get_source(config, "train", image_size)
    num_classes = train_source.num_classes
    if config.dataset.num_classes and config.dataset.num_classes != num_classes:
        raise ConfigError(f"config.dataset.num_classes={config.dataset.num_classes} but "
                          f"{train_source.name} has {num_classes} classes")
    model, _ = models.from_config(config, num_classes)
    return model, image_size, train_source


# -------------------------------------------------------------------------------------- loop


class PreemptionWatcher:
    """Says at which step boundary to checkpoint and stop after a SIGTERM.

    TPU VMs and SLURM announce preemption with SIGTERM. With several processes JAX's
    preemption sync manager (started by ``jax.distributed.initialize``) receives the signal and
    ``reached_preemption_sync_point`` makes every process agree on the same step without a
    device sync; a single process uses its own handler.
    """

    def __init__(self):
        self._signalled = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: checkpointing at the next step boundary")
        self._signalled = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or, with ``eval_only``, evaluates) as ``config`` says.

    Returns the last evaluation (``eval/top1_cls``, ``eval_ema/top1_fused``, ...) with the
    first and last logged training losses of this invocation (``train/loss_first``,
    ``train/loss``) and its median images/s over the logging intervals after the first,
    compiling, step (``train/images_per_sec``; evaluation time excluded).

    Every check on the config, the data, the teacher and ``init_from`` runs before the first
    step is compiled. Resumes from the newest checkpoint in ``workdir`` that restores
    (``checkpoint_on_damage`` says what happens to a damaged one). Process 0 holds
    ``workdir``'s lock for the call: a second run on it is refused.
    """
    check_config(config)
    lock = None
    if jax.process_index() == 0:  # multi-host: every process shares the workdir, one locks it
        check_writable(workdir)
        lock = WorkdirLock(workdir).acquire()
    try:
        return _train_and_evaluate(config, workdir)
    finally:
        if lock is not None:
            lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    layout = input_pipeline.Layout.current(config.batch_size)
    input_pipeline.Layout.current(config.eval_batch_size)  # divisibility check
    if config.optim.grad_accum_steps < 1 or layout.per_device % config.optim.grad_accum_steps:
        raise ConfigError(f"per-device batch {layout.per_device} is not divisible by "
                          f"optim.grad_accum_steps={config.optim.grad_accum_steps}")
    model, image_size, train_source = open_training_data(config)
    num_classes = train_source.num_classes
    eval_source = input_pipeline.get_source(config, "eval", image_size)
    extra_eval = input_pipeline.get_extra_eval_sources(config, num_classes)
    teacher = build_teacher(config, model, num_classes, image_size,
                            num_examples=train_source.num_examples)

    steps_per_epoch = input_pipeline.steps_per_epoch(
        train_source.num_examples, config.batch_size, num_repeats=config.aug.repeated_aug,
        ra_multiple=config.aug.ra_multiple)
    if steps_per_epoch == 0:
        raise ConfigError(f"{train_source.num_examples} training examples hold no full batch of "
                          f"{config.batch_size}")
    total_steps = math.ceil(config.num_epochs * steps_per_epoch)
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    tx, lr_fn = optim.create_optimizer(config, steps_per_epoch)
    state = steps.create_train_state(model, tx, jax.random.key(config.seed), image_size,
                                     ema=config.ema.enabled)

    if config.init_from:
        loaded = pretrained.load(config.init_from)
        params = pretrained.adapt_params(loaded["params"], state.params, model)
        state = state.replace(params=params, opt_state=tx.init(params),
                              batch_stats=loaded.get("batch_stats", state.batch_stats),
                              ema_params=jax.tree.map(np.copy, params) if config.ema.enabled
                              else {})
    elif config.eval_only:
        raise ConfigError("eval_only needs --config.init_from=DIR (a converted checkpoint)")

    p_eval_step = jax.pmap(functools.partial(steps.eval_step, model=model), axis_name=AXIS)

    def run_eval(state_r) -> dict[str, float]:
        results = {}
        weights = {"eval": state_r.params}
        if config.ema.enabled and not config.eval_only:
            weights["eval_ema"] = state_r.ema_params
        for prefix, params in weights.items():
            for name, source in {"": eval_source, **extra_eval}.items():
                key = f"{prefix}_{name}" if name else prefix
                batches = input_pipeline.eval_batches(config, source, layout,
                                                      image_size=image_size,
                                                      batch_size=config.eval_batch_size)
                for k, v in steps.evaluate(p_eval_step, params, state_r.batch_stats,
                                           batches).items():
                    results[f"{key}/{k}"] = v
                if batches.errors.count:
                    results[f"{key}/undecodable"] = batches.errors.count
        return results

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True)
    if config.eval_only:
        results = run_eval(steps.replicate(state))
        writer.write_scalars(0, results)
        writer.flush()
        return results

    ckpts = checkpoint.RunCheckpoints(workdir, max_to_keep=config.keep_checkpoints,
                                      on_damage=config.checkpoint_on_damage)
    start_step = 0
    if (restored := ckpts.restore_latest(state)) is not None:
        state = restored[0]
        start_step = int(state.step)
        logging.info("resumed from %s at step %d", ckpts.directory, start_step)
    if start_step >= total_steps:
        logging.info("run already finished at step %d", start_step)

    state_r = steps.replicate(state)
    teacher_vars = steps.replicate(teacher.variables) if teacher.model else None
    p_train_step = jax.pmap(
        steps.train_step_from_config(config, model=model, tx=tx, lr_fn=lr_fn, teacher=teacher),
        axis_name=AXIS, donate_argnums=(0,))
    train_iter = input_pipeline.train_batches(
        config, train_source, layout, image_size=image_size, start_step=start_step,
        crops=teacher.store.crops if teacher.store else None)  # a crop-aware store's views
    batches = train_iter
    if teacher.precomputed:
        # Joined by example id on the host, before the copy to the devices.
        batches = teacher_store.attach(batches, teacher.store)
    batches = jax_utils.prefetch_to_device(batches, 2)

    def hold(step):
        """Host copy of the state after ``step``, saved once step ``step + 1``'s loss is finite."""
        ckpts.hold(step, jax_utils.unreplicate(state_r),
                   {"step": step, "epoch": step / steps_per_epoch, "model": config.model.name})

    def check_loss(step, loss):
        if not np.isfinite(loss):
            raise DivergedError(f"non-finite loss {loss} at step {step}; "
                                f"{ckpts.last_good_note()}")

    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps)
    eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))
    pending: list[tuple[int, dict]] = []
    results: dict[str, float] = {}
    train_loss: list[float] = []  # per logging interval, returned with the eval results
    train_rate: list[float] = []  # images/s per logging interval after the compiling step
    t_interval = time.time()

    running_loss = 0.0  # smoothed logged loss: a value far above it warns of divergence

    def flush_metrics(step):
        """The loop's only regular host sync: fetch the buffered step metrics, check them."""
        nonlocal pending, t_interval, running_loss
        if not pending:
            return
        host = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, host, strict=True):
            check_loss(s, m["loss"][0])
        elapsed = time.time() - t_interval
        summary = {k: float(np.mean([m[k][0] for m in host])) for k in host[0]}
        summary["images_per_sec"] = len(host) * config.batch_size / elapsed
        summary["undecodable_examples"] = train_iter.errors.count
        summary["epoch"] = step / steps_per_epoch
        writer.write_scalars(step, summary)
        loss = summary["loss"]
        if train_loss and loss > DIVERGENCE_FACTOR * running_loss and loss > running_loss + 1:
            logging.warning("loss %.4g at step %d is %.0fx its running value %.4g: training is "
                            "diverging (optim.lr=%g too high? optim.clip_grad=%g)", loss, step,
                            loss / running_loss, running_loss, config.optim.lr,
                            config.optim.clip_grad)
        running_loss = loss if not train_loss else 0.8 * running_loss + 0.2 * loss
        train_loss.append(loss)
        if step > start_step + 1:
            train_rate.append(summary["images_per_sec"])
        pending, t_interval = [], time.time()

    preemption = PreemptionWatcher()
    try:
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state_r, metrics = p_train_step(state_r, next(batches), teacher_vars)
            pending.append((step, metrics))
            if ckpts.held is not None:
                # This step's loss comes from the held parameters: a finite one makes them good.
                check_loss(step, np.asarray(jax.device_get(metrics["loss"]))[0])
                ckpts.commit()
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                compile_s = time.time() - t_interval
                logging.info("first step (compilation included) took %.1fs", compile_s)
                writer.write_scalars(step, {"first_step_seconds": compile_s})
                flush_metrics(step)
            report(step)
            if step % config.log_every_steps == 0 or step == total_steps:
                flush_metrics(step)
            if step % config.checkpoint_every_steps == 0 or step == total_steps:
                flush_metrics(step)  # the losses up to here are finite
                hold(step)
            if step % eval_every == 0 or step == total_steps:
                with report.timed("eval"):
                    results = run_eval(state_r)
                writer.write_scalars(step, results)
                logging.info("step %d: %s", step, results)
                t_interval = time.time()  # images/s measures training only
            if preemption.reached(step):
                flush_metrics(step)
                # No next step tests these parameters: finite (checked by hold) has to do.
                if ckpts.held is None and ckpts.latest_step() != step:
                    hold(step)
                ckpts.commit()
                ckpts.wait()
                writer.flush()
                logging.warning("preempted: saved step %d in %s; rerun the same command to "
                                "resume", step, ckpts.directory)
                return results
        ckpts.commit()  # the last step's state (finite; no step after it)
        if not results:
            results = run_eval(state_r)
        ckpts.wait()
    finally:
        _finish_saves(ckpts)  # before the SIGTERM handler goes: a signal must not cut them
        preemption.close()
    if jax.process_index() == 0:
        (checkpoint.epath.Path(workdir) / "DONE").write_text(str(total_steps))
    writer.flush()
    if train_loss:
        results.update({"train/loss_first": train_loss[0], "train/loss": train_loss[-1]})
    if train_rate:
        results["train/images_per_sec"] = float(np.median(train_rate))
    return results


def _finish_saves(ckpts: checkpoint.RunCheckpoints) -> None:
    """Lets pending asynchronous saves end before the run does (even on an error)."""
    try:
        ckpts.wait()
    except Exception as e:  # noqa: BLE001 - the error that ended the run is the one to show
        logging.error("a pending checkpoint could not be finished: %s", e)
