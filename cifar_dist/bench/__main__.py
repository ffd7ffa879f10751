"""python -m cifar_dist.bench [flags]: the benchmark (cifar_dist.bench's doc)."""

from cifar_dist.bench import run

if __name__ == "__main__":
    run()
