"""The learning-rate schedule and the optimizer update, written so they compile into the step.

Keras' optimizers cannot run inside an XLA function under tf.distribute in TF 2.21:
`apply_gradients` all-reduces and updates through `merge_call` (refused inside a nested
function), and `stateless_apply` raises on the TensorFlow backend (BUILD_NOTES.md, "Why the
training step looks the way it does"). So the update arithmetic is written out here once,
as plain TensorFlow on plain variables, and `keras.optimizers` is its tested reference:
tests/test_optimizer.py runs 20 steps of each against SGD (momentum, Nesterov), Adam and
AdamW with the same exclusions and LossScaleOptimizer's dynamic scaling.

`Update.apply` is traced inside the compiled step, once per replica, on already all-reduced
gradients; every variable it writes has no aggregation, so each replica writes its own
copy and all copies stay equal (they receive equal inputs).

The gradients arrive as one flat vector (`Update.flatten`: every variable's gradient,
flattened, in order; the all-reduce packs them so anyway) and the optimizer's slots are one
flat vector each, so the optimizer's arithmetic is one fused loop per step rather than a few
per variable; only the last write, weight decay included, is per variable. On XLA:CPU each
fused loop is a launch of its own: per variable, AdamW cost the tiny network 12% of a step,
flat 1-4% (BUILD_NOTES.md, "The training loop").
"""

from __future__ import annotations

import math
import re

import keras
import tensorflow as tf

# BatchNorm scales/offsets and biases are not decayed (standard practice). Matched against
# the variable's name the way keras.optimizers' exclude_from_weight_decay(var_names=...) does.
NO_DECAY_PATTERN = "gamma|beta|bias"
ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7  # keras.optimizers.Adam defaults
LOSS_SCALE_GROWTH_STEPS = 2000  # keras.optimizers.LossScaleOptimizer's dynamic_growth_steps


class LearningRateSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """--schedule: one of three shapes after a linear warmup from 0 to `peak` over
    `warmup_steps` (--warmup_fraction; none when 0): "onecycle" (linear decay to 0 at
    `total_steps`), "cosine" (cosine decay to 0) or "constant" (`peak` throughout).

    A pure function of the step with no variables: checkpoints hold only the step counter
    it reads (Update.iterations), so this class and its name are not in them.
    """


    def __init__(self, peak, total_steps, warmup_steps, kind="onecycle"):
        self.peak, self.total, self.warmup, self.kind = peak, total_steps, warmup_steps, kind

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = tf.cast(max(self.warmup, 1), tf.float32)
        rest = tf.cast(max(self.total - self.warmup, 1), tf.float32)
        progress = tf.clip_by_value((step - self.warmup) / rest, 0.0, 1.0)
        if self.kind == "onecycle":
            after = self.peak * (1.0 - progress)
        elif self.kind == "cosine":
            after = self.peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            after = tf.constant(self.peak, tf.float32)
        if self.warmup == 0:
            return after
        return tf.where(step < self.warmup, self.peak * (step + 1.0) / warm, after)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total,
                "warmup_steps": self.warmup, "kind": self.kind}


def peak_learning_rate(cfg) -> float:
    """--learning_rate is tuned at --base_batch_size; --lr_scaling says how it grows with batch."""
    ratio = cfg.batch_size / cfg.base_batch_size
    return cfg.learning_rate * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def make_schedule(cfg, total_steps: int) -> LearningRateSchedule:
    return LearningRateSchedule(peak_learning_rate(cfg), total_steps,
                          int(round(cfg.warmup_fraction * total_steps)), cfg.schedule)


def _flat_slot(size: int, dtype, what: str) -> tf.Variable:
    return tf.Variable(tf.zeros([size], dtype), trainable=False, name=what)


# --ema_decay's warm-up: step t averages with min(decay, (1 + t) / (EMA_WARMUP + t)), the
# num_updates rule of tf.train.ExponentialMovingAverage (Model Garden's dynamic_decay), so
# the first steps' random weights fade out quickly in a short run.
EMA_WARMUP = 10


