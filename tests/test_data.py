"""The input pipeline: statistics, augmentation geometry, PCA noise, odd files, determinism,
decoders, and the data modules' imports."""

from __future__ import annotations

import ast
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import split_alexnet.data.augment as DA
import split_alexnet.data.dataset as D
import split_alexnet.data.images as I
import split_alexnet.data.stats as DS
from split_alexnet.utils.cli import UsageError
from split_alexnet.data.images import UnreadableImage, load_rgb, load_rgb256

# ----------------------------------------------------------------------------- helpers


def coord_image() -> np.ndarray:
    """256x256 RGB whose R = row, G = column, B = 7: every pixel names its position."""
    y, x = np.mgrid[0:256, 0:256]
    return np.stack([y, x, np.full_like(y, 7)], -1).astype(np.uint8)


def make_root(tmp: Path, arrays: dict[str, list[np.ndarray]], fmt: str = "PNG") -> Path:
    for split in ("train", "val"):
        for c, imgs in arrays.items():
            d = tmp / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k, a in enumerate(imgs):
                Image.fromarray(a).save(d / f"{k:03d}.{fmt.lower()}", fmt)
    return tmp


def zero_stats(mean=None, eigval=(3.0, 2.0, 1.0), eigvec=None) -> DS.Stats:
    if eigvec is None:
        q, _ = torch.linalg.qr(torch.tensor([[1.0, 2, 3], [0.5, -1, 2], [2, 0.3, -1]]))
        eigvec = q
    return DS.Stats(mean=torch.zeros(3, 256, 256) if mean is None else mean,
                   eigval=torch.tensor(eigval), eigvec=eigvec, fingerprint="x", classes=["a"])


# ----------------------------------------------------------------------------- statistics


