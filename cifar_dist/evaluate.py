"""Evaluate a trained run's exported model on a data split; write metrics, a report and plots.

    python -m cifar_dist.evaluate --model_dir=DIR [--split=test|train|validation] [--notta]
        [--dataset=... --data_dir=... --test_subset=N ...] [--output_dir=DIR/eval]

The data come from cifar_dist.data.load with the run's own config.json; any data flag
given here (--dataset, --data_dir, --download, --train_subset, --test_subset,
--synthetic_train_size, --synthetic_test_size, --seed) overrides it. So by default the run
is evaluated on exactly the test images it was checked against during training, and
--split=validation on the images it held out (runs trained with --validation_size).

Writes DIR/eval/ (replaced as a whole, atomically):
  metrics.json               accuracy (+ its standard error), loss, top-k accuracy,
                             per-class precision/recall/F1, confusion matrix, flip TTA
  classification_report.txt  scikit-learn's report with a header
  predictions.csv            index,true_id,true_label,predicted_id,predicted_label,
                             confidence,correct
  confusion_matrix.png, predictions.png (confident mistakes first), training_curves.png

Exit status: 0 done; 2 bad input (one line on stderr, nothing written); 75 (the run has
checkpoints) or 76 (it has none): stopped by SIGTERM/SIGINT/SIGUSR1, one line on stderr,
eval/ as it was before and no temporary folder left.
"""

from __future__ import annotations

import csv
import json
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from cifar_dist import atomic, cli  # noqa: E402
from cifar_dist import config as config_lib  # noqa: E402
from cifar_dist import signals  # noqa: E402
from cifar_dist.errors import ConfigError, DataError, ModelError, printable  # noqa: E402
from cifar_dist.export import TTA_DEFAULT  # noqa: E402 (export imports no TensorFlow)
from cifar_dist.run_dir import CONFIG, KERAS_FILE, SAVED_MODEL_DIR, RunDir  # noqa: E402

# TensorFlow, Keras, scikit-learn and matplotlib are imported where used, so that bad
# input is rejected at once (and before TensorFlow's start-up lines on stderr).

SPLITS = ("test", "train", "validation")
# Config fields a user may override here: where the data come from, not how it trained.
# Not --validation_size: a split held out now, unlike in training, would hold training images.
DATA_FIELDS = ("dataset", "data_dir", "download", "train_subset", "test_subset",
               "synthetic_train_size", "synthetic_test_size", "seed")
OUTPUT_FILES = ("metrics.json", "classification_report.txt", "predictions.csv")
PLOT_FILES = ("confusion_matrix.png", "predictions.png", "training_curves.png")


# --------------------------------------------------------------------------- inputs

def exported_model_path(model_dir: str) -> str:
    """DIR/export/model.keras (else DIR/export/saved_model), checked without importing
    TensorFlow."""
    if not model_dir:
        raise ConfigError("--model_dir is required (a training run's folder)")
    if not os.path.isdir(model_dir):
        raise ConfigError(f"--model_dir={model_dir}: no such folder")
    export_dir = RunDir(model_dir).export
    path = os.path.join(export_dir, KERAS_FILE)
    if os.path.isfile(path):
        return path
    # Only a SavedModel: loaded with a warning (a program), see export.load_exported.
    saved_model = os.path.join(export_dir, SAVED_MODEL_DIR)
    if os.path.isfile(os.path.join(saved_model, "saved_model.pb")):
        return saved_model
    raise ModelError(f"{path}: no exported model (train with --export=true, or run "
                     f"`python -m cifar_dist.export --model_dir={model_dir}`)")


