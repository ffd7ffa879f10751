"""Build cifar_dist/assets/cifar10_sample.npz, the small real CIFAR-10 subset that ships
with the package (`--dataset=sample`).

    python tools/make_sample.py --data_dir=/path/to/cifar10 [--output=cifar_dist/assets/cifar10_sample.npz]

--data_dir is anything `--dataset=cifar10 --data_dir=...` accepts in the official python
layout: a folder holding cifar-10-batches-py/, that folder, or cifar-10-python.tar.gz.
The sample is the first 2,048 images of data_batch_1 and the first 512 of test_batch, in
official order, lossless, with their official labels. The arrays are a pure function of
those files, so a rebuild gives byte-identical arrays (tests/test_sample.py checks it;
the .npz file itself differs in its zip timestamps). A maintainer's step, run once; not
part of the installed package.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cifar_dist import atomic, data  # noqa: E402
from cifar_dist.errors import UserError  # noqa: E402

TRAIN_IMAGES = 2048  # from data_batch_1
TEST_IMAGES = 512  # from test_batch


def build_arrays(data_dir: str) -> dict:
    """The sample's arrays: train/test images (uint8 [N, 32, 32, 3]) and labels (int32 [N])."""
    path = data.find_local_cifar10(data_dir)
    if path is None:
        raise UserError(f"--data_dir={data_dir}: no CIFAR-10 python layout there "
                        f"({data.BATCH_FOLDER}/ or {data.TARBALL})")
    files = data._read_members(path, (data.TRAIN_FILES[0], data.TEST_FILE))
    train = data.parse_batch(files[data.TRAIN_FILES[0]], data.TRAIN_FILES[0])
    test = data.parse_batch(files[data.TEST_FILE], data.TEST_FILE)
    if len(train) < TRAIN_IMAGES or len(test) < TEST_IMAGES:
        raise UserError(f"{path}: {len(train)} training / {len(test)} test images, need "
                        f"{TRAIN_IMAGES} / {TEST_IMAGES}")
    return {"train_images": np.ascontiguousarray(train.images[:TRAIN_IMAGES]),
            "train_labels": train.labels[:TRAIN_IMAGES].astype(np.int32),
            "test_images": np.ascontiguousarray(test.images[:TEST_IMAGES]),
            "test_labels": test.labels[:TEST_IMAGES].astype(np.int32)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="CIFAR-10, official python layout")
    parser.add_argument("--output", default=data.SAMPLE_PATH, help="the .npz to write")
    args = parser.parse_args(argv)
    try:
        arrays = build_arrays(args.data_dir)
    except UserError as e:
        print(f"make_sample: error: {e}", file=sys.stderr)
        return 2
    with atomic.writing(args.output, "wb") as f:  # a file object: savez adds no .npz
        np.savez_compressed(f, **arrays)
    print(f"wrote {args.output}: {TRAIN_IMAGES} training and {TEST_IMAGES} test images, "
          f"{os.path.getsize(args.output) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
