"""cifar_dist: train a residual CNN on CIFAR-10 on one device, many GPUs or many nodes.

The path of one run, one module per arrow:
  config -> distribute (strategy) -> data (arrays) -> pipeline (tf.data)
  -> augment + model inside the compiled step (train) -> evaluate -> export.
"""

__version__ = "0.1.0"
