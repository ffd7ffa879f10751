"""The compiled update (cifar_dist/optimizer.py) against its reference, keras.optimizers:
20 steps of SGD (momentum, Nesterov), Adam and AdamW with weight decay, the same
exclusions, the same schedule, and LossScaleOptimizer's dynamic scaling with skipped steps."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import keras

from cifar_dist import optimizer as opt_lib

STEPS = 20
SHAPES = {"kernel": (3, 3, 4, 8), "bias": (8,), "gamma": (8,), "beta": (8,), "fc_kernel": (16, 4)}


def make_variables(seed=0):
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.normal(size=shape).astype(np.float32), name=name)
            for name, shape in SHAPES.items()]


def gradients(step, nonfinite_steps=()):
    rng = np.random.default_rng(100 + step)
    grads = [rng.normal(size=shape).astype(np.float32) for shape in SHAPES.values()]
    if step in nonfinite_steps:
        grads[1][0] = np.inf
    return [tf.constant(g) for g in grads]


def keras_reference(name, schedule, weight_decay, momentum=0.9, nesterov=True, loss_scale=None,
                    growth_steps=2000):
    wd = weight_decay or None
    if name == "sgd":
        inner = keras.optimizers.SGD(schedule, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    elif name == "adam":
        inner = keras.optimizers.Adam(schedule, weight_decay=wd)
    else:
        inner = keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    inner.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    if loss_scale is None:
        return inner
    return keras.optimizers.LossScaleOptimizer(inner, initial_scale=loss_scale,
                                               dynamic_growth_steps=growth_steps)


def relative_difference(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.mark.parametrize("name, weight_decay, momentum, nesterov", [
    ("sgd", 5e-4, 0.9, True), ("sgd", 1e-2, 0.95, False), ("sgd", 0.0, 0.0, False),
    ("adam", 0.0, 0.9, True), ("adam", 0.05, 0.9, True), ("adamw", 0.2, 0.9, True)])
def test_twenty_steps_match_keras(name, weight_decay, momentum, nesterov):
    schedule = opt_lib.LearningRateSchedule(0.05, STEPS, 4, "onecycle")
    ours_vars, keras_vars = make_variables(), make_variables()
    update = opt_lib.Update(name, schedule, ours_vars, weight_decay=weight_decay,
                            momentum=momentum, nesterov=nesterov)
    reference = keras_reference(name, schedule, weight_decay, momentum, nesterov)
    step = tf.function(lambda grads: update.apply(update.flatten(grads), ours_vars),
                       jit_compile=True)
    for i in range(STEPS):
        grads = gradients(i)
        lr = step(grads)
        assert float(lr) == pytest.approx(float(reference.learning_rate), rel=1e-7)
        reference.apply_gradients(zip(grads, keras_vars))
    assert int(update.iterations.numpy()) == int(reference.iterations.numpy()) == STEPS
    for ours, theirs in zip(ours_vars, keras_vars):
        assert relative_difference(ours.numpy(), theirs.numpy()) <= 1e-6, ours.name
    # The flat slots hold Keras' per-variable slots, in the variables' order.
    slots = {"sgd": [("flat_momentum", "momentums")] if momentum else [],
             "adam": [("flat_momentum", "_momentums"), ("flat_velocity", "_velocities")],
             "adamw": [("flat_momentum", "_momentums"), ("flat_velocity", "_velocities")]}[name]
    for flat_name, keras_name in slots:
        for ours, theirs in zip(update.unflatten(getattr(update, flat_name)),
                                getattr(reference, keras_name)):
            assert relative_difference(ours.numpy(), theirs.numpy()) <= 1e-6, flat_name
    if not momentum:
        assert update.flat_momentum is None and update.flat_velocity is None
    # The check can fail: the same run with another weight decay does not match.
    if weight_decay:
        other_vars = make_variables()
        other = opt_lib.Update(name, schedule, other_vars, weight_decay=weight_decay * 2,
                               momentum=momentum, nesterov=nesterov)
        for i in range(STEPS):
            other.apply(other.flatten(gradients(i)), other_vars)
        assert relative_difference(other_vars[0].numpy(), keras_vars[0].numpy()) > 1e-4


def test_loss_scaling_skips_like_keras(monkeypatch):
    """Steps 3 and 4 overflow: both skip (weights, slots and schedule untouched, scale halved);
    with a growth interval of 5 good steps the scale also doubles, as Keras' does."""
    monkeypatch.setattr(opt_lib, "LOSS_SCALE_GROWTH_STEPS", 5)
    schedule = opt_lib.LearningRateSchedule(0.01, STEPS, 2, "onecycle")
    ours_vars, keras_vars = make_variables(), make_variables()
    update = opt_lib.Update("adamw", schedule, ours_vars, weight_decay=0.1, loss_scale=1024.0)
    reference = keras_reference("adamw", schedule, 0.1, loss_scale=1024.0, growth_steps=5)
    bad = (3, 4)

    @tf.function(jit_compile=True)
    def step(grads):
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        return update.apply(update.flatten(grads), ours_vars, finite)

    for i in range(STEPS):
        grads = [g * 1024.0 for g in gradients(i, bad)]  # as if the loss had been scaled
        step(grads)
        reference.apply(grads, keras_vars)
        assert float(update.dynamic_scale.numpy()) == float(reference.dynamic_scale.numpy()), i
    assert int(update.iterations.numpy()) == int(reference.iterations.numpy()) == STEPS - len(bad)
    for ours, theirs in zip(ours_vars, keras_vars):
        assert relative_difference(ours.numpy(), theirs.numpy()) <= 1e-6, ours.name


