"""Benchmarks: ``python -m split_alexnet.bench [model|data|lrn|all]``. See docs/benchmarks.md."""
