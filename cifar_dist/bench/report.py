"""The benchmark's report: the figures derived from the raw measurements (each computed
once, in derive) and the printed table with its goal and summary lines."""

from __future__ import annotations

LABELS = {
    "cifar_dist": "(1) cifar_dist XLA step, on-device aug",
    "cifar_dist_noaug": "(1b) cifar_dist XLA step, no aug",
    "keras_fit": "(2) Keras fit + aug layers in tf.data",
    "keras_fit_xla": "(2x) same, jit_compile=True",
    "keras_fit_host": "(3) Keras fit + host scipy aug (seed)",
    "pipeline": "(4) input pipeline alone",
    "matmul": "(5) fp32 matmul (roofline)",
    "multiworker": "(7) cifar_dist, 2 workers localhost",
    "profile": "(1p) cifar_dist step, profiled",
}
COUNTS = ("forward_flops_per_image", "train_flops_per_image", "trainable_params",
          "gradient_bytes_per_step", "gradient_tensors")


# --------------------------------------------------------------------------- derived figures

def _rates(m: dict, base, flop, roof, adjacent=True) -> None:
    """Ratio to (1), GFLOP/s and roofline fractions of one method's (or worker's) result."""
    ips = m.get("images_per_second")
    if ips is None:
        return
    if base:
        m["ratio_to_cifar_dist"] = ips / base
    if flop:
        m["gflops"] = flop * ips / 1e9
        if roof:
            m["roofline_fraction"] = m["gflops"] / roof
        if adjacent and m.get("adjacent_matmul_gflops"):
            m["roofline_fraction_adjacent"] = m["gflops"] / (
                sum(m["adjacent_matmul_gflops"]) / len(m["adjacent_matmul_gflops"]))


def _goals(results: dict, base) -> dict:
    methods = results["methods"]
    c1 = methods.get("cifar_dist", {})
    goals = {}

    def goal(key, text, value, target, higher=True):
        if value is None:
            return
        goals[key] = {"goal": text, "measured": value, "target": target,
                      "met": bool(value >= target if higher else value <= target)}

    if base:
        if "keras_fit" in methods:
            goal("vs_keras_fit", "(1) >= 2x images/s of (2)",
                 base / methods["keras_fit"]["images_per_second"], 2.0)
        if "keras_fit_host" in methods:
            goal("vs_seed_host_aug", "(1) >= 3x images/s of (3)",
                 base / methods["keras_fit_host"]["images_per_second"], 3.0)
        goal("roofline", "(1) >= 90% of the matmul roofline (the matmul timed in the same "
             "process right before and after (1)'s windows)",
             c1.get("roofline_fraction_adjacent", c1.get("roofline_fraction")), 0.9)
        goal("roofline_run", "(1) >= 90% of the run's roofline (higher of the matmul medians "
             "at the start and the end of the run)", c1.get("roofline_fraction"), 0.9)
        if "augmentation" in results:
            goal("augmentation", "on-device augmentation <= 10% of the step",
                 results["augmentation"]["step_fraction_from_1_vs_1b"], 0.10, higher=False)
    if "pipeline" in methods:
        goal("pipeline", "(4) >= 50,000 images/s", methods["pipeline"]["images_per_second"],
             50000.0)
    return goals


def _augmentation(c1: dict, noaug: dict) -> dict:
    """The augmentation's share of the step, from (1) vs (1b) and from timing it alone."""
    t_aug = 1.0 / c1["images_per_second"]
    t_no = 1.0 / noaug["images_per_second"]
    alone = c1.get("augmentation_alone")
    return {"step_fraction_from_1_vs_1b": (t_aug - t_no) / t_aug,
            "standalone": alone,
            "standalone_fraction_of_step": (alone["seconds_per_batch"] / c1["step_seconds_median"]
                                            if alone else None)}


def _multiworker_summary(c1: dict, w0: dict, n: int, grad_bytes: int) -> dict:
    one, two = c1["step_seconds_median"], w0["step_seconds_median"]
    t_ar = w0["all_reduce_seconds"]
    ring_bytes = 2 * (n - 1) / n * grad_bytes  # what each worker sends in a ring all-reduce
    return {
        "step_seconds_1_worker": one, "step_seconds_2_workers": two,
        "images_per_second_1_worker": c1["images_per_second"],
        "images_per_second_2_workers": w0["images_per_second"],
        "speedup": one / two,
        "all_reduce_seconds_bare": t_ar,
        "all_reduce_fraction_of_2_worker_step": t_ar / two,
        "step_difference_seconds": two - one,
        "gradient_bytes_per_step": grad_bytes,
        "ring_bytes_sent_per_worker": ring_bytes,
        "ring_bus_bandwidth_gbit_s": ring_bytes * 8 / t_ar / 1e9,
    }


def derive(results: dict) -> dict:
    """Counts, roofline, ratios, GFLOP/s, roofline fractions, goals, the augmentation share
    and the 2-worker summary: everything computed from the raw results, each once."""
    methods, config = results["methods"], results["config"]
    c1 = methods.get("cifar_dist", {})
    if c1:
        results["counts"] = {k: c1[k] for k in COUNTS}
        results["counts"]["host_to_device_bytes_per_step"] = config["batch_size"] * 32 * 32 * 3
    else:
        results["counts"] = {}
    matmul_runs = methods.get("matmul", {}).get("runs", [])
    roof = max(r["gflops"] for r in matmul_runs) if matmul_runs else None
    results["roofline"] = {"matmul_n": config["matmul_size"],
                           "gflops_each_run": [r["gflops"] for r in matmul_runs],
                           "gflops": roof,
                           "rule": "the higher of the matmul medians at the start and end"}
    base = c1.get("images_per_second")
    flop = results["counts"].get("train_flops_per_image")
    for name, m in methods.items():
        if name != "matmul":
            _rates(m, base, None if name == "pipeline" else flop, roof)
    if base and "cifar_dist_noaug" in methods:
        results["augmentation"] = _augmentation(c1, methods["cifar_dist_noaug"])
    results["goals"] = _goals(results, base)
    mw = results.get("multiworker")
    if mw and base:
        w0 = mw["workers"][0]
        # no adjacent roofline here: both workers time their matmul at the same moment on
        # the same cores, so each sees about half the machine
        _rates(w0, base, flop, roof, adjacent=False)
        mw["summary"] = _multiworker_summary(c1, w0, len(mw["workers"]),
                                             results["counts"]["gradient_bytes_per_step"])
    return results


