"""What every cifar_dist command shares at its command-line boundary.

    python -m cifar_dist COMMAND [flags]      (or cifar-dist COMMAND, or cifar-dist-COMMAND)

Each command module (main, evaluate, export, predict, bench, augment_preview) has
`main(argv) -> exit status`, built on `run_command`: its flags are defined into a fresh
FlagValues when it runs (so importing any module of the package defines no flag, and two
commands can run in one process), `--help` prints the module's doc and its flags, and
every error a user can cause becomes one line on stderr with the exit status of
the table in errors.py (its EXIT_* constants).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow's C++ start-up lines

from absl import flags, logging  # noqa: E402

from cifar_dist import errors  # noqa: E402
from cifar_dist.errors import ConfigError  # noqa: E402

# name -> module; the module's main(argv) runs it.
COMMANDS = {
    "train": "cifar_dist.main",
    "evaluate": "cifar_dist.evaluate",
    "export": "cifar_dist.export",
    "predict": "cifar_dist.predict",
    "bench": "cifar_dist.bench",
    "preview": "cifar_dist.augment_preview",
}
HELP_FLAGS = ("--help", "-h", "--helpfull", "-?")


def run_command(argv, doc: str, define_flags, body) -> int:
    """The one path of every command: define its flags, parse argv (program name first),
    run body(flag_values, positional_args) and turn the package's exceptions into one
    stderr line and their exit status. Returns the exit status (body's, or 0)."""
    from cifar_dist import signals  # noqa: PLC0415 (imports no TensorFlow)

    fv = flags.FlagValues()
    define_flags(fv)
    use_absl_logging()
    # Every command answers SIGTERM, SIGINT and SIGUSR1 the same way (signals.py): one line,
    # exit 75/76, nothing half-written. A command that knows its model_dir sets it on
    # signals.current(); train and evaluate install their own request inside this one.
    with signals.StopRequest() as stop:
        try:
            rest = parse_flags(fv, argv, doc)
            stop.check()
            return body(fv, rest[1:]) or 0
        except errors.EXIT_ERRORS as e:
            print(errors.error_line(e), file=sys.stderr)
            return e.exit_code
        except signals.StopNow as e:  # a second Ctrl-C: still one line, no traceback
            print(errors.error_line(e.error), file=sys.stderr)
            return e.error.exit_code


def entry_points(doc: str, define_flags, body):
    """(main, run) of a command module: main(argv) runs the command for argv (program name
    first) and returns the exit status; run() is the console-script entry point."""
    def main(argv) -> int:
        return run_command(argv, doc, define_flags, body)

    def run():
        sys.exit(main(sys.argv))

    return main, run


def no_positional_args(args) -> None:
    if args:
        raise ConfigError(f"unexpected arguments: {' '.join(map(errors.printable, args))}")


def use_absl_logging() -> None:
    """absl's log lines (I1202 12:00:00 ...] text) at INFO on stderr, as absl.app.run gives
    them, without app.run: it would parse the global FLAGS, where our flags are not."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # else absl warns "Logging before flag parsing"
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)


def parse_flags(fv: flags.FlagValues, argv, doc: str) -> list:
    """absl flag errors -> the same one line and exit status 2 as every cifar_dist command
    (absl itself would exit 1 with a usage dump); --help prints `doc` and the flags."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(doc.strip() + "\n\nflags:\n" + fv.get_help(), file=sys.stderr)
        raise SystemExit(0)
    refuse_flagfile_cycles(fv)
    try:
        return fv(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from None


def refuse_flagfile_cycles(fv: flags.FlagValues) -> None:
    """A flagfile that includes itself (directly or through others) becomes a flag error
    (one line, exit 2) instead of absl's warning and a run on whatever was left; so does
    one that is not UTF-8 text (absl's UnicodeDecodeError was a traceback).

    absl reads nested flagfiles through fv._get_flag_file_lines(name, stack); we wrap it
    on this instance only (FlagValues routes attribute writes to flags, hence
    object.__setattr__). Names are compared as real paths, so ./a.cfg is a.cfg."""
    if "_get_flag_file_lines" in vars(fv):
        return
    inner = fv._get_flag_file_lines
    open_files = []  # real paths of the flagfiles being read, outermost first

    def read(filename, parsed_file_stack=None):
        if not filename:
            return inner(filename, parsed_file_stack)
        real = os.path.realpath(filename)
        if real in open_files:
            chain = " -> ".join(open_files[open_files.index(real):] + [real])
            raise flags.Error(f"--flagfile={filename} includes itself ({chain})")
        open_files.append(real)
        try:
            return inner(filename, parsed_file_stack)
        except UnicodeDecodeError as e:  # binary garbage, Latin-1 text: absl reads UTF-8
            raise flags.Error(f"--flagfile={errors.printable(filename)} is not UTF-8 text "
                              f"(it holds the byte 0x{e.object[e.start]:02x})") from None
        finally:
            open_files.pop()

    object.__setattr__(fv, "_get_flag_file_lines", read)


USAGE = """usage: python -m cifar_dist COMMAND [flags]   (COMMAND --help: its flags)

commands:
  train      train, evaluate and export a model (python -m cifar_dist.main)
  evaluate   per-class report, confusion matrix and plots of a trained run
  export     a SavedModel and model.keras from a run's checkpoint
  predict    classify image files or folders into a CSV
  bench      throughput benchmark and the GPU scaling projection
  preview    a grid of augmented training images
"""


def dispatch(argv) -> int:
    """python -m cifar_dist COMMAND ...: runs COMMAND's main with the rest of argv."""
    if len(argv) < 2 or argv[1] in HELP_FLAGS:
        print(USAGE, file=sys.stderr, end="")
        return errors.EXIT_OK if len(argv) >= 2 else errors.EXIT_BAD_INPUT
    name = argv[1]
    if name not in COMMANDS:
        print(errors.error_line(ConfigError(
            f"unknown command {name!r}; choose one of {', '.join(COMMANDS)}")), file=sys.stderr)
        return errors.EXIT_BAD_INPUT
    return importlib.import_module(COMMANDS[name]).main([f"cifar_dist {name}", *argv[2:]])


def dispatch_main():
    """Console-script entry point: cifar-dist COMMAND [flags]."""
    sys.exit(dispatch(sys.argv))
