"""The exported model: write it (from a trained model or a checkpoint) and load it back.

  export/saved_model/   serving signature `serving_default`:
                          images: uint8 [N, 32, 32, 3]
                          -> probabilities float32 [N, classes], class_ids int64 [N],
                             class_names string [N]
                        plus a string variable `class_names` (every class, in order)
  export/model.keras    the plain Keras model (float inputs in [0, 1])
  export/class_names.json

The exported copy is always float32 (whatever --dtype trained it) and holds plain, not
distributed, variables, so it loads anywhere with plain TensorFlow or Keras; the
SavedModel needs nothing from cifar_dist.

Re-export from the newest checkpoint of a run (e.g. after --export=false, or a run
stopped before its end):

    python -m cifar_dist.export --model_dir=DIR [--checkpoint=PATH] [--export_dir=DIR/export]

A run trained with --ema_decay exports the moving averages of its weights, as the run
itself did; --noaveraged_weights exports its trained weights instead (to compare the two).

Exit status: 0 done; 2 bad input (one line on stderr, nothing written), or the run is
still training (it holds model_dir/.lock); 75 stopped by SIGTERM, SIGINT or SIGUSR1
(one line; the export as it was, no temporary left).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from cifar_dist import atomic, cli, signals  # noqa: E402
from cifar_dist.errors import (CheckpointError, ConfigError, ModelError, UserError,  # noqa: E402
                               printable)
from cifar_dist.run_dir import (CLASS_NAMES_FILE, CONFIG, EXPORT, KERAS_FILE,  # noqa: E402
                                SAVED_MODEL_DIR, TTA_FILE, RunDir)

# TensorFlow and Keras are imported inside the functions that need them: the command line
# then rejects bad input at once, before TensorFlow's start-up noise on stderr.


# --------------------------------------------------------------------------- writing

def plain_float32_copy(model, num_classes: int, arch=None):
    """A float32 model with plain variables (call outside any strategy scope); arch: the
    run's model.Architecture (None: the network's own)."""
    from cifar_dist.model import build_model  # noqa: PLC0415

    copy = build_model(model.name, num_classes, "float32", arch=arch)
    copy.set_weights(model.get_weights())
    return copy


def serving_module(model, class_names):
    """A tf.Module whose `serve` takes uint8 images (the SavedModel's serving_default)."""
    import tensorflow as tf  # noqa: PLC0415

    from cifar_dist.augment import to_unit_float  # noqa: PLC0415

    class ServingModule(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            # A variable (not a constant) so that tf.saved_model.load exposes the full list.
            self.class_names = tf.Variable(list(class_names), trainable=False,
                                           name="class_names")

        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8,
                                                    name="images")])
        def serve(self, images):
            # The same uint8 -> float conversion as training and evaluation, bit for bit.
            probs = self.model(to_unit_float(images), training=False)
            ids = tf.argmax(probs, axis=-1)
            return {"probabilities": probs, "class_ids": ids,
                    "class_names": tf.gather(self.class_names, ids)}

    return ServingModule()


def check_replaceable(export_dir: str) -> str:
    """export_dir is replaced as a whole: it must be absent, empty or an earlier export."""
    return atomic.check_replaceable(export_dir, "export_dir", "export",
                                    (SAVED_MODEL_DIR, KERAS_FILE, CLASS_NAMES_FILE, TTA_FILE))


def export_model(model, class_names, export_dir: str, arch=None,
                 tta_views: str = "flip") -> str:
    """Writes export_dir atomically (a temporary folder renamed into place): a signal
    (signals.Interrupted) or an error leaves no half export. tta_views: the test-time
    augmentation recorded with the model (tta.json), what predict and evaluate apply."""
    import tensorflow as tf  # noqa: PLC0415

    export_dir = check_replaceable(export_dir)
    plain = plain_float32_copy(model, len(class_names), arch)
    stop = signals.current() or signals.StopRequest()  # none in force: checks never fire
    with atomic.staged(export_dir, folder=True) as tmp:
        module = serving_module(plain, class_names)
        tf.saved_model.save(module, os.path.join(tmp, SAVED_MODEL_DIR),
                            signatures={"serving_default": module.serve})
        stop.check()  # a signal meanwhile: the temporary is removed, nothing replaced
        plain.save(os.path.join(tmp, KERAS_FILE))
        with open(os.path.join(tmp, CLASS_NAMES_FILE), "w") as f:
            json.dump(list(class_names), f)
        with open(os.path.join(tmp, TTA_FILE), "w") as f:
            json.dump({"views": tta_views}, f)
    logging.info("exported %s", export_dir)
    return export_dir


