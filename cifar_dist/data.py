"""Every data source -> uint8 images [N, 32, 32, 3] + int32 labels in host memory, per split.

Sources:
  cifar10 (local)  the official python layout: a folder holding cifar-10-batches-py/,
                   that folder itself, or cifar-10-python.tar.gz (read without extracting)
  cifar10 (TFDS)   a prepared TensorFlow Datasets data_dir
  cifar10 (found)  without --data_dir: $CIFAR10_DIR, the Keras cache, TFDS' default
                   data_dir, in this order; else the official tarball is downloaded into
                   the Keras cache (--download, on by default; cifar10_files.py finds and
                   downloads, this module reads)
  folder           class-named subfolders of PNG/JPEG images (decoded by images.py)
  sample           the real CIFAR-10 subset shipped in the package (assets/cifar10_sample.npz:
                   the first 2,048 official training and 512 official test images)
  synthetic        random data of the right shapes

Pickled batch files are read with a restricted unpickler that can only rebuild numpy
arrays and plain containers: a file whose unpickling would import anything else (and
so could run code) is rejected. Every problem is a DataError with one clear line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from typing import Optional

import numpy as np

from cifar_dist.cifar10_files import (BATCH_FOLDER, TARBALL, TEST_FILE, TRAIN_FILES,
                                      download_cifar10, find_local_cifar10, is_download_chief,
                                      locate_cifar10, not_found)
from cifar_dist.errors import DataError, printable

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
# An official batch file is 30.7 MB (10,000 x 3,072 bytes + labels, pickled): a file or a
# tar member claiming more than this is refused before a byte of it is read.
MAX_BATCH_BYTES = 64 * 2**20
# The validation split is the same whatever the run seed, so tuning runs compare fairly.
VALIDATION_SEED = 20240229


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # int32 [N]

    def __len__(self):
        return int(self.labels.shape[0])

    def take(self, n: int) -> "Split":
        return Split(self.images[:n], self.labels[:n]) if n else self

    def fingerprint(self) -> str:
        """sha256 of the images and labels as trained on (order included): what a resume
        must find again, wherever the files have moved (about 0.5 s for 50,000 images)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.images, np.uint8).tobytes())
        digest.update(np.ascontiguousarray(self.labels, np.int32).tobytes())
        return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class DataBundle:
    train: Split
    test: Split
    class_names: tuple
    validation: Optional[Split] = None
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def eval_split(self) -> Split:
        """What per-epoch evaluation reports on: validation when held out, else test."""
        return self.validation if self.validation is not None else self.test

    @property
    def eval_split_name(self) -> str:
        return "validation" if self.validation is not None else "test"


# --------------------------------------------------------------------------- safe unpickling

try:  # numpy 2 moved them; numpy.core still works there but warns
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1
    from numpy.core import multiarray as _multiarray

