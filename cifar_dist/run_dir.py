"""Everything a run keeps under --model_dir: its paths, files, checkpoint manager and lock.

    model_dir/
      config.json      the configuration the run trains (a resume is checked against it)
      history.csv      one row per epoch
      metrics.json     the final figures
      checkpoints/     tf.train.CheckpointManager checkpoints
      tensorboard/     summaries (and profiler traces)
      export/          the exported model (export.py)
      eval/            the evaluation report (evaluate.py)
      .lock            held by the run that trains here

Every write goes to a temporary file first and is renamed into place, so a crash leaves
either the old file or the new one.
"""

from __future__ import annotations

import csv
import json
import os

from cifar_dist import preflight
from cifar_dist.errors import CheckpointError

CONFIG, HISTORY, METRICS = "config.json", "history.csv", "metrics.json"
CHECKPOINTS, TENSORBOARD, EXPORT, EVAL = "checkpoints", "tensorboard", "export", "eval"
INT_COLUMNS = ("epoch", "step", "skipped_steps")


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str):
        self.path = path

    def join(self, *parts) -> str:
        return os.path.join(self.path, *parts)

    @property
    def checkpoints(self) -> str:
        return self.join(CHECKPOINTS)

    @property
    def tensorboard(self) -> str:
        return self.join(TENSORBOARD)

    def lock(self) -> preflight.ModelDirLock:
        os.makedirs(self.path, exist_ok=True)
        return preflight.ModelDirLock(self.path)

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
            raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}); "
                                  f"{way_out}") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} is not a JSON object; {way_out}")
        return obj

    def read_config(self) -> dict | None:
        """The saved configuration, or None when there is none yet."""
        return self._read_json(CONFIG, "restore it or use another --model_dir")

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.join(CONFIG), config)

    def check_resume(self, shaping: dict) -> None:
        """Refuses to resume a run whose shaping settings differ from `shaping`."""
        saved = self.read_config()
        if saved is None:
            return
        differ = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in shaping.items()
                  if k in saved and saved[k] != v]
        if differ:
            flags = " ".join(f"--{k}={saved[k]}" for k, v in shaping.items()
                             if k in saved and saved[k] != v and k != "num_classes")
            raise CheckpointError(f"{self.path} holds a run with other settings "
                                  f"({'; '.join(differ)}): rerun with the run's own settings"
                                  f"{' (' + flags + ')' if flags else ''} or use another "
                                  "--model_dir")

    def read_metrics(self) -> dict | None:
        way_out = "delete it to have the run's final figures written again"
        metrics = self._read_json(METRICS, way_out)
        if metrics is not None and "test_accuracy" not in metrics:
            raise CheckpointError(f"{self.join(METRICS)} is not a cifar_dist metrics file; "
                                  f"{way_out}")
        return metrics

    # ------------------------------------------------------------------ history.csv, metrics.json

    def read_history(self) -> list:
        path = self.join(HISTORY)
        if not os.path.exists(path):
            return []
        with open(path, newline="") as f:
            return [{k: (int(float(v)) if k in INT_COLUMNS else float(v))
                     for k, v in row.items() if v != ""} for row in csv.DictReader(f)]

    def write_history(self, history: list) -> None:
        keys = []
        for row in history:
            keys += [k for k in row if k not in keys]
        tmp = self.join(HISTORY + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
        os.replace(tmp, self.join(HISTORY))

    def write_metrics(self, metrics: dict) -> None:
        write_json_atomic(self.join(METRICS), metrics)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_manager(self, checkpoint, keep: int):
        import tensorflow as tf  # noqa: PLC0415 (the rest of this module needs no TensorFlow)

        return tf.train.CheckpointManager(checkpoint, self.checkpoints, max_to_keep=keep)
