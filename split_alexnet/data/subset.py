"""Which part of a source ``prepare`` takes: a class selection and a seeded choice of M images
per class.

Classes: all, the first N sorted wnids, or those of a list file. Images: M per class chosen by a
seeded hash of the file name (deterministic, independent of listing order, of the layout and of
the other classes; a smaller M is a subset of a larger one). A source of class folders without
train/ and val/ is split by ``--val-fraction F`` (:func:`split_val`: per class, the same seeded
hash picks round(F x n) validation images). The choice is recorded in
``DST/subset.json`` (:meth:`Subset.record`) so a DST is never mixed from two subsets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from split_alexnet.utils.cli import UsageError

__all__ = ["SUBSET_FILE", "Subset", "parse_classes_arg", "select_classes", "pick", "split_val"]

SUBSET_FILE = "subset.json"


@dataclass(frozen=True)
class Subset:
    """``classes``: None (all), an int N (first N sorted wnids) or a path to a list file
    (one wnid per line, ``#`` comments); ``per_class`` / ``val_per_class``: None (all) or M
    images per class; ``seed`` picks which M."""

    classes: int | str | None = None
    per_class: int | None = None
    val_per_class: int | None = None
    seed: int = 0
    val_fraction: float | None = None

    def record(self, wnids: Sequence[str]) -> dict:
        """The content of ``DST/subset.json`` for the selected ``wnids``."""
        uses_seed = self.per_class is not None or self.val_per_class is not None or \
            self.val_fraction is not None
        return {"classes": None if self.classes is None else len(wnids),
                "wnids": list(wnids) if self.classes is not None else None,
                "per_class": self.per_class, "val_per_class": self.val_per_class,
                "seed": self.seed if uses_seed else None,
                **({"val_fraction": self.val_fraction} if self.val_fraction is not None
                   else {})}


def parse_classes_arg(value: str | None) -> int | str | None:
    """``--classes``: an integer or a path to a wnid list file."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def select_classes(wnids: Sequence[str], spec: int | str | None) -> list[str]:
    """The selected wnids, sorted (``wnids`` = all classes of the source)."""
    allw = sorted(wnids)
    if spec is None:
        return allw
    if isinstance(spec, int):
        if not 1 <= spec <= len(allw):
            raise UsageError(f"--classes must be in 1..{len(allw)} (the source has "
                             f"{len(allw)} classes), got {spec}")
        return allw[:spec]
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--classes: not an integer and no such list file: {spec}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--classes: cannot read the list file {spec}: {e}") from None
    want = []
    for line in text.splitlines():
        w = line.split("#", 1)[0].strip()
        if w:
            want.append(w.split()[0])
    if not want:
        raise UsageError(f"--classes list file names no classes: {spec}")
    unknown = sorted(set(want) - set(allw))
    if unknown:
        raise UsageError(f"--classes list file {spec} names classes that are not in the source: "
                         f"{', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else ""))
    return sorted(set(want))


def _rank(seed: int, wnid: str, rel: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{wnid}\0{rel}".encode("utf-8", "surrogateescape"),
                           digest_size=16).digest()


def pick(rels: Sequence[str], m: int | None, seed: int, wnid: str) -> set[str]:
    """The ``m`` names of ``rels`` (relative names inside class ``wnid``) with the smallest
    seeded hash; all of them when ``m`` is None."""
    if m is None or m >= len(rels):
        return set(rels)
    return set(sorted(rels, key=lambda r: _rank(seed, wnid, r))[:m])


def split_val(rels: Sequence[str], fraction: float, seed: int, wnid: str) -> set[str]:
    """--val-fraction F: the validation images of class ``wnid`` (relative names ``rels``),
    round(F x n) of its n images but at least one and never all, chosen by the seeded hash
    of :func:`pick` (stratified: every class is split alike). A class of fewer than two
    images cannot be split: :class:`UsageError`."""
    if len(rels) < 2:
        raise UsageError(f"--val-fraction: class {wnid!r} has {len(rels)} image(s); a split "
                         "needs at least 2 per class")
    k = min(max(1, round(fraction * len(rels))), len(rels) - 1)
    return pick(rels, k, seed, wnid)
