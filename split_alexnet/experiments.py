"""``python -m split_alexnet.experiments``: the command of :mod:`split_alexnet.tools.experiments`."""
from split_alexnet.tools.experiments import cli

if __name__ == "__main__":
    cli()
