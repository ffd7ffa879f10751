"""Issue #25, kinds 6 and 7: what a cache or an interrupted build left tells the user the
way out (or is skipped), and names are escaped in every printed line."""

from __future__ import annotations

import io
import tarfile

import pytest

from cifar_dist import data
from cifar_dist.config import Config
from cifar_dist.errors import DataError
from conftest import TINY_SYNTHETIC, run_module
from test_data_find import layout_files, places, serve, tarball_bytes  # noqa: F401 (fixtures)


def _cache(home):
    cache = home / ".keras" / "datasets"
    cache.mkdir(parents=True)
    return cache


def test_a_cached_tarball_without_a_batch_file_names_the_file_to_delete(places):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in layout_files(10).items():
            if name != data.TEST_FILE:
                info = tarfile.TarInfo(f"{data.BATCH_FOLDER}/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    tarball = _cache(places) / data.TARBALL
    tarball.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=f"delete {tarball} and rerun"):
        data.load(Config())


def test_a_partial_keras_archive_names_the_file_to_delete(places):
    archive = _cache(places) / "cifar-10-batches-py-target_archive"
    archive.write_bytes(tarball_bytes(10)[:500])  # cut short by an interrupted load_data
    with pytest.raises(DataError, match=f"delete {archive} and rerun"):
        data.load(Config())


def test_an_interrupted_tfds_build_does_not_block_the_download(places, serve, tmp_path,
                                                                monkeypatch):
    tfds_dir = tmp_path / "tfds"
    (tfds_dir / "cifar10" / "3.0.2.incompleteABCD").mkdir(parents=True)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    assert data.locate_cifar10()[0] is None  # not "tfds": the download goes ahead
    serve(tarball_bytes(10))
    assert len(data.load(Config()).train) == 50


def test_a_newline_in_model_dir_does_not_split_the_summary_line(tmp_path):
    model_dir = tmp_path / "a\nb"
    result = run_module("cifar_dist.main", *TINY_SYNTHETIC, "--train_steps=2",
                        f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("test_accuracy=") and \
        last[0].endswith("model_dir=" + str(model_dir).replace("\n", "\\n")), last