def config_from_model_dir(model_dir: str, overrides: dict | None = None):
    """The run's Config from model_dir/config.json, with data overrides applied."""
    saved = RunDir(model_dir).read_trained_config()
    # Only what says where the data come from (+ the held-out split): training settings
    # and their cross-checks (which change between versions) do not matter here.
    values = {k: saved[k] for k in DATA_FIELDS + ("validation_size",) if k in saved}
    fields = config_lib.Config.__dataclass_fields__
    for k, v in values.items():  # config.json is a file: its types are checked, not trusted
        if type(v) is not type(fields[k].default):
            raise ModelError(f"{RunDir(model_dir).join(CONFIG)}: a data setting of the wrong "
                             f"type ({k}={v!r})")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(DATA_FIELDS))
    if unknown:
        raise ConfigError(f"cannot override {', '.join(unknown)} when evaluating (data flags "
                          f"only: {', '.join(DATA_FIELDS)})")
    values.update(overrides)
    if "data_dir" not in overrides and values.get("dataset") in ("sample", "synthetic"):
        values["data_dir"] = ""  # the run's own data_dir is not read with the data asked for
    if values.get("dataset") != "synthetic":  # the run's synthetic sizes, not read either
        for name in ("synthetic_train_size", "synthetic_test_size"):
            if name not in overrides:
                values.pop(name, None)
    try:
        if values.get("data_dir"):
            values["data_dir"] = os.path.expanduser(values["data_dir"])
        cfg = config_lib.Config(**values)
    except (TypeError, ValueError, AttributeError) as e:  # e.g. "train_subset": "ten"
        raise ModelError(f"{RunDir(model_dir).join(CONFIG)}: a data setting of the "
                         f"wrong type ({type(e).__name__}: {e})") from None
    # an empty cifar10 data_dir means "found automatically" (cifar10_files.locate_cifar10)
    if cfg.dataset in ("cifar10", "folder") and cfg.data_dir and not os.path.exists(cfg.data_dir):
        origin = ("--data_dir" if "data_dir" in overrides
                  else f"data_dir {cfg.data_dir!r} from {RunDir(model_dir).join(CONFIG)}"
                       + (" (relative to where training ran)" if not os.path.isabs(cfg.data_dir)
                          else ""))
        raise DataError(f"{origin}: not found from here; pass --data_dir=...")
    return cfg


def check_split_name(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"--split={split!r} is not one of {', '.join(SPLITS)}")


def select_split(bundle, split: str):
    check_split_name(split)
    chosen = getattr(bundle, split)
    if chosen is None:
        raise ConfigError("--split=validation: this run held out no validation split "
                          "(it was trained without --validation_size)")
    return chosen


# --------------------------------------------------------------------------- metrics

def summary_metrics(labels: np.ndarray, probs: np.ndarray, top_k: int) -> dict:
    """Accuracy (+ binomial standard error), cross-entropy loss, top-k accuracy. The loss
    is Keras' categorical_crossentropy, the function training's evaluation step calls."""
    import keras  # noqa: PLC0415
    from sklearn.metrics import top_k_accuracy_score  # noqa: PLC0415

    n, classes = probs.shape
    per_example = keras.losses.categorical_crossentropy(np.eye(classes, dtype=np.float32)[labels],
                                                        probs.astype(np.float32))
    accuracy = float(np.mean(np.argmax(probs, axis=1) == labels))
    k = min(top_k, classes)
    top = (float(top_k_accuracy_score(labels, probs, k=k, labels=np.arange(classes)))
           if k < classes else 1.0)
    return {"accuracy": accuracy,
            "accuracy_standard_error": math.sqrt(accuracy * (1.0 - accuracy) / n),
            "loss": float(np.mean(keras.ops.convert_to_numpy(per_example), dtype=np.float64)),
            "top_k": k, "top_k_accuracy": top}


def classification_metrics(labels: np.ndarray, predicted: np.ndarray, class_names) -> tuple:
    """(per-class/average dict, scikit-learn report text, confusion matrix)."""
    from sklearn.metrics import classification_report, confusion_matrix  # noqa: PLC0415

    ids = np.arange(len(class_names))
    kwargs = dict(labels=ids, target_names=list(class_names), zero_division=0)
    report = classification_report(labels, predicted, output_dict=True, **kwargs)
    text = classification_report(labels, predicted, digits=4, **kwargs)
    matrix = confusion_matrix(labels, predicted, labels=ids)

    def entry(d):
        return {"precision": d["precision"], "recall": d["recall"], "f1": d["f1-score"],
                "support": int(d["support"])}

    return ({"per_class": {name: entry(report[name]) for name in class_names},
             "macro_avg": entry(report["macro avg"]),
             "weighted_avg": entry(report["weighted avg"])}, text, matrix)


# --------------------------------------------------------------------------- curves

