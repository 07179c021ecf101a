"""``python -m split_alexnet.compare``: the command of :mod:`split_alexnet.tools.compare`."""
from split_alexnet.tools.compare import cli

if __name__ == "__main__":
    cli()