class Update(tf.Module):
    """Optimizer state (checkpointed) and the update that SGD / Adam / AdamW would apply,
    with an optional exponential moving average of the weights (--ema_decay).

    Create it inside the strategy's scope, like the model: its variables are then mirrored.
    """

    def __init__(self, optimizer: str, schedule, variables, *, weight_decay: float = 0.0,
                 momentum: float = 0.9, nesterov: bool = True, loss_scale: float | None = None,
                 ema_decay: float = 0.0):
        super().__init__(name="update")
        self.kind, self.schedule = optimizer, schedule
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        # Keras: SGD/Adam take weight_decay=None for 0 (no decay); AdamW always decays.
        self.weight_decay = float(weight_decay) if (weight_decay or optimizer == "adamw") else None
        self.decayed = [re.search(NO_DECAY_PATTERN, v.name) is None for v in variables]
        self.shapes = [v.shape for v in variables]
        self.sizes = [v.shape.num_elements() for v in variables]
        dtypes = {v.dtype for v in variables}
        if len(dtypes) != 1:  # Keras keeps every variable float32, mixed precision included
            raise ValueError(f"the update needs variables of one dtype, not {sorted(dtypes)}")
        self.dtype = dtypes.pop()
        # Steps applied (skipped float16 steps excluded): what the schedule reads, as Keras'.
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
        # One flat vector per slot, over all variables in order (flatten's layout); None
        # where the optimizer has no such slot.
        size = sum(self.sizes)
        uses_momentum = optimizer in ("adam", "adamw") or self.momentum != 0
        self.flat_momentum = _flat_slot(size, self.dtype, "momentum") if uses_momentum else None
        self.flat_velocity = (_flat_slot(size, self.dtype, "velocity")
                              if optimizer in ("adam", "adamw") else None)
        self.loss_scaling = loss_scale is not None
        if self.loss_scaling:
            self.dynamic_scale = tf.Variable(float(loss_scale), dtype=tf.float32,
                                             trainable=False, name="dynamic_scale")
            self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")
        self.ema_decay = float(ema_decay)
        self.averages = [tf.Variable(tf.convert_to_tensor(v), trainable=False,
                                     name=f"{v.name}_average") for v in variables
                         ] if ema_decay else []

    def learning_rate(self) -> tf.Tensor:
        return tf.cast(self.schedule(self.iterations), tf.float32)

    def scale_loss(self, loss):
        return loss * tf.cast(self.dynamic_scale, loss.dtype) if self.loss_scaling else loss

    def flatten(self, tensors) -> tf.Tensor:
        """One flat vector of per-variable tensors (gradients), in the variables' order."""
        return tf.concat([tf.reshape(tf.cast(t, self.dtype), [-1]) for t in tensors], 0)

    def unflatten(self, flat) -> list:
        return [tf.reshape(part, shape) for part, shape in zip(tf.split(flat, self.sizes),
                                                               self.shapes)]

    def apply(self, grad, variables, finite=None) -> tf.Tensor:
        """Applies (all-reduced, possibly loss-scaled) gradients, one flat vector
        (`flatten`); returns the learning rate used.

        `finite`: with loss scaling, whether every replica's gradients were finite (agreed
        across replicas and workers): if not, nothing changes but the scale, which halves.
        """
        lr = self.learning_rate()  # once per step: weight decay and update share it
        if not self.loss_scaling:
            self._apply(grad, variables, lr, keep=None)
            self.iterations.assign_add(1)
            self._average(variables, keep=None)
            return lr
        scale = self.dynamic_scale
        self._apply(grad / scale, variables, lr, keep=tf.logical_not(finite))
        grow = tf.logical_and(finite, tf.equal(self.good_steps, LOSS_SCALE_GROWTH_STEPS - 1))
        self.dynamic_scale.assign(tf.where(finite, tf.where(grow, scale * 2.0, scale), scale * 0.5))
        self.good_steps.assign(tf.where(finite & ~grow, self.good_steps + 1, 0))
        self.iterations.assign_add(tf.cast(finite, tf.int64))
        self._average(variables, keep=tf.logical_not(finite))
        return lr

    def _average(self, variables, keep):
        """The moving average of the weights after this step (a skipped step leaves it)."""
        if not self.averages:
            return
        t = tf.cast(self.iterations, tf.float32)
        decay = tf.minimum(self.ema_decay, (1.0 + t) / (EMA_WARMUP + t))
        for average, var in zip(self.averages, variables):
            value = average + (tf.convert_to_tensor(var) - average) * tf.cast(1 - decay,
                                                                              average.dtype)
            average.assign(value if keep is None else tf.where(keep, average, value))

    def swap_averages(self, variables) -> None:
        """Exchanges the weights' values with their averages (twice: back as they were), so
        that evaluation and export see the averaged weights. Run per replica, as the update."""
        for average, var in zip(self.averages, variables):
            weights = tf.convert_to_tensor(var)
            var.assign(tf.convert_to_tensor(average))
            average.assign(weights)

    def _apply(self, grad, variables, lr, keep):
        def assign(var, value):
            # A skipped step writes the old value back: a select, no branch in the compiled step.
            var.assign(value if keep is None else tf.where(keep, tf.convert_to_tensor(var), value))

        # The optimizer's step, flat: the same arithmetic as Keras', per element.
        lr = tf.cast(lr, self.dtype)
        if self.kind in ("adam", "adamw"):
            m, v = self.flat_momentum, self.flat_velocity
            local_step = tf.cast(self.iterations + 1, self.dtype)
            b1_power = tf.pow(tf.constant(ADAM_BETA_1, self.dtype), local_step)
            b2_power = tf.pow(tf.constant(ADAM_BETA_2, self.dtype), local_step)
            alpha = lr * tf.sqrt(1 - b2_power) / (1 - b1_power)
            new_m = m + (grad - m) * (1 - ADAM_BETA_1)
            new_v = v + (tf.square(grad) - v) * (1 - ADAM_BETA_2)
            assign(m, new_m)
            assign(v, new_v)
            step = -((new_m * alpha) / (tf.sqrt(new_v) + ADAM_EPSILON))
        elif self.flat_momentum is not None:
            m, mom = self.flat_momentum, tf.constant(self.momentum, self.dtype)
            new_m = m * mom - grad * lr
            assign(m, new_m)
            step = new_m * mom - grad * lr if self.nesterov else new_m
        else:
            step = -(grad * lr)
        # Then each variable: decoupled weight decay (before the step, as Keras), the step.
        for var, var_step, decayed in zip(variables, self.unflatten(step), self.decayed):
            value = tf.convert_to_tensor(var)
            if self.weight_decay is not None and decayed:
                value = value - value * tf.cast(self.weight_decay, self.dtype) * lr
            assign(var, value + var_step)


def make_update(cfg, total_steps: int, variables) -> Update:
    return Update(cfg.optimizer, make_schedule(cfg, total_steps), variables,
                  weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                  loss_scale=cfg.loss_scale if cfg.dtype == "float16" else None,
                  ema_decay=cfg.ema_decay)
