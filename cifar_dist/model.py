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

import dataclasses

import keras
import numpy as np

SEED_TRAINABLE_PARAMS = 2_229_898   # this reconstruction (pinned in tests)
PUBLISHED_TRAINABLE_PARAMS = 2_229_248
AIRBENCH94_PARAMS = 1_971_640       # airbench's ablation network, the frozen whitening included

# The normalisation airbench applies before its whitening layer (CIFAR-10's channel means
# and standard deviations on [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The network options a flag can change (--bn_momentum, --bn_scale, --dirac_init,
    --whiten_init); "auto" takes the network's own from NETWORK_DEFAULTS."""
    bn_momentum: float = 0.9
    bn_scale: bool = True
    dirac_init: bool = False
    whiten_init: str = "none"   # none | trainable | frozen

    @classmethod
    def of(cls, model: str, settings: dict) -> "Architecture":
        """From a run's settings (a Config's dict or config.json; missing keys: auto)."""
        own = NETWORK_DEFAULTS.get(model, cls())
        pick = {k: settings.get(k, "auto") for k in ("bn_momentum", "bn_scale", "dirac_init",
                                                      "whiten_init")}
        return cls(
            bn_momentum=own.bn_momentum if pick["bn_momentum"] == "auto"
            else float(pick["bn_momentum"]),
            bn_scale=own.bn_scale if pick["bn_scale"] == "auto" else pick["bn_scale"] == "true",
            dirac_init=own.dirac_init if pick["dirac_init"] == "auto"
            else pick["dirac_init"] == "true",
            whiten_init=own.whiten_init if pick["whiten_init"] == "auto" else pick["whiten_init"])


# momentum 0.9 (Keras default 0.99) for the seed: the moving statistics settle within a few
# hundred steps, which short (10-epoch, smoke) runs need for a sound evaluation. airbench94:
# the paper's network (PyTorch momentum 0.4 = Keras 0.6, no learnable scale, identity init,
# a frozen whitening first layer).
NETWORK_DEFAULTS = {
    "seed": Architecture(),
    "tiny": Architecture(),
    "airbench94": Architecture(bn_momentum=0.6, bn_scale=False, dirac_init=True,
                               whiten_init="frozen"),
}


def _conv(filters, name, policy):
    return keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                               kernel_initializer="he_normal", name=name, dtype=policy)


def _bn(name, policy, synchronized, arch=Architecture(), epsilon=1e-3):
    return keras.layers.BatchNormalization(momentum=arch.bn_momentum, scale=arch.bn_scale,
                                           epsilon=epsilon, name=name, dtype=policy,
                                           synchronized=synchronized)


def build_seed_model(num_classes: int = 10, dtype_policy: str = "float32",
                     sync_batch_norm: bool = False, widths=(64, 128, 256),
                     dense_units: int = 512, name: str = "seed",
                     arch: Architecture = Architecture()) -> keras.Model:
    w1, w2, w3 = widths
    p, sync = dtype_policy, sync_batch_norm
    inputs = keras.Input((32, 32, 3), name="image")
    first = _conv(w1, "b1_conv", p)
    if arch.whiten_init == "frozen":
        first.build((None, 32, 32, 3))
        first.kernel.trainable = False
    x = first(inputs)
    x = _bn("b1_bn", p, sync, arch)(x)
    x = keras.layers.MaxPooling2D(name="b1_pool", dtype=p)(x)

    a = _conv(w2, "b2_conv1", p)(x)
    b = _conv(w2, "b2_conv2", p)(a)
    x = _bn("b2_bn", p, sync, arch)(keras.layers.Add(name="b2_add", dtype=p)([a, b]))
    x = keras.layers.MaxPooling2D(name="b2_pool", dtype=p)(x)

    a = _conv(w3, "b3_conv1", p)(x)
    b = _conv(w3, "b3_conv2", p)(a)
    c = _bn("b3_bn1", p, sync, arch)(keras.layers.Add(name="b3_add1", dtype=p)([a, b]))
    d = _conv(w3, "b3_conv3", p)(c)
    x = _bn("b3_bn2", p, sync, arch)(keras.layers.Add(name="b3_add2", dtype=p)([c, d]))
    x = keras.layers.MaxPooling2D(name="b3_pool", dtype=p)(x)

    x = keras.layers.AveragePooling2D(2, name="avgpool", dtype=p)(x)
    x = keras.layers.Flatten(name="flatten", dtype=p)(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="fc", dtype=p)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probs",
                                 dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def build_airbench94(num_classes: int = 10, dtype_policy: str = "float32",
                     sync_batch_norm: bool = False, widths=(64, 256, 256),
                     arch: Architecture = NETWORK_DEFAULTS["airbench94"]) -> keras.Model:
    """airbench94's network (Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU"):

      normalise (fixed CIFAR-10 mean/std) -> 2x2 conv, 24 filters, bias, GELU   32 -> 31
        (the patch-whitening layer: filters set from the data, frozen; see whitening.py)
      3 groups (64, 256, 256): conv3x3 -> maxpool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU
                                                                 31 -> 15 -> 7 -> 3
      global max pool -> dense (no bias) -> x 1/9 -> softmax (float32)

    Convolutions and the dense layer start as PyTorch's defaults (uniform, +/- 1/sqrt(fan_in));
    BatchNorm's epsilon is the reference's 1e-12. The input is [0, 1] like the seed network's,
    so export and predict treat both alike.
    """
    p, sync = dtype_policy, sync_batch_norm
    torch_default = keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Normalization(mean=list(CIFAR10_MEAN),
                                   variance=[s * s for s in CIFAR10_STD], name="normalize",
                                   dtype=p)(inputs)
    whiten = keras.layers.Conv2D(24, 2, padding="valid", kernel_initializer=torch_default,
                                 name="whiten", dtype=p)
    if arch.whiten_init == "frozen":
        whiten.build((None, 32, 32, 3))
        whiten.kernel.trainable = False
    x = keras.layers.Activation("gelu", name="whiten_gelu", dtype=p)(whiten(x))
    for g, width in enumerate(widths, 1):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False,
                                kernel_initializer=torch_default, name=f"g{g}_conv1",
                                dtype=p)(x)
        x = keras.layers.MaxPooling2D(2, name=f"g{g}_pool", dtype=p)(x)
        x = _bn(f"g{g}_bn1", p, sync, arch, epsilon=1e-12)(x)
        x = keras.layers.Activation("gelu", name=f"g{g}_gelu1", dtype=p)(x)
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False,
                                kernel_initializer=torch_default, name=f"g{g}_conv2",
                                dtype=p)(x)
        x = _bn(f"g{g}_bn2", p, sync, arch, epsilon=1e-12)(x)
        x = keras.layers.Activation("gelu", name=f"g{g}_gelu2", dtype=p)(x)
    x = keras.layers.GlobalMaxPooling2D(name="maxpool", dtype=p)(x)
    x = keras.layers.Dense(num_classes, use_bias=False, kernel_initializer=torch_default,
                           name="logits", dtype=p)(x)
    x = keras.layers.Rescaling(1.0 / 9.0, name="scale", dtype="float32")(x)
    outputs = keras.layers.Activation("softmax", name="probs", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="airbench94")


