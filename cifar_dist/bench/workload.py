"""What every training method is given: the same configuration, data and network, built
through the package's public entry points (Config, data.load, distribute.make_strategy,
train.Trainer), and the network's FLOP and parameter counts."""

from __future__ import annotations

import math

from cifar_dist.bench.settings import Settings


def make_config(settings: Settings, **overrides):
    from cifar_dist.config import Config  # noqa: PLC0415

    s = settings
    steps = (s.warmup_windows + s.windows) * s.steps_per_window + 1
    real = s.data == "real"
    # Synthetic sizes only for synthetic data: a Config refuses a flag without effect.
    sizes = {} if real else dict(synthetic_train_size=s.synthetic_size, synthetic_test_size=16)
    values = dict(
        dataset="cifar10" if real else "synthetic", data_dir=s.data_dir if real else "",
        **sizes, test_subset=16 if real else 0, model=s.model, batch_size=s.batch_size,
        # SGD as in the Keras methods (2) and (3), not the seed recipe's AdamW: like with like
        optimizer="sgd", learning_rate=0.1, weight_decay=5e-4,
        train_steps=steps, dtype=s.dtype, strategy="one_device", model_dir="",
        enable_tensorboard=False, export=False, skip_eval=True, log_steps=10 ** 9)
    values.update(overrides)
    return Config(**values)


def load_bundle(cfg):
    from cifar_dist import data  # noqa: PLC0415
    return data.load(cfg)


def build_trainer(cfg):
    from cifar_dist import distribute, train  # noqa: PLC0415

    strategy, cluster = distribute.make_strategy(cfg)  # first: before any other op
    bundle = load_bundle(cfg)
    return train.Trainer(cfg, strategy, cluster, bundle), bundle


def model_counts(model):
    from cifar_dist.model import forward_flops_per_image, train_flops_per_image  # noqa: PLC0415

    params = list(model.trainable_variables)
    n = int(sum(math.prod(tuple(v.shape)) for v in params))
    return {"forward_flops_per_image": forward_flops_per_image(model),
            "train_flops_per_image": train_flops_per_image(model),
            "trainable_params": n,
            # fp32 gradients (variables stay fp32 under mixed precision): what is all-reduced
            "gradient_bytes_per_step": 4 * n,
            "gradient_tensors": len(params)}
