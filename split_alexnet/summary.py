"""``python -m split_alexnet.summary``: the command of :mod:`split_alexnet.tools.summary`."""
from split_alexnet.tools.summary import cli

if __name__ == "__main__":
    cli()
