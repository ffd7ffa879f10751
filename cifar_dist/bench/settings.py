"""The bench command's settings: its flags, read once into a frozen value that every part
of the benchmark is given (no module reads the flags)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from absl import flags

from cifar_dist.errors import ConfigError

METHODS = ("matmul", "pipeline", "cifar_dist", "cifar_dist_noaug", "keras_fit",
           "keras_fit_xla", "keras_fit_host", "profile")
TINY = {"model": "tiny", "batch_size": 32, "windows": 2, "steps_per_window": 3,
        "warmup_windows": 1, "synthetic_size": 1024, "matmul_size": 512,
        "pipeline_batches": 20, "isolate": False, "multiworker": False,
        "methods": tuple(m for m in METHODS if m not in ("keras_fit_xla", "profile"))}
# What a child process running one method is given again (the rest it does not read).
CHILD_FLAGS = ("tiny", "batch_size", "dtype", "model", "data", "data_dir", "synthetic_size",
               "windows", "steps_per_window", "warmup_windows", "pipeline_batches",
               "matmul_size", "timeout", "all_reduce")
# What the report records as the run's configuration (with the methods).
REPORTED = ("tiny", "batch_size", "dtype", "model", "data", "data_dir", "synthetic_size",
            "windows", "steps_per_window", "warmup_windows", "pipeline_batches", "matmul_size",
            "isolate", "multiworker", "all_reduce")


def define_flags(fv: flags.FlagValues) -> None:
    """The bench command's flags (defined when it runs: cli.run_command)."""
    flags.DEFINE_bool("tiny", False, "a plumbing check in well under a minute: tiny model, batch 32, "
                      "2 short windows, all methods in this process, no multi-worker part "
                      "(flags given explicitly still win)", flag_values=fv)
    flags.DEFINE_string("output", "", "write the results as JSON here", flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "GLOBAL batch size of every training method",
                         flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"],
                      "compute dtype (mixed precision for float16/bfloat16) of every training method",
                      flag_values=fv)
    flags.DEFINE_enum("model", "seed", ["seed", "tiny"], "network", flag_values=fv)
    flags.DEFINE_enum("data", "synthetic", ["synthetic", "real"],
                      "random uint8 images, or CIFAR-10 from --data_dir", flag_values=fv)
    flags.DEFINE_string("data_dir", "", "CIFAR-10 location for --data=real (as cifar_dist.main)",
                        flag_values=fv)
    flags.DEFINE_integer("synthetic_size", 50000, "training images for --data=synthetic",
                         flag_values=fv)
    flags.DEFINE_integer("windows", 5, "timed windows per method", flag_values=fv)
    flags.DEFINE_integer("steps_per_window", 4, "training steps per window", flag_values=fv)
    flags.DEFINE_integer("warmup_windows", 1, "untimed windows first (compilation, autotuning)",
                         flag_values=fv)
    flags.DEFINE_integer("pipeline_batches", 200, "batches per window of the input-pipeline method",
                         flag_values=fv)
    flags.DEFINE_integer("matmul_size", 2048, "n of the n x n float32 roofline matmul",
                         flag_values=fv)
    flags.DEFINE_list("methods", ",".join(METHODS), f"subset of {', '.join(METHODS)}",
                      flag_values=fv)
    flags.DEFINE_bool("multiworker", True, "also run (7): 2 workers on localhost vs 1",
                      flag_values=fv)
    flags.DEFINE_enum("all_reduce", "ring", ["ring", "nccl", "auto"],
                      "(7): the workers' all-reduce (ring over gRPC on CPUs; nccl on GPUs)",
                      flag_values=fv)
    flags.DEFINE_bool("isolate", True, "each method in its own process (independent peak memory)",
                      flag_values=fv)
    flags.DEFINE_integer("timeout", 1200, "seconds any one method may take", flag_values=fv)
    # paper projection for GPUs (no training; from the FLOP and byte counts)
    flags.DEFINE_bool("projection", False, "print the GPU scaling projection from the counts and exit",
                      flag_values=fv)
    flags.DEFINE_float("gpu_tflops", 93.6, "projection: achieved TFLOP/s per GPU on this network",
                       flag_values=fv)
    flags.DEFINE_string("gpu_label", "A100, bf16, 30% of its 312 TFLOP/s dense peak",
                        "projection: what --gpu_tflops stands for", flag_values=fv)
    flags.DEFINE_list("link_gbits", "25,100,400", "projection: per-GPU ring bandwidths, Gbit/s",
                      flag_values=fv)
    flags.DEFINE_list("gpu_counts", "2,4,8,16,32,64", "projection: numbers of GPUs", flag_values=fv)
    flags.DEFINE_list("per_gpu_batches", "256,512", "projection: per-GPU batch sizes",
                      flag_values=fv)
    # the loop's fixed costs (bench/overhead.py)
    flags.DEFINE_bool("overhead", False, "measure the training loop's per-step overhead (tiny "
                      "network, 2 images per replica, one device and mirrored on 2 CPUs, SGD and "
                      "AdamW) and exit", flag_values=fv)
    flags.DEFINE_integer("overhead_pairs", 0, "with --overhead: instead of the table, this many "
                         "interleaved rounds of (the tight loop, `cifar_dist.main` as users run "
                         "it, 2,000-step epochs), each a fresh process, and their ratios",
                         flag_values=fv)
    flags.DEFINE_string("overhead_case", "", "internal: run one overhead case STRATEGY,OPTIMIZER "
                        "(or `tight`)", flag_values=fv)
    # internal: a child process running one method
    flags.DEFINE_string("child", "", "internal: run this one method and write --child_output",
                        flag_values=fv)
    flags.DEFINE_string("child_output", "", "internal", flag_values=fv)