def test_weight_decay_exclusions_are_keras_choice():
    variables = make_variables()
    update = opt_lib.Update("adamw", opt_lib.LearningRateSchedule(0.1, 10, 0), variables,
                            weight_decay=0.1)
    reference = keras_reference("adamw", 0.1, 0.1)
    reference.build(variables)
    decayed = [m != 0 for m in update.decay_multipliers]
    assert decayed == [reference._use_weight_decay(v) for v in variables]
    assert decayed == [True, False, False, False, True]


GROUPS = opt_lib.GroupSettings(norm_lr=64.0, norm_decay=0.5, bias_lr=4.0, bias_decay=0.25)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_group_multipliers_match_one_keras_optimizer_per_group(name):
    """Per-group rates and decay: kernels, biases and BatchNorm each match a Keras optimizer
    whose rate is multiplied by the group's (its decoupled decay, which Keras scales by that
    rate, divided by it again: ours decays by the base rate x the group's decay)."""
    schedule = opt_lib.LearningRateSchedule(0.01, STEPS, 4, "onecycle")
    ours_vars, keras_vars = make_variables(), make_variables()
    update = opt_lib.Update(name, schedule, ours_vars, weight_decay=0.1, groups=GROUPS)
    groups = [opt_lib.variable_group(v) for v in ours_vars]
    assert groups == ["kernel", "bias", "norm", "norm", "kernel"]
    references = {}
    for group in ("kernel", "bias", "norm"):
        lr_mult, decay = GROUPS.lr(group), GROUPS.decay(group)
        rate = opt_lib.LearningRateSchedule(0.01 * lr_mult, STEPS, 4, "onecycle")
        wd = 0.1 * decay / lr_mult
        references[group] = (keras.optimizers.SGD(rate, momentum=0.9, nesterov=True,
                                                  weight_decay=wd) if name == "sgd"
                             else keras.optimizers.AdamW(rate, weight_decay=wd))
    step = tf.function(lambda grads: update.apply(update.flatten(grads), ours_vars),
                       jit_compile=True)
    for i in range(STEPS):
        grads = gradients(i)
        step(grads)
        for group, reference in references.items():
            reference.apply_gradients([(g, v) for g, v, k in zip(grads, keras_vars, groups)
                                       if k == group])
    for ours, theirs in zip(ours_vars, keras_vars):
        assert relative_difference(ours.numpy(), theirs.numpy()) <= 1e-5, ours.name
    # The check can fail: without the multipliers the BatchNorm weights end elsewhere.
    plain_vars = make_variables()
    plain = opt_lib.Update(name, schedule, plain_vars, weight_decay=0.1)
    for i in range(STEPS):
        plain.apply(plain.flatten(gradients(i)), plain_vars)
    assert relative_difference(plain_vars[2].numpy(), keras_vars[2].numpy()) > 1e-3


