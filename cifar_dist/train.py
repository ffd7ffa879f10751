"""The training loop: when things happen (log, evaluate, checkpoint, stop), many steps per call.

What a step computes lives in steps.py (compiled); what a run keeps on disk in run_dir.py.
Here: build the run under a strategy, restore it, then

    while step < total_steps:
        call the compiled loop for the steps up to the next event (at most --steps_per_loop)
        read its stats (the one host read per call)
        log / stop on a signal / end the epoch (evaluate, history, checkpoint) / checkpoint

Events (log lines, checkpoints, epoch ends, the end) always fall on call boundaries, so a
call never spans an epoch and the data order of an epoch is fixed when the call starts.
"""

from __future__ import annotations

import contextlib
import math
import signal

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from cifar_dist import pipeline, preflight, whitening
from cifar_dist import steps as steps_lib
from cifar_dist.checkpoints import RunCheckpoints
from cifar_dist.errors import ConfigError, Preempted, TrainingDiverged
from cifar_dist.model import (Architecture, build_model, first_conv, first_layer_normalization,
                              initialize, train_flops_per_image, trainable_param_count)
from cifar_dist.optimizer import make_update
from cifar_dist.progress import ProfilerWindow, Progress, Throughput
from cifar_dist.run_dir import TRAIN_DATA, RunDir
from cifar_dist.signals import StopRequest
from cifar_dist.steps import COUNT, CORRECT, LEARNING_RATE, LOSS_SUM, NONFINITE, \
    SKIPPED_TOTAL, STOP, SUMMED

# --steps_per_loop=auto: 100 steps per call on accelerators. On CPUs a call must stay short
# enough that a stop signal is answered within seconds, so it holds as many steps as take
# about 25 s at the ~100 GFLOP/s that 2 vCPUs reach on the seed network (10 of its steps at
# batch 256), at most 100: a small network is then not slowed by a host read every few ms.
AUTO_STEPS_PER_LOOP = 100
CPU_CALL_FLOPS = 2.5e12


