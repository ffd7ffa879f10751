"""python -m cifar_dist COMMAND [flags]: train, evaluate, export, predict, bench, preview."""

import sys

from cifar_dist import cli

if __name__ == "__main__":
    sys.exit(cli.dispatch(sys.argv))