def test_coupled_decay_is_pytorch_sgd():
    """--weight_decay_mode=coupled: torch.optim.SGD(nesterov=True, weight_decay=wd) per group,
    written out in numpy (d = g + wd p; buf = mu buf + d; p -= lr (d + mu buf)); at a constant
    rate Keras' momentum convention (rate inside the buffer) is the same update."""
    lr, mu, wd = 0.05, 0.85, 0.01
    variables = make_variables()
    update = opt_lib.Update("sgd", opt_lib.LearningRateSchedule(lr, STEPS, 0, "constant"),
                            variables, weight_decay=wd, momentum=mu, groups=GROUPS,
                            coupled_decay=True)
    params = [v.numpy().astype(np.float64) for v in make_variables()]
    buffers = [np.zeros_like(p) for p in params]
    groups = [opt_lib.variable_group(v) for v in variables]
    for i in range(STEPS):
        update.apply(update.flatten(gradients(i)), variables)
        for k, g in enumerate(gradients(i)):
            d = g.numpy() + wd * GROUPS.decay(groups[k]) * params[k]
            buffers[k] = mu * buffers[k] + d
            params[k] = params[k] - lr * GROUPS.lr(groups[k]) * (d + mu * buffers[k])
    for ours, want in zip(variables, params):
        assert relative_difference(ours.numpy(), want) <= 1e-5, ours.name
    decoupled_vars = make_variables()
    decoupled = opt_lib.Update("sgd", opt_lib.LearningRateSchedule(lr, STEPS, 0, "constant"),
                               decoupled_vars, weight_decay=wd, momentum=mu, groups=GROUPS)
    for i in range(STEPS):
        decoupled.apply(decoupled.flatten(gradients(i)), decoupled_vars)
    assert relative_difference(decoupled_vars[0].numpy(), params[0]) > 1e-5


def test_lookahead_and_freezing_follow_their_definitions():
    """Plain SGD at a constant rate, lookahead every 5 of 20 steps (decay 0.8 (t/T)^3, the
    last step takes the average), and the bias frozen from step 7 on, against numpy."""
    lr, total, every = 0.1, 20, 5
    variables = make_variables()
    update = opt_lib.Update("sgd", opt_lib.LearningRateSchedule(lr, total, 0, "constant"),
                            variables, momentum=0.0, lookahead_steps=every,
                            lookahead_decay=0.8, total_steps=total,
                            train_until=[None, 7, None, None, None])
    step = tf.function(lambda grads: update.apply(update.flatten(grads), variables),
                       jit_compile=True)
    params = [v.numpy().astype(np.float64) for v in make_variables()]
    slow = [p.copy() for p in params]
    for i in range(total):
        step(gradients(i))
        for k, g in enumerate(gradients(i)):
            if not (k == 1 and i >= 7):
                params[k] = params[k] - lr * g.numpy()
        t = i + 1
        if t % every == 0 or t == total:
            decay = 1.0 if t == total else 0.8 * (t / total) ** 3
            for k in range(len(params)):
                slow[k] = decay * slow[k] + (1 - decay) * params[k]
                params[k] = slow[k].copy()
    for ours, want in zip(variables, params):
        assert relative_difference(ours.numpy(), want) <= 1e-5, ours.name
    assert int(update.iterations.numpy()) == total