def model_from_checkpoint(model_dir: str, checkpoint: str = "", averaged: bool = True) -> tuple:
    """(float32 Keras model with the checkpoint's weights, run config, checkpoint path).
    A run with --ema_decay gives its averaged weights, unless averaged=False."""
    run = RunDir(model_dir)
    saved = run.read_trained_config()
    path = checkpoint or run.latest_checkpoint()
    import tensorflow as tf  # noqa: PLC0415

    from cifar_dist.model import Architecture, build_model  # noqa: PLC0415

    if not tf.io.gfile.exists(path + ".index"):
        raise CheckpointError(f"--checkpoint={path}: no such checkpoint ({path}.index missing)")
    try:
        model = build_model(saved["model"], len(saved["class_names"]), "float32",
                            arch=Architecture.of(saved["model"], saved))
    except ValueError as e:
        raise ModelError(f"{run.join(CONFIG)}: {e}") from None
    reason = _restore(model, path, averaged=averaged and bool(saved.get("ema_decay")))
    if reason:
        # A restore that failed half-way leaves deferred restorations behind, whose
        # deleters log ~30 "unrestored values" warnings when collected, i.e. after our
        # error line: collect them now, with TensorFlow's logger silenced.
        del model
        with _tf_warnings_silenced():
            gc.collect()
        raise CheckpointError(f"{path}: does not fit a {saved['model']!r} model with "
                              f"{len(saved['class_names'])} classes ({reason})")
    return model, saved, path


@contextlib.contextmanager
def _tf_warnings_silenced():
    import tensorflow as tf  # noqa: PLC0415

    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def _restore(model, path: str, averaged: bool = False) -> str:
    """Restores the model's variables from the checkpoint; "" or why they do not fit.
    averaged (a run with --ema_decay): the trainable weights are then the moving averages
    the checkpoint keeps beside them, as the training run exported them.
    Returns (not raises) so that no traceback keeps the failed restore alive."""
    import tensorflow as tf  # noqa: PLC0415

    with _tf_warnings_silenced():
        try:
            # The checkpoint also holds the optimizer and step counters: expect_partial;
            # but every model variable must come from it, or the export would be half random.
            status = tf.train.Checkpoint(model=model).restore(path).expect_partial()
            status.assert_existing_objects_matched()
            if averaged:
                # The same object path as optimizer.Update's list: optimizer/averages/<i>.
                holder = tf.Module()
                holder.averages = [tf.Variable(tf.zeros(v.shape, v.dtype))
                                   for v in model.trainable_variables]
                tf.train.Checkpoint(optimizer=holder).restore(path).expect_partial() \
                    .assert_existing_objects_matched()
                for var, average in zip(model.trainable_variables, holder.averages):
                    var.assign(average)
            return ""
        except (tf.errors.OpError, AssertionError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        gc.collect()
    return reason


def export_from_checkpoint(model_dir: str, export_dir: str = "", checkpoint: str = "",
                           averaged: bool = True, tta_views: str = "") -> str:
    """Builds the run's model, restores the checkpoint (newest by default), exports it.
    averaged=False: the trained weights of an --ema_decay run, not their averages.
    tta_views: recorded with the model ("": the run's --tta_views)."""
    run = RunDir(model_dir)
    run.read_trained_config()  # a missing model_dir is the first thing to say
    export_dir = check_replaceable(export_dir or run.export)
    stop = signals.current()
    if stop is not None:
        stop.model_dir = model_dir  # a signal from now on: 75 when the run has checkpoints
    with _run_lock(run):
        # Holding the lock, nothing else writes this export: what a killed export left
        # beside it (SIGKILL gives no chance to clean up) is removed, not kept forever.
        for name in atomic.remove_leftovers(export_dir):
            logging.info("removed %s, left by an interrupted export", name)
        model, saved, path = model_from_checkpoint(model_dir, checkpoint, averaged)
        if stop is not None:
            stop.check()
        from cifar_dist.model import Architecture  # noqa: PLC0415
        out = export_model(model, saved["class_names"], export_dir,
                           Architecture.of(saved["model"], saved),
                           tta_views or saved.get("tta_views", TTA_VIEWS_BEFORE))
    logging.info("exported %s from %s", out, path)
    return out


@contextlib.contextmanager
def _run_lock(run: RunDir):
    """The run's lock for the export (training holds it while it runs: its export and
    checkpoints change under us). A model_dir we cannot write (read-only, another user's)
    is exported to --export_dir without it, after checking that no run holds it."""
    then = "it exports itself at its end: export it after that"
    run.refuse_if_training(then)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run.lock())
        except UserError:  # taken between the check and here
            raise ConfigError(f"--model_dir={run.path} is in use by a run still training; "
                              f"{then}") from None
        except OSError:  # cannot write model_dir: no lock to take (checked above)
            pass
        yield


# --------------------------------------------------------------------------- loading

