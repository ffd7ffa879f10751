"""Copy a trained run's exported model into the package, with a record of what it scores.

    python tools/ship_model.py --model_dir=RUN --data_dir=../shared/data

Writes cifar_dist/assets/seed_model.keras (the run's export/model.keras), class_names.json
beside it, and seed_model.json: the run's command and recipe, the file's sha256 and the
accuracy of this very file on the first --test_images official test images (with and without
flip test-time augmentation). tests/test_shipped_model.py checks the file against that record.
A maintainer's step, run once per recorded training run; not part of the installed package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cifar_dist import data, evaluate, export  # noqa: E402
from cifar_dist.predict import SHIPPED_MODEL  # noqa: E402


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def accuracy(model, split) -> float:
    return float((model.probabilities(split.images).argmax(1) == split.labels).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="the finished training run")
    parser.add_argument("--data_dir", required=True, help="CIFAR-10 python layout")
    parser.add_argument("--test_images", type=int, default=1000)
    parser.add_argument("--command", default="", help="the command that trained the run")
    args = parser.parse_args()

    source = os.path.join(args.model_dir, export.EXPORT_SUBDIR)
    assets = os.path.dirname(SHIPPED_MODEL)
    os.makedirs(assets, exist_ok=True)
    shutil.copyfile(os.path.join(source, export.KERAS_FILE), SHIPPED_MODEL)
    shutil.copyfile(os.path.join(source, export.CLASS_NAMES_FILE),
                    os.path.join(assets, export.CLASS_NAMES_FILE))

    model = export.load_exported(SHIPPED_MODEL)
    test = data.load_local_cifar10(data.find_local_cifar10(args.data_dir)).test
    test = test.take(args.test_images)
    flipped = evaluate.flip_tta(model, test.images, 500).argmax(1)
    with open(os.path.join(args.model_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(args.model_dir, "metrics.json")) as f:
        run = json.load(f)  # what training measured (its own test pass, speed, cost)
    record = {
        "file": os.path.basename(SHIPPED_MODEL),
        "sha256": sha256(SHIPPED_MODEL),
        "test_images": len(test),
        "test_accuracy": accuracy(model, test),
        "test_accuracy_flip_tta": float((flipped == test.labels).mean()),
        "epochs": run["epochs"],
        "validation_accuracy": run.get("validation_accuracy"),
        "pflops_per_run": run["pflops_per_run"],
        "images_per_second": run["images_per_second"],
        "train_seconds": run["train_seconds"],
        "wall_seconds": run["wall_seconds"],
        "command": args.command,
        "trained_on": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "config": config,
    }
    with open(os.path.join(assets, "seed_model.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
