"""Classify image files with an exported model; write one CSV row per image.

    python -m cifar_dist.predict --model=PATH [--output=FILE.csv] [--notta] PATHS...

PATH: an export folder (DIR/export), a training model_dir, a model.keras file or a
SavedModel folder; without --model, the model shipped in the package
(cifar_dist/assets/seed_model.keras) when there is one. A folder with model.keras loads it in
Keras' safe mode; a bare SavedModel (a program: trust its source) loads with a warning
line, once its signature is checked to take uint8 [N, 32, 32, 3]. PATHS: image files and folders;
folders are searched recursively for .png .jpg .jpeg .bmp .gif .webp files. Any size is
resized to 32x32 (a note on stderr says so), grayscale/palette/RGBA/CMYK/16-bit images
are converted to 8-bit RGB.

CSV (to --output, or stdout): path,label,confidence, then one probability column per class.
The probabilities are the mean of each image's and its mirror image's (flip test-time
augmentation, chosen on validation); --notta gives the model's own for the image alone.
A missing, corrupt or non-image file gives one `cifar_dist: error: PATH: ...` line on
stderr and no row; the other files are still classified. File names that are not UTF-8 or
hold control characters are escaped (errors.printable) in the CSV and on stderr.

Exit status: 0 every file classified; 2 any file failed, or bad input (a bad flag, no
usable model: one line on stderr, nothing written); 76 stopped by SIGTERM, SIGINT or
SIGUSR1 (one line; --output is not written, its temporary removed).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from cifar_dist import atomic, cli, signals  # noqa: E402
from cifar_dist import images as images_lib  # noqa: E402
from cifar_dist.errors import ConfigError, ImageError, ModelError, printable  # noqa: E402

SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                             "seed_model.keras")
# What the shipped model scores and how it was trained (tools/ship_model.py writes it,
# tests/test_shipped_model.py checks the model against it).
SHIPPED_RECORD = os.path.splitext(SHIPPED_MODEL)[0] + ".json"
CHUNK = 2048  # files decoded and classified per round: bounds memory for huge folders
MAX_RESIZE_NOTES = 20  # then one summary line, not thousands of notes


@dataclasses.dataclass
class FileResult:
    path: str
    probabilities: np.ndarray | None = None  # float32 [classes]
    error: str = ""
    original_size: tuple | None = None  # (width, height) before resizing

    @property
    def resized(self) -> bool:
        return self.original_size is not None and self.original_size != (32, 32)


def default_model() -> str:
    """The shipped model's path; ModelError when the package ships none."""
    if os.path.isfile(SHIPPED_MODEL):
        return SHIPPED_MODEL
    raise ModelError("no --model given and no model shipped in the package "
                     f"({SHIPPED_MODEL} is absent): pass --model=MODEL_DIR/export")


def expand_paths(paths) -> tuple[list, list]:
    """(image files in order, FileResults with errors for paths that give no images)."""
    files, errors = [], []
    for path in paths:
        if os.path.isdir(path):
            found = images_lib.list_images(path)
            if not found:
                errors.append(FileResult(path, error=f"{printable(path)}: folder holds no "
                                         f"images ({', '.join(images_lib.IMAGE_EXTENSIONS)})"))
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)  # named explicitly: tried whatever its extension
        else:
            errors.append(FileResult(path, error=f"{printable(path)}: no such file or folder"))
    return files, errors


def _load(path: str):
    try:
        array, size = images_lib.load_image(path)
        return array, size, ""
    except ImageError as e:
        return None, None, str(e)
    except (OSError, MemoryError) as e:  # e.g. permission denied on open
        return None, None, printable(f"{path}: {type(e).__name__}: {e}")


def predict_files(model, files, batch_size: int = 256, tta: bool | str = False):
    """Yields a FileResult per file, in order: CHUNK files are decoded, then classified in
    batches of batch_size (tta: ExportedModel.probabilities' test-time augmentation).
    (Decoding in threads was slower here: small files are GIL-bound.)"""
    stop = signals.current() or signals.StopRequest()  # none in force: checks never fire
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        loaded = []
        for path in chunk:
            stop.check()  # a signal ends the command here, within a file's decoding
            loaded.append(_load(path))
        good = [i for i, (array, _, _) in enumerate(loaded) if array is not None]
        probs = _classify(model, [loaded[i][0] for i in good], batch_size, tta, stop)
        row_of = {i: r for r, i in enumerate(good)}
        for i, path in enumerate(chunk):
            array, size, error = loaded[i]
            if error:
                yield FileResult(path, error=error)
            else:
                yield FileResult(path, probabilities=probs[row_of[i]], original_size=size)


