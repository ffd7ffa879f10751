"""Trained model -> a SavedModel that takes raw uint8 images, plus a .keras file.

  export/saved_model/   serving signature `serving_default`:
                          images: uint8 [N, 32, 32, 3]
                          -> probabilities float32 [N, classes], class_ids int64 [N],
                             class_names string [N]
  export/model.keras    the plain Keras model (float inputs in [0, 1])
  export/class_names.json

The exported copy is always float32 (whatever --dtype trained it) and holds plain, not
distributed, variables, so it loads anywhere with plain TensorFlow or Keras.
"""

from __future__ import annotations

import json
import os
import shutil

import keras
import tensorflow as tf

from cifar_dist.model import build_model


def plain_float32_copy(model: keras.Model, num_classes: int) -> keras.Model:
    """A float32 model with plain variables (call outside any strategy scope)."""
    copy = build_model(model.name, num_classes, "float32")
    copy.set_weights(model.get_weights())
    return copy


class ServingModule(tf.Module):
    def __init__(self, model: keras.Model, class_names):
        super().__init__()
        self.model = model
        self.class_names = tf.constant(list(class_names))

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8, name="images")])
    def serve(self, images):
        probs = self.model(tf.cast(images, tf.float32) / 255.0, training=False)
        ids = tf.argmax(probs, axis=-1)
        return {"probabilities": probs, "class_ids": ids,
                "class_names": tf.gather(self.class_names, ids)}


def export_model(model: keras.Model, class_names, export_dir: str) -> str:
    """Writes export_dir atomically (a temporary folder renamed into place)."""
    plain = plain_float32_copy(model, len(class_names))
    tmp = export_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    module = ServingModule(plain, class_names)
    tf.saved_model.save(module, os.path.join(tmp, "saved_model"),
                        signatures={"serving_default": module.serve})
    plain.save(os.path.join(tmp, "model.keras"))
    with open(os.path.join(tmp, "class_names.json"), "w") as f:
        json.dump(list(class_names), f)
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)
    return export_dir
