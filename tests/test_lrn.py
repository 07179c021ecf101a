"""LRN: the formula against a literal loop, every implementation's gradients, layouts, autocast,
the C++ kernel's torch.library autograd, its build key and its build fallback. The C++ kernel is
built once per machine (cached)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import split_alexnet.network.lrn as lrn_mod
import split_alexnet.network.lrn_ext as _lrn_ext
from split_alexnet.network.lrn import LRN_IMPLS, LocalResponseNorm, lrn, lrn_reference, resolve_impl

SIZE, ALPHA, BETA, K = 5, 1e-4, 0.75, 2.0
# Large alpha in some checks so that the sum term matters as much as k (a wrong window shows).
BIG_ALPHA = 0.3
IMPLS = ("reference", "function", "cpp")  # "compile": see test_compile_impl (compile time)


def loop_lrn(a: np.ndarray, size: int, alpha: float, beta: float, k: float) -> np.ndarray:
    """The paper's formula written out: alpha on the sum, window clipped at the channel ends."""
    B, N, H, W = a.shape
    out = np.empty_like(a)
    for b in range(B):
        for i in range(N):
            for y in range(H):
                for x in range(W):
                    s = 0.0
                    for j in range(max(0, i - size // 2), min(N - 1, i + size // 2) + 1):
                        s += a[b, j, y, x] ** 2
                    out[b, i, y, x] = a[b, i, y, x] / (k + alpha * s) ** beta
    return out


@pytest.fixture(scope="module")
def cpp_ok():
    if not _lrn_ext.available():
        pytest.skip("C++ LRN kernel could not be built here")
    return True


def _x(shape=(2, 7, 3, 4), dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("alpha", [ALPHA, BIG_ALPHA])
def test_forward_matches_loop(impl, alpha, cpp_ok):
    x = _x()
    want = torch.from_numpy(loop_lrn(x.numpy(), SIZE, alpha, BETA, K))
    got64 = lrn(x, SIZE, alpha, BETA, K, impl=impl)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=0)
    got32 = lrn(x.float(), SIZE, alpha, BETA, K, impl=impl)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-6, atol=1e-7)


def test_window_edges_are_clipped():
    # Only the last channel is non-zero: channels C-3.. C-1 see it, the first ones do not.
    x = torch.zeros(1, 7, 1, 1, dtype=torch.float64)
    x[0, 6] = 10.0
    x[0, 0] = 1.0
    y = lrn_reference(x, SIZE, BIG_ALPHA, BETA, K)
    assert y[0, 0, 0, 0] == pytest.approx(1.0 / (K + BIG_ALPHA * 1.0) ** BETA, rel=1e-14)
    assert y[0, 6, 0, 0] == pytest.approx(10.0 / (K + BIG_ALPHA * 100.0) ** BETA, rel=1e-14)


@pytest.mark.parametrize("impl", IMPLS)
def test_readings_match_torch(impl, cpp_ok):
    x = _x((2, 9, 5, 5), torch.float32, scale=20.0)
    ref_n = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(x)
    ref_p = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(x)
    paper = LocalResponseNorm(5, 1e-4, 0.75, 2.0, reading="paper", impl=impl)
    over_n = LocalResponseNorm(5, 1e-4, 0.75, 2.0, reading="alpha-over-n", impl=impl)
    torch.testing.assert_close(over_n(x), ref_n, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(paper(x), ref_p, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(paper(x), over_n(x))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [5, 4, 3])
def test_gradcheck(impl, size, cpp_ok):
    x = _x((2, 7, 3, 4)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: lrn(t, size, BIG_ALPHA, BETA, K, impl=impl), (x,))


@pytest.mark.parametrize("impl", ["function", "cpp"])
@pytest.mark.parametrize("groups", [1, 2])
def test_fused_grads_match_reference_float32(impl, groups, cpp_ok):
    x = torch.relu(_x((3, 96, 11, 13), torch.float32, scale=20.0))
    g = _x((3, 96, 11, 13), torch.float32, seed=1)
    outs = {}
    for which in ("reference", impl):
        xi = x.clone().requires_grad_(True)
        y = LocalResponseNorm(impl=which, groups=groups)(xi)
        y.backward(g)
        outs[which] = (y.detach(), xi.grad)
    torch.testing.assert_close(outs[impl][0], outs["reference"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[impl][1], outs["reference"][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_groups_equal_per_half_calls(impl, cpp_ok):
    x = _x((2, 10, 3, 3), scale=5.0).requires_grad_(True)
    m1 = LocalResponseNorm(5, BIG_ALPHA, impl=impl)
    halves = torch.cat([m1(h) for h in x.chunk(2, dim=1)], dim=1)
    grouped = LocalResponseNorm(5, BIG_ALPHA, impl=impl, groups=2)(x)
    torch.testing.assert_close(grouped, halves, rtol=1e-13, atol=0)
    g = torch.randn_like(x)
    (ga,) = torch.autograd.grad(halves, x, g)
    (gb,) = torch.autograd.grad(grouped, x, g)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("groups", [1, 2])
def test_channels_last_same_result(impl, groups, cpp_ok):
    x = _x((2, 12, 5, 6), torch.float32, scale=10.0)
    g = _x((2, 12, 5, 6), torch.float32, seed=3)
    m = LocalResponseNorm(5, BIG_ALPHA, impl=impl, groups=groups)
    res = []
    for t in (x, x.to(memory_format=torch.channels_last)):
        t = t.clone().requires_grad_(True)
        y = m(t)
        y.backward(g)
        res.append((y, t.grad))
    assert res[1][0].is_contiguous(memory_format=torch.channels_last) or impl != "cpp"
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_half_views(impl, cpp_ok):
    # What the collapsed model passes: x.chunk(2, dim=1) halves (batch stride != C*H*W).
    x = _x((3, 8, 4, 5), scale=5.0).requires_grad_(True)
    h = x.chunk(2, dim=1)[1]
    assert not h.is_contiguous()
    y = lrn(h, SIZE, BIG_ALPHA, BETA, K, impl=impl)
    torch.testing.assert_close(y, lrn_reference(h.contiguous(), SIZE, BIG_ALPHA, BETA, K),
                               rtol=1e-13, atol=0)
    g = torch.randn(3, 8, 4, 5, dtype=torch.float64)[:, 2:6]  # a strided grad too
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(lrn_reference(h, SIZE, BIG_ALPHA, BETA, K), x, g)
    torch.testing.assert_close(gx, gr, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_autocast(impl, dtype, cpp_ok):
    x32 = torch.relu(_x((2, 16, 6, 6), torch.float32, scale=20.0))
    want = lrn_reference(x32, SIZE, 5e-3, BETA, K)
    # Low-precision input: float32 accumulation inside, output in the input dtype.
    xl = x32.to(dtype).requires_grad_(True)
    y = lrn(xl, SIZE, 5e-3, BETA, K, impl=impl)
    assert y.dtype == dtype
    # Tolerance: a few bf16 ulps (2^-8 relative) on input rounding + output rounding.
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert xl.grad.dtype == dtype and torch.isfinite(xl.grad.float()).all()
    # Under CPU autocast after a conv (what the net does): bf16 flows in, bf16 comes out.
    conv = torch.nn.Conv2d(3, 16, 3, padding=1)
    inp = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = torch.relu(conv(inp))
        out = LocalResponseNorm(impl=impl)(a)
    assert out.dtype == a.dtype == torch.bfloat16
    ref = lrn_reference(torch.relu(conv(inp)), SIZE, ALPHA, BETA, K)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    out.float().sum().backward()


def test_resolve_and_api():
    assert resolve_impl("auto", "cpu") == "cpp"
    assert resolve_impl("auto", "cuda") == "function"
    assert resolve_impl("fused", "cpu") == "cpp"
    assert resolve_impl("cpp", "cuda") == "function"
    assert set(LRN_IMPLS) >= {"auto", "reference", "fused"}
    with pytest.raises(ValueError):
        LocalResponseNorm(impl="nope")
    with pytest.raises(ValueError):
        LocalResponseNorm(reading="nope")
    m = LocalResponseNorm(5, 1e-4, 0.75, 2.0, reading="alpha-over-n")  # the old signature
    assert m.alpha == pytest.approx(2e-5) and m.impl == "auto"
    assert "impl=auto" in repr(m)


def test_build_failure_falls_back_with_one_line(monkeypatch, capsys):
    """Compiling the C++ kernel fails -> one line on stderr, the reference's result."""
    saved = dict(_lrn_ext._state)
    _lrn_ext._state.clear()

    def boom():
        raise RuntimeError("no compiler here\nsecond line of a long log")

    monkeypatch.setattr(_lrn_ext, "_compile", boom)
    monkeypatch.setattr(_lrn_ext, "_registered", lambda: None)
    monkeypatch.setattr(lrn_mod, "_CPP_OPS", [])
    try:
        x = _x((2, 7, 3, 4)).requires_grad_(True)
        y = lrn(x, SIZE, BIG_ALPHA, BETA, K, impl="cpp")
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no compiler here" in err and "reference" in err
        torch.testing.assert_close(y, lrn_reference(x, SIZE, BIG_ALPHA, BETA, K), rtol=0, atol=0)
        y.sum().backward()  # the reference's autograd
        lrn(x, impl="auto")  # no second notice
        assert capsys.readouterr().err == ""
    finally:
        _lrn_ext._state.clear()
        _lrn_ext._state.update(saved)


def test_cpp_autograd_registered_with_torch_library(cpp_ok):
    """The op's own autograd (torch.library): its backward is the C++ backward op, bit for bit,
    and differentiating that backward again raises instead of returning a wrong answer."""
    ops = torch.ops.split_alexnet_lrn
    x = _x((2, 10, 4, 3), torch.float32, scale=10.0).requires_grad_(True)
    g = _x((2, 10, 4, 3), torch.float32, seed=4)
    y = ops.forward(x, 2, 2, BIG_ALPHA, BETA, K, 2)  # the bare op, no Python wrapper around it
    assert y.grad_fn is not None
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, ops.backward(x.detach(), g, 2, 2, BIG_ALPHA, BETA, K, 2))
    (gx2,) = torch.autograd.grad(lrn(x, SIZE, BIG_ALPHA, BETA, K, impl="cpp", groups=2), x, g)
    assert torch.equal(gx2, gx)
    (gg,) = torch.autograd.grad(ops.forward(x, 2, 2, BIG_ALPHA, BETA, K, 1), x, g, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order only"):
        gg.sum().backward()


def test_build_key_covers_cpu_flags(monkeypatch):
    """Same model name, different instruction-set flags -> another build folder; same -> same."""
    def cpu(flags):
        return lambda: f"model name: AMD EPYC\nflags: {flags}"

    keys = {}
    for name, flags in (("avx2", "fpu sse2 avx2"), ("avx512", "fpu sse2 avx2 avx512f"),
                        ("avx2 again", "fpu sse2 avx2")):
        monkeypatch.setattr(_lrn_ext, "cpu_description", cpu(flags))
        keys[name] = _lrn_ext.build_key()
    assert keys["avx2"] != keys["avx512"]
    assert keys["avx2"] == keys["avx2 again"]
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in keys.values())


def test_build_key_covers_the_source(monkeypatch, tmp_path):
    copy = tmp_path / "lrn.cpp"
    text = _lrn_ext.SOURCE.read_bytes()
    copy.write_bytes(text)
    monkeypatch.setattr(_lrn_ext, "SOURCE", copy)
    same = _lrn_ext.build_key()
    assert _lrn_ext.build_key() == same  # the same file, the same build
    copy.write_bytes(text + b"// edited\n")
    assert _lrn_ext.build_key() != same
    copy.write_bytes(text)
    assert _lrn_ext.build_key() == same
    monkeypatch.undo()
    # the same text elsewhere (another checkout) builds apart: no rebuilds over each other
    assert _lrn_ext.build_key() != same


def test_cpu_description_reads_the_instruction_set():
    desc = _lrn_ext.cpu_description()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        text = ""
    first = text.split("\n\n")[0].splitlines()
    flags = [ln for ln in first if ln.split(":")[0].strip() in ("flags", "Features")]
    if flags:  # Linux: the first processor's flags line, whitespace normalised
        key, _, value = flags[0].partition(":")
        assert f"{key.strip()}: {' '.join(value.split())}" in desc.splitlines()
    else:
        assert desc.splitlines()[0].startswith(("model name", "machine", "CPU"))


def test_missing_source_falls_back_with_one_line(monkeypatch, capsys, tmp_path):
    """An install without csrc/lrn.cpp: one line naming the file, then the reference."""
    saved = dict(_lrn_ext._state)
    _lrn_ext._state.clear()
    monkeypatch.setattr(_lrn_ext, "SOURCE", tmp_path / "csrc" / "lrn.cpp")
    monkeypatch.setattr(_lrn_ext, "_registered", lambda: None)
    monkeypatch.setattr(lrn_mod, "_CPP_OPS", [])
    try:
        x = _x((2, 7, 3, 4))
        y = lrn(x, SIZE, BIG_ALPHA, BETA, K, impl="cpp")
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "FileNotFoundError" in err and "lrn.cpp" in err
        torch.testing.assert_close(y, lrn_reference(x, SIZE, BIG_ALPHA, BETA, K), rtol=0, atol=0)
    finally:
        _lrn_ext._state.clear()
        _lrn_ext._state.update(saved)


@pytest.mark.gpu
def test_cuda_function_path_deterministic():
    x = _x((4, 48, 27, 27), torch.float32, scale=20.0).cuda().requires_grad_(True)
    g = torch.randn_like(x)
    grads = []
    for _ in range(2):
        x.grad = None
        LocalResponseNorm(impl="auto")(x).backward(g)
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])
    ref = torch.autograd.grad(lrn_reference(x, SIZE, ALPHA, BETA, K), x, g)[0]
    torch.testing.assert_close(grads[0], ref, rtol=1e-5, atol=1e-6)


def test_compile_impl():
    """impl="compile" (torch.compile of the reference): small shapes, a few seconds of Inductor."""
    x = _x((2, 7, 3, 4))
    want = torch.from_numpy(loop_lrn(x.numpy(), SIZE, BIG_ALPHA, BETA, K))
    torch.testing.assert_close(lrn(x, SIZE, BIG_ALPHA, BETA, K, impl="compile"), want,
                               rtol=1e-12, atol=0)
    # The compiled backward against the eager reference's autograd, in float64, one backward
    # each (gradcheck would re-run a compiled backward whose buffers may have been donated).
    w = _x((2, 7, 3, 4), seed=1, scale=1.0)
    xc, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (lrn(xc, SIZE, BIG_ALPHA, BETA, K, impl="compile") * w).sum().backward()
    (lrn_reference(xr, SIZE, BIG_ALPHA, BETA, K) * w).sum().backward()
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-10, atol=1e-12)
    xb = torch.relu(_x((2, 16, 6, 6), torch.float32, scale=20.0))
    yb = lrn(xb.bfloat16(), impl="compile")
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), lrn_reference(xb), rtol=2e-2, atol=2e-2)


