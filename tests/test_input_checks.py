"""Every input is checked before it is used, and read within bounds (docs/reliability.md,
"Inputs are checked and bounded"): the fields of DATA/stats.npz.
"""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest

from helpers import CPU_PAIR, train
from split_alexnet.data.stats import load_stats


def one_error(capsys) -> str:
    """The one line the last run printed on stderr (asserting it was one line)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ----------------------------------------------------------------------------- stats.npz


def _inflating_mean(path, arrays) -> None:
    """``arrays`` as a .npz whose mean is 1 GiB of zeros, deflated to about 1 MB."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, a in arrays.items():
            if name != "mean":
                with z.open(f"{name}.npy", "w") as f:
                    np.lib.format.write_array(f, np.asanyarray(a))
        with z.open("mean.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (4, 8192, 8192)})
            chunk = bytes(1 << 20)
            for _ in range(1024):
                f.write(chunk)


@pytest.mark.parametrize("case, words", [
    ("small mean", "field mean is of shape (3, 8, 8), not (3, 256, 256)"),
    ("nan mean", "field mean is not finite (NaN or infinity)"),
    ("mean above 255", "field mean is outside 0-255"),
    ("text eigval", "field eigval is of dtype <U3"),
    ("no eigvec", "field eigvec is missing"),
    ("1 GiB mean", "field mean declares 1,073,741,952 bytes"),
])
def test_a_stats_file_with_a_bad_field_is_one_line_naming_it(demo_root, tmp_path, capsys, case,
                                                             words):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    load_stats(data, progress=False)  # the real file, with the data's fingerprint
    with np.load(data / "stats.npz") as z:
        arrays = {k: z[k] for k in z.files}
    if case == "1 GiB mean":
        _inflating_mean(data / "stats.npz", arrays)
        assert (data / "stats.npz").stat().st_size < 2 << 20
    else:
        if case == "small mean":
            arrays["mean"] = arrays["mean"][:, :8, :8]
        elif case == "nan mean":
            arrays["mean"][1, 2, 3] = np.nan
        elif case == "mean above 255":
            arrays["mean"][0, 0, 0] = 300
        elif case == "text eigval":
            arrays["eigval"] = np.array(["abc"] * 3)
        else:
            del arrays["eigvec"]
        np.savez(data / "stats.npz", **arrays)
    capsys.readouterr()
    assert train(data, tmp_path / "run", *CPU_PAIR, "--max-steps", "1") == 2
    line = one_error(capsys)
    assert f"statistics file {data / 'stats.npz'}: {words}" in line, line
