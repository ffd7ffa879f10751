"""GPU scaling on paper (`--projection`): no training, from the network's FLOP and gradient
byte counts, an assumed achieved TFLOP/s per GPU and ring all-reduce bandwidths."""

from __future__ import annotations

from cifar_dist.bench.settings import Settings


def ring_all_reduce_seconds(num_gpus: int, nbytes: float, gbits: float) -> float:
    """Bandwidth term of a ring all-reduce: each GPU sends (and receives) 2(N-1)/N x bytes."""
    return 2 * (num_gpus - 1) / num_gpus * nbytes * 8 / (gbits * 1e9)


def projection(model_name: str, tflops: float, label: str, links, gpus, batches) -> dict:
    """Scaling on paper: per-GPU compute time from the FLOP count at an assumed achieved rate;
    the all-reduce does not overlap the compute (the gradients leave the XLA function all at
    once and are then all-reduced), so efficiency = t_compute / (t_compute + t_all_reduce)."""
    from cifar_dist.bench.workload import model_counts  # noqa: PLC0415  (imports TensorFlow)
    from cifar_dist.model import build_model  # noqa: PLC0415

    counts = model_counts(build_model(model_name))
    nbytes, flop = counts["gradient_bytes_per_step"], counts["train_flops_per_image"]
    rows = []
    for b in batches:
        t_c = b * flop / (tflops * 1e12)
        for link in links:
            for n in gpus:
                t_ar = ring_all_reduce_seconds(n, nbytes, link)
                rows.append({"per_gpu_batch": b, "link_gbits": link, "gpus": n,
                             "compute_ms": 1e3 * t_c, "all_reduce_ms": 1e3 * t_ar,
                             "efficiency": t_c / (t_c + t_ar),
                             # what 90% needs: t_ar <= t_c / 9
                             "link_gbits_for_90": 9 * 2 * (n - 1) / n * nbytes * 8 / t_c / 1e9,
                             "per_gpu_batch_for_90": 9 * t_ar * tflops * 1e12 / flop})
    return {"model": model_name, "counts": counts, "gpu_tflops": tflops, "gpu_label": label,
            "host_to_device_bytes_per_image": 32 * 32 * 3, "rows": rows}


def _needs_lines(rows, other: str, text) -> list:
    """At N = 8 and 64, what 90% needs for each value of `other` (a row key), once each."""
    done, lines = set(), []
    for r in rows:
        key = (r["gpus"], r[other])
        if r["gpus"] in (8, 64) and key not in done:
            done.add(key)
            lines.append(text(r))
    return lines


def projection_text(p) -> str:
    c = p["counts"]
    lines = [f"{p['model']}: {c['train_flops_per_image'] / 1e9:.4f} GFLOP per trained image "
             f"(forward {c['forward_flops_per_image'] / 1e9:.4f}), {c['trainable_params']:,} "
             f"parameters -> {c['gradient_bytes_per_step'] / 1e6:.3f} MB of fp32 gradients "
             f"all-reduced per step; {p['host_to_device_bytes_per_image']} B uint8 per image "
             "host->device",
             f"assumed per-GPU rate: {p['gpu_tflops']:.1f} TFLOP/s ({p['gpu_label']})", ""]
    lines.append("| per-GPU batch | compute ms | link Gb/s | " + " | ".join(
        f"N={n}" for n in sorted({r['gpus'] for r in p['rows']})) + " |")
    lines.append("|---|---|---|" + "---|" * len({r['gpus'] for r in p['rows']}))
    keyed = {}
    for r in p["rows"]:
        keyed.setdefault((r["per_gpu_batch"], r["link_gbits"], r["compute_ms"]), []).append(r)
    for (b, link, t_c), rs in keyed.items():
        cells = [f"{r['all_reduce_ms']:.2f} ms / {100 * r['efficiency']:.0f}%" for r in rs]
        lines.append(f"| {b} | {t_c:.2f} | {link:g} | " + " | ".join(cells) + " |")
    lines += ["", "what 90% efficiency needs (t_all_reduce <= t_compute / 9, no overlap):"]
    lines += _needs_lines(p["rows"], "per_gpu_batch", lambda r: (
        f"  N={r['gpus']:>2}, per-GPU batch {r['per_gpu_batch']}: a ring link of "
        f">= {r['link_gbits_for_90']:.0f} Gb/s per GPU"))
    lines += _needs_lines(p["rows"], "link_gbits", lambda r: (
        f"  N={r['gpus']:>2}, {r['link_gbits']:g} Gb/s: a per-GPU batch of >= "
        f"{r['per_gpu_batch_for_90']:,.0f}"))
    return "\n".join(lines)


def run_projection(settings: Settings) -> dict:
    """The projection the settings ask for; prints it and returns it."""
    p = projection(settings.model, settings.gpu_tflops, settings.gpu_label,
                   [float(x) for x in settings.link_gbits], [int(x) for x in settings.gpu_counts],
                   [int(x) for x in settings.per_gpu_batches])
    print(projection_text(p))
    return p