# --------------------------------------------------------------------------- the table

def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _percent(m: dict, key: str):
    return 100 * m[key] if key in m else None


def _method_row(label: str, m: dict) -> tuple:
    """One table row from a method's (or the chief worker's) measurements."""
    return (label, fmt(m.get("images_per_second"), ",.1f"),
            f"{fmt(m.get('images_per_second_min'), ',.1f')}-"
            f"{fmt(m.get('images_per_second_max'), ',.1f')}",
            fmt(m.get("ratio_to_cifar_dist"), ".2f"), fmt(m.get("gflops"), ".1f"),
            fmt(_percent(m, "roofline_fraction"), ".1f"),
            fmt(_percent(m, "roofline_fraction_adjacent"), ".1f"),
            fmt(m.get("cores_busy"), ".2f"), fmt(m.get("other_cores_busy"), ".2f"),
            fmt(m.get("peak_rss_mib"), ",.0f"))


def _rows(results: dict) -> list:
    rows = [("method", "images/s", "min-max", "x (1)", "GFLOP/s", "% roof", "% adj roof",
             "cores busy", "others busy", "peak MiB")]
    for name, m in results["methods"].items():
        if name != "matmul":
            rows.append(_method_row(LABELS.get(name, name), m))
    mm = results["methods"].get("matmul")
    if mm:
        roof = results["roofline"]
        rows.append((LABELS["matmul"] + f" n={roof['matmul_n']}", "-",
                     "/".join(f"{g:.1f}" for g in roof["gflops_each_run"]) + " GF/s", "-",
                     fmt(roof["gflops"], ".1f"), "100.0", "-", fmt(mm.get("cores_busy"), ".2f"),
                     "/".join(fmt(r.get("other_cores_busy"), ".2f") for r in mm.get("runs", [mm])),
                     fmt(mm.get("peak_rss_mib"), ",.0f")))
    mw = results.get("multiworker")
    if mw and "summary" in mw:
        rows.append(_method_row(LABELS["multiworker"], mw["workers"][0]))
    return rows


def _markdown(rows: list) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _summary_lines(results: dict) -> list:
    out = []
    for key, g in results.get("goals", {}).items():
        out.append(f"goal {key}: {g['goal']}: measured {g['measured']:.3f} -> "
                   f"{'met' if g['met'] else 'MISSED'}")
    aug = results.get("augmentation")
    if aug:
        line = (f"augmentation: {100 * aug['step_fraction_from_1_vs_1b']:.1f}% of the step "
                "((1) vs (1b))")
        if aug.get("standalone_fraction_of_step") is not None:
            line += (f"; alone under XLA {1e3 * aug['standalone']['seconds_per_batch']:.1f} ms "
                     f"per batch = {100 * aug['standalone_fraction_of_step']:.1f}% of the step")
        out.append(line)
    c1 = results["methods"].get("cifar_dist", {})
    if c1.get("xla_function_alone"):
        alone = c1["xla_function_alone"]["seconds_per_step"]
        out.append(f"(1) split: XLA function alone {alone:.3f} s per step, outside it "
                   f"{c1['outside_xla_seconds_per_step']:.3f} s "
                   f"({100 * c1['outside_xla_seconds_per_step'] / c1['step_seconds_median']:.1f}% "
                   f"of the {c1['step_seconds_median']:.3f} s step; "
                   f"{c1['ops_outside_xla_per_replica_per_step']:g} ops outside XLA per replica per step)")
    prof = results.get("profile")
    if prof:
        shares = sorted(prof["by_category_share"].items(), key=lambda kv: -kv[1])
        out.append(f"profile of (1) (HLO-op time summed over threads, "
                   f"{prof['hlo_op_ms_per_step_summed_over_threads']:.0f} ms per "
                   f"{prof['step_wall_ms']:.0f} ms step): "
                   + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares))
    mw = results.get("multiworker")
    if mw and "summary" in mw:
        s = mw["summary"]
        out.append(
            f"2 workers vs 1 (global batch {results['config']['batch_size']}): step "
            f"{s['step_seconds_2_workers']:.3f} s vs {s['step_seconds_1_worker']:.3f} s "
            f"(speed-up {s['speedup']:.2f}); bare ring all-reduce of "
            f"{s['gradient_bytes_per_step'] / 1e6:.2f} MB: "
            f"{1e3 * s['all_reduce_seconds_bare']:.1f} ms "
            f"({100 * s['all_reduce_fraction_of_2_worker_step']:.1f}% of the 2-worker step, "
            f"{s['ring_bus_bandwidth_gbit_s']:.2f} Gbit/s bus bandwidth)")
    return out


def table(results: dict) -> str:
    """The printed report: the table, then the goal and summary lines."""
    return "\n".join([_markdown(_rows(results)), *_summary_lines(results)])


def load_line(results: dict) -> str:
    machine = results["machine"]
    return (f"load average before {machine['load_average_before']}, after "
            f"{machine['load_average_after']}; {results['wall_seconds']:.0f} s")
