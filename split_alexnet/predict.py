"""``python -m split_alexnet.predict``: the command of :mod:`split_alexnet.tools.predict`."""
from split_alexnet.tools.predict import cli

if __name__ == "__main__":
    cli()
