"""The seed network, reconstructed from its published description, as a plain Keras model.

Published: a residual CNN for CIFAR-10 with 2,229,248 trainable parameters, 88.7%
test accuracy. Its description (three blocks of 64/128/256 filters, skip connections
combined by Add with BatchNorm after each add, max pooling after each block, average
pooling, dense layers, softmax over 10 classes) does not pin every layer. This
reconstruction has 2,229,898 trainable parameters (+650, +0.03%); the layer table is
in docs/model.md (`python -m cifar_dist.model` prints it):

  conv3x3(64) BN ReLU maxpool                                   32 -> 16
  a = conv3x3(128); b = conv3x3(128)(a); BN(a + b); maxpool     16 -> 8
  a = conv3x3(256); b = conv3x3(256)(a); c = BN(a + b)
                    d = conv3x3(256)(c); BN(c + d); maxpool      8 -> 4
  avgpool 2x2 -> flatten(1024) -> dense(512) ReLU -> dense(10) softmax

The model takes float images in [0, 1] (the step converts and augments uint8 on the
device). Under mixed precision every layer computes in the policy's dtype except the
final dense + softmax, which stays float32 for a numerically safe loss.
"""

from __future__ import annotations

import keras

SEED_TRAINABLE_PARAMS = 2_229_898   # this reconstruction (pinned in tests)
PUBLISHED_TRAINABLE_PARAMS = 2_229_248


def _conv(filters, name, policy):
    return keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                               kernel_initializer="he_normal", name=name, dtype=policy)


def _bn(name, policy, synchronized):
    # momentum 0.9 (Keras default 0.99): the moving statistics settle within a few hundred
    # steps, which short (10-epoch, smoke) runs need for a sound evaluation.
    return keras.layers.BatchNormalization(momentum=0.9, name=name, dtype=policy,
                                           synchronized=synchronized)


def build_seed_model(num_classes: int = 10, dtype_policy: str = "float32",
                     sync_batch_norm: bool = False, widths=(64, 128, 256),
                     dense_units: int = 512, name: str = "seed") -> keras.Model:
    w1, w2, w3 = widths
    p, sync = dtype_policy, sync_batch_norm
    inputs = keras.Input((32, 32, 3), name="image")
    x = _conv(w1, "b1_conv", p)(inputs)
    x = _bn("b1_bn", p, sync)(x)
    x = keras.layers.MaxPooling2D(name="b1_pool", dtype=p)(x)

    a = _conv(w2, "b2_conv1", p)(x)
    b = _conv(w2, "b2_conv2", p)(a)
    x = _bn("b2_bn", p, sync)(keras.layers.Add(name="b2_add", dtype=p)([a, b]))
    x = keras.layers.MaxPooling2D(name="b2_pool", dtype=p)(x)

    a = _conv(w3, "b3_conv1", p)(x)
    b = _conv(w3, "b3_conv2", p)(a)
    c = _bn("b3_bn1", p, sync)(keras.layers.Add(name="b3_add1", dtype=p)([a, b]))
    d = _conv(w3, "b3_conv3", p)(c)
    x = _bn("b3_bn2", p, sync)(keras.layers.Add(name="b3_add2", dtype=p)([c, d]))
    x = keras.layers.MaxPooling2D(name="b3_pool", dtype=p)(x)

    x = keras.layers.AveragePooling2D(2, name="avgpool", dtype=p)(x)
    x = keras.layers.Flatten(name="flatten", dtype=p)(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="fc", dtype=p)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probs",
                                 dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def build_model(name: str, num_classes: int = 10, dtype_policy: str = "float32",
                sync_batch_norm: bool = False) -> keras.Model:
    """`seed`: the published network. `tiny`: the same topology, 1/8 the width, for tests."""
    if name == "seed":
        return build_seed_model(num_classes, dtype_policy, sync_batch_norm)
    if name == "tiny":
        return build_seed_model(num_classes, dtype_policy, sync_batch_norm,
                                widths=(8, 16, 32), dense_units=32, name="tiny")
    raise ValueError(f"unknown model {name!r}")


def trainable_param_count(model: keras.Model) -> int:
    return int(sum(v.numpy().size for v in model.trainable_weights))


def forward_flops_per_image(model: keras.Model) -> int:
    """Multiply-adds x 2 of the conv and dense layers for one image (the usual FLOP count)."""
    flops = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, out_ch = layer.output.shape
            kh, kw, in_ch, _ = layer.kernel.shape
            flops += 2 * h * w * out_ch * kh * kw * in_ch
        elif isinstance(layer, keras.layers.Dense):
            flops += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(flops)


def train_flops_per_image(model: keras.Model) -> int:
    """Forward + backward ~= 3x forward (gradients w.r.t. activations and weights)."""
    return 3 * forward_flops_per_image(model)


def layer_table(model: keras.Model) -> str:
    """A markdown table of the layers: name, type, output shape, trainable parameters."""
    rows = ["| layer | type | output shape | trainable params |", "| --- | --- | --- | ---: |"]
    for layer in model.layers:
        count = sum(int(w.numpy().size) for w in layer.trainable_weights)
        shape = "x".join(str(d) for d in layer.output.shape[1:])
        rows.append(f"| {layer.name} | {type(layer).__name__} | {shape} | {count:,} |")
    return "\n".join(rows)


def main():
    """Prints docs/model.md: `python -m cifar_dist.model > docs/model.md`."""
    model = build_seed_model()
    print("# The seed network (reconstruction)\n")
    print("Written by `python -m cifar_dist.model > docs/model.md`.\n")
    print(layer_table(model))
    print(f"\nTrainable parameters: {trainable_param_count(model):,} "
          f"(published: {PUBLISHED_TRAINABLE_PARAMS:,}, difference "
          f"{trainable_param_count(model) - PUBLISHED_TRAINABLE_PARAMS:+,}, "
          f"{(trainable_param_count(model) / PUBLISHED_TRAINABLE_PARAMS - 1) * 100:+.2f}%).  ")
    print("Non-trainable (BatchNorm moving statistics): "
          f"{sum(int(w.numpy().size) for w in model.non_trainable_weights):,}.  ")
    print(f"Forward: {forward_flops_per_image(model) / 1e9:.4f} GFLOP per image "
          "(2 x multiply-adds of conv and dense layers); training: "
          f"{train_flops_per_image(model) / 1e9:.4f} GFLOP per image (3x forward).")


if __name__ == "__main__":
    main()
