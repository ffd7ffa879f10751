"""Flags -> one frozen, validated Config. Every later step reads only the Config.

Flags are grouped by concern (data, model, optimisation, precision, distribution,
output) so that a flagfile in configs/ reads like a table of every knob of a recipe.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from absl import flags, logging

from cifar_dist.errors import ConfigError, printable

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")
DATASETS = ("cifar10", "sample", "folder", "synthetic")
DTYPES = ("float32", "float16", "bfloat16")
MODELS = ("seed", "tiny", "airbench94")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
LR_SCALING = ("none", "linear", "sqrt")
CLUSTERS = ("auto", "tf_config", "slurm")
ALL_REDUCE = ("auto", "ring", "nccl")
DATA_ON_DEVICE = ("auto", "true", "false")
FLIPS = ("random", "alternating", "none")
AUTO_BOOL = ("auto", "true", "false")
WHITEN_INIT = ("auto", "none", "trainable", "frozen")
WEIGHT_DECAY_MODES = ("decoupled", "coupled")
TTA_VIEWS = ("none", "flip", "flip_translate")
MAX_CPU_DEVICES_PER_CORE = 8
# Every integer flag fits in int32 (steps, sizes, epochs, the seed): a larger one would
# reach TensorFlow or numpy as an overflow, or a memory error, long after start-up.
MAX_INT_FLAG = 2**31 - 1
# A timeout longer than a week is a typo (and 1e300 s overflows TensorFlow's milliseconds).
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600.0


# The defaults are configs/seed.cfg's recipe (tests/test_config.py keeps the two equal):
# `python -m cifar_dist.main` with no flags trains the seed network for 10 epochs.
@dataclasses.dataclass(frozen=True)
class Config:
    # data
    dataset: str = "cifar10"
    data_dir: str = ""
    download: bool = True
    validation_size: int = 0
    train_subset: int = 0
    test_subset: int = 0
    synthetic_train_size: int = 1024
    synthetic_test_size: int = 256
    augment: bool = True
    rotation_degrees: float = 15.0
    shift_fraction: float = 0.1
    translate_pixels: int = 0
    flip: str = "random"
    # model ("auto": the network's own choice, see model.NETWORK_DEFAULTS)
    model: str = "seed"
    bn_momentum: str = "auto"
    bn_scale: str = "auto"
    dirac_init: str = "auto"
    whiten_init: str = "auto"
    whiten_bias_epochs: int = 0  # 0 = the first conv's bias trains throughout
    # optimisation
    batch_size: int = 256
    train_epochs: int = 10
    train_steps: int = 0
    optimizer: str = "adamw"
    learning_rate: float = 0.006
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "onecycle"
    warmup_fraction: float = 0.15
    weight_decay: float = 0.2
    weight_decay_mode: str = "decoupled"
    norm_lr_multiplier: float = 1.0
    norm_weight_decay_multiplier: float = 0.0
    bias_lr_multiplier: float = 1.0
    bias_weight_decay_multiplier: float = 0.0
    initial_lr_fraction: float = 0.0
    final_lr_fraction: float = 0.0
    label_smoothing: float = 0.1
    ema_decay: float = 0.0  # 0 = off
    lookahead_steps: int = 0  # 0 = off
    lookahead_decay: float = 0.95 ** 5
    lr_scaling: str = "none"
    base_batch_size: int = 256
    seed: int = 0
    # precision and compilation
    dtype: str = "float32"
    loss_scale: float = 32768.0
    jit_compile: bool = True
    steps_per_loop: str = "auto"
    data_on_device: str = "auto"
    deterministic: bool = False  # TF op determinism; needs jit_compile=False
    # distribution
    strategy: str = "one_device"
    num_gpus: int = -1
    num_cpu_devices: int = 0
    cluster: str = "auto"
    all_reduce: str = "auto"
    collective_timeout: float = 300.0
    startup_timeout: float = 600.0
    sync_batch_norm: bool = False
    # output
    model_dir: str = ""  # from_flags: runs/<UTC time> when not given
    checkpoint_steps: int = 0
    keep_checkpoints: int = 3
    log_steps: int = 50
    skip_eval: bool = False
    tta_views: str = "flip"
    enable_tensorboard: bool = True
    profile_steps: str = ""  # "A,B": a profiler trace of steps A..B (see profile_range)
    export: bool = True

    def __post_init__(self):
        validate(self)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """--profile_steps as (first, last) step, 1-based and inclusive (Keras'
        TensorBoard(profile_batch=...) convention); None when not profiling."""
        if not self.profile_steps:
            return None
        parts = _step_numbers(self.profile_steps)
        return parts[0], parts[-1]

    @property
    def dtype_policy(self) -> str:
        return {"float32": "float32", "float16": "mixed_float16",
                "bfloat16": "mixed_bfloat16"}[self.dtype]


def _step_numbers(text: str):
    """ "A,B" or "A" -> [A, B] / [A]: ASCII digits only (str.isdigit also takes '²',
    which int() then refuses); None when text is not that."""
    parts = [p.strip() for p in text.split(",")]
    if not (len(parts) in (1, 2) and all(p.isascii() and p.isdigit() for p in parts)):
        return None
    return [int(p) for p in parts]


def _choice(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"--{name}={value!r} is not one of {', '.join(allowed)}")


def validate(cfg: Config) -> None:
    """Checks that need no hardware; strategy-dependent checks live in distribute.py."""
    # NaN passes every `<` and `>` test below as False, inf most of them: refuse both first,
    # for every float field (a new one is covered without being listed).
    for field in dataclasses.fields(cfg):
        if field.type in (float, "float"):
            value = getattr(cfg, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ConfigError(f"--{field.name} must be a finite number, got {value!r}")
        elif field.type in (int, "int"):  # every int flag, found by type, as the floats
            value = getattr(cfg, field.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"--{field.name} must be an integer, got {value!r}")
            if abs(value) > MAX_INT_FLAG:
                raise ConfigError(f"--{field.name}={value} is out of range (at most "
                                  f"{MAX_INT_FLAG:,} either way)")
    _choice("strategy", cfg.strategy, STRATEGIES)
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("dtype", cfg.dtype, DTYPES)
    _choice("model", cfg.model, MODELS)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("lr_scaling", cfg.lr_scaling, LR_SCALING)
    _choice("cluster", cfg.cluster, CLUSTERS)
    _choice("all_reduce", cfg.all_reduce, ALL_REDUCE)
    _choice("data_on_device", cfg.data_on_device, DATA_ON_DEVICE)
    _choice("flip", cfg.flip, FLIPS)
    _choice("bn_scale", cfg.bn_scale, AUTO_BOOL)
    _choice("dirac_init", cfg.dirac_init, AUTO_BOOL)
    _choice("whiten_init", cfg.whiten_init, WHITEN_INIT)
    _choice("weight_decay_mode", cfg.weight_decay_mode, WEIGHT_DECAY_MODES)
    _choice("tta_views", cfg.tta_views, TTA_VIEWS)
    if cfg.bn_momentum != "auto":
        try:
            momentum = float(cfg.bn_momentum)
        except ValueError:
            momentum = math.nan
        if not 0 <= momentum < 1:
            raise ConfigError(f"--bn_momentum={cfg.bn_momentum!r} must be 'auto' or a number "
                              "in [0, 1) (Keras' convention: the weight of the old statistics)")
    if cfg.translate_pixels and (cfg.rotation_degrees or cfg.shift_fraction):
        raise ConfigError("--translate_pixels needs --rotation_degrees=0 and "
                          "--shift_fraction=0 (whole-pixel translation replaces the seed's "
                          "affine map)")
    if not 0 <= cfg.translate_pixels <= 8:
        raise ConfigError(f"--translate_pixels must be in 0..8, got {cfg.translate_pixels}")
    if not 0 <= cfg.rotation_degrees <= 180 or not 0 <= cfg.shift_fraction <= 0.5:
        raise ConfigError("--rotation_degrees must be in [0, 180] and --shift_fraction in "
                          f"[0, 0.5], got {cfg.rotation_degrees} and {cfg.shift_fraction}")
    if not 0 < cfg.lookahead_decay < 1:
        raise ConfigError(f"--lookahead_decay must be in (0, 1), got {cfg.lookahead_decay}")
    for name in ("initial_lr_fraction", "final_lr_fraction"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"--{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.steps_per_loop != "auto":
        steps = _step_numbers(cfg.steps_per_loop)
        if not (steps and len(steps) == 1 and 0 < steps[0] <= MAX_INT_FLAG):
            raise ConfigError(f"--steps_per_loop={cfg.steps_per_loop!r} must be 'auto' or a "
                              f"positive number of steps (at most {MAX_INT_FLAG:,})")
    if cfg.profile_steps:
        parts = _step_numbers(cfg.profile_steps)
        if not (parts and 1 <= parts[0] <= parts[-1] <= MAX_INT_FLAG):
            raise ConfigError(f"--profile_steps={cfg.profile_steps!r} must be A,B (steps A to "
                              "B, 1 <= A <= B) or A (one step)")
    positive = {"batch_size": cfg.batch_size, "base_batch_size": cfg.base_batch_size,
                "log_steps": cfg.log_steps, "keep_checkpoints": cfg.keep_checkpoints,
                "learning_rate": cfg.learning_rate, "collective_timeout": cfg.collective_timeout,
                "startup_timeout": cfg.startup_timeout, "loss_scale": cfg.loss_scale}
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"--{name} must be > 0, got {value}")
    non_negative = {"train_epochs": cfg.train_epochs, "train_steps": cfg.train_steps,
                    "validation_size": cfg.validation_size, "train_subset": cfg.train_subset,
                    "test_subset": cfg.test_subset, "seed": cfg.seed,
                    "checkpoint_steps": cfg.checkpoint_steps,
                    "num_cpu_devices": cfg.num_cpu_devices, "weight_decay": cfg.weight_decay,
                    "synthetic_train_size": cfg.synthetic_train_size,
                    "synthetic_test_size": cfg.synthetic_test_size,
                    "whiten_bias_epochs": cfg.whiten_bias_epochs,
                    "lookahead_steps": cfg.lookahead_steps,
                    "norm_lr_multiplier": cfg.norm_lr_multiplier,
                    "norm_weight_decay_multiplier": cfg.norm_weight_decay_multiplier,
                    "bias_lr_multiplier": cfg.bias_lr_multiplier,
                    "bias_weight_decay_multiplier": cfg.bias_weight_decay_multiplier}
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"--{name} must be >= 0, got {value}")
    for name in ("collective_timeout", "startup_timeout"):
        if getattr(cfg, name) > MAX_TIMEOUT_SECONDS:
            raise ConfigError(f"--{name}={getattr(cfg, name):g} s is more than a week "
                              f"(at most {MAX_TIMEOUT_SECONDS:.0f})")
    if cfg.num_gpus < -1:
        raise ConfigError(f"--num_gpus must be -1 (all) or >= 0, got {cfg.num_gpus}")
    if cfg.train_epochs == 0 and cfg.train_steps == 0:
        raise ConfigError("set --train_epochs or --train_steps to a positive number")
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"--label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0 <= cfg.warmup_fraction < 1:
        raise ConfigError(f"--warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError(f"--ema_decay must be in [0, 1) (0 = off), got {cfg.ema_decay}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.dataset == "folder" and not cfg.data_dir:
        raise ConfigError("--dataset=folder needs --data_dir (e.g. --data_dir=/path/to/photos, "
                          "one subfolder per class)")
    if cfg.data_dir and cfg.dataset in ("sample", "synthetic"):
        # Not dropped in silence: `--flagfile=configs/smoke.cfg --data_dir=/my/cifar` would
        # train on the shipped sample and never read /my/cifar.
        what = "the sample shipped with cifar_dist" if cfg.dataset == "sample" else "random images"
        raise ConfigError(f"--data_dir={printable(cfg.data_dir)} is not read with "
                          f"--dataset={cfg.dataset} ({what}): add --dataset=cifar10 (or folder) "
                          "after the flagfile to train on it, or drop --data_dir")
    if cfg.deterministic and cfg.jit_compile:
        raise ConfigError("--deterministic needs --jit_compile=false: XLA in TF 2.21 has no "
                          "deterministic MaxPool gradient (XLA on CPU is already run-to-run "
                          "reproducible without the flag)")
    # Each logical CPU device runs its own replica's step and thread pools: many more
    # than the cores only thrash, and such a number is far more likely a typo.
    max_cpu_devices = MAX_CPU_DEVICES_PER_CORE * (os.cpu_count() or 1)
    if cfg.num_cpu_devices > max_cpu_devices:
        raise ConfigError(f"--num_cpu_devices={cfg.num_cpu_devices} is more than "
                          f"{MAX_CPU_DEVICES_PER_CORE} per CPU core ({os.cpu_count()} cores "
                          f"here: at most {max_cpu_devices})")
    if cfg.num_cpu_devices and cfg.strategy not in ("mirrored", "default"):
        raise ConfigError("--num_cpu_devices splits the CPU for --strategy=mirrored; "
                          f"it does nothing with --strategy={cfg.strategy}")
    # A flag that does nothing with the others given is refused, not dropped in silence
    # (only when it differs from its default: a flagfile may spell the default out).
    _refuse_ignored(cfg)


def _refuse_ignored(cfg: Config) -> None:
    defaults = Config.__dataclass_fields__
    ignored = [  # (flag, why it has no effect here)
        ("num_gpus", cfg.strategy != "mirrored",
         f"it picks GPUs for --strategy=mirrored, not --strategy={cfg.strategy}"),
        ("num_gpus", cfg.num_cpu_devices > 0,
         "--num_cpu_devices puts the replicas on the CPU"),
        ("loss_scale", cfg.dtype != "float16",
         f"loss scaling is used with --dtype=float16 only, not --dtype={cfg.dtype}"),
        ("synthetic_train_size", cfg.dataset != "synthetic",
         f"it sizes --dataset=synthetic, not --dataset={cfg.dataset}"),
        ("synthetic_test_size", cfg.dataset != "synthetic",
         f"it sizes --dataset=synthetic, not --dataset={cfg.dataset}"),
        ("base_batch_size", cfg.lr_scaling == "none",
         "it is the batch size --lr_scaling scales from, and --lr_scaling=none"),
        ("lookahead_decay", cfg.lookahead_steps == 0,
         "lookahead is off (--lookahead_steps=0)"),
    ]
    for name, no_effect, why in ignored:
        value = getattr(cfg, name)
        if no_effect and value != defaults[name].default:
            raise ConfigError(f"--{name}={value} has no effect: {why}; drop it "
                              "(or set what it needs)")


# --------------------------------------------------------------------------- flags

def define_flags(flag_values=None) -> None:
    """Defines one absl flag per Config field, with the field's default. Idempotent."""
    fv = flags.FLAGS if flag_values is None else flag_values
    if "batch_size" in fv:
        return
    from cifar_dist.cli import refuse_flagfile_cycles  # noqa: PLC0415
    refuse_flagfile_cycles(fv)
    d = Config.__dataclass_fields__
    help_text = {
        "dataset": "cifar10 (local python layout or TFDS), sample (2,048 + 512 real CIFAR-10 "
                   "images shipped in the package), folder (class subfolders of images), synthetic",
        "data_dir": "cifar10: folder with cifar-10-batches-py/, that folder, cifar-10-python.tar.gz, "
                    "or a TFDS data_dir (empty: found automatically, see README 'Data sources'); "
                    "folder: root with one subfolder per class (train/ and test/ "
                    "subfolders are used as splits when present)",
        "download": "cifar10 without --data_dir: download the official cifar-10-python.tar.gz "
                    "into the Keras cache when no copy is found (--download=false forbids it)",
        "validation_size": "hold out this many training images (deterministic) as a validation "
                           "split; evaluation then uses it instead of the test split",
        "train_subset": "use only the first N training images (0 = all): smoke runs and tests",
        "test_subset": "use only the first N test images (0 = all)",
        "synthetic_train_size": "number of random training images for --dataset=synthetic",
        "synthetic_test_size": "number of random test images for --dataset=synthetic",
        "augment": "augment the training images on the device (the next four flags; default: "
                   "the seed's rotation +/-15 deg, 10%% shifts, random flip)",
        "rotation_degrees": "augmentation: rotation uniform in +/- this many degrees",
        "shift_fraction": "augmentation: continuous shifts up to this fraction of the image "
                          "size (bilinear, nearest fill)",
        "translate_pixels": "augmentation: whole-pixel translation by up to N pixels with "
                            "reflect padding (the fast recipes'; needs --rotation_degrees=0 "
                            "--shift_fraction=0)",
        "flip": "augmentation: random (p=0.5), alternating (each example mirrored in every "
                "other epoch from a random phase: airbench's) or none",
        "model": "seed (the published 2.2M-parameter residual net), airbench94 (airbench's "
                 "2.0M-parameter net) or tiny (for tests)",
        "bn_momentum": "BatchNorm momentum, Keras' convention (weight of the old moving "
                       "statistics; PyTorch's momentum is 1 minus it): auto = the network's "
                       "own (seed 0.9, airbench94 0.6)",
        "bn_scale": "BatchNorm with a learnable scale (gamma): auto (seed yes, airbench94 no), "
                    "true, false",
        "dirac_init": "initialise 3x3 convolutions after the first as partial identities "
                      "(dirac): auto (seed no, airbench94 yes), true, false",
        "whiten_init": "the first convolution's filters from the whitening of the training "
                       "images' patches: auto (seed none, airbench94 frozen), none, "
                       "trainable, frozen",
        "whiten_bias_epochs": "with whitening: train the first convolution's bias for this "
                              "many epochs, then freeze it (0 = never frozen)",
        "batch_size": "GLOBAL batch size, summed over all replicas and workers",
        "train_epochs": "epochs to train (ignored when --train_steps > 0)",
        "train_steps": "total optimizer steps (overrides --train_epochs when > 0)",
        "optimizer": "sgd (momentum, Nesterov by default), adam or adamw",
        "learning_rate": "peak learning rate at --base_batch_size (see --lr_scaling)",
        "momentum": "SGD momentum",
        "nesterov": "Nesterov momentum for SGD",
        "schedule": "onecycle (linear warmup then linear decay to 0), cosine (warmup then cosine), constant",
        "warmup_fraction": "fraction of all steps spent warming the learning rate up from 0",
        "weight_decay": "weight decay of the kernels (biases and BatchNorm: see the "
                        "*_weight_decay_multiplier flags)",
        "weight_decay_mode": "decoupled (each step shrinks a weight by rate x decay, as Keras' "
                             "AdamW) or coupled (decay x weight added to the gradient, as "
                             "PyTorch's SGD)",
        "norm_lr_multiplier": "learning-rate multiplier of BatchNorm parameters",
        "norm_weight_decay_multiplier": "weight-decay multiplier of BatchNorm parameters "
                                        "(0: not decayed)",
        "bias_lr_multiplier": "learning-rate multiplier of conv and dense biases",
        "bias_weight_decay_multiplier": "weight-decay multiplier of conv and dense biases "
                                        "(0: not decayed)",
        "initial_lr_fraction": "the warmup starts at this fraction of the peak rate",
        "final_lr_fraction": "onecycle/cosine end at this fraction of the peak rate",
        "lookahead_steps": "lookahead: every N steps the weights move to a moving average of "
                           "themselves (0 = off), as airbench",
        "lookahead_decay": "lookahead: the average's decay at the end of training; at step t "
                           "of T it is decay x (t/T)^3, and the last step takes the average",
        "ema_decay": "exponential moving average of the weights (0 = off), updated in the "
                     "compiled step with a warm-up, min(decay, (1 + t) / (10 + t)) at step t; "
                     "evaluation and export then use the averaged weights",
        "label_smoothing": "label smoothing of the categorical cross-entropy",
        "lr_scaling": "how the peak learning rate scales when --batch_size differs from "
                      "--base_batch_size: none, linear (Goyal et al.) or sqrt",
        "base_batch_size": "the global batch size --learning_rate was tuned for",
        "seed": "seed of data order, augmentation and initialisation",
        "dtype": "float32, float16 (mixed, dynamic loss scaling) or bfloat16 (mixed)",
        "loss_scale": "float16: the initial dynamic loss scale (halved after each overflowing "
                      "step, doubled after 2,000 good ones)",
        "jit_compile": "compile the per-replica step (augmentation, forward, loss, gradients) with XLA",
        "steps_per_loop": "training steps per tf.function call: a number, or auto (100 on GPUs; "
                          "on CPUs about 25 s of work at 100 GFLOP/s, at most 100: 10 for the "
                          "seed network at batch 256); calls also end at every log line, "
                          "checkpoint and epoch end, and a stop signal is acted on between calls",
        "data_on_device": "keep the uint8 training split on each device and gather batches inside "
                          "the compiled step: auto (when it is at most 1 GiB), true, false (tf.data)",
        "deterministic": "enable TensorFlow op determinism (bitwise-reproducible runs, slower)",
        "strategy": "one_device, mirrored (all local GPUs or --num_cpu_devices), multi_worker, default",
        "num_gpus": "mirrored: number of local GPUs to use (-1 = all)",
        "num_cpu_devices": "mirrored without GPUs: split the CPU into N logical devices (N replicas)",
        "cluster": "multi_worker: where the cluster comes from: auto (TF_CONFIG, else SLURM), tf_config, slurm",
        "all_reduce": "cross-device all-reduce: auto (NCCL on GPUs, ring otherwise), ring, nccl",
        "collective_timeout": "seconds any collective may wait for a peer before the run fails",
        "startup_timeout": "multi_worker: seconds a worker waits at start-up for every other "
                           "worker of the cluster to start; then it ends with exit status 3, "
                           "naming the workers that never came",
        "sync_batch_norm": "synchronise BatchNorm batch statistics across all replicas",
        "model_dir": "where checkpoints, logs, metrics.json and the exported model go "
                     "(default: runs/<UTC time> in the current folder; required with "
                     "--strategy=multi_worker)",
        "checkpoint_steps": "save a checkpoint every N steps (0 = only at epoch ends)",
        "keep_checkpoints": "checkpoints kept in model_dir",
        "log_steps": "log loss, accuracy and images/s every N steps",
        "skip_eval": "skip the evaluation at each epoch end",
        "tta_views": "test-time augmentation of this run's model (the final evaluation, "
                     "evaluate and predict by default): none, flip, flip_translate (6 views)",
        "enable_tensorboard": "write TensorBoard summaries into model_dir/tensorboard",
        "profile_steps": "A,B: write a TensorFlow profiler trace of training steps A to B "
                         "(1-based) into model_dir/tensorboard on the chief, for TensorBoard's "
                         "Profile tab (empty: no trace)",
        "export": "export a SavedModel and a .keras file into model_dir/export at the end",
    }
    for name, field in d.items():
        default = field.default
        text = help_text.get(name, name)
        if isinstance(default, bool):
            flags.DEFINE_bool(name, default, text, flag_values=fv)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, text, flag_values=fv)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, text, flag_values=fv)
        else:
            flags.DEFINE_string(name, default, text, flag_values=fv)


def from_flags(flag_values=None) -> Config:
    fv = flag_values or flags.FLAGS
    values = {name: fv[name].value for name in Config.__dataclass_fields__}
    if not values["model_dir"]:
        values["model_dir"] = default_model_dir(values["strategy"])
    # Absolute paths, so config.json still finds them from another working directory.
    for key in ("data_dir", "model_dir"):
        if values[key]:
            values[key] = os.path.abspath(os.path.expanduser(values[key]))
    return Config(**values)


def default_model_dir(strategy: str, now: float | None = None) -> str:
    """runs/<UTC time> under the current folder, for a run without --model_dir."""
    if strategy == "multi_worker":
        # Each worker would pick its own time: they must be told one shared folder.
        raise ConfigError("--strategy=multi_worker needs an explicit --model_dir that every "
                          "worker shares (e.g. --model_dir=/shared/runs/exp1)")
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)))
    path, n = base, 1
    while os.path.exists(path):  # two runs started in the same second
        path, n = f"{base}-{n}", n + 1
    logging.info("no --model_dir given: writing to %s", os.path.abspath(path))
    return path
