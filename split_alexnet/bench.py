"""``python -m split_alexnet.bench``: the command of :mod:`split_alexnet.tools.bench.main`."""
from split_alexnet.tools.bench.main import cli

if __name__ == "__main__":
    cli()
