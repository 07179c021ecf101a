"""``python -m split_alexnet.export``: the command of :mod:`split_alexnet.tools.export`."""
from split_alexnet.tools.export import cli

if __name__ == "__main__":
    cli()
