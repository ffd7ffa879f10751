"""Trains a few steps under a strategy and dumps weights + the example ids each replica saw.

Used by tests/test_distributed.py in fresh processes (logical CPU devices and collective
ops must be configured before TensorFlow starts):

    python tests/helpers/dist_probe.py OUT_DIR --strategy=mirrored --num_cpu_devices=2 ...

Writes OUT_DIR/weights_<worker>.npz and OUT_DIR/ids_<worker>.json
({"replica_ids": [[ids of global replica r at step s] ...]}).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from cifar_dist import config as config_lib  # noqa: E402

config_lib.define_flags()
flags.DEFINE_integer("probe_id_epochs", 0, "also record the example ids of this many epochs")


def main(argv):
    import numpy as np
    import tensorflow as tf

    from cifar_dist import data, distribute, train

    out_dir = argv[1]
    cfg = config_lib.from_flags()
    strategy, cluster = distribute.make_strategy(cfg)
    bundle = data.load(cfg)
    trainer = train.Trainer(cfg, strategy, cluster, bundle)

    # Which ids does each global replica get? Walk the distributed dataset itself.
    records = []
    if flags.FLAGS.probe_id_epochs:
        steps = flags.FLAGS.probe_id_epochs * trainer.steps_per_epoch
        iterator = trainer.train_iterator(0)
        for _ in range(steps):
            _, _, ids = next(iterator)
            local = strategy.experimental_local_results(ids)
            records.append([x.numpy().tolist() for x in local])

    os.makedirs(out_dir, exist_ok=True)
    trainer.run()
    worker = cluster.worker_index
    np.savez(os.path.join(out_dir, f"weights_{worker}.npz"),
             *[np.asarray(w) for w in trainer.model.get_weights()])
    with open(os.path.join(out_dir, f"ids_{worker}.json"), "w") as f:
        json.dump({"worker": worker, "num_workers": cluster.num_workers,
                   "replicas": strategy.num_replicas_in_sync,
                   "steps_per_epoch": trainer.steps_per_epoch, "local_ids": records}, f)
    del tf


if __name__ == "__main__":
    app.run(main)
