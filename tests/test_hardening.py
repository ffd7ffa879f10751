"""The fault matrix: concurrent runs, corrupt checkpoints, a full disk, fuzzed data files
and hostile images. Each case ends in a clear error or a valid result; nothing is lost."""

from __future__ import annotations

import io
import pickle
import random
import resource
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cifar_dist import data, images
from cifar_dist.errors import DataError
from conftest import REPO, TINY_SYNTHETIC, env_for_subprocess, error_lines, run_module
from test_train import start, wait_for_step

LONG = TINY_SYNTHETIC + ["--train_steps=400", "--log_steps=1", "--learning_rate=0.05"]


@pytest.mark.slow
def test_second_run_on_the_same_model_dir_is_refused_and_the_first_goes_on(tmp_path):
    first = start([*LONG, f"--model_dir={tmp_path}"])
    wait_for_step(first, 2)
    second = run_module("cifar_dist.main", *LONG, f"--model_dir={tmp_path}")
    assert second.returncode == 2
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and f"in use by another run (pid {first.pid})" in lines[0]
    wait_for_step(first, 6)  # still training
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 75
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")) is not None


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    # The same command twice (a resume may not change --train_steps): the second run finds
    # the newest checkpoint damaged, resumes from the one before and trains the rest again.
    args = [*TINY_SYNTHETIC, "--checkpoint_steps=2", "--train_steps=6", f"--model_dir={tmp_path}"]
    first = run_module("cifar_dist.main", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    data_file = tmp_path / "checkpoints" / "ckpt-6.data-00000-of-00001"
    blob = data_file.read_bytes()
    data_file.write_bytes(blob[: len(blob) // 3])
    again = run_module("cifar_dist.main", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "ckpt-6 is unusable" in again.stderr
    assert "ckpt-4 at step 4" in again.stderr


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
    args = [*TINY_SYNTHETIC, "--checkpoint_steps=2", "--train_steps=4", f"--model_dir={tmp_path}"]
    first = run_module("cifar_dist.main", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    # Roll the run back to its step-2 checkpoint, so the same command trains and saves again.
    ckpt_dir = tmp_path / "checkpoints"
    for path in ckpt_dir.glob("ckpt-4.*"):
        path.unlink()
    before = str(ckpt_dir / "ckpt-2")
    (ckpt_dir / "checkpoint").write_text(f'model_checkpoint_path: "ckpt-2"\n'
                                         f'all_model_checkpoint_paths: "ckpt-2"\n')
    # Small files (config.json, the lock) still fit; a checkpoint's data file does not.
    full = subprocess.run([sys.executable, "-m", "cifar_dist.main", *args],
                          cwd=REPO, env=env_for_subprocess(), capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit_file_size(20_000))
    assert full.returncode == 2, full.stderr[-2000:]
    lines = error_lines(full.stderr)
    assert len(lines) == 1 and "cannot write a checkpoint" in lines[0]
    assert "previous checkpoint is intact" in lines[0]
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")) == before
    reader = tf.train.load_checkpoint(before)  # still loads
    assert reader.get_variable_to_shape_map()


# --------------------------------------------------------------------------- fuzzing

def _batch_blob(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": [int(x) for x in rng.integers(0, 10, n)],
                         b"batch_label": b"fuzz"}, protocol=2)


def test_fuzzed_batch_files_end_in_a_clear_error_or_a_valid_load():
    rng = random.Random(1234)
    blob = _batch_blob()
    outcomes = {"error": 0, "valid": 0}
    for case in range(400):
        mutated = bytearray(blob)
        if case % 2:
            mutated = mutated[: rng.randrange(len(mutated))]
        else:
            for _ in range(rng.randint(1, 8)):
                # flip bytes in the pickle opcodes/header region and anywhere else
                pos = rng.randrange(min(len(mutated), 400)) if rng.random() < 0.7 \
                    else rng.randrange(len(mutated))
                mutated[pos] = rng.randrange(256)
        try:
            split = data.parse_batch(bytes(mutated), f"case {case}")
        except DataError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
            continue
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (32, 32, 3)
        assert split.labels.shape == (split.images.shape[0],)
        outcomes["valid"] += 1
    assert outcomes["error"] > 100  # the fuzzing reached the checks


def _png_bytes(img):
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def test_fuzzed_images_end_in_a_clear_error_or_a_valid_image(tmp_path):
    rng = random.Random(99)
    sources = [_png_bytes(Image.new("RGB", (40, 30), (10, 200, 30))),
               _png_bytes(Image.fromarray(np.random.default_rng(0).integers(
                   0, 255, (50, 50, 3), dtype=np.uint8)))]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="JPEG")
    sources.append(buffer.getvalue())
    errors = 0
    for case in range(150):
        blob = bytearray(sources[case % len(sources)])
        if case % 3 == 0:
            blob = blob[: rng.randrange(len(blob))]
        else:
            for _ in range(rng.randint(1, 6)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        path = tmp_path / f"case{case}.png"
        path.write_bytes(bytes(blob))
        try:
            pixels, _ = images.load_image(str(path))
        except images.ImageError as e:
            assert "\n" not in str(e)
            errors += 1
            continue
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert errors > 10


def _bomb_png(width, height):
    """A valid PNG header claiming width x height pixels, with almost no data behind it."""
    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind", ["bomb", "empty", "text_as_png", "png_as_jpg", "animated",
                                  "16bit", "cmyk", "palette", "tiny"])
def test_hostile_and_unusual_images(tmp_path, kind):
    path = tmp_path / "img.png"
    if kind == "bomb":
        path.write_bytes(_bomb_png(100_000, 100_000))
        with pytest.raises(images.ImageError, match="pixel limit"):
            images.load_image(str(path))
        return
    if kind == "empty":
        path.write_bytes(b"")
        with pytest.raises(images.ImageError, match="not a readable image"):
            images.load_image(str(path))
        return
    if kind == "text_as_png":
        path.write_text("hello")
        with pytest.raises(images.ImageError, match="not a readable image"):
            images.load_image(str(path))
        return
    expected = None
    if kind == "png_as_jpg":
        path = tmp_path / "really_a_png.jpg"
        Image.new("RGB", (32, 32), (5, 6, 7)).save(path, format="PNG")
        expected = [5, 6, 7]
    elif kind == "animated":
        path = tmp_path / "anim.gif"
        frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
        expected = [255, 0, 0]
    elif kind == "16bit":
        Image.new("I;16", (32, 32), 65535 // 2).save(path)
        expected = [128, 128, 128]
    elif kind == "cmyk":
        path = tmp_path / "cmyk.jpg"
        Image.new("CMYK", (32, 32), (0, 0, 0, 0)).save(path, quality=100)
        expected = [255, 255, 255]
    elif kind == "palette":
        Image.new("RGB", (32, 32), (0, 0, 255)).convert("P").save(path)
        expected = [0, 0, 255]
    elif kind == "tiny":
        Image.new("RGB", (1, 1), (9, 9, 9)).save(path)
        expected = [9, 9, 9]
    pixels, _ = images.load_image(str(path))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels[16, 16], expected, atol=2)
