"""Loads one image with ``load_rgb`` and prints JSON: the refusal's message (null if it
loaded), the seconds it took and how many MB the process's peak memory grew by.

Usage: load_image.py IMAGE (run by tests/test_data_hardening.py::
test_image_over_the_pixel_limit_is_refused_before_decoding,
tests/test_input_checks.py::test_an_image_file_larger_than_any_allowed_image_is_refused_unread)
"""

import json
import resource
import sys
import time
import warnings

from split_alexnet.data.images import UnreadableImage, load_rgb

warnings.simplefilter("ignore")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    load_rgb(sys.argv[1])
    err = None
except UnreadableImage as e:
    err = str(e)
print(json.dumps({"error": err, "seconds": time.perf_counter() - t,
                  "grown_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
                              / 1024}))
