"""Show what the training augmentation does: originals beside augmented versions, one PNG.

    python -m cifar_dist.augment_preview --output=FILE.png [--data_dir=/path/to/cifar10]
        [--dataset=cifar10|sample|folder|synthetic] [--split=train|test] [--num_images=10]
        [--num_augmentations=6] [--seed=0]

The augmented images come from cifar_dist.augment.augment_batch, the very function the
training step compiles, with the stateless seed (--seed, 0): the same flags give the same
picture. One image per class is shown first (then further images in data order).

Exit status: 0 done; 2 bad input (one line on stderr, nothing written).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from cifar_dist import cli  # noqa: E402
from cifar_dist import config as config_lib  # noqa: E402
from cifar_dist.errors import ConfigError, printable  # noqa: E402

FORMATS = (".png", ".pdf", ".svg")


def pick_examples(labels: np.ndarray, count: int) -> np.ndarray:
    """The first image of each class (by class id), then the rest in data order."""
    labels = np.asarray(labels)
    firsts = [int(np.argmax(labels == c)) for c in np.unique(labels)]
    rest = np.setdiff1d(np.arange(len(labels)), firsts)  # sorted
    return np.concatenate([firsts, rest])[:count].astype(np.int64)


def augmented_versions(images_u8: np.ndarray, num_augmentations: int, seed: int) -> np.ndarray:
    """float32 [N, K, H, W, C] in [0, 1]: K augmentations of each image, one batched call."""
    import tensorflow as tf  # noqa: PLC0415

    from cifar_dist.augment import augment_batch  # noqa: PLC0415

    n = len(images_u8)
    repeated = np.repeat(images_u8, num_augmentations, axis=0)  # image-major: [N*K]
    out = augment_batch(tf.constant(repeated), tf.constant([seed, 0], tf.int64)).numpy()
    return out.reshape((n, num_augmentations) + images_u8.shape[1:])


def write_preview(bundle, output: str, split: str = "train", num_images: int = 10,
                  num_augmentations: int = 6, seed: int = 0) -> np.ndarray:
    """Writes the preview figure; returns the indices of the images shown."""
    from cifar_dist import plots  # noqa: PLC0415

    chosen = bundle.train if split == "train" else bundle.test
    idx = pick_examples(chosen.labels, num_images)
    originals = chosen.images[idx]
    augmented = augmented_versions(originals, num_augmentations, seed)
    plots.augmentation_grid(originals, augmented, output, labels=chosen.labels[idx],
                            class_names=bundle.class_names,
                            title=f"augmentation preview ({bundle.source}, {split}, seed {seed}):"
                                  "\nrotation +/-15 deg, shifts up to 10%, flip p=0.5, "
                                  "nearest fill")
    return idx


# --------------------------------------------------------------------------- command line

def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("output", None, "the image to write (.png, .pdf or .svg)",
                        flag_values=fv)
    flags.DEFINE_enum("dataset", "cifar10", config_lib.DATASETS, "data source",
                      flag_values=fv)
    flags.DEFINE_string("data_dir", "", "data folder, as for training (cifar10: found "
                        "automatically when empty)", flag_values=fv)
    flags.DEFINE_enum("split", "train", ("train", "test"), "images from this split",
                      flag_values=fv)
    flags.DEFINE_integer("num_images", 10, "rows: images shown", lower_bound=1, upper_bound=100,
                         flag_values=fv)
    flags.DEFINE_integer("num_augmentations", 6, "augmented versions per image", lower_bound=1,
                         upper_bound=20, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "augmentation seed (and synthetic data seed)",
                         flag_values=fv)


def preview_command(fv, args) -> int:
    cli.no_positional_args(args)
    if not fv.output:
        raise ConfigError("--output=FILE.png is required")
    if os.path.splitext(fv.output)[1].lower() not in FORMATS:
        raise ConfigError(f"--output={fv.output}: use a {', '.join(FORMATS)} file name")
    parent = os.path.dirname(os.path.abspath(fv.output))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output={fv.output}: {parent} is not a writable folder")
    cfg = config_lib.Config(dataset=fv.dataset, data_dir=os.path.expanduser(fv.data_dir),
                            seed=fv.seed, augment=True)
    from cifar_dist import data  # noqa: PLC0415
    bundle = data.load(cfg)
    write_preview(bundle, fv.output, fv.split, fv.num_images, fv.num_augmentations, fv.seed)
    print(f"wrote {printable(fv.output)}")
    return 0


main, run = cli.entry_points(__doc__, define_flags, preview_command)


if __name__ == "__main__":
    run()
