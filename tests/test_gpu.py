"""GPU readiness.

Runs everywhere (no GPU needed): the compiled step has no host round-trips (no Python
callbacks in the traced graph, the per-replica function is marked for XLA); its HLO is
produced for float32, float16 and bfloat16, computes in that dtype, takes uint8 images, and
its convolution + dot FLOPs equal the hand count (model.train_flops_per_image x batch); the
placement-log probe used by the GPU tests finds the step's ops on the CPU here.

Marked `gpu` (skipped, with the reason, where TensorFlow sees no GPU): the smoke config
trains on one GPU in every dtype (loss falls, no NaN, images/s reported); model variables
and the compiled step sit on the GPU and no op of the step runs on the CPU except the
input iterator; --strategy=mirrored uses every GPU when there are two or more.

This file is also the placement probe's program: `python tests/test_gpu.py placement OUT`.
"""

from __future__ import annotations

import json
import math
import re
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import DATA_DIR, REPO, requires_data, run_module, run_script

GPUS = tf.config.list_physical_devices("GPU")
needs_gpu = pytest.mark.skipif(
    not GPUS, reason="no GPU visible to TensorFlow (tf.config.list_physical_devices('GPU') "
                     "is empty): GPU checks run only on a GPU machine")
needs_two_gpus = pytest.mark.skipif(
    len(GPUS) < 2, reason=f"--strategy=mirrored over GPUs needs >= 2 GPUs, {len(GPUS)} visible")

DTYPES = ("float32", "float16", "bfloat16")
HLO_TYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
BATCH = 16


def tiny_config(**overrides):
    from cifar_dist.config import Config

    values = dict(dataset="synthetic", model="tiny", batch_size=BATCH, train_steps=4,
                  data_on_device="false",
                  synthetic_train_size=64, synthetic_test_size=16, strategy="one_device",
                  model_dir="", enable_tensorboard=False, export=False, skip_eval=True)
    values.update(overrides)
    return Config(**values)


def build_trainer(cfg):
    from cifar_dist import data, distribute, train

    strategy, cluster = distribute.make_strategy(cfg)
    return train.Trainer(cfg, strategy, cluster, data.load(cfg))


@pytest.fixture(scope="module")
def trainers():
    made = {}

    def get(dtype):
        if dtype not in made:
            made[dtype] = build_trainer(tiny_config(dtype=dtype))
        return made[dtype]

    return get


# --------------------------------------------------------------------------- everywhere

