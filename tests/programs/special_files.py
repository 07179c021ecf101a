"""Reads a dataset that holds FIFOs, devices, sockets and dangling links, and prints JSON:
the classes and items the statistics and the dataset found, which items loaded, which were
skipped, and why ``load_rgb`` refused each special file given after the root.

Usage: special_files.py ROOT FILE... (run by tests/test_data_hardening.py::
test_fifos_devices_sockets_and_dangling_links_are_skipped_never_opened)
"""

import json
import sys
from pathlib import Path

from split_alexnet.data.dataset import CropFolder
from split_alexnet.data.images import UnreadableImage, load_rgb
from split_alexnet.data.stats import load_stats

root = Path(sys.argv[1])
s = load_stats(root, progress=False, workers=2)
ds = CropFolder(root / "train", s.classes, mode="center")
refused = {}
for p in sys.argv[2:]:
    try:
        load_rgb(p)
        refused[Path(p).name] = None
    except UnreadableImage as e:
        refused[Path(p).name] = str(e)
print(json.dumps({"classes": s.classes, "items": len(ds),
                  "ok": sum(bool(ds[i]["ok"]) for i in range(len(ds))),
                  "skipped": sorted(Path(p).name for p in ds.skipped), "refused": refused}))
