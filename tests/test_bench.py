"""The benchmark (cifar_dist.bench): tiny mode end to end, the arithmetic of its report, the
HLO FLOP counter (cifar_dist.graph_checks) and the seed-style host augmentation."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from cifar_dist import graph_checks
from cifar_dist.bench import host_augment, projection, timing
from cifar_dist.bench.report import LABELS
from conftest import error_lines, run_module

TINY_METHODS = ("matmul", "pipeline", "cifar_dist", "cifar_dist_noaug", "keras_fit",
                "keras_fit_host")
TRAINING = ("cifar_dist", "cifar_dist_noaug", "keras_fit", "keras_fit_host")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One `--tiny` run (30-60 s on 2 shared cores, most of it XLA compilation)."""
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    started = time.time()
    result = run_module("cifar_dist.bench", "--tiny", f"--output={out}", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    report["_test_wall_seconds"] = time.time() - started
    return report, result.stdout


def close(a, b, rel=1e-9):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def test_tiny_bench_measures_every_method(tiny):
    report, _ = tiny
    assert set(report["methods"]) == set(TINY_METHODS)
    for name in TINY_METHODS:
        m = report["methods"][name]
        assert m["peak_rss_mib"] > 0 and m["wall_seconds"] > 0
        if name == "matmul":
            assert m["gflops"] > 0
            continue
        ips = m["images_per_second"]
        assert ips > 0, name
        assert m["images_per_second_min"] <= m["images_per_second_q1"] <= ips
        assert ips <= m["images_per_second_q3"] <= m["images_per_second_max"]
        assert len(m["window_images_per_second"]) == report["config"]["windows"]
        assert m["step_seconds_median"] > 0
        assert 0 < m["cores_busy"] <= report["machine"]["cpus"] * 1.5, name
        assert m["other_cores_busy"] >= 0 and m["steal_cores"] >= 0, name
    for name in TRAINING:
        assert report["methods"][name]["finite"], name
    for name in ("cifar_dist", "cifar_dist_noaug"):
        assert report["methods"][name]["input_dtype"].startswith("uint8")
        assert report["methods"][name]["jit_compile"] is True
    assert report["methods"]["pipeline"]["element_dtype"] == "uint8"
    c1 = report["methods"]["cifar_dist"]
    # one device: the whole step is one XLA launch; a handful of loop ops around it
    assert c1["xla_functions"] >= 1 and c1["ops_outside_xla_per_step_by_type"]["XlaLaunch"] == 1
    assert 1 <= c1["ops_outside_xla_per_replica_per_step"] <= 16
    assert not c1["host_callbacks"]
    assert "multiworker" not in report  # tiny mode leaves the 2-worker part out


def test_tiny_bench_derived_fields_agree_with_the_raw_numbers(tiny):
    report, _ = tiny
    methods, counts = report["methods"], report["counts"]
    base = methods["cifar_dist"]["images_per_second"]
    roof = report["roofline"]
    assert roof["gflops"] == max(roof["gflops_each_run"]) > 0
    assert len(roof["gflops_each_run"]) == 2  # timed at the start and at the end
    assert counts["gradient_bytes_per_step"] == 4 * counts["trainable_params"] > 0
    assert counts["train_flops_per_image"] == 3 * counts["forward_flops_per_image"]
    assert counts["host_to_device_bytes_per_step"] == report["config"]["batch_size"] * 3072
    # the hand FLOP count equals what XLA is given (unoptimised HLO, shape-based count)
    assert methods["cifar_dist"]["hlo_train_flops_per_image"] == counts["train_flops_per_image"]
    for name, m in methods.items():
        if name == "matmul":
            continue
        assert close(m["ratio_to_cifar_dist"], m["images_per_second"] / base), name
        if name == "pipeline":
            assert "gflops" not in m
            continue
        assert close(m["gflops"], counts["train_flops_per_image"] * m["images_per_second"] / 1e9)
        assert close(m["roofline_fraction"], m["gflops"] / roof["gflops"]), name
    goals = report["goals"]
    assert set(goals) == {"vs_keras_fit", "vs_seed_host_aug", "roofline", "roofline_run",
                          "augmentation", "pipeline"}
    assert close(goals["vs_keras_fit"]["measured"],
                 base / methods["keras_fit"]["images_per_second"])
    assert close(goals["vs_seed_host_aug"]["measured"],
                 base / methods["keras_fit_host"]["images_per_second"])
    c1 = methods["cifar_dist"]
    adjacent = sum(c1["adjacent_matmul_gflops"]) / 2
    assert close(c1["roofline_fraction_adjacent"], c1["gflops"] / adjacent)
    assert close(goals["roofline"]["measured"], c1["roofline_fraction_adjacent"])
    assert close(goals["roofline_run"]["measured"], c1["roofline_fraction"])
    noaug = methods["cifar_dist_noaug"]["images_per_second"]
    assert close(goals["augmentation"]["measured"], 1 - base / noaug, rel=1e-6)
    for key, g in goals.items():
        higher = key != "augmentation"
        assert g["met"] == (g["measured"] >= g["target"] if higher
                            else g["measured"] <= g["target"]), key
    assert report["machine"]["cpus"] >= 1 and len(report["machine"]["load_average_after"]) == 3


def test_tiny_bench_prints_a_table_with_every_method(tiny):
    report, stdout = tiny
    for name in TINY_METHODS:
        assert LABELS[name] in stdout
    assert "goal vs_keras_fit" in stdout and "load average before" in stdout


def test_quantiles_and_window_summary():
    assert timing.quantile([3, 1, 2], 0.5) == 2
    assert timing.quantile([1, 2, 3, 4], 0.5) == 2.5
    assert timing.quantile([1, 2, 3, 4], 0.25) == 1.75
    s = timing.summarise([1.0, 2.0, 4.0], items_per_window=8, steps_per_window=2)
    assert s["images_per_second"] == 4.0 and s["images_per_second_min"] == 2.0
    assert s["images_per_second_max"] == 8.0 and s["step_seconds_median"] == 1.0


def test_hlo_flop_counter_reads_convolutions_and_dots():
    inline = (
        "  %c = f32[16,32,32,8]{3,2,1,0} convolution(f32[16,32,32,3]{3,2,1,0} %x, "
        "f32[3,3,3,8]{3,2,1,0} %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f\n"
        # a filter gradient: the batch is the lhs 'f' dimension, the window is the image
        "  %g = f32[3,3,3,8]{3,2,1,0} convolution(f32[16,32,32,3]{3,2,1,0} %x, "
        "f32[16,32,32,8]{3,2,1,0} %dy), window={size=32x32 pad=1_1x1_1}, "
        "dim_labels=f01b_i01o->01bf\n"
        "  %d = bf16[16,10]{1,0} dot(bf16[16,32]{1,0} %h, bf16[32,10]{1,0} %w), "
        "lhs_contracting_dims={1}, rhs_contracting_dims={0}\n")
    conv = 2 * 16 * 32 * 32 * 8 * 9 * 3
    counted = graph_checks.hlo_flops(inline)
    assert counted["convolution"] == 2 * conv and counted["convolution_ops"] == 2
    assert counted["dot"] == 2 * 16 * 10 * 32 and counted["total"] == 2 * conv + 2 * 16 * 10 * 32
    # optimized HLO names operands without shapes: they come from the defining lines
    by_name = ("  %x = f32[16,32,32,3]{3,2,1,0} parameter(0)\n"
               "  %k = f32[3,3,3,8]{3,2,1,0} parameter(1)\n"
               "  ROOT %c = f32[16,32,32,8]{3,2,1,0} convolution(%x, %k), "
               "window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={}\n")
    assert graph_checks.hlo_flops(by_name)["convolution"] == conv


def test_host_augmentation_is_image_data_generators_arithmetic():
    legacy = pytest.importorskip("keras.src.legacy.preprocessing.image")
    rng = np.random.default_rng(0)
    x = rng.random((32, 32, 3)).astype(np.float32)
    for theta, tx, ty in [(0.0, 0.0, 0.0), (12.5, 2.3, -3.1), (-15.0, -3.2, 3.2)]:
        ours = host_augment.host_affine(x, theta, tx, ty, flip=False)
        # ImageDataGenerator.apply_transform: rows axis 0, cols 1, channels 2
        theirs = legacy.apply_affine_transform(x, theta=theta, tx=tx, ty=ty, row_axis=0,
                                               col_axis=1, channel_axis=2,
                                               fill_mode="nearest", order=1)
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    np.testing.assert_array_equal(host_augment.host_affine(x, 0.0, 0.0, 0.0, flip=True), x[:, ::-1])
    draws = np.stack([host_augment.host_augment_image(x, rng) for _ in range(8)])
    assert draws.shape == (8, 32, 32, 3) and draws.min() >= 0 and draws.max() <= 1


@pytest.mark.slow
@pytest.mark.multiworker
def test_two_worker_part_reports_all_reduce_and_step_times(tmp_path):
    out = tmp_path / "mw.json"
    result = run_module("cifar_dist.bench", "--tiny", "--multiworker", "--methods=cifar_dist",
                        f"--output={out}", timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    workers = report["multiworker"]["workers"]
    assert [w["worker_index"] for w in workers] == [0, 1]
    assert all(w["workers"] == 2 and w["replicas"] == 2 for w in workers)
    s = report["multiworker"]["summary"]
    grad_bytes = report["counts"]["gradient_bytes_per_step"]
    assert s["gradient_bytes_per_step"] == grad_bytes == workers[0]["gradient_bytes_per_step"]
    assert s["all_reduce_seconds_bare"] > 0 and s["step_seconds_2_workers"] > 0
    assert close(s["speedup"], s["step_seconds_1_worker"] / s["step_seconds_2_workers"])
    assert close(s["ring_bus_bandwidth_gbit_s"],
                 grad_bytes * 8 / s["all_reduce_seconds_bare"] / 1e9)
    assert "(7) cifar_dist, 2 workers localhost" in result.stdout


def test_gpu_projection_arithmetic():
    # 2(N-1)/N x bytes: 2 GPUs send the whole buffer once, many GPUs approach twice
    assert close(projection.ring_all_reduce_seconds(2, 1e9 / 8, 1.0), 1.0)
    assert close(projection.ring_all_reduce_seconds(64, 1e9 / 8, 1.0), 2 * 63 / 64)
    p = projection.projection("tiny", 10.0, "test GPU", [25.0, 400.0], [2, 8], [256])
    flop = p["counts"]["train_flops_per_image"]
    nbytes = p["counts"]["gradient_bytes_per_step"]
    assert nbytes == 4 * p["counts"]["trainable_params"]
    for r in p["rows"]:
        t_c = 256 * flop / 10e12
        t_ar = 2 * (r["gpus"] - 1) / r["gpus"] * nbytes * 8 / (r["link_gbits"] * 1e9)
        assert close(r["compute_ms"], 1e3 * t_c) and close(r["all_reduce_ms"], 1e3 * t_ar)
        assert close(r["efficiency"], t_c / (t_c + t_ar))
        # at the link (or batch) it says 90% needs, the efficiency is exactly 90%
        t_ar90 = t_ar * r["link_gbits"] / r["link_gbits_for_90"]
        assert close(t_c / (t_c + t_ar90), 0.9)
        t_c90 = r["per_gpu_batch_for_90"] * flop / 10e12
        assert close(t_c90 / (t_c90 + t_ar), 0.9)
    assert "N=8" in projection.projection_text(p)


@pytest.mark.slow
def test_overhead_pairs_time_tight_and_main_side_by_side(monkeypatch, capsys):
    from cifar_dist.bench import overhead

    monkeypatch.setattr(overhead, "PAIR_TRAIN_IMAGES", 40)  # 20-step epochs: a quick check
    results = overhead.run_pairs(rounds=2, windows=1)
    assert len(results["pairs"]) == 2
    for pair in results["pairs"]:
        assert 0 < pair["tight"] < 1 and 0 < pair["main"] < 1, pair
        assert pair["ratio"] == pytest.approx(pair["main"] / pair["tight"])
    ratios = sorted(p["ratio"] for p in results["pairs"])
    assert results["median_ratio"] == pytest.approx(sum(ratios) / 2)
    assert (results["min_ratio"], results["max_ratio"]) == (ratios[0], ratios[1])
    assert "--synthetic_train_size=40 " in results["command"]
    table = overhead.pairs_table(results)
    lines = table.splitlines()
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| 1", "| 2"], table
    assert "median" in lines[4], table


@pytest.mark.parametrize("args, line", [
    (["--overhead", "--overhead_pairs=-1"], "--overhead_pairs must be >= 0, got -1"),
    (["--overhead_pairs=3"], "--overhead_pairs is a mode of --overhead: give both"),
])
def test_bad_overhead_pairs_is_one_line_and_exit_2(args, line):
    result = run_module("cifar_dist.bench", *args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert error_lines(result.stderr) == [f"cifar_dist: error: {line}"]
    assert result.stdout == ""