def test_compiled_step_has_no_host_round_trips(trainers):
    from cifar_dist import graph_checks

    trainer = trainers("float32")
    step = trainer.steps.loop_on_iterator.get_concrete_function(
        trainer.train_iterator(0), tf.constant(1), tf.constant(0))
    ops = graph_checks.function_op_types(step)
    leaks = set(ops) & set(graph_checks.HOST_CALLBACK_OPS)
    assert not leaks, sorted(leaks)
    assert graph_checks.xla_functions(step), "no function in the step is marked _XlaMustCompile"
    assert ops.get("Conv2D", 0) >= 6  # the walk reaches the per-replica function's body
    # One device: the whole step (gradients and update) is one XLA launch per step.
    counts = graph_checks.loop_counts(trainer)
    assert counts["ops_outside_xla_per_step_by_type"].get("XlaLaunch") == 1, counts
    assert counts["ops_outside_xla_per_replica_per_step"] <= 16, counts

    # The check can fail: a step with a tf.numpy_function in it is caught.
    @tf.function
    def leaky(x):
        return tf.numpy_function(lambda a: a * 2, [x], tf.float32)

    bad = graph_checks.function_op_types(leaky.get_concrete_function(tf.TensorSpec([2], tf.float32)))
    assert set(bad) & set(graph_checks.HOST_CALLBACK_OPS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_hlo_exists_in_every_dtype_and_its_flops_match_the_hand_count(trainers, dtype):
    from cifar_dist import graph_checks
    from cifar_dist.model import train_flops_per_image

    trainer = trainers(dtype)
    hlo = graph_checks.step_hlo(trainer, "hlo")
    counted = graph_checks.hlo_flops(hlo)
    hand = train_flops_per_image(trainer.model) * BATCH
    # 6 convolutions x (forward, input gradient, filter gradient); 2 dense x 3
    assert counted["convolution_ops"] == 18 and counted["dot_ops"] == 6, counted
    assert abs(counted["total"] - hand) <= 0.05 * hand, (counted, hand)
    # the convolutions compute in the policy's dtype; the images come in as uint8
    conv_lines = [line for line in hlo.splitlines() if " convolution(" in line]
    assert all(f"= {HLO_TYPE[dtype]}[" in line for line in conv_lines), conv_lines[0][:200]
    entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
    assert re.search(r"\(arg0[.\d]*: u8\[%d,32,32,3\]" % BATCH, entry), entry[:200]


def test_optimized_hlo_drops_only_the_unused_first_input_gradient(trainers):
    """What XLA runs: the first convolution's input gradient is dead code (the images are not
    trained), so the executed FLOPs are the hand count minus that one convolution."""
    from cifar_dist import graph_checks
    from cifar_dist.model import forward_flops_per_image, train_flops_per_image

    trainer = trainers("float32")
    counted = graph_checks.hlo_flops(graph_checks.step_hlo(trainer, "optimized_hlo"))
    hand = train_flops_per_image(trainer.model) * BATCH
    first = trainer.model.get_layer("b1_conv")
    first_conv = 2 * 32 * 32 * first.filters * 3 * 3 * 3 * BATCH
    assert counted["convolution_ops"] == 17
    assert math.isclose(counted["total"], hand - first_conv, rel_tol=1e-9)
    assert abs(counted["total"] - hand) <= 0.05 * hand
    assert forward_flops_per_image(trainer.model) > 0


def test_input_reaches_the_step_as_uint8(trainers):
    from cifar_dist.graph_checks import images_dtype

    trainer = trainers("float32")
    assert images_dtype(trainer.train_iterator(0).element_spec) == "uint8"
    fn = trainer.steps.fused_step.get_concrete_function(
        (tf.TensorSpec([BATCH, 32, 32, 3], tf.uint8), tf.TensorSpec([BATCH], tf.int32),
         tf.TensorSpec([BATCH], tf.int64)),  # images, labels, example ids
        tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32))
    assert fn.inputs[0].dtype == tf.uint8


# --------------------------------------------------------------------------- placement probe

PLACEMENT = re.compile(r"^(\S+): \((\w+)\): (/job:\S+/device:([A-Z]+):(\d+))\s*$")
# Ops that belong on the host in a GPU step: function arguments/results and the input
# iterator (tf.data runs on the CPU by design; batches are prefetched to the device).
HOST_OK = {"_Arg", "_Retval", "NoOp", "Const", "IteratorGetNext", "IteratorGetNextAsOptional",
           "OptionalGetValue", "OptionalHasValue", "MultiDeviceIteratorGetNextFromShard"}


def _mark(text):
    """A marker in stdout, in order with TensorFlow's placement lines (C stdio, buffered)."""
    import ctypes
    import os

    sys.stdout.flush()
    ctypes.CDLL(None).fflush(None)
    os.write(1, f"\n=== placement {text}\n".encode())


def placement_probe(out_path):
    """Runs 2 steps of a tiny one_device Trainer with device-placement logging on (TensorFlow
    prints one `name: (Op): device` line per op to stdout when a graph is placed); marks the
    first step, when the step's graph is placed; writes the variables' devices."""
    tf.debugging.set_log_device_placement(True)
    trainer = build_trainer(tiny_config(batch_size=32, train_steps=4))
    iterator = trainer.train_iterator(0)
    _mark("start")
    totals = trainer.steps.run(iterator, 1, stop=False)
    _mark("end")
    totals = trainer.steps.run(iterator, 1, stop=False)
    finite = bool(np.isfinite(totals.numpy()).all())
    variables = [getattr(v, "value", v).device for v in trainer.model.variables]
    with open(out_path, "w") as f:
        json.dump({"variables": variables, "finite": finite,
                   "step_device": trainer.strategy.extended.worker_devices[0]}, f)


