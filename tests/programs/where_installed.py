"""Prints where ``split_alexnet`` is imported from, then whether the C++ LRN source it
compiles on first use is there (True/False).

Run by tests/test_packaging.py::test_installed_wheel_runs_outside_the_repository, with only
the installed wheel on PYTHONPATH.
"""

import split_alexnet
import split_alexnet.network.lrn_ext as lrn_ext

print(split_alexnet.__file__)
print(lrn_ext.SOURCE.is_file())