def build_model(name: str, num_classes: int = 10, dtype_policy: str = "float32",
                sync_batch_norm: bool = False, arch: Architecture | None = None) -> keras.Model:
    """`seed`: the published network. `airbench94`: airbench's. `tiny`: the seed's topology at
    1/8 the width, for tests. arch: None = the network's own options."""
    arch = arch or NETWORK_DEFAULTS.get(name, Architecture())
    if name == "seed":
        return build_seed_model(num_classes, dtype_policy, sync_batch_norm, arch=arch)
    if name == "tiny":
        return build_seed_model(num_classes, dtype_policy, sync_batch_norm,
                                widths=(8, 16, 32), dense_units=32, name="tiny", arch=arch)
    if name == "airbench94":
        return build_airbench94(num_classes, dtype_policy, sync_batch_norm, arch=arch)
    raise ValueError(f"unknown model {name!r}")


def first_layer_normalization(name: str):
    """(mean, std) the network subtracts and divides by before its first convolution, on
    [0, 1] images: what the whitening of that layer's patches must see."""
    if name == "airbench94":
        return CIFAR10_MEAN, CIFAR10_STD
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def first_conv(model: keras.Model) -> keras.layers.Conv2D:
    return next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))


def batch_norm_statistics(model: keras.Model) -> list:
    """Every BatchNormalization layer's moving mean and variance, in layer order."""
    return [v for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)]


def dirac_kernel(kernel: np.ndarray) -> np.ndarray:
    """A 3x3 kernel [kh, kw, in, out] whose first min(in, out) filters are identities (the
    centre tap of their own input channel is 1, every other tap 0), the rest unchanged:
    torch.nn.init.dirac_ on the first filters, as airbench."""
    kernel = np.array(kernel, copy=True)
    kh, kw, fan_in, fan_out = kernel.shape
    n = min(fan_in, fan_out)
    kernel[:, :, :, :n] = 0.0
    kernel[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
    return kernel


def initialize(model: keras.Model, arch: Architecture, whitening: np.ndarray | None = None):
    """Sets the initial weights that the architecture asks for, after the random ones: the
    identity (dirac) filters of every 3x3 convolution after the first, and the first
    convolution's whitening filters (whitening.py). A pure function of the weights and the
    data, so every replica and worker computes the same."""
    first = first_conv(model)
    if arch.dirac_init:
        for layer in model.layers:
            if (isinstance(layer, keras.layers.Conv2D) and layer is not first
                    and tuple(layer.kernel_size) == (3, 3)):
                layer.kernel.assign(dirac_kernel(layer.kernel.numpy()))
    if whitening is not None:
        kernel = first.kernel.numpy()
        count = min(whitening.shape[-1], kernel.shape[-1])
        kernel[..., :count] = whitening[..., :count]
        first.kernel.assign(kernel)


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


def _flops_line(model: keras.Model) -> str:
    return (f"Forward: {forward_flops_per_image(model) / 1e9:.4f} GFLOP per image "
            "(2 x multiply-adds of conv and dense layers); training: "
            f"{train_flops_per_image(model) / 1e9:.4f} GFLOP per image (3x forward).")


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
    print(_flops_line(model))
    airbench = build_airbench94()
    frozen = AIRBENCH94_PARAMS - trainable_param_count(airbench)
    print("\n# airbench94 (`--model=airbench94`)\n")
    print(layer_table(airbench))
    print(f"\nTrainable parameters: {trainable_param_count(airbench):,}, plus {frozen:,} in "
          f"the frozen whitening filters: {AIRBENCH94_PARAMS:,} (airbench's ablation "
          "network).  ")
    print(_flops_line(airbench))


if __name__ == "__main__":
    main()
