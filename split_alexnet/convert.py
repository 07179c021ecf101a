"""``python -m split_alexnet.convert``: the command of :mod:`split_alexnet.tools.convert`."""
from split_alexnet.tools.convert import cli

if __name__ == "__main__":
    cli()
