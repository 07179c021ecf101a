"""``python -m split_alexnet.train``: the command of :mod:`split_alexnet.training.command`."""
from split_alexnet.training.command import cli

if __name__ == "__main__":
    cli()