# Test-time augmentation (augment.tta_probabilities) by default in predict and evaluate, with
# the views recorded in the export (tta.json: the run's --tta_views); an export written before
# that file existed gets flip TTA, its default then (chosen on validation, docs/tuning.md).
TTA_DEFAULT = True
TTA_VIEWS_BEFORE = "flip"


class ExportedModel:
    """An exported model, loaded back: uint8 images -> class probabilities, in batches."""

    def __init__(self, path: str, kind: str, class_names, fn, tta_views: str = TTA_VIEWS_BEFORE):
        self.path, self.kind, self.class_names, self._fn = path, kind, tuple(class_names), fn
        self.tta_views = tta_views

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def probabilities(self, images_u8: np.ndarray, batch_size: int = 500,
                      tta: bool | str = False) -> np.ndarray:
        """float32 [N, classes] for uint8 [N, 32, 32, 3], a batch at a time.
        tta: False (the image alone), True (the export's recorded views) or the views by
        name (augment.TTA_VIEWS): augment.tta_probabilities, the one TTA function."""
        images_u8 = np.asarray(images_u8)
        if images_u8.dtype != np.uint8 or images_u8.shape[1:] != (32, 32, 3):
            raise ValueError(f"expected uint8 [N, 32, 32, 3], got {images_u8.dtype} "
                             f"{images_u8.shape}")
        import tensorflow as tf  # noqa: PLC0415

        from cifar_dist.augment import tta_probabilities  # noqa: PLC0415

        views = self.tta_views if tta is True else (tta or "none")
        out = [tta_probabilities(self._fn, tf.constant(images_u8[i:i + batch_size]),
                                 views).numpy()
               for i in range(0, len(images_u8), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)


def _tta_views_beside(folder: str) -> str:
    """The views recorded in an export folder's tta.json (TTA_VIEWS_BEFORE without one)."""
    from cifar_dist.config import TTA_VIEWS  # noqa: PLC0415

    path = os.path.join(folder, TTA_FILE)
    if not os.path.isfile(path):
        return TTA_VIEWS_BEFORE
    try:
        with open(path) as f:
            views = json.load(f).get("views")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if views not in TTA_VIEWS:
        raise ModelError(f"{path}: views {views!r} is not one of {', '.join(TTA_VIEWS)}")
    return views


def _class_names_beside(folder: str, num_classes: int, what: str):
    path = os.path.join(folder, CLASS_NAMES_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                names = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(names, list) or len(names) != num_classes:
            raise ModelError(f"{path}: expected a list of {num_classes} class names for {what}")
        if not all(isinstance(n, str) for n in names):
            raise ModelError(f"{path}: class names must be strings")
        return tuple(printable(n) for n in names)
    from cifar_dist.data import CIFAR10_CLASSES  # noqa: PLC0415
    if num_classes == len(CIFAR10_CLASSES):
        logging.warning("%s: no %s beside it; assuming the CIFAR-10 class names", what,
                        CLASS_NAMES_FILE)
        return CIFAR10_CLASSES
    return tuple(f"class_{i}" for i in range(num_classes))


def _load_keras(path: str) -> ExportedModel:
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from cifar_dist.augment import to_unit_float  # noqa: PLC0415

    try:
        # safe_mode: refuse Lambda layers and other deserialised code.
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a bad file
        raise ModelError(f"{path}: not a loadable Keras model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if tuple(model.input_shape[1:]) != (32, 32, 3) or len(model.output_shape) != 2:
        raise ModelError(f"{path}: expects inputs {model.input_shape} -> {model.output_shape}, "
                         "not [N, 32, 32, 3] -> [N, classes]")
    names = _class_names_beside(os.path.dirname(path), model.output_shape[-1], path)

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8)])
    def fn(images):
        return model(to_unit_float(images), training=False)

    return ExportedModel(path, "keras", names, fn, _tta_views_beside(os.path.dirname(path)))


SAVED_MODEL_WARNING = ("a SavedModel is a program (its graph runs whatever operations "
                       "it holds, file access included): load only one from a trusted source; "
                       f"a {KERAS_FILE} beside it loads in Keras' safe mode instead")


