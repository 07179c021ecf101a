"""``python -m split_alexnet.evaluate``: the command of :mod:`split_alexnet.tools.evaluate`."""
from split_alexnet.tools.evaluate import cli

if __name__ == "__main__":
    cli()
