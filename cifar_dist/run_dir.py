"""Everything a run keeps under --model_dir: its paths, files, checkpoint manager and lock.

    model_dir/
      config.json      the configuration the run trains (a resume is checked against it)
      history.csv      one row per epoch
      metrics.json     the final figures
      checkpoints/     tf.train.CheckpointManager checkpoints
      tensorboard/     summaries (and profiler traces)
      export/          the exported model (export.py: model.keras, saved_model/, class_names.json)
      eval/            the evaluation report (evaluate.py)
      .lock            held by the run that trains here

Every write goes through atomic.py (a temporary file renamed into place), so a crash
leaves either the old file or the new one. Every reader raises one error line
(CheckpointError, DataError, ModelError) for a file that is there but not what training
writes; a file that is not there yet is None ([] for the history).
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os

from cifar_dist import atomic
from cifar_dist.errors import CheckpointError, ConfigError, DataError, ModelError

CONFIG, HISTORY, METRICS = "config.json", "history.csv", "metrics.json"
CHECKPOINTS, TENSORBOARD, EXPORT, EVAL = "checkpoints", "tensorboard", "export", "eval"
LOCK = ".lock"
# What an export folder holds (export.py writes it; evaluate, predict and tools/ read it).
KERAS_FILE, SAVED_MODEL_DIR, CLASS_NAMES_FILE = "model.keras", "saved_model", "class_names.json"
TTA_FILE = "tta.json"  # the export's test-time views ({"views": ...}), what predict applies
CHECKPOINT_STATE = "checkpoint"  # tf.train.CheckpointManager's state file in checkpoints/
# The running totals of the epoch in progress at each kept checkpoint ({step: totals}), so a
# resume mid-epoch reports the whole epoch in history.csv (train.py)
EPOCH_TOTALS = "epoch_totals.json"
TRAIN_DATA = "train_data_sha256"  # config.json: the training split's fingerprint
INT_COLUMNS = ("epoch", "step", "skipped_steps")
HISTORY_NUMBERS = ("epoch", "step")  # what every row needs (the curves' x axis)
MAX_HISTORY_BYTES = 16 * 2**20  # one short row per epoch: far fewer in any real run


class RunDir:
    def __init__(self, path: str):
        self.path = path
        self.checkpoints, self.tensorboard, self.export, self.eval = (
            self.join(name) for name in (CHECKPOINTS, TENSORBOARD, EXPORT, EVAL))

    def join(self, *parts) -> str:
        return os.path.join(self.path, *parts)

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint was completed here (its state file exists; no TensorFlow)."""
        return os.path.isfile(self.join(CHECKPOINTS, CHECKPOINT_STATE))

    # ------------------------------------------------------------------ config.json

    def _read_json(self, name: str, way_out: str) -> dict | None:
        """A JSON object file of the run, or None when absent; anything else is one line."""
        path = self.join(name)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                obj = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e}); "
                                  f"{way_out}") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: not a JSON object; {way_out}")
        return obj

    def read_config(self) -> dict | None:
        """The saved configuration (Config fields + num_classes, class_names, replicas,
        workers), or None when there is none yet."""
        return self._read_json(CONFIG, "restore it or use another --model_dir")

    def read_trained_config(self) -> dict:
        """config.json of a run that trained here (export, evaluate, tools/ship_model.py):
        ModelError when the folder or the file is missing or is not training's."""
        if not os.path.isdir(self.path):
            raise ModelError(f"--model_dir={self.path}: no such folder")
        saved = self.read_config()
        path = self.join(CONFIG)
        if saved is None:
            raise ModelError(f"{path}: missing (is {self.path} a training model_dir?)")
        if not isinstance(saved.get("class_names"), list) or not isinstance(saved.get("model"), str):
            raise ModelError(f"{path}: has no 'model' and 'class_names' (not written by cifar_dist?)")
        return saved

    def write_config(self, config: dict) -> None:
        atomic.write_json(self.join(CONFIG), config)

    def check_resume(self, shaping: dict) -> None:
        """Refuses to resume a run whose shaping settings differ from `shaping`."""
        saved = self.read_config()
        if saved is None:
            return
        differ = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in shaping.items()
                  if k in saved and saved[k] != v]
        if TRAIN_DATA in shaping and saved.get(TRAIN_DATA, shaping[TRAIN_DATA]) != shaping[TRAIN_DATA]:
            # A path may move between machines; the data may not: compared by content.
            differ = [d for d in differ if not d.startswith(TRAIN_DATA)] + [
                "the training data: not the images and labels it trained on (sha256 of the "
                f"training split {saved[TRAIN_DATA][:12]}... then, {shaping[TRAIN_DATA][:12]}... "
                "now)"]
        if differ:
            flags = " ".join(f"--{k}={saved[k]}" for k, v in shaping.items()
                             if k in saved and saved[k] != v and k not in ("num_classes", TRAIN_DATA))
            raise CheckpointError(f"{self.path} holds a run with other settings "
                                  f"({'; '.join(differ)}): rerun with the run's own settings"
                                  f"{' (' + flags + ')' if flags else ''} or use another "
                                  "--model_dir")

    # ------------------------------------------------------------------ history.csv, metrics.json

    def read_history(self) -> list:
        """history.csv's rows, numbers as numbers ([] when there is none); DataError when it
        is not one that training wrote (every row needs a finite epoch and step)."""
        path = self.join(HISTORY)
        if not os.path.isfile(path):
            return []
        if os.path.getsize(path) > MAX_HISTORY_BYTES:
            raise DataError(f"{path}: {os.path.getsize(path):,} bytes: not a training history")
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = [{k: (int(float(v)) if k in INT_COLUMNS else float(v))
                         for k, v in row.items() if v not in ("", None)}
                        for row in csv.DictReader(f)]
            for row in rows:
                for key in HISTORY_NUMBERS:
                    if not math.isfinite(row[key]):
                        raise ValueError(f"{key} {row[key]}")
        except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError,
                OverflowError) as e:
            raise DataError(f"{path}: not a history.csv written by training "
                            f"({type(e).__name__}: {e})") from None
        return rows

    def write_history(self, history: list) -> None:
        keys = []
        for row in history:
            keys += [k for k in row if k not in keys]
        with atomic.writing(self.join(HISTORY), newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)

    def read_metrics(self) -> dict | None:
        way_out = "delete it to have the run's final figures written again"
        metrics = self._read_json(METRICS, way_out)
        if metrics is not None and "test_accuracy" not in metrics:
            raise CheckpointError(f"{self.join(METRICS)} is not a cifar_dist metrics file; "
                                  f"{way_out}")
        return metrics

    def write_metrics(self, metrics: dict) -> None:
        atomic.write_json(self.join(METRICS), metrics)

    # ------------------------------------------------------------------ checkpoints

    def read_epoch_totals(self, step: int) -> list | None:
        """The running totals of the epoch in progress at checkpoint `step`, or None."""
        path = os.path.join(self.checkpoints, EPOCH_TOTALS)
        try:
            with open(path) as f:
                totals = json.load(f).get(str(step))
        except (OSError, ValueError, AttributeError):
            return None  # absent (a run from before it) or damaged: the epoch row is partial
        if not (isinstance(totals, list) and all(isinstance(t, (int, float)) for t in totals)):
            return None
        return totals

    def write_epoch_totals(self, step: int, totals, keep: int) -> None:
        """Records the totals for the checkpoint about to be saved at `step` (and the newest
        `keep` before it: a damaged newest checkpoint falls back to an older one)."""
        path = os.path.join(self.checkpoints, EPOCH_TOTALS)
        try:
            with open(path) as f:
                known = {k: v for k, v in json.load(f).items() if k.isdigit()}
        except (OSError, ValueError, AttributeError):
            known = {}
        known[str(step)] = [float(t) for t in totals]
        newest = sorted(known, key=int)[-(keep + 1):]
        os.makedirs(self.checkpoints, exist_ok=True)
        atomic.write_json(path, {k: known[k] for k in newest})

    def checkpoint_manager(self, checkpoint, keep: int):
        import tensorflow as tf  # noqa: PLC0415 (the rest of this module needs no TensorFlow)

        return tf.train.CheckpointManager(checkpoint, self.checkpoints, max_to_keep=keep)

    def latest_checkpoint(self) -> str:
        """The newest checkpoint's prefix; CheckpointError when there is none."""
        if not self.has_checkpoint():  # checked before importing TensorFlow
            raise CheckpointError(f"{self.checkpoints}: no checkpoint to export")
        import tensorflow as tf  # noqa: PLC0415

        path = tf.train.latest_checkpoint(self.checkpoints)
        if not path:
            raise CheckpointError(f"{self.checkpoints}: no checkpoint to export")
        return path

    # ------------------------------------------------------------------ the lock

    def lock(self) -> "ModelDirLock":
        os.makedirs(self.path, exist_ok=True)
        return ModelDirLock(self.path)

    def refuse_if_training(self, then: str) -> None:
        """ConfigError (exit 2) when a training run holds this model_dir's lock: `evaluate`
        and `export` would read (and replace) what it is still writing. `then` says what
        to do instead. Creates and writes nothing."""
        owner = self.lock_owner()
        if owner is not None:
            raise ConfigError(f"--model_dir={self.path} is in use by a run still training "
                              f"(pid {owner}); {then}")

    def lock_owner(self):
        """The pid (a string, "?" if unknown) of the run holding model_dir/.lock, or None
        when no run holds it. Creates and writes nothing: a shared lock is taken and dropped."""
        try:
            fd = os.open(self.join(LOCK), os.O_RDONLY)
        except OSError:  # no lock file (no run ever trained here), or unreadable: cannot tell
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


class ModelDirLock:
    """An exclusive advisory lock on model_dir/.lock for the life of the run.

    The kernel drops it when the process dies (even by SIGKILL), so a crashed run never
    leaves a stale lock behind. Needs a filesystem with working flock (local disks, most
    cluster filesystems; see BUILD_NOTES.md).
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, LOCK)
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise ConfigError(f"--model_dir={os.path.dirname(self.path)} is in use by another "
                              f"run (pid {owner}); wait for it or use another --model_dir")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return False
