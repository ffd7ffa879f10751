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

import dataclasses
import math

import keras
import tensorflow as tf

ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7  # keras.optimizers.Adam defaults
LOSS_SCALE_GROWTH_STEPS = 2000  # keras.optimizers.LossScaleOptimizer's dynamic_growth_steps


class LearningRateSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """--schedule: one of three shapes after a linear warmup from 0 to `peak` over
    `warmup_steps` (--warmup_fraction; none when 0): "onecycle" (linear decay to 0 at
    `total_steps`), "cosine" (cosine decay to 0) or "constant" (`peak` throughout).

    A pure function of the step with no variables: checkpoints hold only the step counter
    it reads (Update.iterations), so this class and its name are not in them.
    """


    def __init__(self, peak, total_steps, warmup_steps, kind="onecycle", initial_fraction=0.0,
                 final_fraction=0.0):
        self.peak, self.total, self.warmup, self.kind = peak, total_steps, warmup_steps, kind
        # --initial_lr_fraction / --final_lr_fraction: where the warmup starts and the decay
        # ends, as fractions of the peak (airbench's triangle: 0.2 -> 1 -> 0.07).
        self.initial, self.final = initial_fraction, final_fraction

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = tf.cast(max(self.warmup, 1), tf.float32)
        rest = tf.cast(max(self.total - self.warmup, 1), tf.float32)
        progress = tf.clip_by_value((step - self.warmup) / rest, 0.0, 1.0)
        low, high = self.final * self.peak, (1.0 - self.final) * self.peak
        if self.kind == "onecycle":
            after = low + high * (1.0 - progress)
        elif self.kind == "cosine":
            after = low + high * 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            after = tf.constant(self.peak, tf.float32)
        if self.warmup == 0:
            return after
        ramp = (step + 1.0) / warm
        if self.initial:
            ramp = self.initial + (1.0 - self.initial) * ramp
        return tf.where(step < self.warmup, self.peak * ramp, after)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total, "warmup_steps": self.warmup,
                "kind": self.kind, "initial_fraction": self.initial,
                "final_fraction": self.final}


def peak_learning_rate(cfg) -> float:
    """--learning_rate is tuned at --base_batch_size; --lr_scaling says how it grows with batch."""
    ratio = cfg.batch_size / cfg.base_batch_size
    return cfg.learning_rate * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def make_schedule(cfg, total_steps: int) -> LearningRateSchedule:
    return LearningRateSchedule(peak_learning_rate(cfg), total_steps,
                                int(round(cfg.warmup_fraction * total_steps)), cfg.schedule,
                                cfg.initial_lr_fraction, cfg.final_lr_fraction)


def _flat_slot(size: int, dtype, what: str) -> tf.Variable:
    return tf.Variable(tf.zeros([size], dtype), trainable=False, name=what)


# --ema_decay's warm-up: step t averages with min(decay, (1 + t) / (EMA_WARMUP + t)), the
# num_updates rule of tf.train.ExponentialMovingAverage (Model Garden's dynamic_decay), so
# the first steps' random weights fade out quickly in a short run.
EMA_WARMUP = 10


def variable_group(variable) -> str:
    """kernel (conv and dense kernels), norm (BatchNorm scale and offset) or bias: the
    parameter groups that --norm_* and --bias_* multipliers address."""
    name = variable.name.split("/")[-1].split(":")[0]
    if name in ("gamma", "beta"):
        return "norm"
    return "bias" if name == "bias" else "kernel"


@dataclasses.dataclass(frozen=True)
class GroupSettings:
    """Per-group multipliers of the learning rate and the weight decay (kernels: 1 and 1)."""
    norm_lr: float = 1.0
    norm_decay: float = 0.0
    bias_lr: float = 1.0
    bias_decay: float = 0.0

    def lr(self, group: str) -> float:
        return {"kernel": 1.0, "norm": self.norm_lr, "bias": self.bias_lr}[group]

    def decay(self, group: str) -> float:
        return {"kernel": 1.0, "norm": self.norm_decay, "bias": self.bias_decay}[group]


