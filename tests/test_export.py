"""cifar_dist.export: the SavedModel works in a fresh process without cifar_dist and gives the
training code's predictions; re-export from a checkpoint; loading every export form."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cifar_dist import data, evaluate, export
from cifar_dist.errors import CheckpointError
from conftest import copy_run, env_for_subprocess, run_module

FRESH_PROCESS = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
saved_model, images_path, out = sys.argv[1:]
loaded = tf.saved_model.load(saved_model)
result = loaded.signatures["serving_default"](images=tf.constant(np.load(images_path)))
np.savez(out, probabilities=result["probabilities"].numpy(),
         class_ids=result["class_ids"].numpy(),
         class_names=result["class_names"].numpy().astype(str),
         all_names=loaded.class_names.numpy().astype(str))
assert not [m for m in sys.modules if m.startswith("cifar_dist")], "cifar_dist was imported"
print("ok")
"""


@pytest.fixture(scope="module")
def images(trained_run):
    """The run's test images plus random ones (values the model never saw)."""
    split = data.load(evaluate.config_from_model_dir(str(trained_run))).test
    noise = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    return np.concatenate([split.images[:48], noise, np.zeros((1, 32, 32, 3), np.uint8),
                           np.full((1, 32, 32, 3), 255, np.uint8)])


def training_code_probabilities(run_dir, images):
    """What the training code computes: the run's model restored from its newest
    checkpoint, fed uint8 -> float exactly like the training/eval step."""
    import tensorflow as tf

    from cifar_dist.augment import to_unit_float
    from cifar_dist.model import build_model

    config = json.loads((run_dir / "config.json").read_text())
    model = build_model(config["model"], config["num_classes"], "float32")
    path = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    return model(to_unit_float(tf.constant(images)), training=False).numpy(), config


def test_saved_model_in_a_fresh_process_matches_training_code(trained_run, images, tmp_path):
    np.save(tmp_path / "images.npy", images)
    env = env_for_subprocess()
    env["PYTHONPATH"] = ""  # nothing from the repository on the path
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(trained_run / "export" / "saved_model"),
         str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    fresh = np.load(tmp_path / "out.npz")
    expected, config = training_code_probabilities(trained_run, images)
    assert fresh["probabilities"].shape == (len(images), 10)
    np.testing.assert_allclose(fresh["probabilities"], expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(fresh["class_ids"], expected.argmax(1))
    names = np.array(config["class_names"])
    np.testing.assert_array_equal(fresh["class_names"], names[expected.argmax(1)])
    assert fresh["all_names"].tolist() == config["class_names"]
    assert json.loads((trained_run / "export" / "class_names.json").read_text()) == \
        config["class_names"]


def test_every_export_form_loads_with_the_same_predictions(trained_run, images):
    reference = export.load_exported(str(trained_run / "export"))
    assert reference.kind == "keras" and reference.num_classes == 10
    expected = reference.probabilities(images, batch_size=7)  # several batches + a remainder
    np.testing.assert_allclose(expected, training_code_probabilities(trained_run, images)[0],
                               atol=1e-5, rtol=0)
    for path in (trained_run, trained_run / "export" / "model.keras",
                 trained_run / "export" / "saved_model"):
        model = export.load_exported(str(path))
        assert model.class_names == reference.class_names, path
        np.testing.assert_allclose(model.probabilities(images), expected, atol=1e-5, rtol=0)
    assert export.load_exported(str(trained_run / "export" / "saved_model")).kind == "saved_model"
    assert reference.probabilities(images[:0]).shape == (0, 10)


def test_load_exported_rejects_what_is_not_a_model(trained_run, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "nope", "no such file"),
                          (tmp_path / "notes.txt", "not a model"),
                          (tmp_path / "broken.keras", "not a loadable Keras model"),
                          (tmp_path / "empty", "no exported model here")):
        with pytest.raises(export.ModelError, match=message):
            export.load_exported(str(path))


def test_export_command_reexports_the_latest_checkpoint(trained_run, images, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    shutil.rmtree(run / "export")
    assert export.main(["export", f"--model_dir={run}"]) == 0
    assert f"exported {run / 'export'}" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "export").iterdir()) == \
        ["class_names.json", "model.keras", "saved_model", "tta.json"]
    # The newest checkpoint holds the final weights: the same model as the training export.
    original = export.load_exported(str(trained_run / "export")).probabilities(images)
    again = export.load_exported(str(run / "export")).probabilities(images)
    np.testing.assert_allclose(again, original, atol=1e-6, rtol=0)
    # An older checkpoint, into another folder (trailing slash: still replaced atomically).
    older = min((run / "checkpoints").glob("ckpt-*.index"),
                key=lambda p: int(p.stem.split("-")[1])).with_suffix("")
    target = tmp_path / "older_export"
    assert export.main(["export", f"--model_dir={run}", f"--checkpoint={older}",
                        f"--export_dir={target}/"]) == 0
    assert not (tmp_path / "older_export.tmp").exists()
    first_epoch = export.load_exported(str(target)).probabilities(images)
    assert np.abs(first_epoch - original).max() > 1e-4  # other weights, other predictions


def test_export_from_a_checkpoint_of_another_model_is_refused(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["model"] = "seed"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit a 'seed' model"):
        export.export_from_checkpoint(str(run), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_command_bad_input_exits_2(trained_run, tmp_path):
    no_ckpt = copy_run(trained_run, tmp_path / "no_ckpt")
    shutil.rmtree(no_ckpt / "checkpoints")
    shutil.rmtree(no_ckpt / "export")
    cases = [([], "--model_dir is required"),
             ([f"--model_dir={tmp_path / 'nope'}"], "no such folder"),
             ([f"--model_dir={no_ckpt}"], "no checkpoint to export"),
             ([f"--model_dir={tmp_path}"], "config.json: missing"),
             ([f"--model_dir={no_ckpt}", "--bogus"], "bogus"),
             ([f"--model_dir={no_ckpt}", f"--export_dir={no_ckpt}"], "not an export folder"),
             ([f"--model_dir={no_ckpt}", f"--export_dir={tmp_path}/a/b"], "not a writable")]
    for args, message in cases:
        result = run_module("cifar_dist.export", *args, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("cifar_dist: error: ") and message in lines[0], lines
    copied = ("checkpoints", "export", "eval")  # removed above, or not copied by copy_run
    assert sorted(p.name for p in no_ckpt.iterdir()) == \
        sorted(p.name for p in trained_run.iterdir() if p.name not in copied)
