"""The paper's Figure 4 as code: query images from ``val/`` with the training images whose
fc7 features (4096-d, post-ReLU, eval mode) are nearest in Euclidean distance
(:func:`retrieve`), and the picture of them (:class:`RetrievalLayout`,
:func:`retrieval_image`). ``split_alexnet.visualize retrieval`` is the command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from split_alexnet.data.augment import finish_batch
from split_alexnet.data.dataset import CENTER, CROP, CropFolder, find_classes, make_loader
from split_alexnet.data.images import UnreadableImage, load_rgb256
from split_alexnet.tools.features import fc7_features
from split_alexnet.utils.checkpoint_file import checkpoint_stats
from split_alexnet.utils.cli import UsageError
from split_alexnet.utils.progress import Progress


@torch.no_grad()
def _features(model, ds, indices: Sequence[int], stats, device, *, batch_size: int,
              workers: int, desc: str, progress: bool):
    """Yield (dataset indices, fc7 features float64 on the CPU) batch by batch."""
    loader = make_loader(ds, batch_size=batch_size, sampler=list(indices), workers=workers,
                         pin_memory=device.type == "cuda")
    with Progress(len(indices), desc, unit="img", enabled=progress) as bar:
        for batch in loader:
            n_in = batch["label"].numel() + len(batch["skipped"])
            if batch["label"].numel():
                x = finish_batch(batch, stats, device)
                yield batch["index"].tolist(), fc7_features(model, x).double().cpu()
            bar.update(n_in)


def pick_queries(n: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(n)`` (val samples are sorted by class, so
    the queries cover the classes)."""
    count = min(count, n)
    if count <= 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, count)})


@torch.no_grad()
def retrieve(model, ckpt: dict, data: Path, device, *, queries: int | Sequence[int] = 5,
             neighbours: int = 6, batch_size: int = 64, workers: int = 0,
             progress: bool = True, max_train: int | None = None) -> list[dict]:
    """Figure 4's search. For each query (val images: a count spread evenly over
    ``data/val``, or explicit val indices), the ``neighbours`` training images of
    ``data/train`` nearest in fc7 space (Euclidean), nearest first (ties: dataset order).

    Returns ``[{"path", "label", "neighbours": [{"path", "label", "distance"}, ...]}]``
    with labels as class-folder names. Only the (queries x train) distances are kept, so any
    training set size fits in memory; ``max_train`` searches an evenly spread subset."""
    model.eval()
    data = Path(data)
    stats = checkpoint_stats(ckpt)
    val = CropFolder(data / "val", find_classes(data / "val"), mode="center")
    train = CropFolder(data / "train", find_classes(data / "train"), mode="center")
    q_idx = pick_queries(len(val), queries) if isinstance(queries, int) else list(queries)
    t_idx = (list(range(len(train))) if not max_train or max_train >= len(train)
             else pick_queries(len(train), max_train))
    kw = dict(batch_size=batch_size, workers=workers, progress=progress)
    q_rows, q_feats = [], []
    for idx, f in _features(model, val, q_idx, stats, device, desc="fc7 of queries", **kw):
        q_rows += idx
        q_feats.append(f)
    if not q_rows:
        raise UsageError(f"no readable query images in {data / 'val'}")
    qf = torch.cat(q_feats)
    dist = torch.full((len(q_rows), len(t_idx)), float("inf"), dtype=torch.float64)
    col = {i: c for c, i in enumerate(t_idx)}
    for idx, f in _features(model, train, t_idx, stats, device, desc="fc7 of train", **kw):
        d = torch.cdist(qf, f, compute_mode="donot_use_mm_for_euclid_dist")
        dist[:, [col[i] for i in idx]] = d
    order = torch.sort(dist, dim=1, stable=True).indices[:, :neighbours]
    out = []
    for r, qi in enumerate(q_rows):
        qp, ql = val.samples[qi]
        nbrs = []
        for c in order[r].tolist():
            if not torch.isfinite(dist[r, c]):
                break  # fewer readable training images than neighbours asked for
            tp, tl = train.samples[t_idx[c]]
            nbrs.append({"path": tp, "label": train.classes[tl], "distance": float(dist[r, c])})
        out.append({"path": qp, "label": val.classes[ql], "neighbours": nbrs})
    return out


@dataclass(frozen=True)
class RetrievalLayout:
    """Figure 4's grid: one row per query; the query in the first column, then a wider gap
    (``sep``) and its neighbours, nearest first. Each cell is a ``tile`` x ``tile`` thumbnail of
    the 227 centre crop with ``label`` pixels of text under it; ``pad`` pixels around cells;
    a ``header`` strip of text on top."""

    queries: int
    neighbours: int
    tile: int = 112
    pad: int = 6
    sep: int = 16
    label: int = 26
    header: int = 18

    @property
    def size(self) -> tuple[int, int]:
        w = self.pad + self.tile + self.sep + self.neighbours * (self.tile + self.pad)
        h = self.header + self.queries * (self.tile + self.label + self.pad) + self.pad
        return w, h

    def box(self, q: int, j: int) -> tuple[int, int, int, int]:
        """Tile (x0, y0, x1, y1) of query ``q``'s column ``j`` (0: the query, 1..: nbrs)."""
        x0 = self.pad
        if j:
            x0 += self.tile + self.sep + (j - 1) * (self.tile + self.pad)
        y0 = self.header + q * (self.tile + self.label + self.pad)
        return x0, y0, x0 + self.tile, y0 + self.tile


def _thumb(path: str, tile: int) -> Image.Image:
    try:
        a = load_rgb256(path)[CENTER:CENTER + CROP, CENTER:CENTER + CROP]
    except UnreadableImage:
        return Image.new("RGB", (tile, tile), (200, 200, 200))
    return Image.fromarray(np.ascontiguousarray(a), "RGB").resize((tile, tile),
                                                                  Image.Resampling.BILINEAR)


def _fit(d: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and d.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def retrieval_image(results: list[dict], neighbours: int, *, tile: int = 112
                    ) -> tuple[Image.Image, RetrievalLayout]:
    """Draw :func:`retrieve`'s results. Neighbours of the query's class get a green frame,
    others red; under each tile: class name, and the fc7 distance for neighbours."""
    lay = RetrievalLayout(len(results), neighbours, tile=tile)
    img = Image.new("RGB", lay.size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((lay.pad, 3), "query  |  nearest training images by fc7 distance (nearest first)",
           fill="black", font=font)
    xs = lay.pad + lay.tile + lay.sep // 2
    d.line([xs, lay.header, xs, lay.size[1] - lay.pad], fill=(120, 120, 120), width=2)
    for q, res in enumerate(results):
        cells = [(res["path"], res["label"], None)] + [
            (n["path"], n["label"], n["distance"]) for n in res["neighbours"]]
        for j, (path, label, dist) in enumerate(cells):
            x0, y0, x1, y1 = lay.box(q, j)
            if j:
                colour = (40, 160, 40) if label == res["label"] else (200, 40, 40)
                d.rectangle([x0 - 3, y0 - 3, x1 + 2, y1 + 2], outline=colour, width=2)
            img.paste(_thumb(path, tile), (x0, y0))
            d.text((x0, y1 + 2), _fit(d, label, font, tile), fill="black", font=font)
            if dist is not None:
                d.text((x0, y1 + 13), _fit(d, f"d = {dist:.4g}", font, tile), fill=(80, 80, 80),
                       font=font)
    return img, lay