class Update(tf.Module):
    """Optimizer state (checkpointed) and the update that SGD / Adam / AdamW would apply,
    with per-group rates and decay, coupled or decoupled decay, an optional exponential
    moving average of the weights (--ema_decay) and lookahead (--lookahead_steps).

    Create it inside the strategy's scope, like the model: its variables are then mirrored.
    """

    def __init__(self, optimizer: str, schedule, variables, *, weight_decay: float = 0.0,
                 momentum: float = 0.9, nesterov: bool = True, loss_scale: float | None = None,
                 ema_decay: float = 0.0, groups: GroupSettings = GroupSettings(),
                 coupled_decay: bool = False, train_until=None, lookahead_steps: int = 0,
                 lookahead_decay: float = 0.95 ** 5, total_steps: int = 0):
        super().__init__(name="update")
        self.kind, self.schedule = optimizer, schedule
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        # Keras: SGD/Adam take weight_decay=None for 0 (no decay); AdamW always decays.
        self.weight_decay = float(weight_decay) if (weight_decay or optimizer == "adamw") else None
        self.coupled_decay = bool(coupled_decay)
        kinds = [variable_group(v) for v in variables]
        self.lr_multipliers = [groups.lr(k) for k in kinds]
        self.decay_multipliers = [groups.decay(k) for k in kinds]
        # train_until[i]: the step (applied steps) from which variable i stays as it is
        # (--whiten_bias_epochs); None: trains throughout.
        self.train_until = list(train_until or [None] * len(kinds))
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
        self.lookahead_steps, self.lookahead_decay = int(lookahead_steps), float(lookahead_decay)
        self.total_steps = int(total_steps)
        self.lookahead = [tf.Variable(tf.convert_to_tensor(v), trainable=False,
                                      name=f"{v.name}_lookahead") for v in variables
                          ] if lookahead_steps else []

    def _per_element(self, multipliers) -> tf.Tensor | float:
        """A flat vector of per-variable multipliers (flatten's layout); 1.0 when all are 1."""
        if all(m == 1.0 for m in multipliers):
            return 1.0
        return tf.concat([tf.fill([n], tf.constant(m, self.dtype))
                          for n, m in zip(self.sizes, multipliers)], 0)

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
            self._look_ahead(variables, keep=None)
            return lr
        scale = self.dynamic_scale
        self._apply(grad / scale, variables, lr, keep=tf.logical_not(finite))
        grow = tf.logical_and(finite, tf.equal(self.good_steps, LOSS_SCALE_GROWTH_STEPS - 1))
        self.dynamic_scale.assign(tf.where(finite, tf.where(grow, scale * 2.0, scale), scale * 0.5))
        self.good_steps.assign(tf.where(finite & ~grow, self.good_steps + 1, 0))
        self.iterations.assign_add(tf.cast(finite, tf.int64))
        self._average(variables, keep=tf.logical_not(finite))
        self._look_ahead(variables, keep=tf.logical_not(finite))
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

    def _look_ahead(self, variables, keep):
        """Lookahead as airbench: every lookahead_steps steps the average moves toward the
        weights, a = d a + (1 - d) w with d = lookahead_decay x (t / T)^3, and the weights are
        set to it; the last step (t = T) sets them to the average as it stands. Trainable
        weights only (airbench also averages BatchNorm's moving statistics; here those stay
        per replica until they are synchronised, BUILD_NOTES.md)."""
        if not self.lookahead:
            return
        t = self.iterations
        last = tf.equal(t, self.total_steps)
        due = tf.logical_or(tf.equal(t % self.lookahead_steps, 0), last)
        if keep is not None:
            due = tf.logical_and(due, tf.logical_not(keep))
        progress = tf.cast(t, tf.float32) / float(max(self.total_steps, 1))
        decay = tf.where(last, 1.0, self.lookahead_decay * progress ** 3)
        for slow, var in zip(self.lookahead, variables):
            weights, average = tf.convert_to_tensor(var), tf.convert_to_tensor(slow)
            moved = average + (weights - average) * tf.cast(1.0 - decay, average.dtype)
            slow.assign(tf.where(due, moved, average))
            var.assign(tf.where(due, moved, weights))

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

        lr = tf.cast(lr, self.dtype)
        if self.weight_decay is not None and self.coupled_decay:
            # PyTorch's SGD: decay x weight joins the gradient (and so the momentum).
            decay = self._per_element(self.decay_multipliers) * self.weight_decay
            grad = grad + self.flatten(variables) * decay
        # The optimizer's step, flat: the same arithmetic as Keras', per element, with each
        # group's rate (a vector only when some multiplier is not 1).
        rate = lr * self._per_element(self.lr_multipliers)
        if self.kind in ("adam", "adamw"):
            m, v = self.flat_momentum, self.flat_velocity
            local_step = tf.cast(self.iterations + 1, self.dtype)
            b1_power = tf.pow(tf.constant(ADAM_BETA_1, self.dtype), local_step)
            b2_power = tf.pow(tf.constant(ADAM_BETA_2, self.dtype), local_step)
            alpha = rate * tf.sqrt(1 - b2_power) / (1 - b1_power)
            new_m = m + (grad - m) * (1 - ADAM_BETA_1)
            new_v = v + (tf.square(grad) - v) * (1 - ADAM_BETA_2)
            assign(m, new_m)
            assign(v, new_v)
            step = -((new_m * alpha) / (tf.sqrt(new_v) + ADAM_EPSILON))
        elif self.flat_momentum is not None:
            m, mom = self.flat_momentum, tf.constant(self.momentum, self.dtype)
            new_m = m * mom - grad * rate
            assign(m, new_m)
            step = new_m * mom - grad * rate if self.nesterov else new_m
        else:
            step = -(grad * rate)
        # Then each variable: decoupled weight decay (before the step, as Keras), the step.
        decoupled = self.weight_decay is not None and not self.coupled_decay
        for var, var_step, decay, until in zip(variables, self.unflatten(step),
                                               self.decay_multipliers, self.train_until):
            old = tf.convert_to_tensor(var)
            value = old
            if decoupled and decay:
                value = value - value * tf.cast(self.weight_decay * decay, self.dtype) * lr
            value = value + var_step
            if until is not None:  # frozen from step `until` on (--whiten_bias_epochs)
                value = tf.where(self.iterations < until, value, old)
            assign(var, value)


def make_update(cfg, total_steps: int, variables, train_until=None) -> Update:
    groups = GroupSettings(cfg.norm_lr_multiplier, cfg.norm_weight_decay_multiplier,
                           cfg.bias_lr_multiplier, cfg.bias_weight_decay_multiplier)
    return Update(cfg.optimizer, make_schedule(cfg, total_steps), variables,
                  weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                  loss_scale=cfg.loss_scale if cfg.dtype == "float16" else None,
                  ema_decay=cfg.ema_decay, groups=groups,
                  coupled_decay=cfg.weight_decay_mode == "coupled", train_until=train_until,
                  lookahead_steps=cfg.lookahead_steps, lookahead_decay=cfg.lookahead_decay,
                  total_steps=total_steps)
