"""``python -m split_alexnet.prepare``: the command of :mod:`split_alexnet.data.prepare`."""
from split_alexnet.data.prepare import cli

if __name__ == "__main__":
    cli()