def test_compile_failure_falls_back(monkeypatch, capsys):
    """torch.compile fails -> one line on stderr, the reference's result."""
    def boom():
        raise RuntimeError("inductor unavailable")

    monkeypatch.setattr(lrn_mod, "_compiled_reference", boom)
    monkeypatch.setattr(lrn_mod, "_compile_failed", [])
    x = _x((2, 7, 3, 4))
    y = lrn(x, SIZE, BIG_ALPHA, BETA, K, impl="compile")
    assert capsys.readouterr().err.count("\n") == 1
    torch.testing.assert_close(y, lrn_reference(x, SIZE, BIG_ALPHA, BETA, K), rtol=0, atol=0)
    lrn(x, impl="compile")
    assert capsys.readouterr().err == ""


def test_cpp_under_torch_compile(cpp_ok, monkeypatch):
    """The kernels have fake (shape) versions, so a compiled model can call them; and a
    compiled model's first LRN call loads them outside the graph."""
    monkeypatch.setattr(lrn_mod, "_CPP_OPS", [])  # not yet loaded in this process
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                            LocalResponseNorm(impl="cpp", groups=2))
    x = torch.randn(2, 3, 10, 10)
    y = torch.compile(m)(x)
    torch.testing.assert_close(y, m(x), rtol=1e-6, atol=1e-6)


def test_cpp_backward_under_torch_compile(cpp_ok):
    """AOT autograd traces the registered autograd: compiled gradients equal eager ones."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                            LocalResponseNorm(5, BIG_ALPHA, impl="cpp", groups=2))
    x = torch.randn(2, 3, 10, 10) * 3
    torch.compile(m)(x).square().sum().backward()
    compiled = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m(x).square().sum().backward()
    for got, want in zip(compiled, (p.grad for p in m.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
