"""The train command: train, evaluate and export.

    python -m cifar_dist train                                # the seed recipe (configs/seed.cfg)
    python -m cifar_dist train --flagfile=configs/smoke.cfg \
        [--model_dir=/tmp/run] [--data_dir=/path/to/cifar10] [--strategy=mirrored --num_cpu_devices=2]

`python -m cifar_dist.main` and `cifar-dist-train` are the same command. Without
--model_dir a run writes to runs/<UTC time>; without --data_dir CIFAR-10 is found or
downloaded (README, "Data sources").

Exit status: 0 done; 2 bad input (one line on stderr, nothing written); 3 another worker
died or stalled (restart the group; it resumes); 4 the loss diverged (last good checkpoint
kept); 75 stopped by a signal with a checkpoint in model_dir (rerun the same command to
resume, or to finish the export); 76 stopped by a signal before any checkpoint existed
(nothing to resume).
"""

from __future__ import annotations

import os

from absl import logging

from cifar_dist import cli
from cifar_dist import config as config_lib
from cifar_dist.errors import Interrupted, PeerLost, UserError, peer_cause, printable


def train_main(cfg) -> dict:
    # Checks that need no TensorFlow come first, so their errors are one clean line.
    from cifar_dist import data, preflight, signals  # noqa: PLC0415

    preflight.check_model_dir(cfg.model_dir)
    # From here on a signal ends the run within seconds in every phase (signals.py).
    # until_exit: once the record is complete, a signal up to the process's end is ignored.
    with signals.StopRequest(cfg.model_dir, until_exit=True) as stop:
        bundle = None if data.needs_tensorflow(cfg) else data.load(cfg)
        stop.check()  # each phase boundary ends the run if a signal came meanwhile
        # The strategy (devices, collectives) must exist before any TensorFlow op runs.
        from cifar_dist import distribute, train  # noqa: PLC0415

        stop.check()
        strategy, cluster = distribute.make_strategy(cfg)
        stop.install()  # MultiWorkerMirroredStrategy replaced our SIGTERM handler
        stop.check()
        bundle = bundle or data.load(cfg)
        stop.check()
        logging.info("data: %s; train %d, test %d%s", bundle.source, len(bundle.train),
                     len(bundle.test), f", validation {len(bundle.validation)}"
                     if bundle.validation is not None else "")
        trainer = train.Trainer(cfg, strategy, cluster, bundle)
        stop.check()
        metrics = trainer.run(stop)  # the loop defers signals to its call boundaries
        if cluster.is_chief and cfg.export:
            export_and_evaluate(cfg, trainer, bundle, metrics, stop)
        stop.finished()  # everything is written: from here to exit a signal changes nothing
        distribute.leave_together(cluster)  # no worker exits while the chief still works
    return metrics


def export_and_evaluate(cfg, trainer, bundle, metrics, stop) -> None:
    """The exported model and DIR/eval/ (report, confusion matrix, plots) on the chief.
    A rerun of a finished run writes only what is missing."""
    from cifar_dist import evaluate, export  # noqa: PLC0415

    rerun = trainer.finished_record is not None
    export_dir = trainer.run_dir.export
    stop.check()
    if not (rerun and os.path.isdir(export_dir)):
        logging.info("exporting into %s", export_dir)
        with trainer.eval_steps.averaged_weights():  # --ema_decay: the averages are the model
            export.export_model(trainer.model, bundle.class_names, export_dir, trainer.arch,
                                cfg.tta_views)
    stop.check()
    if rerun and os.path.isdir(trainer.run_dir.eval):
        return
    try:
        evaluate.evaluate_model_dir(cfg.model_dir, bundle)
    except UserError as e:  # training succeeded; a report problem must not turn it into a failure
        logging.warning("evaluation report not written: %s", e)
    stop.check()


def train_with_peer_errors(cfg) -> dict:
    """A dead or stalled peer surfaces as one of a few TF errors: turn them into one line."""
    try:
        return train_main(cfg)
    except Exception as e:  # noqa: BLE001 - narrowed below
        if cfg.strategy != "multi_worker" or isinstance(e, (UserError, Interrupted)):
            raise
        import tensorflow as tf  # noqa: PLC0415 (loaded by now: a strategy exists)

        peer_errors = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                       tf.errors.CancelledError, tf.errors.AbortedError)
        if not isinstance(e, peer_errors):
            raise
        cause = peer_cause(e.message or str(e))  # not TF's first line, "Graph execution error:"
        raise PeerLost(f"lost contact with another worker ({type(e).__name__}: {cause}); "
                       "restart every worker: they resume from the last checkpoint") from None


def train_command(fv, args) -> int:
    cli.no_positional_args(args)
    cfg = config_lib.from_flags(fv)
    metrics = train_with_peer_errors(cfg)
    print(f"test_accuracy={metrics['test_accuracy']:.4f} test_loss={metrics['test_loss']:.4f} "
          f"images_per_second={metrics['images_per_second']:.1f} "
          f"wall_seconds={metrics['wall_seconds']:.0f} model_dir={printable(cfg.model_dir)}")
    return 0


main, run = cli.entry_points(__doc__, config_lib.define_flags, train_command)


if __name__ == "__main__":
    run()
