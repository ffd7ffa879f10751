"""The run's checkpoints: restore the newest loadable one, save one (a collective).

tf.train.Checkpoint holds the model, the update (optimizer state, loss scale, weight
averages) and the step counters; tf.train.CheckpointManager (run_dir.checkpoint_manager)
keeps the newest --keep_checkpoints of them on the chief.
"""

from __future__ import annotations

import shutil
import tempfile

import tensorflow as tf
from absl import logging

from cifar_dist.errors import CheckpointError, TrainingDiverged


class RunCheckpoints:
    def __init__(self, checkpoint: tf.train.Checkpoint, run_dir, cluster, eval_steps,
                 global_step, keep: int):
        self.checkpoint, self.run_dir, self.cluster = checkpoint, run_dir, cluster
        self.eval_steps, self.global_step, self.keep = eval_steps, global_step, keep
        self.folder = run_dir.checkpoints
        self._manager = None  # the chief's, made at its first save

    def restore(self, shaping: dict) -> int:
        """Restores the newest loadable checkpoint; returns the step to start from.
        shaping: the settings that shape the weights; a resume that changes one is refused."""
        if not tf.io.gfile.isdir(self.folder):
            return 0
        self.run_dir.check_resume(shaping)
        state = tf.train.get_checkpoint_state(self.folder)
        candidates = list(reversed(state.all_model_checkpoint_paths)) if state else []
        for path in candidates:
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as e:  # noqa: BLE001 - a damaged file raises many types
                # (OpError, IndexError "Read less bytes", ValueError, AssertionError); an
                # older checkpoint then overwrites every variable again.
                logging.warning("checkpoint %s is unusable (%s); trying an older one",
                                path, str(e).splitlines()[0])
                continue
            step = int(self.global_step.numpy())
            logging.info("resumed from %s at step %d", path, step)
            return step
        if candidates:
            raise CheckpointError(f"no loadable checkpoint in {self.folder}: "
                                  "use another --model_dir to start fresh")
        return 0

    def save(self) -> None:
        """Every worker takes part (saving is a collective); only the chief keeps its files.

        Weights that went non-finite are never saved: the last good checkpoint stays the
        newest one (every worker holds the same weights, so all of them stop here).
        """
        if not bool(self.eval_steps.weights_finite().numpy()):
            raise TrainingDiverged(
                f"weights became non-finite by step {int(self.global_step.numpy())}; the last "
                f"good checkpoint in {self.folder} is kept (lower --learning_rate?)")
        try:
            if self.cluster.is_chief:
                if self._manager is None:
                    self._manager = self.run_dir.checkpoint_manager(self.checkpoint, self.keep)
                # CheckpointManager updates its state file only after the new checkpoint is
                # complete, so a crash or a full disk mid-save leaves the previous one usable.
                self._manager.save(checkpoint_number=int(self.global_step.numpy()))
            else:
                tmp = tempfile.mkdtemp(prefix=f"cifar_dist_worker{self.cluster.worker_index}_")
                try:
                    self.checkpoint.write(f"{tmp}/ckpt")
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        except (tf.errors.OpError, OSError) as e:
            message = getattr(e, "message", None) or str(e)
            raise CheckpointError(f"cannot write a checkpoint into {self.folder} "
                                  f"({type(e).__name__}: {message.splitlines()[0][:200]}); "
                                  "the previous checkpoint is intact (disk full?)") from None
