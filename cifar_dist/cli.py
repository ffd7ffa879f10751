"""What every cifar_dist command shares at its command-line boundary."""

from __future__ import annotations

import os
import sys

from absl import flags

from cifar_dist.errors import ConfigError


def parse_flags(fv: flags.FlagValues, argv, doc: str) -> list:
    """absl flag errors -> the same one line and exit status 2 as every cifar_dist command
    (absl itself would exit 1 with a usage dump); --help prints `doc` and the flags."""
    if any(a in ("--help", "-h", "--helpfull", "-?") for a in argv[1:]):
        print(doc.strip() + "\n\nflags:\n" + fv.get_help(), file=sys.stderr)
        raise SystemExit(0)
    refuse_flagfile_cycles(fv)
    try:
        return fv(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from None


def refuse_flagfile_cycles(fv: flags.FlagValues) -> None:
    """A flagfile that includes itself (directly or through others) becomes a flag error
    (one line, exit 2) instead of absl's warning and a run on whatever was left.

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
        finally:
            open_files.pop()

    object.__setattr__(fv, "_get_flag_file_lines", read)
