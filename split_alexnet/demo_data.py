"""``python -m split_alexnet.demo_data``: the command of :mod:`split_alexnet.data.demo`."""
from split_alexnet.data.demo import cli

if __name__ == "__main__":
    cli()