def read_tensorboard_scalars(model_dir: str, tags) -> dict:
    """{tag: (steps, values)} from model_dir/tensorboard; {} when there is none."""
    folder = RunDir(model_dir).tensorboard
    if not os.path.isdir(folder):
        return {}
    import tensorflow as tf  # noqa: PLC0415
    from google.protobuf.message import DecodeError  # noqa: PLC0415
    from tensorflow.core.util import event_pb2  # noqa: PLC0415

    found = {tag: {} for tag in tags}
    for name in sorted(os.listdir(folder)):
        if "tfevents" not in name:
            continue
        try:
            for record in tf.data.TFRecordDataset(os.path.join(folder, name)):
                event = event_pb2.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if value.tag in found and value.HasField("tensor"):
                        found[value.tag][int(event.step)] = float(
                            tf.make_ndarray(value.tensor))  # a resumed run rewrites steps
        except tf.errors.OpError as e:  # a truncated event file: use what was read
            logging.warning("%s: %s", name, str(e).splitlines()[0])
        except (DecodeError, ValueError, TypeError) as e:  # a damaged event: the same
            logging.warning("%s: unreadable event (%s)", name, type(e).__name__)
    return {tag: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)]))
            for tag, d in found.items() if d}


def plot_training_curves(model_dir: str, path: str, config: dict | None = None) -> bool:
    """training_curves.png from history.csv (+ TensorBoard scalars); False if no history.
    config: the run's config.json (labels the training curves)."""
    from cifar_dist import plots  # noqa: PLC0415

    history = RunDir(model_dir).read_history()
    if not history:
        logging.info("%s has no history.csv: no training curves", model_dir)
        return False
    first = history[0]
    steps_per_epoch = float(first["step"]) / max(float(first["epoch"]), 1.0)
    scalars = read_tensorboard_scalars(
        model_dir, ("train/learning_rate", "train/images_per_second"))

    def in_epochs(tag):
        if tag not in scalars:
            return None
        steps, values = scalars[tag]
        return steps / steps_per_epoch, values

    # Training loss/accuracy are measured on augmented images, with label smoothing in the
    # loss: say so, or the gap to the evaluation curve reads as a mistake.
    cfg = config if isinstance(config, dict) else {}
    smoothing = cfg.get("label_smoothing")
    notes = (["measured on augmented images"] if cfg.get("augment") is True else []) + \
        ([f"loss with label smoothing {smoothing:g}"]
         if isinstance(smoothing, (int, float)) and smoothing else [])
    if history[0].get("images_per_second") not in (None, ""):  # per epoch, training only
        speed = (np.array([float(r["epoch"]) for r in history]),
                 np.array([float(r["images_per_second"]) for r in history]))
        speed_title = "training images/s per epoch"
    else:
        # TensorBoard's per-window figure: the first window includes XLA compilation, a
        # window after an epoch end that epoch's evaluation and checkpoint.
        speed = in_epochs("train/images_per_second")
        speed_title = "images/s per log window\n(incl. compile, eval, checkpoints)"
    plots.training_curves(history, path, lr_curve=in_epochs("train/learning_rate"),
                          speed_curve=speed, speed_title=speed_title,
                          title=f"training curves: {model_dir}",
                          train_note=f"train: {', '.join(notes)}" if notes else "")
    return True


# --------------------------------------------------------------------------- writing

def _write_predictions(path, labels, predicted, confidence, class_names):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "true_id", "true_label", "predicted_id", "predicted_label",
                    "confidence", "correct"])
        for i, (t, p, c) in enumerate(zip(labels, predicted, confidence)):
            w.writerow([i, int(t), class_names[t], int(p), class_names[p], f"{c:.6f}",
                        int(t == p)])


def _report_text(metrics, sklearn_text) -> str:
    m = metrics
    lines = [f"model: {m['model_path']}",
             f"data: {m['data_source']}; split {m['split']}, {m['examples']} images",
             f"accuracy {m['accuracy']:.4f} (standard error {m['accuracy_standard_error']:.4f}), "
             f"loss {m['loss']:.4f}, top-{m['top_k']} accuracy {m['top_k_accuracy']:.4f}"]
    if m.get("tta"):
        t = m["tta"]
        lines.append(f"TTA ({t.get('views', 'flip')}): accuracy {t['accuracy']:.4f} (standard error "
                     f"{t['accuracy_standard_error']:.4f}), loss {t['loss']:.4f}, "
                     f"top-{t['top_k']} accuracy {t['top_k_accuracy']:.4f}")
    lines.append("(report below: without TTA)")
    return "\n".join(lines) + "\n\n" + sklearn_text


# --------------------------------------------------------------------------- entry point