def test_stats_match_numpy_over_all_pixels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {c: [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(3)]
            for c in ("a", "b")}
    # correlated channels so the eigenvectors are not axis-aligned
    for c in imgs:
        for a in imgs[c]:
            a[..., 1] = (a[..., 0].astype(int) // 2 + a[..., 1] // 2).astype(np.uint8)
    root = make_root(tmp_path, imgs)
    s = DS.load_stats(root, progress=False)
    allimg = np.stack([a for c in sorted(imgs) for a in imgs[c]]).astype(np.float64)
    mean = allimg.mean(0).transpose(2, 0, 1)
    x = allimg.reshape(-1, 3)
    cov = np.cov(x, rowvar=False, bias=True)
    ev, vec = np.linalg.eigh(cov)
    ev, vec = ev[::-1], vec[:, ::-1]
    np.testing.assert_allclose(s.mean.numpy(), mean, rtol=0, atol=1e-4)
    np.testing.assert_allclose(s.eigval.numpy(), ev, rtol=1e-5)
    for i in range(3):  # column i is eigenvector i (up to sign)
        assert abs(float(np.dot(s.eigvec[:, i].numpy(), vec[:, i]))) == pytest.approx(1, abs=1e-5)
    assert s.classes == ["a", "b"]
    assert (root / "stats.npz").is_file()
    # cached: same object contents, no recomputation when nothing changed
    s2 = DS.load_stats(root, progress=False)
    assert s2.fingerprint == s.fingerprint and torch.equal(s2.mean, s.mean)
    # a changed dataset is noticed
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(root / "train" / "a" / "new.png")
    s3 = DS.load_stats(root, progress=False)
    assert s3.fingerprint != s.fingerprint
    assert float(s3.mean.mean()) < float(s.mean.mean())


def test_stats_parallel_equals_serial_and_cache_fallback(demo_root, tmp_path, monkeypatch):
    a = DS.compute_stats(demo_root, progress=False, workers=0)
    b = DS.compute_stats(demo_root, progress=False, workers=2, chunk=5)
    for k in ("mean", "eigval", "eigvec", "cov"):
        np.testing.assert_array_equal(a[k], b[k])  # exact float64 sums: order-independent
    # read-only root -> user cache keyed by the absolute path
    import shutil
    root = tmp_path / "ro"
    shutil.copytree(demo_root, root)
    (root / "stats.npz").unlink(missing_ok=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(DS, "_writable", lambda d: False)
    s = DS.load_stats(root, progress=False)
    assert not (root / "stats.npz").exists()
    cache = DS.stats_cache_path(root)
    assert cache.is_file() and str(tmp_path / "cache") in str(cache)
    assert DS.read_stats(cache).fingerprint == s.fingerprint


# ----------------------------------------------------------------------------- PCA noise


@pytest.mark.parametrize("pca", ["paper", "paper-255", "sqrt", "off"])
def test_pca_noise_adds_exact_offset_to_every_pixel(pca):
    st = zero_stats()
    alpha = torch.tensor([[0.05, -0.12, 0.2], [-0.3, 0.01, 0.0]])
    if pca == "off":
        alpha = torch.zeros_like(alpha)
    img = torch.randint(0, 256, (2, 3, 227, 227), dtype=torch.uint8)
    batch = {"image": img, "top": torch.tensor([0, 29]), "left": torch.tensor([3, 14]),
             "flip": torch.tensor([False, True]), "alpha": alpha, "pca": pca}
    out = DA.finish_batch(batch, st, "cpu")
    # paper: eigenvalues of [0, 1]-scaled RGB (l / 255**2), offset back in 0-255 units (* 255)
    lam = {"paper": st.eigval / 255.0, "paper-255": st.eigval, "sqrt": st.eigval.sqrt(),
           "off": st.eigval}[pca]
    for b in range(2):
        # [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T
        expect = st.eigvec @ (alpha[b] * lam) if pca != "off" else torch.zeros(3)
        diff = out[b] - img[b].float()
        torch.testing.assert_close(diff, expect[:, None, None].expand_as(diff), rtol=0,
                                   atol=1e-4)
    if pca == "off":
        assert torch.equal(out, img.float())


def test_dataset_alpha_distribution_and_off(demo_root):
    classes = D.find_classes(demo_root / "train")
    ds = D.CropFolder(demo_root / "train", classes, mode="train", pca="paper")
    alphas = torch.stack([ds.draw(e, i)[3] for e in range(50) for i in range(len(ds))])
    assert abs(float(alphas.std()) - 0.1) < 0.01 and abs(float(alphas.mean())) < 0.01
    off = D.CropFolder(demo_root / "train", classes, mode="train", pca="off")
    assert torch.equal(off[3]["alpha"], torch.zeros(3))
    ev = D.CropFolder(demo_root / "val", classes, mode="center")
    assert torch.equal(ev[0]["alpha"], torch.zeros(3))


# ----------------------------------------------------------------------------- geometry


@pytest.fixture
def coord_root(tmp_path):
    return make_root(tmp_path, {"a": [coord_image()] * 2})


def coord_stats() -> DS.Stats:
    return zero_stats(mean=torch.from_numpy(coord_image().transpose(2, 0, 1).astype(np.float32)))


def test_train_crop_flip_and_mean_crop(coord_root):
    ds = D.CropFolder(coord_root / "train", ["a"], mode="train", pca="off")
    seen_flip, seen_offsets = set(), set()
    items = [ds[(e, 0)] for e in range(40)]
    for it in items:
        img, t, l, f = it["image"], it["top"], it["left"], it["flip"]
        assert img.shape == (3, 227, 227) and img.dtype == torch.uint8
        assert 0 <= t <= 29 and 0 <= l <= 29
        rows = torch.arange(t, t + 227)
        cols = torch.arange(l, l + 227)
        if f:
            cols = cols.flip(0)
        assert torch.equal(img[0], rows[:, None].expand(227, 227).to(torch.uint8))
        assert torch.equal(img[1], cols[None, :].expand(227, 227).to(torch.uint8))
        assert bool((img[2] == 7).all())
        seen_flip.add(f)
        seen_offsets.add((t, l))
    assert seen_flip == {True, False} and len(seen_offsets) > 20
    # the mean image is cropped (and flipped) exactly like the image
    out = DA.finish_batch(D.collate(items), coord_stats(), "cpu")
    assert out.shape == (40, 3, 227, 227) and bool((out == 0).all())


def test_center_and_tencrop_regions(coord_root):
    st = coord_stats()
    c = D.CropFolder(coord_root / "val", ["a"], mode="center")[0]
    assert (c["top"], c["left"], c["flip"]) == (14, 14, False)
    assert int(c["image"][0, 0, 0]) == 14 and int(c["image"][1, 0, 0]) == 14
    assert int(c["image"][0, -1, -1]) == 240 and int(c["image"][1, -1, -1]) == 240
    assert bool((DA.finish_batch(D.collate([c]), st, "cpu") == 0).all())
    t = D.CropFolder(coord_root / "val", ["a"], mode="tencrop")[1]
    img = t["image"]
    assert img.shape == (10, 3, 227, 227)
    expect = [(0, 0, False), (0, 29, False), (29, 0, False), (29, 29, False), (14, 14, False)]
    expect += [(a, b, True) for a, b, _ in expect]
    assert D.tencrop_offsets() == expect
    for k, (top, left, flip) in enumerate(expect):
        assert int(img[k, 0, 0, 0]) == top, D.TENCROP_ORDER[k]
        first_col, last_col = (left + 226, left) if flip else (left, left + 226)
        assert int(img[k, 1, 0, 0]) == first_col and int(img[k, 1, 0, -1]) == last_col
        assert torch.equal(img[k + 5 if k < 5 else k - 5], img[k].flip(-1))
    out = DA.finish_batch(D.collate([t, t]), st, "cpu")
    assert out.shape == (2, 10, 3, 227, 227) and bool((out == 0).all())


# ----------------------------------------------------------------------------- odd files


def _save(path: Path, img: Image.Image, fmt: str, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


@pytest.mark.parametrize("decoder", ["auto", "pillow"])
def test_odd_images_load(tmp_path, decoder):
    rgb = Image.new("RGB", (300, 200), (200, 30, 40))
    files = {
        "gray": _save(tmp_path / "g.jpg", Image.new("L", (300, 280), 90), "JPEG"),
        "cmyk": _save(tmp_path / "c.jpg", rgb.convert("CMYK"), "JPEG", quality=95),
        "palette": _save(tmp_path / "p.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE),
                         "PNG"),
        "tiny": _save(tmp_path / "t.png", Image.new("RGB", (50, 30), (1, 2, 3)), "PNG"),
    }
    rgba = np.zeros((260, 300, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 150:, 3] = 255  # left half fully transparent -> white
    files["rgba"] = _save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA"), "PNG")
    pal_t = Image.new("P", (256, 256), 0)
    pal_t.putpalette([0, 255, 0] + [0, 0, 255] * 255)
    pal_t.info["transparency"] = 0
    files["palette_transparent"] = _save(tmp_path / "pt.png", pal_t, "PNG", transparency=0)
    a16 = np.full((256, 300), 65535, np.uint16)
    a16[:, 150:] = 32896  # 32896 / 257 = 128
    files["16bit"] = _save(tmp_path / "s.png", Image.fromarray(a16), "PNG")
    out = {k: load_rgb256(p, decoder=decoder) for k, p in files.items()}
    for k, a in out.items():
        assert a.shape == (256, 256, 3) and a.dtype == np.uint8, k
    assert (out["gray"] == out["gray"][..., :1]).all() and abs(int(out["gray"][5, 5, 0]) - 90) <= 2
    assert np.abs(out["cmyk"][128, 128].astype(int) - [200, 30, 40]).max() <= 12
    assert np.abs(out["palette"][128, 128].astype(int) - [200, 30, 40]).max() <= 12
    assert (out["tiny"] == [1, 2, 3]).all()
    assert (out["rgba"][128, 5] == [255, 255, 255]).all()
    assert (out["rgba"][128, 250] == [255, 0, 0]).all()
    assert (out["palette_transparent"] == 255).all()
    assert (out["16bit"][128, 5] == 255).all() and (out["16bit"][128, 250] == 128).all()


@pytest.mark.parametrize("decoder", ["auto", "pillow"])
def test_exif_rotation_is_applied(tmp_path, decoder):
    a = np.zeros((200, 300, 3), np.uint8)  # stored: left half red, right half blue
    a[:, :150] = (255, 0, 0)
    a[:, 150:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: left half -> top half
    p = _save(tmp_path / "r.jpg", im, "JPEG", exif=exif, quality=95)
    out = load_rgb256(p, decoder=decoder).astype(int)
    assert np.abs(out[10, 128] - [255, 0, 0]).max() < 40
    assert np.abs(out[245, 128] - [0, 0, 255]).max() < 40


def _bad_files(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
                    ).save(buf, "JPEG")
    files = {"empty": d / "empty.jpg", "truncated": d / "trunc.jpg", "text": d / "text.jpg",
             "corrupt": d / "corrupt.png"}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    files["text"].write_text("this is not an image\n")
    files["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return files


def test_unreadable_files_raise_naming_path(tmp_path):
    for k, p in _bad_files(tmp_path).items():
        with pytest.raises(UnreadableImage, match=str(p.name)):
            load_rgb256(p)


def test_decompression_bomb_is_unreadable(tmp_path, monkeypatch):
    p = _save(tmp_path / "big.png", Image.new("RGB", (300, 300)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UnreadableImage, match="DecompressionBomb"):
        load_rgb256(p)


def test_bad_files_skipped_and_counted_or_strict(demo_root, tmp_path, capsys):
    import shutil
    root = tmp_path / "r"
    shutil.copytree(demo_root / "train", root / "train")
    classes = D.find_classes(root / "train")
    bad = _bad_files(root / "train" / classes[0])
    ds = D.CropFolder(root / "train", classes)
    bad_idx = [i for i, (p, _) in enumerate(ds.samples) if Path(p) in set(bad.values())]
    assert len(bad_idx) == 4
    capsys.readouterr()
    batches = list(D.make_loader(ds, batch_size=8, sampler=D.EpochSampler(len(ds)), workers=0))
    skipped = [p for b in batches for p in b["skipped"]]
    assert sorted(skipped) == sorted(str(p) for p in bad.values())
    assert sum(len(b["label"]) for b in batches) == len(ds) - 4
    err = capsys.readouterr().err  # one plain line per file, no Python warning
    assert sorted(err.splitlines()) == sorted(f"warning: skipping unreadable image: {p}"
                                              for p in bad.values())
    strict = D.CropFolder(root / "train", classes, strict=True)
    with pytest.raises(UnreadableImage, match=str(ds.samples[bad_idx[0]][0])):
        strict[bad_idx[0]]
    # an all-bad batch collates to an empty batch
    b = D.collate([ds[i] for i in bad_idx])
    assert b["image"].shape == (0, 3, 227, 227) and len(b["skipped"]) == 4


def test_usage_errors(tmp_path, demo_root):
    with pytest.raises(UsageError, match="not found"):
        D.check_dataset_root(tmp_path / "nope")
    (tmp_path / "r" / "train").mkdir(parents=True)
    with pytest.raises(UsageError, match="no class folders"):
        D.check_dataset_root(tmp_path / "r")
    (tmp_path / "r" / "train" / "a").mkdir()
    with pytest.raises(UsageError, match="val"):
        D.check_dataset_root(tmp_path / "r")
    with pytest.raises(UsageError, match="empty class folder"):
        D.CropFolder(tmp_path / "r" / "train", ["a"])
    classes = D.find_classes(demo_root / "train")
    assert classes == sorted(classes)
    with pytest.raises(UsageError, match="class folder missing"):
        D.CropFolder(demo_root / "val", classes + ["zzz"])


# ----------------------------------------------------------------------------- determinism


def test_same_key_same_item(demo_root):
    classes = D.find_classes(demo_root / "train")
    ds = D.CropFolder(demo_root / "train", classes, seed=3)
    a, b = ds[(2, 5)], D.CropFolder(demo_root / "train", classes, seed=3)[(2, 5)]
    for k in ("image", "alpha"):
        assert torch.equal(a[k], b[k])
    assert (a["top"], a["left"], a["flip"]) == (b["top"], b["left"], b["flip"])
    keys = {(ds.draw(e, 5)[:3], tuple(ds.draw(e, 5)[3].tolist())) for e in range(6)}
    assert len(keys) == 6  # different epochs draw differently
    assert ds[5]["top"] == ds[(0, 5)]["top"]


def test_workers_0_and_2_give_identical_batches(demo_root):
    classes = D.find_classes(demo_root / "train")
    ds = D.CropFolder(demo_root / "train", classes, seed=1)

    def run(workers):
        sampler = D.EpochSampler(len(ds), epoch=4, seed=1)
        return list(D.make_loader(ds, batch_size=6, sampler=sampler, workers=workers))
    b0, b2 = run(0), run(2)
    assert len(b0) == len(b2) == 6
    for x, y in zip(b0, b2):
        for k in ("image", "label", "index", "top", "left", "flip", "alpha"):
            assert torch.equal(x[k], y[k]), k


# ----------------------------------------------------------------------------- sampler


def test_epoch_sampler_sharding_and_resume():
    n, world = 23, 4
    shards = [list(D.EpochSampler(n, epoch=1, seed=2, rank=r, world_size=world))
              for r in range(world)]
    idx = [i for s in shards for _, i in s]
    assert all(len(s) == n // world for s in shards)
    assert len(idx) == len(set(idx)) == (n // world) * world
    assert all(e == 1 for s in shards for e, _ in s)
    assert shards != [list(D.EpochSampler(n, epoch=2, seed=2, rank=r, world_size=world))
                      for r in range(world)]
    full = list(D.EpochSampler(n, epoch=1, seed=2, rank=0, world_size=1))
    assert sorted(i for _, i in full) == list(range(n))
    # eval: every index exactly once, no padding
    ev = [list(D.EpochSampler(n, shuffle=False, rank=r, world_size=world)) for r in range(world)]
    assert sorted(i for s in ev for _, i in s) == list(range(n))
    assert [len(s) for s in ev] == [6, 6, 6, 5]
    assert [len(D.EpochSampler(n, shuffle=False, rank=r, world_size=world))
            for r in range(world)] == [6, 6, 6, 5]
    # start skips exactly
    s = D.EpochSampler(n, epoch=3, seed=2, rank=1, world_size=world)
    s7 = D.EpochSampler(n, epoch=3, seed=2, rank=1, world_size=world, start=2)
    assert list(s7) == list(s)[2:] and len(s7) == len(s) - 2
    nd = list(D.EpochSampler(n, epoch=1, seed=2, rank=3, world_size=world, drop_last=False))
    assert len(nd) == 5


def test_finish_batch_dtype_and_cache(demo_root):
    classes = D.find_classes(demo_root / "train")
    st = DS.load_stats(demo_root, progress=False)
    ds = D.CropFolder(demo_root / "train", classes, pca="sqrt")
    b = D.collate([ds[i] for i in range(4)])
    assert b["pca"] == "sqrt" and b["image"].dtype == torch.uint8
    x = DA.finish_batch(b, st, "cpu")
    y = DA.finish_batch(b, st, "cpu", dtype=torch.bfloat16)
    assert x.dtype == torch.float32 and y.dtype == torch.bfloat16
    # mean-subtracted, raw 0-255 scale: roughly zero-centred, std tens of levels
    assert abs(float(x.mean())) < 40 and 10 < float(x.std()) < 200


# ----------------------------------------------------------------------------- decoders


def _odd_sources(d: Path) -> list[Path]:
    """A big JPEG (draft path), an EXIF-rotated JPEG, a prepared JPEG, a PNG with alpha."""
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 256, (1100, 1300, 3), dtype=np.uint8))
    rot = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    exif = rot.getexif()
    exif[0x0112] = 6
    rgba = rng.integers(0, 256, (120, 90, 4), dtype=np.uint8)
    return [_save(d / "big.jpg", big, "JPEG", quality=90),
            _save(d / "rot.jpg", rot, "JPEG", exif=exif),
            _save(d / "prep.jpg", Image.fromarray(coord_image()), "JPEG", quality=90),
            _save(d / "alpha.png", Image.fromarray(rgba, "RGBA"), "PNG")]


@pytest.mark.parametrize("decoder", ["auto", "pillow"])
def test_bytes_and_path_decode_identically(tmp_path, decoder):
    for p in _odd_sources(tmp_path):
        a = load_rgb256(p, decoder=decoder)
        b = load_rgb(p.read_bytes(), name=p.name, decoder=decoder)
        assert a.shape == (256, 256, 3) and np.array_equal(a, b), p.name
    with pytest.raises(UnreadableImage, match="cannot read image member.jpg: "):
        load_rgb(b"\xff\xd8\xff" + b"\0" * 50, name="member.jpg")
    with pytest.raises(ValueError, match="decoder must be one of"):
        load_rgb(p, decoder="cv2")


def _torchvision_deprecates_codecs() -> bool:
    """torchvision >= 0.29 deprecates torchvision.io's image decoding (moved to TorchCodec)."""
    import torchvision
    major, minor = (int(x) for x in torchvision.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (0, 29)


@pytest.mark.skipif(I.tv_io() is None, reason="torchvision.io does not load here")
def test_torchvision_decoder_only_without_deprecation(tmp_path, monkeypatch):
    p = _odd_sources(tmp_path)[2]  # prepared 256x256 JPEG: the one the fast path takes
    monkeypatch.setattr(I, "_tv_state", {})  # decide afresh in this test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = load_rgb256(p)  # decoder="auto"
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert (I._tv_decoder() is None) == _torchvision_deprecates_codecs()
    assert I.tv_deprecates_codecs() == _torchvision_deprecates_codecs()  # read, not imported
    assert np.array_equal(a, load_rgb256(p, decoder="pillow"))

    def quiet(data):  # the same torchvision decoder with its warning silenced
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return I._tv_decode(data)
    assert I._tv_usable(quiet)
    assert I._tv_usable(I._tv_decode) == (not _torchvision_deprecates_codecs())
    # where torchvision is used, it gives Pillow's pixels exactly on prepared JPEGs
    fast = I._decode_tv(p.read_bytes(), 256, quiet)
    assert fast is not None and np.array_equal(fast, load_rgb256(p, decoder="pillow"))


# ----------------------------------------------------------------------------- module structure


def _import_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module]
    return []


def test_data_modules_import_at_top_without_cycles():
    pkg = Path(I.__file__).parent
    graph: dict[str, set[str]] = {}
    inside: list[str] = []
    for f in sorted(pkg.glob("*.py")):
        tree = ast.parse(f.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{f.stem}.{fn.name}: {n}" for node in ast.walk(fn)
                           for n in _import_names(node)]
        graph[f.stem] = {n.rsplit(".", 1)[-1] for node in ast.walk(tree)
                         for n in _import_names(node) if n.startswith("split_alexnet.data.")}
    # only optional imports sit inside a function: scipy (the devkit reader) and torchvision
    # (the JPEG decoder; importing it costs a second of every process's start)
    assert inside == ["imagenet.parse_devkit: scipy.io", "images.tv_io: torchvision"]
    assert not graph["imagenet"] & {"prepare", "prepare_tasks"}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        assert state.get(m) != 1, f"import cycle: {' -> '.join(path + [m])}"
        if m not in state:
            state[m] = 1
            for d in sorted(graph.get(m, ())):
                visit(d, path + [m])
            state[m] = 2
    for m in sorted(graph):
        visit(m, [])