def _check_signature(path: str, signature) -> str:
    """The serving signature's one input name; ModelError unless it takes uint8
    [N or None, 32, 32, 3] and returns probabilities [N, classes]."""
    import tensorflow as tf  # noqa: PLC0415

    args, kwargs = signature.structured_input_signature
    specs = list(args) + list(kwargs.items())
    if args or len(kwargs) != 1:
        raise ModelError(f"{path}: serving_default takes {len(specs)} inputs, not one uint8 "
                         "[N, 32, 32, 3] image batch")
    (name, spec), = kwargs.items()
    shape = spec.shape
    if spec.dtype != tf.uint8 or shape.rank != 4 or list(shape)[1:] != [32, 32, 3]:
        raise ModelError(f"{path}: serving_default takes {name} {spec.dtype.name} "
                         f"{shape.as_list() if shape.rank is not None else '[unknown]'}, "
                         "not uint8 [N, 32, 32, 3] images")
    outputs = signature.structured_outputs
    probs = outputs.get("probabilities") if isinstance(outputs, dict) else None
    if probs is None or probs.shape.rank != 2 or probs.shape[-1] is None:
        raise ModelError(f"{path}: serving_default returns no 'probabilities' [N, classes]")
    return name


def _load_saved_model(path: str) -> ExportedModel:
    import tensorflow as tf  # noqa: PLC0415

    try:
        loaded = tf.saved_model.load(path)
        signature = loaded.signatures["serving_default"]
    except Exception as e:  # noqa: BLE001
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"{path}: not a loadable SavedModel with a serving_default signature "
                         f"({type(e).__name__}: {reason})") from None
    # Checked here, so that predict refuses it before writing its CSV header.
    input_name = _check_signature(path, signature)
    num = signature.structured_outputs["probabilities"].shape[-1]
    names = None
    if hasattr(loaded, "class_names"):
        try:
            names = tuple(printable(n) for n in loaded.class_names.numpy())
        except (AttributeError, TypeError, ValueError):
            names = None
        if names is not None and len(names) != num:
            raise ModelError(f"{path}: {len(names)} class names for {num} probabilities")
    if names is None:  # exported before the variable existed: class_names.json one folder up
        names = _class_names_beside(os.path.dirname(os.path.normpath(path)), num, path)
    print(f"cifar_dist: warning: {printable(path)}: {SAVED_MODEL_WARNING}", file=sys.stderr)

    def fn(images):
        return signature(**{input_name: images})["probabilities"]

    return ExportedModel(path, "saved_model", names, fn,
                         _tta_views_beside(os.path.dirname(os.path.normpath(path))))


def load_exported(path: str) -> ExportedModel:
    """Loads a model from an export folder, a training model_dir, a .keras file or a SavedModel.

    A folder holding model.keras is read through Keras in safe mode (no deserialised
    code; the same code path as training), so an export folder (saved_model/ and
    model.keras) loads its model.keras. A SavedModel folder with no model.keras is read
    through tf.saved_model.load after its serving signature is checked, with a warning:
    a SavedModel is a program.
    """
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        if path.endswith(".keras"):
            return _load_keras(path)
        raise ModelError(f"{path}: not a model (give an export folder, a .keras file "
                         "or a SavedModel folder)")
    for candidate in (path, os.path.join(path, EXPORT)):
        if os.path.isfile(os.path.join(candidate, KERAS_FILE)):
            return _load_keras(os.path.join(candidate, KERAS_FILE))
        for saved_model in (candidate, os.path.join(candidate, SAVED_MODEL_DIR)):
            if os.path.isfile(os.path.join(saved_model, "saved_model.pb")):
                return _load_saved_model(saved_model)
    raise ModelError(f"{path}: no exported model here (expected {KERAS_FILE}, {SAVED_MODEL_DIR}/ "
                     f"or {EXPORT}/; `python -m cifar_dist.export --model_dir=...` "
                     "makes one from a checkpoint)")


# --------------------------------------------------------------------------- command line

def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model_dir", None, "training model_dir (config.json, checkpoints/)",
                        flag_values=fv)
    flags.DEFINE_string("checkpoint", "", "checkpoint prefix to export (default: the newest in "
                        "model_dir/checkpoints)", flag_values=fv)
    flags.DEFINE_string("export_dir", "", "where to write (default: model_dir/export, replaced)",
                        flag_values=fv)
    flags.DEFINE_bool("averaged_weights", True, "a run trained with --ema_decay: export the "
                      "moving averages of the weights (as the run did); false: the trained "
                      "weights", flag_values=fv)
    from cifar_dist.config import TTA_VIEWS  # noqa: PLC0415

    flags.DEFINE_enum("tta_views", "", ["", *TTA_VIEWS],
                      "test-time augmentation recorded with the model (what predict and "
                      "evaluate apply; empty: the run's --tta_views)", flag_values=fv)


def export_command(fv, args) -> int:
    cli.no_positional_args(args)
    if not fv.model_dir:
        raise UserError("--model_dir is required (the training run to export)")
    out = export_from_checkpoint(os.path.expanduser(fv.model_dir), fv.export_dir, fv.checkpoint,
                                 fv.averaged_weights, fv.tta_views)
    print(f"exported {printable(out)}")
    return 0


main, run = cli.entry_points(__doc__, define_flags, export_command)


if __name__ == "__main__":
    run()