def evaluate_model_dir(model_dir: str, bundle_or_cfg=None, *, split: str = "test",
                       tta: bool = TTA_DEFAULT, tta_views: str = "", top_k: int = 5,
                       batch_size: int = 500,
                       output_dir: str = "", plots: bool = True) -> dict:
    """Evaluates model_dir/export/model.keras on one split and writes output_dir.

    bundle_or_cfg: a cifar_dist.data.DataBundle (already loaded, e.g. by training), a
    Config (data.load(cfg) is called), or None (the run's config.json). output_dir
    defaults to model_dir/eval. Returns the metrics written to output_dir/metrics.json,
    plus "eval_dir". Raises UserError subclasses for bad input, before writing anything.

    Under a StopRequest (training's end, the evaluate command) a signal ends it at the next
    check below (Interrupted) and output_dir is left as it was; the temporary folder is
    removed then, or by the StopRequest's watchdog if a step hangs.
    """
    from cifar_dist import data  # noqa: PLC0415

    stop = signals.current() or signals.StopRequest()  # none in force: checks never fire
    run = RunDir(model_dir)
    model_path = exported_model_path(model_dir)
    check_split_name(split)
    if top_k < 1 or batch_size < 1:
        raise ConfigError("--top_k and --eval_batch_size must be >= 1")
    output_dir = atomic.check_replaceable(output_dir or run.eval, "output_dir", "evaluation",
                                          OUTPUT_FILES + PLOT_FILES)
    if isinstance(bundle_or_cfg, data.DataBundle):
        bundle = bundle_or_cfg
    else:
        cfg = bundle_or_cfg if bundle_or_cfg is not None else config_from_model_dir(model_dir)
        bundle = data.load(cfg)
    stop.check()
    chosen = select_split(bundle, split)
    if plots:
        run.read_history()  # a damaged history.csv fails now, not after the metrics

    from cifar_dist import export  # noqa: PLC0415
    model = export.load_exported(model_path)
    if model.num_classes != bundle.num_classes:
        raise DataError(f"{model_path} predicts {model.num_classes} classes but the data "
                        f"({bundle.source}) has {bundle.num_classes}")
    if tuple(model.class_names) != tuple(bundle.class_names):
        raise DataError(f"{model_path} was trained on classes {list(model.class_names)}, "
                        f"the data ({bundle.source}) has {list(bundle.class_names)}")
    stop.check()
    class_names = list(bundle.class_names)
    labels, images = chosen.labels.astype(np.int64), chosen.images
    logging.info("evaluating %s on %d %s images of %s", model_path, len(labels), split,
                 bundle.source)

    probs = model.probabilities(images, batch_size)
    predicted = np.argmax(probs, axis=1)
    confidence = probs[np.arange(len(labels)), predicted]
    metrics = {"model_path": model_path, "data_source": bundle.source, "split": split,
               "examples": int(len(labels)), "class_names": class_names}
    metrics.update(summary_metrics(labels, probs, top_k))
    per_class, sklearn_text, matrix = classification_metrics(labels, predicted, class_names)
    metrics.update(per_class)
    metrics["confusion_matrix"] = matrix.tolist()
    metrics["tta"] = None
    views = (tta_views or model.tta_views) if tta else "none"
    if views != "none":  # augment.tta_probabilities, as predict and the export
        metrics["tta"] = dict(summary_metrics(labels, model.probabilities(images, batch_size,
                                                                          views), top_k),
                              views=views)
    stop.check()

    # A private temporary folder beside output_dir: two evaluations at once (or one
    # beside training's own) never write into or delete each other's.
    try:
        with atomic.staged(output_dir, folder=True) as tmp:
            _write_report(tmp, run, metrics, sklearn_text, matrix, images, labels, predicted,
                          confidence, plots)
            stop.check()  # the last moment to stop: output_dir is replaced as a whole after
    except FileExistsError:
        raise ConfigError(f"--output_dir={output_dir}: kept being replaced by other "
                          "evaluations") from None
    logging.info("%s accuracy %.4f (+/- %.4f), loss %.4f; wrote %s", split, metrics["accuracy"],
                 metrics["accuracy_standard_error"], metrics["loss"], output_dir)
    return dict(metrics, eval_dir=output_dir)


