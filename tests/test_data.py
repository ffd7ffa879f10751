"""Data sources: local python layout (folder, batch folder, tarball), TFDS, image folders,
synthetic; the restricted unpickler; validation of what was loaded."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from cifar_dist import data
from cifar_dist.config import Config
from cifar_dist.errors import DataError
from conftest import DATA_DIR, requires_data


def write_batch(path, n, seed=0, labels=None, protocol=2):
    rng = np.random.default_rng(seed)
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"labels": list(rng.integers(0, 10, n)) if labels is None else labels}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=protocol)
    return d


def make_fake_cifar(root, n=20):
    folder = os.path.join(root, data.BATCH_FOLDER)
    os.makedirs(folder)
    for i, name in enumerate(data.TRAIN_FILES + (data.TEST_FILE,)):
        write_batch(os.path.join(folder, name), n, seed=i)
    return folder


@requires_data
def test_shared_cifar10_loads_with_published_statistics():
    bundle = data.load(Config(data_dir=str(DATA_DIR)))
    assert bundle.train.images.shape == (50000, 32, 32, 3)
    assert bundle.train.images.dtype == np.uint8 and bundle.train.labels.dtype == np.int32
    assert len(bundle.test) == 1000  # the shared copy holds the first 1,000 test images
    assert np.bincount(bundle.test.labels).tolist() == [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
    mean = bundle.train.images.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, [125.30692, 122.95039, 113.86538], atol=1e-3)
    assert bundle.class_names[0] == "airplane" and bundle.num_classes == 10


def test_layouts_folder_batchfolder_and_tarball_agree(tmp_path):
    folder = make_fake_cifar(tmp_path / "plain")
    tarball = tmp_path / data.TARBALL
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=data.BATCH_FOLDER)
    loaded = [data.load(Config(data_dir=str(p))) for p in
              (tmp_path / "plain", folder, tarball)]
    for bundle in loaded:
        assert len(bundle.train) == 100 and len(bundle.test) == 20
        np.testing.assert_array_equal(bundle.train.images, loaded[0].train.images)
        np.testing.assert_array_equal(bundle.test.labels, loaded[0].test.labels)


def test_pixel_layout_is_channel_planes_row_major(tmp_path):
    folder = make_fake_cifar(tmp_path)
    raw = pickle.load(open(os.path.join(folder, "data_batch_1"), "rb"), encoding="bytes")
    bundle = data.load(Config(data_dir=str(tmp_path)))
    first = raw[b"data"][0]
    img = bundle.train.images[0]
    assert img[0, 0, 0] == first[0] and img[0, 0, 1] == first[1024] and img[0, 0, 2] == first[2048]
    assert img[0, 1, 0] == first[1] and img[1, 0, 0] == first[32]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def test_code_running_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_fake_cifar(tmp_path)
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load global"):
        data.load(Config(data_dir=str(tmp_path)))
    assert not (tmp_path / "EVIL_RAN").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "corrupt or truncated"),
    ("labels_out_of_range", "outside 0..9"),
    ("wrong_shape", "must be uint8"),
    ("missing", "missing"),
    ("label_count", "labels of shape"),
])
def test_damaged_files_give_one_clear_error(tmp_path, damage, message):
    folder = make_fake_cifar(tmp_path)
    path = os.path.join(folder, "data_batch_2")
    if damage == "truncate":
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[: len(blob) // 2])
    elif damage == "labels_out_of_range":
        write_batch(path, 20, labels=[0] * 19 + [10])
    elif damage == "wrong_shape":
        with open(path, "wb") as f:
            pickle.dump({b"data": np.zeros((20, 100), np.uint8), b"labels": [0] * 20}, f, protocol=2)
    elif damage == "missing":
        os.remove(path)
    elif damage == "label_count":
        write_batch(path, 20, labels=[0] * 7)
    with pytest.raises(DataError, match=message) as info:
        data.load(Config(data_dir=str(tmp_path)))
    assert "\n" not in str(info.value)


def test_missing_data_dir_and_no_tfds_data_name_the_flags(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.load(Config(data_dir=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="--data_dir"):
        data.load(Config(data_dir=str(tmp_path)))  # empty folder: neither layout nor TFDS


def test_tfds_source_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        bundle = data.load(Config(data_dir=str(tmp_path)))
    assert bundle.train.images.shape == (24, 32, 32, 3) and bundle.train.images.dtype == np.uint8
    assert bundle.test.labels.dtype == np.int32 and bundle.num_classes == 10
    assert bundle.source.startswith("tfds")


def test_validation_split_is_fixed_disjoint_and_seed_independent(tmp_path):
    make_fake_cifar(tmp_path)
    a = data.load(Config(data_dir=str(tmp_path), validation_size=10, seed=1))
    b = data.load(Config(data_dir=str(tmp_path), validation_size=10, seed=2))
    assert len(a.train) == 90 and len(a.validation) == 10 and a.eval_split_name == "validation"
    np.testing.assert_array_equal(a.validation.images, b.validation.images)
    full = data.load(Config(data_dir=str(tmp_path)))
    rows = {img.tobytes() for img in full.train.images}
    val = {img.tobytes() for img in a.validation.images}
    train = {img.tobytes() for img in a.train.images}
    assert val <= rows and not (val & train) and len(val | train) == 100
    with pytest.raises(DataError, match="leaves no training"):
        data.load(Config(data_dir=str(tmp_path), validation_size=100))


def test_synthetic_shapes():
    bundle = data.load(Config(dataset="synthetic", synthetic_train_size=33, synthetic_test_size=7))
    assert bundle.train.images.shape == (33, 32, 32, 3) and len(bundle.test) == 7


def _save(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def test_image_folder_source_converts_and_resizes(tmp_path):
    root = tmp_path / "photos"
    _save(root / "train" / "cat" / "a.png", Image.new("RGB", (64, 48), (255, 0, 0)))
    _save(root / "train" / "cat" / "b.jpg", Image.new("L", (32, 32), 128))
    _save(root / "train" / "dog" / "c.png", Image.new("RGBA", (100, 100), (0, 0, 255, 10)))
    _save(root / "test" / "cat" / "d.png", Image.new("RGB", (32, 32), (0, 255, 0)))
    _save(root / "test" / "dog" / "e.png", Image.new("RGB", (8, 8), (1, 2, 3)))
    bundle = data.load(Config(dataset="folder", data_dir=str(root)))
    assert bundle.class_names == ("cat", "dog")
    assert bundle.train.images.shape == (3, 32, 32, 3) and bundle.train.labels.tolist() == [0, 0, 1]
    assert bundle.train.images[0, 5, 5].tolist() == [255, 0, 0]
    assert bundle.train.images[1, 5, 5].tolist() == [128, 128, 128]
    assert bundle.train.images[2, 5, 5].tolist() == [0, 0, 255]  # alpha dropped
    assert bundle.test.labels.tolist() == [0, 1]


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    _save(tmp_path / "empty" / "dog" / "a.png", Image.new("RGB", (32, 32)))
    with pytest.raises(DataError, match="cat: class folder with no images"):
        data.load(Config(dataset="folder", data_dir=str(tmp_path / "empty")))
    bad = tmp_path / "bad" / "cat"
    bad.mkdir(parents=True)
    (bad / "x.png").write_bytes(b"not a png at all")
    _save(tmp_path / "bad" / "dog" / "a.png", Image.new("RGB", (32, 32)))
    with pytest.raises(DataError, match="not a readable image"):
        data.load(Config(dataset="folder", data_dir=str(tmp_path / "bad")))
    with pytest.raises(DataError, match="no class subfolders"):
        data.load(Config(dataset="folder", data_dir=str(tmp_path / "bad" / "cat")))


def test_restricted_unpickler_reads_python2_style_bytes_pickles():
    arr = np.arange(12, dtype=np.uint8).reshape(2, 6)
    blob = pickle.dumps({"data": arr, "labels": [1, 2]}, protocol=2)
    d = data.safe_unpickle(blob, "x")
    np.testing.assert_array_equal(d["data"], arr)
    with pytest.raises(DataError):
        data.safe_unpickle(pickle.dumps(io.BytesIO(b"")), "x")