def resolve_steps_per_loop(value: str, devices, flops_per_step: float) -> int:
    """flops_per_step: training FLOPs of one global batch (the CPUs' work per step)."""
    if value != "auto":
        return int(value)
    on_cpu = all("CPU" in tf.DeviceSpec.from_string(d).device_type.upper() for d in devices)
    if not on_cpu:
        return AUTO_STEPS_PER_LOOP
    return int(min(AUTO_STEPS_PER_LOOP, max(1, CPU_CALL_FLOPS // max(flops_per_step, 1))))


def resolve_data_on_device(value: str, split) -> bool:
    fits = pipeline.fits_on_device(split.images, split.labels)
    if value == "true" and not fits:
        size = (split.images.nbytes + split.labels.nbytes) / 2**20
        raise ConfigError(f"--data_on_device=true: the training split ({size:.0f} MiB) is over "
                          f"the {pipeline.DEVICE_DATA_LIMIT_BYTES / 2**20:.0f} MiB a device "
                          "holds; use --data_on_device=auto or false")
    return value == "true" or (value == "auto" and fits)


def call_end(step: int, *, total_steps: int, steps_per_epoch: int, steps_per_loop: int,
             log_steps: int, checkpoint_steps: int = 0,
             profile: tuple[int, int] | None = None) -> int:
    """Where the call starting at `step` ends: the next event, at most steps_per_loop on.

    Events: a log line, a checkpoint, an epoch end, the last step, and the edges of the
    profiled steps (A-1 and B of --profile_steps=A,B). A pure function of the step and the
    flags, so every worker makes the same calls (their collectives stay in lockstep).
    """
    def next_multiple(every):
        return (step // every + 1) * every

    ends = [total_steps, step + steps_per_loop, next_multiple(steps_per_epoch),
            next_multiple(log_steps)]
    if checkpoint_steps:
        ends.append(next_multiple(checkpoint_steps))
    if profile:
        ends += [edge for edge in (profile[0] - 1, profile[1]) if edge > step]
    return min(ends)


# The settings that shape a run's weights: a resume with any of them changed is refused
# (run_dir.check_resume), so config.json, history.csv and metrics.json always describe the
# checkpoints beside them. Not among them: how the run is executed (strategy, devices,
# steps per call, data path, XLA, logging, checkpoint cadence), which a resume may change.
SHAPING_FLAGS = ("dataset", "validation_size", "train_subset", "synthetic_train_size",
                 "augment", "rotation_degrees", "shift_fraction", "translate_pixels", "flip",
                 "model", "bn_momentum", "bn_scale", "dirac_init", "whiten_init",
                 "whiten_bias_epochs", "weight_decay_mode", "norm_lr_multiplier",
                 "norm_weight_decay_multiplier", "bias_lr_multiplier",
                 "bias_weight_decay_multiplier", "initial_lr_fraction", "final_lr_fraction",
                 "lookahead_steps", "lookahead_decay", "batch_size", "train_epochs",
                 "train_steps", "optimizer",
                 "learning_rate", "momentum", "nesterov", "schedule", "warmup_fraction",
                 "weight_decay", "label_smoothing", "ema_decay", "lr_scaling",
                 "base_batch_size", "seed", "dtype", "loss_scale", "sync_batch_norm")


def history_rate(history, batch_size: int) -> float:
    """Training images/s over history.csv's epochs: the figure of a finished run whose
    metrics.json was deleted and is written again (no step runs in this process)."""
    images = seconds = 0.0
    previous = 0
    for row in history:
        n = (row["step"] - previous) * batch_size
        previous = row["step"]
        if row.get("images_per_second", 0) > 0:
            images, seconds = images + n, seconds + n / row["images_per_second"]
    return images / seconds if seconds else 0.0


class Trainer:
    """Builds model, update, counters and compiled steps under a strategy, and runs the loop."""

    def __init__(self, cfg, strategy, cluster, bundle):
        self.cfg, self.strategy, self.cluster, self.bundle = cfg, strategy, cluster, bundle
        self.replicas = strategy.num_replicas_in_sync
        pipeline.per_replica_batch(cfg.batch_size, self.replicas)
        self.steps_per_epoch = pipeline.steps_per_epoch(len(bundle.train), cfg.batch_size)
        self.total_steps = cfg.train_steps or cfg.train_epochs * self.steps_per_epoch
        if cfg.profile_range and cfg.profile_range[0] > self.total_steps:
            raise ConfigError(f"--profile_steps={cfg.profile_steps} starts past the run's end "
                              f"(step {self.total_steps}): no trace would be written")
        self.data_on_device = resolve_data_on_device(cfg.data_on_device, bundle.train)
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(cfg.seed)
        self.arch = arch = Architecture.of(cfg.model, cfg.to_dict())
        with strategy.scope():
            self.model = build_model(cfg.model, bundle.num_classes, cfg.dtype_policy,
                                     cfg.sync_batch_norm, arch)
            initialize(self.model, arch, self.whitening(arch))
            self.update = make_update(cfg, self.total_steps, self.model.trainable_variables,
                                      self.train_until(arch))
            self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                             name="skipped_steps")
            window = tf.Variable(tf.zeros([len(steps_lib.STATS)]), trainable=False,
                                 name="step_stats")
        self.flops_per_image = train_flops_per_image(self.model)  # also metrics.json's
        self.steps_per_loop = resolve_steps_per_loop(
            cfg.steps_per_loop, strategy.extended.worker_devices,
            flops_per_step=self.flops_per_image * cfg.batch_size)
        self.run_dir = RunDir(cfg.model_dir)
        self.device_data = (pipeline.DeviceData(strategy, bundle.train.images, bundle.train.labels,
                                                global_batch=cfg.batch_size, seed=cfg.seed)
                            if self.data_on_device else None)
        self.steps = steps_lib.TrainSteps(
            cfg, strategy, self.model, self.update, num_classes=bundle.num_classes,
            steps_per_epoch=self.steps_per_epoch, global_step=self.global_step,
            skipped_steps=self.skipped_steps, window=window, device_data=self.device_data)
        self.eval_steps = steps_lib.EvalSteps(cfg, strategy, self.model, self.update,
                                              bundle.num_classes)
        self.checkpoints = RunCheckpoints(
            tf.train.Checkpoint(model=self.model, optimizer=self.update,
                                global_step=self.global_step, skipped_steps=self.skipped_steps),
            self.run_dir, cluster, self.eval_steps, self.global_step, cfg.keep_checkpoints)
        self.finished_record = None  # a finished run's metrics.json, when rerun unchanged

    def whitening(self, arch):
        """The first convolution's whitening filters (--whiten_init), from the training split
        and the run's seed: the same on every worker (a resume restores them anyway)."""
        if arch.whiten_init == "none":
            return None
        mean, std = first_layer_normalization(self.cfg.model)
        size = first_conv(self.model).kernel_size[0]
        return whitening.whitening_filters(self.bundle.train.images, size, seed=self.cfg.seed,
                                           mean=mean, std=std)

    def train_until(self, arch):
        """Per trainable variable, the step from which it stays as it is: the first
        convolution's bias after --whiten_bias_epochs (with whitening), else None."""
        until = [None] * len(self.model.trainable_variables)
        if arch.whiten_init != "none" and self.cfg.whiten_bias_epochs:
            bias = first_conv(self.model).bias
            for i, var in enumerate(self.model.trainable_variables):
                if var.path == bias.path:
                    until[i] = self.cfg.whiten_bias_epochs * self.steps_per_epoch
        return until

    # ------------------------------------------------------------------ data

    def train_iterator(self, start_step: int):
        """The tf.data path (--data_on_device=false, or a split too large for a device)."""
        train = self.bundle.train
        ds = pipeline.distribute(self.strategy, lambda pid, npipe: pipeline.train_dataset(
            train.images, train.labels, global_batch=self.cfg.batch_size, seed=self.cfg.seed,
            start_step=start_step, total_steps=self.total_steps, num_replicas=self.replicas,
            pipeline_id=pid, num_pipelines=npipe))
        return iter(ds)

    def inputs(self, step: int, iterator):
        """The training call's inputs for `step`: the device arrays and the epoch's order, or
        the tf.data iterator (what Trainer.run passes to steps.run; the benchmark times it)."""
        if self.device_data is None:
            return iterator
        data = self.device_data
        return data.images, data.labels, data.order(step // self.steps_per_epoch)

    # ------------------------------------------------------------------ loop

    def loop_end(self, step: int) -> int:
        return call_end(step, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                        steps_per_loop=self.steps_per_loop, log_steps=self.cfg.log_steps,
                        checkpoint_steps=self.cfg.checkpoint_steps,
                        profile=self.cfg.profile_range)

    def run(self, stop: StopRequest | None = None) -> dict:
        """Trains to the end. `stop`: a StopRequest installed earlier (main installs one at
        start-up, so a signal during start-up is not lost); else one is installed here."""
        with (stop or StopRequest()) as self.stop:
            if not self.cluster.is_chief:
                return self._run()
            preflight.check_disk_space(self.cfg.model_dir, trainable_param_count(self.model),
                                       self.cfg.keep_checkpoints)
            with self.run_dir.lock():
                return self._run()

    def _run(self) -> dict:
        cfg, chief = self.cfg, self.cluster.is_chief
        train_data = self.bundle.train.fingerprint()
        start_step = self.checkpoints.restore(dict(
            {k: v for k, v in cfg.to_dict().items() if k in SHAPING_FLAGS},
            num_classes=self.bundle.num_classes, **{TRAIN_DATA: train_data}))
        self.stop.check()
        finished = self.run_dir.read_metrics() if start_step >= self.total_steps else None
        self.finished_record = finished
        if finished is not None:
            # The same command again on a finished run: its record stays as it is (main then
            # completes only what is missing: the export, the evaluation report).
            logging.info("%s holds a finished run (step %d): its record is kept", cfg.model_dir,
                         start_step)
            return finished
        if chief:
            self.run_dir.write_config(dict(
                cfg.to_dict(), num_classes=self.bundle.num_classes,
                class_names=list(self.bundle.class_names), replicas=self.replicas,
                workers=self.cluster.num_workers, **{TRAIN_DATA: train_data}))
        writer = (tf.summary.create_file_writer(self.run_dir.tensorboard)
                  if chief and cfg.enable_tensorboard else tf.summary.create_noop_writer())
        history = self.run_dir.read_history() if chief else []
        logging.info("training %s: %d steps (%d per epoch, up to %d per call), global batch %d "
                     "on %d replica(s), dtype %s, XLA %s, data %s, from step %d", cfg.model,
                     self.total_steps, self.steps_per_epoch, self.steps_per_loop, cfg.batch_size,
                     self.replicas, cfg.dtype, cfg.jit_compile,
                     "on the device" if self.data_on_device else "from tf.data", start_step)
        iterator = None if self.data_on_device else self.train_iterator(start_step)
        progress = Progress(self.total_steps, start_step, enabled=chief)
        # Throughput counts training time only: evaluation and checkpoint time is excluded
        # (the clock restarts after them); XLA compilation in the first call is included.
        clock = Throughput(cfg.batch_size, start_step)
        profiler = ProfilerWindow(cfg.profile_range, self.run_dir.tensorboard, enabled=chief)
        # A resume mid-epoch carries on the epoch's running totals, so its history row covers
        # the whole epoch (its images/s: the steps since the resume).
        resumed_totals = (self.run_dir.read_epoch_totals(start_step)
                          if start_step % self.steps_per_epoch else None)
        epoch_stats = np.array(resumed_totals if resumed_totals is not None
                               and len(resumed_totals) == SUMMED else np.zeros(SUMMED))
        step = start_step
        with writer.as_default(), self.stop.deferring(), contextlib.closing(profiler):
            while step < self.total_steps:
                end = self.loop_end(step)
                stop_asked = self.stop.signal is not None
                profiler.before_call(step)
                window = self.steps.run(self.inputs(step, iterator), end - step, stop_asked)
                window = window.numpy()  # the one host read per call: waits for the device
                step = end
                profiler.after_call(step)
                clock.stop(step)
                epoch_stats += window[:SUMMED]
                if window[NONFINITE] and cfg.dtype != "float16":
                    raise TrainingDiverged(
                        f"non-finite loss or gradients at or before step {step}; "
                        f"the last good checkpoint in {self.run_dir.checkpoints} is kept")
                epoch_end = step % self.steps_per_epoch == 0 or step == self.total_steps
                if step % cfg.log_steps == 0 or epoch_end:
                    self._log(step, window, clock.window_rate(), progress)
                # Workers agree on a stop through the summed flag; one process can stop at once,
                # at this boundary even when the signal came during the call (read it again:
                # stop_asked is from before the call, and waiting for it costs a whole call).
                asked = self.stop.signal is not None
                stopping = window[STOP] > 0 or (asked and self.cluster.num_workers == 1)
                if epoch_end:  # before a stop too, so history.csv keeps every epoch
                    epoch = math.ceil(step / self.steps_per_epoch)
                    row = self._end_epoch(epoch, step, epoch_stats, clock.epoch_rate(),
                                          clock.train_seconds)
                    epoch_stats = np.zeros(SUMMED)
                    if chief:
                        history = [h for h in history if h["epoch"] < epoch] + [row]
                        self.run_dir.write_history(history)
                    self.checkpoints.save()
                elif stopping or (cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0):
                    if chief:
                        self.run_dir.write_epoch_totals(step, epoch_stats, cfg.keep_checkpoints)
                    self.checkpoints.save()
                if stopping:
                    progress.close()
                    source = (signal.Signals(self.stop.signal).name if asked
                              else "a signal to another worker")
                    raise Preempted(f"stopped by {source} at step {step}; checkpoint saved "
                                    f"in {self.run_dir.checkpoints}: rerun the same command "
                                    "to resume")
                clock.start()
        progress.close()
        return self._finish(start_step, clock, history)

    def _log(self, step, window, images_per_second, progress):
        loss = window[LOSS_SUM] / max(window[COUNT], 1)
        lr = float(window[LEARNING_RATE])
        progress.update(step, loss=loss, acc=window[CORRECT] / max(window[COUNT], 1),
                        ips=images_per_second, lr=lr, skipped=int(window[SKIPPED_TOTAL]))
        tf.summary.scalar("train/loss", loss, step)
        tf.summary.scalar("train/images_per_second", images_per_second, step)
        tf.summary.scalar("train/learning_rate", lr, step)

    def _end_epoch(self, epoch, step, stats, images_per_second, train_seconds):
        row = {"epoch": epoch, "step": step,
               "train_loss": stats[LOSS_SUM] / max(stats[COUNT], 1),
               "train_accuracy": stats[CORRECT] / max(stats[COUNT], 1),
               # the rate the next step will use (so 0 after the last step of onecycle)
               "learning_rate": float(self.update.learning_rate().numpy()),
               "images_per_second": images_per_second,
               "train_seconds": train_seconds,
               "skipped_steps": int(self.skipped_steps.numpy())}
        if not self.cfg.skip_eval:
            name = self.bundle.eval_split_name
            with self.eval_steps.averaged_weights():
                result = self.eval_steps.evaluate(self.bundle.eval_split)
            row[f"{name}_loss"], row[f"{name}_accuracy"] = result["loss"], result["accuracy"]
            tf.summary.scalar(f"{name}/accuracy", result["accuracy"], step)
            tf.summary.scalar(f"{name}/loss", result["loss"], step)
        logging.info("epoch %d: %s", epoch, ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return row

    def _finish(self, start_step, clock, history) -> dict:
        with self.eval_steps.averaged_weights():
            test = self.eval_steps.evaluate(self.bundle.test)
            val = (self.eval_steps.evaluate(self.bundle.validation)
                   if self.bundle.validation is not None else None)
        flops = self.flops_per_image
        metrics = {
            "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "test_examples": test["examples"],
            "epochs": self.total_steps / self.steps_per_epoch, "steps": self.total_steps,
            "steps_this_run": self.total_steps - start_step,
            # training images / training seconds of this run (no evaluation, no checkpoints)
            "images_per_second": clock.total_rate() if self.total_steps > start_step
                                 else history_rate(history, self.cfg.batch_size),
            "train_seconds": clock.train_seconds,
            "wall_seconds": clock.wall_seconds(),
            "trainable_params": trainable_param_count(self.model),
            "train_flops_per_image": flops,
            "pflops_per_run": flops * self.total_steps * self.cfg.batch_size / 1e15,
            "skipped_steps": int(self.skipped_steps.numpy()),
            "replicas": self.replicas, "workers": self.cluster.num_workers,
            "steps_per_loop": self.steps_per_loop, "data_on_device": self.data_on_device,
            "data_source": self.bundle.source,
            "config": self.cfg.to_dict(),
        }
        if val is not None:
            metrics["validation_accuracy"], metrics["validation_loss"] = val["accuracy"], val["loss"]
        if history:
            metrics["history"] = history
        if self.cluster.is_chief:
            self.run_dir.write_metrics(metrics)
        logging.info("test accuracy %.4f (loss %.4f) on %d images; %.1f images/s; %.0f s",
                     test["accuracy"], test["loss"], test["examples"],
                     metrics["images_per_second"], metrics["wall_seconds"])
        return metrics