def _write_report(folder, run, metrics, sklearn_text, matrix, images, labels, predicted,
                  confidence, plots) -> None:
    """Writes OUTPUT_FILES (and PLOT_FILES) into folder; metrics gains "files"."""
    class_names, split = metrics["class_names"], metrics["split"]
    files = list(OUTPUT_FILES)
    _write_predictions(os.path.join(folder, "predictions.csv"), labels, predicted,
                       confidence, class_names)
    with open(os.path.join(folder, "classification_report.txt"), "w") as f:
        f.write(_report_text(metrics, sklearn_text))
    if plots:
        from cifar_dist import plots as plots_lib  # noqa: PLC0415
        accuracy = (f"accuracy {metrics['accuracy']:.2%} "
                    f"(standard error {metrics['accuracy_standard_error']:.2%})")
        plots_lib.confusion_matrix(
            matrix, class_names, os.path.join(folder, "confusion_matrix.png"),
            title=f"{split}: {len(labels)} images, {accuracy}")
        plots_lib.prediction_grid(
            images, labels, predicted, confidence, class_names,
            os.path.join(folder, "predictions.png"),
            title=f"{split}: most confident mistakes first (red: wrong, green: right; "
                  "number: confidence)")
        files += list(PLOT_FILES[:2])
        if plot_training_curves(run.path, os.path.join(folder, "training_curves.png"),
                                run.read_config()):
            files.append("training_curves.png")
    metrics["files"] = sorted(files)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)


# --------------------------------------------------------------------------- command line

def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model_dir", None, "the training run's folder (holds export/)",
                        flag_values=fv)
    flags.DEFINE_enum("split", "test", SPLITS, "which split to evaluate (validation: runs "
                      "trained with --validation_size)", flag_values=fv)
    flags.DEFINE_bool("tta", TTA_DEFAULT, "also report test-time augmentation (the views "
                      "recorded with the model, or --tta_views)", flag_values=fv)
    flags.DEFINE_enum("tta_views", "", ["", *config_lib.TTA_VIEWS[1:]], "test-time views "
                      "(empty: the ones recorded with the exported model, tta.json)",
                      flag_values=fv)
    flags.DEFINE_integer("top_k", 5, "k of the top-k accuracy", flag_values=fv)
    flags.DEFINE_integer("eval_batch_size", 500, "images per inference batch", flag_values=fv)
    flags.DEFINE_string("output_dir", "", "where to write (default: model_dir/eval, replaced)",
                        flag_values=fv)
    flags.DEFINE_bool("plots", True, "write the PNG plots", flag_values=fv)
    # Data overrides: default None = "as in the run's config.json".
    flags.DEFINE_enum("dataset", None, config_lib.DATASETS, "data source", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "data folder (see cifar_dist.main --helpfull)",
                        flag_values=fv)
    flags.DEFINE_bool("download", None, "cifar10 without --data_dir: download it into the "
                      "Keras cache when not found (as the training flag)", flag_values=fv)
    for name in ("train_subset", "test_subset", "synthetic_train_size", "synthetic_test_size",
                 "seed"):
        flags.DEFINE_integer(name, None, f"as the training flag --{name}", flag_values=fv)


def evaluate_command(fv, args) -> int:
    cli.no_positional_args(args)
    # From here on a signal ends the command within seconds with one line (signals.py).
    with signals.StopRequest() as stop:
        model_dir = os.path.expanduser(fv.model_dir or "")
        exported_model_path(model_dir)  # fail fast, before the data load
        stop.model_dir = model_dir  # a signal from now on: 75 when the run has checkpoints
        # Its export/ may be replaced at any moment, and eval/ is its to write at its end.
        RunDir(model_dir).refuse_if_training("evaluate it when that run has finished")
        cfg = config_from_model_dir(model_dir, {name: fv[name].value for name in DATA_FIELDS})
        stop.check()
        m = evaluate_model_dir(model_dir, cfg, split=fv.split, tta=fv.tta,
                               tta_views=fv.tta_views, top_k=fv.top_k,
                               batch_size=fv.eval_batch_size, output_dir=fv.output_dir,
                               plots=fv.plots)
        stop.check()  # a signal during the last step: stop, as training's end does
    line = (f"{m['split']}_accuracy={m['accuracy']:.4f} (+/- {m['accuracy_standard_error']:.4f} "
            f"standard error, {m['examples']} images) loss={m['loss']:.4f} "
            f"top{m['top_k']}_accuracy={m['top_k_accuracy']:.4f}")
    if m["tta"]:
        line += f" tta_accuracy={m['tta']['accuracy']:.4f} tta_views={m['tta']['views']}"
    print(f"{line} eval_dir={printable(m['eval_dir'])}")  # one line, whatever the name
    return 0


main, run = cli.entry_points(__doc__, define_flags, evaluate_command)


if __name__ == "__main__":
    run()
