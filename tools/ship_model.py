"""Copy a trained run's exported model into the package, with a record of what it scores.

    python tools/ship_model.py --model_dir=RUN --data_dir=/path/to/cifar10

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

from cifar_dist import atomic, data, export  # noqa: E402
from cifar_dist.errors import UserError  # noqa: E402
from cifar_dist.predict import SHIPPED_MODEL, SHIPPED_RECORD  # noqa: E402
from cifar_dist.run_dir import CLASS_NAMES_FILE, TTA_FILE, KERAS_FILE, METRICS, RunDir  # noqa: E402

# What the record copies from the run's metrics.json (a finished run always has them).
RUN_FIGURES = ("epochs", "pflops_per_run", "images_per_second", "train_seconds", "wall_seconds")


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def accuracy(model, split) -> float:
    return float((model.probabilities(split.images).argmax(1) == split.labels).mean())


def build_record(args) -> tuple[str, str, dict]:
    """Scores the run's exported model. Returns (model file, class-names file, record)."""
    run_dir = RunDir(args.model_dir)
    model_file = os.path.join(run_dir.export, KERAS_FILE)
    names_file = os.path.join(run_dir.export, CLASS_NAMES_FILE)
    for path in (model_file, names_file):
        if not os.path.isfile(path):
            raise UserError(f"{path}: missing; train with --export=true (the default) first")
    config = run_dir.read_trained_config()
    run = run_dir.read_metrics() or {}  # training's own figures
    missing = [key for key in RUN_FIGURES if key not in run]
    if missing:
        raise UserError(f"{run_dir.join(METRICS)} has no {', '.join(missing)}; "
                        "is the run finished?")
    if args.test_images < 1:
        raise UserError(f"--test_images must be at least 1, not {args.test_images}")
    found = data.find_local_cifar10(args.data_dir)
    if found is None:
        raise UserError(f"--data_dir={args.data_dir}: no CIFAR-10 python layout there")

    model = export.load_exported(model_file)
    test = data.load_local_cifar10(found).test.take(args.test_images)
    # the export's recorded test-time views (tta.json), as predict applies them
    augmented = model.probabilities(test.images, 500, tta=True).argmax(1)
    record = {
        "file": os.path.basename(SHIPPED_MODEL),
        "sha256": sha256(model_file),
        "test_images": len(test),
        "test_accuracy": accuracy(model, test),
        "tta_views": model.tta_views,
        "test_accuracy_tta": float((augmented == test.labels).mean()),
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
    return model_file, names_file, record


def install(model_file: str, names_file: str, record: dict) -> None:
    """Stages the three files next to the assets, then renames each into place, the record
    last (the innermost block renames first), so a failure never leaves a model beside a
    record that describes another one."""
    assets = os.path.dirname(SHIPPED_MODEL)
    os.makedirs(assets, exist_ok=True)
    with atomic.staged(SHIPPED_RECORD) as record_tmp, \
            atomic.staged(SHIPPED_MODEL) as model_tmp, \
            atomic.staged(os.path.join(assets, CLASS_NAMES_FILE)) as names_tmp, \
            atomic.staged(os.path.join(assets, TTA_FILE)) as tta_tmp:
        shutil.copyfile(model_file, model_tmp)
        shutil.copyfile(names_file, names_tmp)
        with open(tta_tmp, "w") as f:  # the views predict applies to the shipped model
            json.dump({"views": record["tta_views"]}, f)
        with open(record_tmp, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        if sha256(model_tmp) != record["sha256"]:
            raise UserError(f"{model_file} changed while it was being scored; run again")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="the finished training run")
    parser.add_argument("--data_dir", required=True, help="CIFAR-10 python layout")
    parser.add_argument("--test_images", type=int, default=1000)
    parser.add_argument("--command", default="", help="the command that trained the run")
    args = parser.parse_args()
    try:
        model_file, names_file, record = build_record(args)
        install(model_file, names_file, record)
    except UserError as e:
        print(f"ship_model: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