class _Refused(pickle.UnpicklingError):
    """The pickle asked for something other than numpy arrays and plain containers."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers only; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),  # numpy integers in a re-pickled label list
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes into protocol-2 pickles
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise _Refused(f"refusing to load global {module}.{name}")
        if module.endswith("multiarray"):
            return getattr(_multiarray, name)
        if module == "_codecs":
            import codecs  # noqa: PLC0415
            return codecs.encode
        return getattr(np, name)


def safe_unpickle(data: bytes, what: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as e:
        raise DataError(f"{what}: not a CIFAR-10 batch file ({e})") from None
    except Exception as e:  # truncated/corrupt files raise many types (EOFError, ValueError, ...)
        raise DataError(f"{what}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{what}: expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def parse_batch(data: bytes, what: str) -> Split:
    d = safe_unpickle(data, what)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{what}: missing 'data' or 'labels' (keys: {sorted(map(str, d))})")
    raw, labels = d["data"], d["labels"]
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2 \
            or raw.shape[1] != 3072:
        shape = getattr(raw, "shape", None)
        dtype = getattr(raw, "dtype", type(raw).__name__)
        raise DataError(f"{what}: 'data' must be uint8 [N, 3072], found {dtype} {shape}")
    try:
        # No dtype here: asking for int64 would truncate 1.7 to 1 without a word.
        labels = np.asarray(labels)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{what}: 'labels' is not a list of integers") from None
    if labels.size == 0:  # np.asarray([]) is float64
        labels = labels.astype(np.int64)
    if labels.ndim != 1 or labels.shape[0] != raw.shape[0]:
        raise DataError(f"{what}: {raw.shape[0]} images but labels of shape {labels.shape}")
    if labels.dtype.kind not in "iu":  # floats, bools, strings, ints beyond int64 (object)
        example = next((v for v in labels.tolist() if not _is_int(v)), labels[:1].tolist())
        raise DataError(f"{what}: 'labels' must be integers, found {labels.dtype} "
                        f"(e.g. {example!r})")
    if labels.size and (labels.min() < np.iinfo(np.int32).min
                        or labels.max() > np.iinfo(np.int32).max):
        bad = labels.min() if labels.min() < np.iinfo(np.int32).min else labels.max()
        raise DataError(f"{what}: label {int(bad)} does not fit in int32 (it would wrap)")
    images = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), labels.astype(np.int32))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _concat(splits) -> Split:
    return Split(np.concatenate([s.images for s in splits]),
                 np.concatenate([s.labels for s in splits]))


# --------------------------------------------------------------------------- local cifar10

def _read_members(path: str, names) -> dict:
    """Reads the named batch files from a folder or a tarball, as bytes."""
    out = {}
    if os.path.isdir(path):
        for name in names:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                raise DataError(f"{full}: missing (expected the official CIFAR-10 python layout)")
            _check_batch_size(full, os.path.getsize(full))
            try:
                with open(full, "rb") as f:
                    out[name] = f.read(MAX_BATCH_BYTES + 1)
            except OSError as e:
                raise DataError(f"{full}: unreadable ({e.strerror or e})") from None
            _check_batch_size(full, len(out[name]))  # grew since the stat
        return out
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {}
            for member in tar:  # lazily: each header's size is checked before reading on
                base = os.path.basename(member.name)
                if member.isfile() and base in names:
                    # A header claiming gigabytes (forged, or a gzip bomb) is refused
                    # before its data are decompressed or skipped over.
                    _check_batch_size(f"{path}: member {member.name}", member.size)
                    members[base] = member
            for name in names:
                if name not in members:
                    raise DataError(f"{path}: has no {BATCH_FOLDER}/{name}")
                out[name] = tar.extractfile(members[name]).read(MAX_BATCH_BYTES + 1)
                _check_batch_size(f"{path}: member {members[name].name}", len(out[name]))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable tarball ({e})") from None
    return out


def _check_batch_size(what: str, size: int) -> None:
    if size > MAX_BATCH_BYTES:
        raise DataError(f"{what}: {size:,} bytes, far more than a CIFAR-10 batch file "
                        f"(about 31 MB; the limit is {MAX_BATCH_BYTES:,}): not read")


def load_local_cifar10(path: str) -> DataBundle:
    files = _read_members(path, TRAIN_FILES + (TEST_FILE,))
    train = _concat([parse_batch(files[n], os.path.join(path, n)) for n in TRAIN_FILES])
    test = parse_batch(files[TEST_FILE], os.path.join(path, TEST_FILE))
    return DataBundle(train, test, CIFAR10_CLASSES, source=f"cifar10 python layout at {path}")


def load_found_cifar10(cfg, is_chief: Optional[bool] = None) -> DataBundle:
    """CIFAR-10 without --data_dir: found (locate_cifar10) or downloaded."""
    kind, path, looked = locate_cifar10()
    if kind == "tfds":
        return load_tfds_cifar10(path, download=False)
    if kind is None:
        if not cfg.download:
            raise not_found(looked, "--download=false forbids downloading it")
        path = download_cifar10(looked, is_download_chief(cfg) if is_chief is None else is_chief)
    try:
        return load_local_cifar10(path)
    except DataError as e:
        # A damaged copy the search found (a cut tarball, a half-extracted cache) would stop
        # every later run the same way: name the way out.
        raise DataError(f"{e}; it was found without --data_dir (README, 'Finding CIFAR-10'): "
                        f"delete {path} and rerun to download it again, or pass "
                        "--data_dir=DIR") from None


# --------------------------------------------------------------------------- TFDS

def _to_arrays(batches):
    """(images, labels) batches -> two arrays (batch_size=-1 aborts under tfds mock_data)."""
    xs, ys = zip(*batches)
    return np.concatenate(xs), np.concatenate(ys)


def load_tfds_cifar10(data_dir: str, download: bool) -> DataBundle:
    import tensorflow_datasets as tfds  # noqa: PLC0415 (slow import, only when used)

    try:
        splits, info = tfds.load("cifar10", split=["train", "test"], data_dir=data_dir or None,
                                 download=download, as_supervised=True, with_info=True)
    except Exception as e:  # noqa: BLE001 - TFDS raises AssertionError, DatasetNotFoundError, ...
        hint = ("no local copy and no TFDS data there; pass --data_dir=DIR where DIR holds "
                f"{BATCH_FOLDER}/ or {TARBALL} or a prepared TFDS 'cifar10' folder, leave "
                "--data_dir out to find or download it, or use --dataset=sample")
        raise DataError(f"CIFAR-10 not found in {data_dir!r}: {hint} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    (tr_x, tr_y), (te_x, te_y) = [_to_arrays(tfds.as_numpy(s.batch(10000))) for s in splits]
    names = tuple(info.features["label"].names)
    bundle = DataBundle(Split(tr_x.astype(np.uint8), tr_y.astype(np.int32)),
                        Split(te_x.astype(np.uint8), te_y.astype(np.int32)), names,
                        source=f"tfds cifar10 at {data_dir or 'default data_dir'}")
    return bundle


# --------------------------------------------------------------------------- sample

SAMPLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                           "cifar10_sample.npz")
SAMPLE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def load_sample(path: str = SAMPLE_PATH) -> DataBundle:
    """The real CIFAR-10 subset shipped in the package (provenance: assets/cifar10_sample.md)."""
    try:
        # allow_pickle=False: the file can only hold plain arrays, never code
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in SAMPLE_KEYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: the shipped CIFAR-10 sample is missing or damaged "
                        f"({type(e).__name__}: {e}); reinstall cifar_dist") from None
    return DataBundle(Split(arrays["train_images"], arrays["train_labels"].astype(np.int32)),
                      Split(arrays["test_images"], arrays["test_labels"].astype(np.int32)),
                      CIFAR10_CLASSES, source="cifar10 sample shipped with cifar_dist")


# --------------------------------------------------------------------------- folder

def load_image_folder(root: str) -> DataBundle:
    """ROOT/train/<class>/*, ROOT/test/<class>/* ; or ROOT/<class>/* with a 10% test holdout."""
    from cifar_dist.images import load_class_folders  # noqa: PLC0415 (PIL, only when used)

    if not os.path.isdir(root):
        raise DataError(f"--data_dir={root}: not a folder")
    train_root, test_root = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(train_root):
        x, y, names = load_class_folders(train_root)
        if os.path.isdir(test_root):
            tx, ty, _ = load_class_folders(test_root, names)
            return DataBundle(Split(x, y), Split(tx, ty), names, source=f"image folder {root}")
    else:
        x, y, names = load_class_folders(root)
    # No test/ folder: every 10th image (a fixed choice) is the test split.
    test = np.zeros(len(y), bool)
    test[::10] = True
    if test.all():
        raise DataError(f"{root}: too few images to hold out a test split")
    return DataBundle(Split(x[~test], y[~test]), Split(x[test], y[test]), names,
                      source=f"image folder {root}")


# --------------------------------------------------------------------------- synthetic

def physical_memory_bytes() -> int:
    """This machine's memory (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def load_synthetic(train_size: int, test_size: int, num_classes: int = 10, seed: int = 0):
    # Refused before allocating (10**12 images was a numpy MemoryError traceback): at most
    # half of this machine's memory for the images.
    need, memory = (train_size + test_size) * int(np.prod(IMAGE_SHAPE)), physical_memory_bytes()
    if memory and need > memory // 2:
        raise DataError(f"--synthetic_train_size={train_size} and --synthetic_test_size="
                        f"{test_size} need {need / 2**30:,.1f} GiB of images, more than half "
                        f"of this machine's {memory / 2**30:,.1f} GiB")
    rng = np.random.default_rng(seed)

    def split(n):
        return Split(rng.integers(0, 256, size=(n,) + IMAGE_SHAPE, dtype=np.uint8),
                     rng.integers(0, num_classes, size=(n,), dtype=np.int32))

    return DataBundle(split(train_size), split(test_size), CIFAR10_CLASSES[:num_classes],
                      source="synthetic")


# --------------------------------------------------------------------------- checks, entry

def check_split(split: Split, num_classes: int, what: str) -> None:
    if split.images.dtype != np.uint8 or split.images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{what}: images must be uint8 [N, 32, 32, 3], found "
                        f"{split.images.dtype} {split.images.shape}")
    if split.labels.shape != (split.images.shape[0],):
        raise DataError(f"{what}: {split.images.shape[0]} images but {split.labels.shape} labels")
    if len(split) == 0:
        raise DataError(f"{what}: no images")
    low, high = int(split.labels.min()), int(split.labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{what}: label {low if low < 0 else high} outside 0..{num_classes - 1}")


def check_class_names(names, source: str) -> None:
    """Class names go into the exported model (a string variable), class_names.json,
    config.json, the report and predict's CSV header: one that is not printable UTF-8 text
    (an undecodable byte, a newline, a tab in a folder name) is refused here, before
    training, not at the export at its end (a TensorFlow traceback, or an evaluation that
    no longer matches the names read back)."""
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{source}: class name {printable(repr(name))} is not a name")
        if printable(name) != name:
            raise DataError(f"{source}: class name {printable(name)} is not printable UTF-8 "
                            "text (it is written into the exported model): rename its folder")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if list(names).count(n) > 1})
        raise DataError(f"{source}: class names listed twice: {', '.join(twice)}")


def hold_out_validation(bundle: DataBundle, size: int) -> DataBundle:
    """Moves `size` training images (a fixed, seed-independent choice) into a validation split."""
    n = len(bundle.train)
    if size >= n:
        raise DataError(f"--validation_size={size} leaves no training images (train has {n})")
    order = np.random.default_rng(VALIDATION_SEED).permutation(n)
    keep, held = np.sort(order[:n - size]), np.sort(order[n - size:])
    tr = bundle.train
    return dataclasses.replace(bundle, train=Split(tr.images[keep], tr.labels[keep]),
                               validation=Split(tr.images[held], tr.labels[held]))


def needs_tensorflow(cfg) -> bool:
    """True when loading goes through TFDS (which starts TensorFlow): then it must wait
    until the distribution strategy exists. Every other source is plain numpy."""
    if cfg.dataset != "cifar10":
        return False
    if not cfg.data_dir:
        return locate_cifar10()[0] == "tfds"
    return os.path.exists(cfg.data_dir) and find_local_cifar10(cfg.data_dir) is None


def load(cfg) -> DataBundle:
    """The DataBundle a Config asks for, validated."""
    if cfg.dataset == "synthetic":
        bundle = load_synthetic(cfg.synthetic_train_size, cfg.synthetic_test_size, seed=cfg.seed)
    elif cfg.dataset == "sample":
        bundle = load_sample()
    elif cfg.dataset == "folder":
        bundle = load_image_folder(cfg.data_dir)
    elif not cfg.data_dir:
        bundle = load_found_cifar10(cfg)
    else:
        if not os.path.exists(cfg.data_dir):
            raise DataError(f"--data_dir={cfg.data_dir}: no such file or folder")
        local = find_local_cifar10(cfg.data_dir)
        # An explicit --data_dir is never written into: no TFDS download there.
        bundle = (load_local_cifar10(local) if local
                  else load_tfds_cifar10(cfg.data_dir, download=False))
    check_class_names(bundle.class_names, bundle.source)
    if cfg.validation_size:
        bundle = hold_out_validation(bundle, cfg.validation_size)
    # "The first N images" of fewer than N would silently train on less than asked for.
    for flag, n, split in (("train_subset", cfg.train_subset, bundle.train),
                           ("test_subset", cfg.test_subset, bundle.test)):
        if n > len(split):
            held = (f" after --validation_size={cfg.validation_size}"
                    if flag == "train_subset" and cfg.validation_size else "")
            raise DataError(f"--{flag}={n} is more than the {len(split)} "
                            f"{flag.split('_')[0]} images of {bundle.source}{held}")
    bundle = dataclasses.replace(
        bundle, train=bundle.train.take(cfg.train_subset), test=bundle.test.take(cfg.test_subset))
    for name in ("train", "test", "validation"):
        split = getattr(bundle, name)
        if split is not None:
            check_split(split, bundle.num_classes, f"{bundle.source}: {name} split")
    return bundle
