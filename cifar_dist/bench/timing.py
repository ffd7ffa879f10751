"""How the benchmark times: windows of work, their quantiles, the CPU cores a method and
everything else kept busy meanwhile, and the adjacent roofline matmul. Every measurement
is returned as a value (Windows, Load); nothing is kept between calls."""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
from dataclasses import dataclass


def quantile(values, q):
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cpu_seconds() -> float:
    """CPU time of this process so far, all threads, user + system. process_time, not
    os.times: the latter counts 10 ms ticks, and a tiny window can be shorter than one."""
    return time.process_time()


def system_cpu_seconds():
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


@dataclass(frozen=True)
class Load:
    """cores_busy: this process's CPU time / wall time over the timed windows (how many of
    the machine's cores the method used; os.cpu_count() is the ceiling). other_cores_busy:
    the same for everything else on the machine (competing work); steal_cores: hypervisor."""

    cores_busy: float | None = None
    other_cores_busy: float | None = None
    steal_cores: float | None = None

    @classmethod
    def of(cls, own: float, system, wall: float) -> Load:
        """From this process's CPU seconds and the machine's (busy, steal) seconds (or None)
        over `wall` seconds: the machine's busy time minus ours is the competing work."""
        if not wall:
            return cls()
        if system is None:
            return cls(own / wall)
        return cls(own / wall, max(0.0, (system[0] - own) / wall), system[1] / wall)

    def fields(self) -> dict:
        return dataclasses.asdict(self)


class Meter:
    """CPU seconds of this process and of the whole machine since it was made."""

    def __init__(self):
        self.cpu0, self.system0 = cpu_seconds(), system_cpu_seconds()

    def usage(self):
        """(own CPU seconds, (machine busy, steal) seconds or None) since it was made."""
        own = cpu_seconds() - self.cpu0
        s1, s0 = system_cpu_seconds(), self.system0
        return own, ((s1[0] - s0[0], s1[1] - s0[1]) if s0 and s1 else None)

    def load(self, wall: float) -> Load:
        return Load.of(*self.usage(), wall)


def combined_load(usages, wall: float) -> Load:
    """The Load of several spans (Meter.usage() each) that together took `wall` seconds."""
    own = sum(u[0] for u in usages)
    systems = [u[1] for u in usages]
    system = ((sum(s[0] for s in systems), sum(s[1] for s in systems))
              if all(systems) else None)
    return Load.of(own, system, wall)


@dataclass(frozen=True)
class Windows:
    """Timed windows: their seconds, the untimed warm-up before them (tracing, XLA
    compilation) and the cores busy during the timed ones."""

    seconds: tuple
    warmup_seconds: float = 0.0
    load: Load = Load()

    def summary(self, items_per_window, steps_per_window, unit="images") -> dict:
        return summarise(self.seconds, items_per_window, steps_per_window, unit,
                         self.warmup_seconds, self.load)


def summarise(window_seconds, items_per_window, steps_per_window, unit="images",
              warmup_seconds=0.0, load=Load()) -> dict:
    """Per-window rates -> median / min / quartiles / max (rates in unit per second)."""
    rates = [items_per_window / t for t in window_seconds]
    return {f"{unit}_per_second": quantile(rates, 0.5),
            f"{unit}_per_second_min": min(rates), f"{unit}_per_second_max": max(rates),
            f"{unit}_per_second_q1": quantile(rates, 0.25),
            f"{unit}_per_second_q3": quantile(rates, 0.75),
            f"window_{unit}_per_second": rates,
            "window_seconds": list(window_seconds),
            "warmup_seconds": warmup_seconds,
            "step_seconds_median": quantile(window_seconds, 0.5) / steps_per_window,
            **load.fields()}


def timed_windows(run_window, warmup, windows) -> Windows:
    """Calls run_window() warmup + windows times; the warm-up calls are timed as one."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        run_window()
    warmup_seconds = time.perf_counter() - t0
    out = []
    meter = Meter()
    for _ in range(windows):
        t0 = time.perf_counter()
        run_window()
        out.append(time.perf_counter() - t0)
    return Windows(tuple(out), warmup_seconds, meter.load(sum(out)))


class AdjacentMatmul:
    """A short n x n float32 matmul measurement in this process, taken right before and right
    after a method's timed windows: the roofline under the same conditions as the method
    (this machine's speed drifts by tens of percent within minutes)."""

    def __init__(self, n: int):
        self.n = n
        self._fn = None

    def gflops(self, reps: int = 3) -> float:
        import tensorflow as tf  # noqa: PLC0415

        n = self.n
        if self._fn is None:  # made (and traced) on first use, outside any timing
            self._a = tf.random.normal([n, n], seed=3)
            self._b = tf.random.normal([n, n], seed=4)
            self._fn = tf.function(tf.linalg.matmul)
            float(self._fn(self._a, self._b)[0, 0].numpy())
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            float(self._fn(self._a, self._b)[0, 0].numpy())
            times.append(time.perf_counter() - t0)
        return 2.0 * n ** 3 / quantile(times, 0.5) / 1e9
