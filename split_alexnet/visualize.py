"""``python -m split_alexnet.visualize``: the command of :mod:`split_alexnet.tools.visualize`."""
from split_alexnet.tools.visualize import cli

if __name__ == "__main__":
    cli()
