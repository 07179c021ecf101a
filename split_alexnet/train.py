"""``python -m split_alexnet.train``: the command of :mod:`split_alexnet.training.trainer`."""
from split_alexnet.training.trainer import cli

if __name__ == "__main__":
    cli()
