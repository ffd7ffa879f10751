"""What every cifar_dist command shares at its command-line boundary."""

from __future__ import annotations

import sys

from absl import flags

from cifar_dist.errors import ConfigError


def parse_flags(fv: flags.FlagValues, argv, doc: str) -> list:
    """absl flag errors -> the same one line and exit status 2 as every cifar_dist command
    (absl itself would exit 1 with a usage dump); --help prints `doc` and the flags."""
    if any(a in ("--help", "-h", "--helpfull", "-?") for a in argv[1:]):
        print(doc.strip() + "\n\nflags:\n" + fv.get_help(), file=sys.stderr)
        raise SystemExit(0)
    try:
        return fv(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
