"""Image files -> uint8 [32, 32, 3]: the folder data source (data.py) and `predict` share this.

Any size is resized to 32x32 (area averaging when shrinking); grayscale, palette, CMYK,
RGBA (alpha dropped) and 16-bit images are converted to 8-bit RGB; an animated image
contributes its first frame. Decompression bombs (more than MAX_PIXELS pixels) are
refused before any pixel is decoded, so memory stays bounded.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

from cifar_dist.errors import DataError, ImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_PIXELS = 40_000_000  # ~ a 6300x6300 photo; a bomb claims far more
SIZE = 32


def _to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits by the format's range, not by clipping.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    return img.convert("RGB")


def load_image(path: str):
    """Returns (uint8 [32, 32, 3], original (width, height)). Raises ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise ImageError(f"{path}: image has zero size")
                if width * height > MAX_PIXELS:
                    raise ImageError(f"{path}: {width}x{height} is larger than the "
                                     f"{MAX_PIXELS:,}-pixel limit (decompression bomb?)")
                img.seek(0)  # animated: first frame
                img.draft("RGB", (SIZE * 2, SIZE * 2))  # JPEG: decode at reduced size, cheaply
                rgb = _to_rgb8(img)
                if rgb.size != (SIZE, SIZE):
                    rgb = rgb.resize((SIZE, SIZE), Image.Resampling.BOX if min(rgb.size) >= SIZE
                                     else Image.Resampling.BILINEAR)
                return np.asarray(rgb, dtype=np.uint8), (width, height)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: larger than the {MAX_PIXELS:,}-pixel limit "
                         f"(decompression bomb?): {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL raises these for bad files
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def list_images(folder: str):
    """Image files under folder, recursively, in sorted order."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out.extend(os.path.join(root, f) for f in sorted(files)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    return out


def load_class_folders(root: str, class_names=None):
    """ROOT/<class name>/<images> -> (uint8 images [N, 32, 32, 3], int32 labels, class
    names: the sorted subfolder names unless given)."""
    if class_names is None:
        class_names = tuple(sorted(d for d in os.listdir(root)
                                   if os.path.isdir(os.path.join(root, d))))
    if not class_names:
        raise DataError(f"{root}: no class subfolders (expected ROOT/<class name>/<images>)")
    if len(class_names) < 2:
        # One class scores 100% whatever the network does: nothing would be learnt.
        raise DataError(f"{root}: only one class folder ({class_names[0]}); a classifier "
                        "needs at least 2 (ROOT/<class name>/<images>, one folder per class)")
    images, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise DataError(f"{root}: class folder {name} is missing (present in train/)")
        paths = list_images(folder)
        if not paths:
            # Its label would exist but never be seen: refuse rather than train on 9 of 10.
            raise DataError(f"{folder}: class folder with no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        for path in paths:
            images.append(load_image(path)[0])
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.int32), class_names