def _classify(model, arrays, batch_size: int, tta: bool, stop):
    """probabilities of the arrays, one batch per call, a signal checked between them."""
    if not arrays:
        return None
    images = np.stack(arrays)
    out = []
    for i in range(0, len(images), batch_size):
        stop.check()
        out.append(model.probabilities(images[i:i + batch_size], batch_size, tta))
    return np.concatenate(out)


# --------------------------------------------------------------------------- command line

def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", "", "export folder, training model_dir, model.keras or "
                        "SavedModel folder (default: the model shipped in the package)",
                        flag_values=fv)
    flags.DEFINE_string("output", "", "CSV file to write (default: stdout)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "images per inference batch", flag_values=fv)
    from cifar_dist.config import TTA_VIEWS  # noqa: PLC0415
    from cifar_dist.export import TTA_DEFAULT  # noqa: PLC0415 (export imports no TensorFlow)

    flags.DEFINE_bool("tta", TTA_DEFAULT, "test-time augmentation: each image's probabilities "
                      "combine those of several views of it (the views recorded with the "
                      "model, or --tta_views); --notta: the image alone", flag_values=fv)
    flags.DEFINE_enum("tta_views", "", ["", *TTA_VIEWS[1:]], "test-time views "
                      "(empty: the ones recorded with the model; flip: the image and its "
                      "mirror; flip_translate: airbench's 6 views)", flag_values=fv)


def _check_output(path: str) -> None:
    if not path:
        return
    if os.path.isdir(path):
        raise ConfigError(f"--output={path} is a folder; name a .csv file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output={path}: {parent} is not a writable folder")


def predict_command(fv, paths) -> int:
    if not paths:
        raise ConfigError("give at least one image file or folder to classify")
    if fv.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {fv.batch_size}")
    _check_output(fv.output)
    model_path = os.path.expanduser(fv.model) if fv.model else default_model()
    if not os.path.exists(model_path):
        raise ModelError(f"--model={model_path}: no such file or folder")
    from cifar_dist.export import load_exported  # noqa: PLC0415 (imports TensorFlow)
    model = load_exported(model_path)
    (signals.current() or signals.StopRequest()).check()  # loading took seconds

    files, failures = expand_paths(paths)
    for result in failures:  # paths that gave no files at all
        print(f"cifar_dist: error: {result.error}", file=sys.stderr)
    # File names go through printable(), so the CSV is always valid UTF-8, one row per
    # line; stdout in an ASCII locale escapes the rest instead of stopping half-way.
    if not fv.output and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    # --output: whole or not at all.
    ok = resized = 0
    with (atomic.writing(fv.output, newline="", encoding="utf-8") if fv.output
          else contextlib.nullcontext(sys.stdout)) as out:
        writer = csv.writer(out)
        writer.writerow(["path", "label", "confidence"] + list(model.class_names))
        tta = (fv.tta_views or True) if fv.tta else False
        for result in predict_files(model, files, fv.batch_size, tta):
            if result.error:
                failures.append(result)
                print(f"cifar_dist: error: {result.error}", file=sys.stderr)
                continue
            if result.resized:
                resized += 1
                if resized <= MAX_RESIZE_NOTES:
                    w, h = result.original_size
                    print(f"cifar_dist: note: {printable(result.path)}: resized from "
                          f"{w}x{h} to 32x32", file=sys.stderr)
            p = result.probabilities
            best = int(np.argmax(p))
            writer.writerow([printable(result.path), model.class_names[best], f"{p[best]:.6f}"]
                            + [f"{v:.6f}" for v in p])
            ok += 1
    if resized > MAX_RESIZE_NOTES:
        print(f"cifar_dist: note: {resized - MAX_RESIZE_NOTES} more images resized to 32x32",
              file=sys.stderr)
    if failures:
        print(f"cifar_dist: {len(failures)} of {ok + len(failures)} inputs failed; "
              f"{ok} classified", file=sys.stderr)
        return 2
    return 0


main, run = cli.entry_points(__doc__, define_flags, predict_command)


if __name__ == "__main__":
    run()