def run_placement_probe(tmp_path):
    out = tmp_path / "placement.json"
    result = run_script(__file__, "placement", out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    section = text[text.index("=== placement start"):text.index("=== placement end")]
    placed = [m.groups() for m in map(PLACEMENT.match, section.splitlines()) if m]
    return json.loads(out.read_text()), placed


def test_placement_probe_sees_the_step_on_this_machines_cpu(tmp_path):
    """The GPU placement test is only as good as its log parsing: check it here, on the CPU."""
    if GPUS:
        pytest.skip("a GPU is visible: test_step_runs_on_the_gpu covers placement")
    info, placed = run_placement_probe(tmp_path)
    assert info["finite"] and "CPU" in info["step_device"]
    ops = {op for _, op, _, _, _ in placed}
    assert {"StatefulPartitionedCall", "IteratorGetNext"} <= ops, ops
    assert all(kind == "CPU" for _, _, _, kind, _ in placed)
    assert all("CPU" in d for d in info["variables"])


@needs_gpu
@pytest.mark.gpu
def test_step_runs_on_the_gpu(tmp_path):
    info, placed = run_placement_probe(tmp_path)
    assert info["finite"] and "GPU" in info["step_device"].upper()
    assert info["variables"] and all("GPU" in d.upper() for d in info["variables"]), info
    xla_calls = [p for p in placed if p[1] in ("StatefulPartitionedCall", "PartitionedCall",
                                               "XlaLaunch", "_XlaRun")]
    assert xla_calls and all(p[3] == "GPU" for p in xla_calls), xla_calls
    on_cpu = [(name, op) for name, op, _, kind, _ in placed
              if kind == "CPU" and op not in HOST_OK]
    assert not on_cpu, f"ops of the step placed on the CPU: {on_cpu[:20]}"


def smoke_on_gpu(tmp_path, *extra):
    model_dir = tmp_path / "run"
    result = run_module("cifar_dist.main", "--flagfile=configs/smoke.cfg",
                        f"--data_dir={DATA_DIR}", f"--model_dir={model_dir}", "--export=false",
                        "--enable_tensorboard=false", *extra, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    losses = [float(line.split(" loss ")[1].split()[0]) for line in result.stderr.splitlines()
              if " loss " in line and "step " in line]
    return metrics, losses


@needs_gpu
@pytest.mark.gpu
@requires_data
@pytest.mark.parametrize("dtype", DTYPES)
def test_smoke_config_trains_on_one_gpu(tmp_path, dtype):
    metrics, losses = smoke_on_gpu(tmp_path, f"--dtype={dtype}", "--strategy=one_device")
    assert metrics["steps"] == 32 and metrics["replicas"] == 1
    assert metrics["images_per_second"] > 0 and math.isfinite(metrics["test_loss"])
    assert losses and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    if dtype == "float16":  # dynamic loss scaling may skip a few early steps, not many
        assert metrics["skipped_steps"] <= 8


@needs_two_gpus
@pytest.mark.gpu
@requires_data
def test_mirrored_uses_every_gpu(tmp_path):
    n = len(GPUS)
    metrics, losses = smoke_on_gpu(tmp_path, "--strategy=mirrored",
                                   f"--batch_size={128 // n * n}")
    assert metrics["replicas"] == n and metrics["images_per_second"] > 0
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@needs_gpu
@pytest.mark.gpu
def test_benchmark_runs_on_the_gpu(tmp_path):
    out = tmp_path / "bench.json"
    result = run_module("cifar_dist.bench", "--tiny", f"--output={out}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["gpus"]
    assert "GPU" in report["methods"]["cifar_dist"]["device"].upper()


if __name__ == "__main__":
    if sys.argv[1:2] == ["placement"]:
        sys.path.insert(0, str(REPO))
        placement_probe(sys.argv[2])
    else:
        sys.exit("usage: python tests/test_gpu.py placement OUT_JSON")