@dataclass(frozen=True)
class Settings:
    """Every bench flag's value (list flags as tuples), plus which flags were given; the
    defaults are the flags' (Settings.parse([]) gives them)."""

    tiny: bool
    output: str
    batch_size: int
    dtype: str
    model: str
    data: str
    data_dir: str
    synthetic_size: int
    windows: int
    steps_per_window: int
    warmup_windows: int
    pipeline_batches: int
    matmul_size: int
    methods: tuple
    multiworker: bool
    all_reduce: str
    isolate: bool
    timeout: int
    projection: bool
    gpu_tflops: float
    gpu_label: str
    link_gbits: tuple
    gpu_counts: tuple
    per_gpu_batches: tuple
    overhead: bool
    overhead_pairs: int
    overhead_case: str
    child: str
    child_output: str
    given: frozenset  # the flags set on the command line (they beat --tiny)

    @classmethod
    def from_flags(cls, fv: flags.FlagValues) -> Settings:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "given"]
        values = {n: tuple(fv[n].value) if isinstance(fv[n].value, list) else fv[n].value
                  for n in names}
        return cls(**values, given=frozenset(n for n in names if fv[n].present))

    @classmethod
    def parse(cls, args) -> Settings:
        """The settings of `bench ARGS...` (no program name), for tests and tools."""
        fv = flags.FlagValues()
        define_flags(fv)
        fv(["bench", *args])
        return cls.from_flags(fv)

    def with_tiny_defaults(self) -> Settings:
        """--tiny's values for every flag not given explicitly (the benchmark run only: a
        child gets every value it reads explicitly, --projection and --overhead ignore it)."""
        if not self.tiny:
            return self
        return dataclasses.replace(self, **{k: v for k, v in TINY.items() if k not in self.given})

    def check(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ConfigError(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
        if self.data == "real" and not self.data_dir:
            raise ConfigError("--data=real needs --data_dir")
        if self.overhead_pairs < 0:
            raise ConfigError(f"--overhead_pairs must be >= 0, got {self.overhead_pairs}")
        if self.overhead_pairs and not self.overhead:
            raise ConfigError("--overhead_pairs is a mode of --overhead: give both")

    def child_args(self) -> list:
        """These settings as flags again, for a child process that runs one method."""
        return [f"--{k}={getattr(self, k)}" for k in CHILD_FLAGS]

    def reported(self) -> dict:
        return {**{k: getattr(self, k) for k in REPORTED}, "methods": list(self.methods)}
