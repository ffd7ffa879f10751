"""The real CIFAR-10 sample shipped in the package (--dataset=sample) and its builder."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cifar_dist import data
from cifar_dist.config import Config
from conftest import DATA_DIR, REPO, requires_data

sys.path.insert(0, str(REPO / "tools"))
import make_sample  # noqa: E402

RECORD = Path(data.SAMPLE_PATH).with_suffix(".md")


def test_sample_loads_as_real_cifar10_without_pickle():
    bundle = data.load(Config(dataset="sample"))
    assert bundle.train.images.shape == (2048, 32, 32, 3) and bundle.test.images.shape == (512, 32, 32, 3)
    assert bundle.train.images.dtype == np.uint8 and bundle.train.labels.dtype == np.int32
    assert bundle.class_names == data.CIFAR10_CLASSES
    assert np.bincount(bundle.train.labels, minlength=10).min() > 150  # every class present
    with np.load(data.SAMPLE_PATH, allow_pickle=False) as npz:  # plain arrays only
        assert sorted(npz.files) == sorted(data.SAMPLE_KEYS)
    # subsets and held-out validation work on it like on the full set
    small = data.load(Config(dataset="sample", train_subset=512, test_subset=128,
                             validation_size=100))
    assert len(small.train) == 512 and len(small.test) == 128 and len(small.validation) == 100


def test_shipped_arrays_match_their_record():
    digests = dict(re.findall(r"\| `(\w+)` \| ([0-9a-f]{64}) \|", RECORD.read_text()))
    assert sorted(digests) == sorted(data.SAMPLE_KEYS)
    with np.load(data.SAMPLE_PATH, allow_pickle=False) as npz:
        for key in data.SAMPLE_KEYS:
            assert hashlib.sha256(npz[key].tobytes()).hexdigest() == digests[key], key


def test_damaged_sample_is_one_clear_error(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(data.DataError, match="missing or damaged") as info:
        data.load_sample(str(bad))
    assert "\n" not in str(info.value)


@requires_data
def test_rebuilding_from_the_official_files_gives_identical_arrays(tmp_path):
    out = tmp_path / "sample.npz"
    assert make_sample.main([f"--data_dir={DATA_DIR}", f"--output={out}"]) == 0
    with np.load(out, allow_pickle=False) as new, np.load(data.SAMPLE_PATH, allow_pickle=False) as old:
        for key in data.SAMPLE_KEYS:
            assert new[key].dtype == old[key].dtype and new[key].tobytes() == old[key].tobytes(), key
    # and they are the official files' first images
    full = data.load(Config(data_dir=str(DATA_DIR)))
    np.testing.assert_array_equal(full.train.images[:2048], data.load_sample().train.images)
    np.testing.assert_array_equal(full.test.labels[:512], data.load_sample().test.labels)


def test_builder_rejects_a_folder_without_cifar10(tmp_path, capsys):
    assert make_sample.main([f"--data_dir={tmp_path}", f"--output={tmp_path / 'o.npz'}"]) == 2
    assert "no CIFAR-10 python layout" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
