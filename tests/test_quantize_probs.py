"""``mixq::quantize_probs``: the cpu kernel (csrc/probs.cpp, every ISA path) and the Triton kernel
(interpreter on CPU) against ``formats.quantize_probs``, bit for bit: random softmax rows, every fp32
edge value (signed zeros, subnormals, both sides of each power of two and of each sqrt(1/2) * 2^e
boundary, of each uniform rounding boundary, 1, > 1, infinities, NaNs, negatives), random bit patterns,
every bf16 and fp16 bit pattern, float64, odd and empty shapes, non-contiguous views; the op's fake
implementation under torch.compile(fullgraph=True); QuantAttention routing its probabilities through it."""

from __future__ import annotations

import secrets
import struct

import pytest
import torch

from mixq import formats, ops

_C = pytest.importorskip("mixq._C", reason="mixq._C (the C++ CPU kernels) is not built; run setup.py build_ext")

from mixq.backends.cpu import CpuBackend  # noqa: E402

BITS = [4, 6, 8]
KINDS = ["log2", "uniform"]
CPU = CpuBackend()
# odd lengths around the vector widths (8 and 16 lanes, 32 per AVX2 iteration) and a ViT row
LENGTHS = [1, 7, 8, 15, 16, 17, 31, 32, 33, 63, 197]


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


def from_bits(bits: list[int]) -> torch.Tensor:
    """fp32 values with the given bit patterns (unsigned 32-bit ints)."""
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def edge_values() -> torch.Tensor:
    """Every fp32 value where a code can change, with its neighbours, and the special values."""
    pats = [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF,  # zeros, subnormals
            0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF,
            0x7F7FFFFF, 0xFF7FFFFF]  # inf, NaNs (quiet, signalling, payloads), largest finite
    sqrt_half_mantissa = f32_bits(2**-0.5) & 0x7FFFFF
    for e in range(0, 255):
        for mant in (0, 1, 0x7FFFFF, sqrt_half_mantissa - 1, sqrt_half_mantissa, sqrt_half_mantissa + 1):
            pats.append((e << 23) | mant)
            pats.append((1 << 31) | (e << 23) | mant)
    for bits in BITS:  # uniform grid: the rounding boundaries (c + 1/2) / (2^b - 1) and their neighbours
        lim = 2**bits - 1
        for c in range(lim + 1):
            b = f32_bits((c + 0.5) / lim)
            pats += [b - 1, b, b + 1]
    values = from_bits(sorted(set(pats)))
    extra = torch.tensor([1.0, 1.5, 2.0, 0.5, 0.25, 1e-3, 2.0**-31, 2.0**-32, 2.0**-14, 2.0**-15, -0.5, 3e38])
    return torch.cat([values, extra])


def softmax_rows(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Softmaxes from sharp to flat rows, so every code of the grid turns up."""
    rows = shape[-2] if len(shape) >= 2 else 1
    temp = torch.logspace(-1, 1.5, max(rows, 1)).reshape(rows, 1) if len(shape) >= 2 else 3.0
    return (torch.randn(shape, generator=g) * temp).softmax(-1)


def check_cpu(p: torch.Tensor, bits: int, kind: str, what: str = "") -> None:
    want = formats.quantize_probs(p, bits, kind)
    got = ops.quantize_probs(p, bits, kind, "cpu")
    assert got.dtype == torch.uint8 and got.shape == p.shape
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[0].tolist()
        raise AssertionError(f"{what} bits={bits} {kind} {_C.kernel_path()}: at {bad} p={p[tuple(bad)].item()!r} "
                             f"got {got[tuple(bad)].item()} want {want[tuple(bad)].item()}")


# ----------------------------------------------------------------------------- cpu


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_random_softmax_rows_every_length(kernel_path, bits, kind):
    g, seed = fresh_generator()
    for m in LENGTHS:
        check_cpu(softmax_rows(g, (2, 3, 5, m)), bits, kind, f"seed={seed} m={m}")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_edge_values_at_every_lane(kernel_path, bits, kind):
    """Each edge value at several offsets, so it passes through every vector lane and the scalar tail."""
    e = edge_values()
    for shift in (0, 1, 5, 13, 29):
        check_cpu(torch.cat([torch.full((shift,), 0.25), e]), bits, kind, f"shift={shift}")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_random_bit_patterns(kernel_path, bits, kind):
    g, seed = fresh_generator()
    p = torch.randint(-(2**31), 2**31 - 1, (4099,), generator=g, dtype=torch.int32).view(torch.float32)
    check_cpu(p, bits, kind, f"seed={seed}")
    check_cpu(torch.rand(4099, generator=g) * 1.5 - 0.25, bits, kind, f"seed={seed}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_every_16_bit_pattern(kernel_path, dtype, kind):
    """bf16 / fp16 widen to fp32 exactly (as p.to(torch.float32)): all 65536 patterns, and softmax rows."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    g, seed = fresh_generator()
    for bits in BITS:
        check_cpu(every, bits, kind, str(dtype))
        check_cpu(softmax_rows(g, (3, 7, 45)).to(dtype), bits, kind, f"{dtype} seed={seed}")


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_other_dtypes_layouts_and_shapes(kernel_path, kind):
    g, seed = fresh_generator()
    p = softmax_rows(g, (2, 3, 9, 21))
    for bits in BITS:
        check_cpu(p.double(), bits, kind, "float64")
        check_cpu(p.transpose(-1, -2), bits, kind, "transposed")
        check_cpu(p[..., ::3, 1::2], bits, kind, "strided")
        check_cpu(p.to(torch.bfloat16).transpose(0, 3), bits, kind, "bf16 transposed")
        for shape in [(), (0,), (3, 0, 5), (0, 4), (1, 1), (5,), (2, 1, 1, 1, 3)]:
            check_cpu(torch.rand(shape, generator=g), bits, kind, f"shape={shape}")


def test_cpu_many_threads_chunks():
    """A ViT-B head set (12 x 197 x 197, several parallel chunks), both grids, against formats."""
    g, seed = fresh_generator()
    p = softmax_rows(g, (1, 12, 197, 197))
    for kind in KINDS:
        check_cpu(p, 8, kind, f"seed={seed}")


def test_cpu_bad_arguments():
    p = torch.rand(3, 4)
    with pytest.raises(ValueError, match="bits"):
        CPU.quantize_probs(p, 5, "log2")
    with pytest.raises(ValueError, match="p_grid"):
        CPU.quantize_probs(p, 8, "log4")
    with pytest.raises(RuntimeError, match="bits"):
        _C.quantize_probs(p, 7, True)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _C.quantize_probs(p.double(), 8, True)


# ----------------------------------------------------------------------------- op, compile, reference


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_op_matches_formats_on_every_cpu_backend(backend):
    g, _ = fresh_generator()
    p = softmax_rows(g, (2, 17, 23))
    for bits in BITS:
        for kind in KINDS:
            assert torch.equal(ops.quantize_probs(p, bits, kind, backend), formats.quantize_probs(p, bits, kind))


def test_op_fake_impl_under_torch_compile_fullgraph():
    def f(scores: torch.Tensor) -> torch.Tensor:
        return ops.quantize_probs(scores.softmax(-1), 6, "log2", "cpu").to(torch.int32) + 1

    g, _ = fresh_generator()
    x = torch.randn(2, 3, 11, 11, generator=g)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))
    torch.library.opcheck(torch.ops.mixq.quantize_probs.default, (x.softmax(-1), 8, "uniform", "cpu"),
                          test_utils=("test_schema", "test_faketensor"))


def test_quant_attention_uses_the_op(monkeypatch):
    """The integer path of QuantAttention quantizes its probabilities through the backend's kernel;
    simulate keeps formats; both give the same output."""
    timm = pytest.importorskip("timm")
    from mixq.attention import QuantAttention

    calls = []
    original = CpuBackend.quantize_probs

    def counting(self, p, bits, kind):
        calls.append((tuple(p.shape), bits, kind))
        return original(self, p, bits, kind)

    monkeypatch.setattr(CpuBackend, "quantize_probs", counting)
    torch.manual_seed(0)
    attn = timm.models.vision_transformer.Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 9, 32)
    for kind in KINDS:
        q = QuantAttention(attn, 8, p_bits=6, p_grid=kind, backend="cpu")
        with torch.no_grad():
            out = q(x)
            sim = q.set_simulate(True)(x)
        assert torch.equal(out, sim)
        assert calls[-1] == ((2, 4, 9, 9), 6, kind)


# ----------------------------------------------------------------------------- triton (interpreter)


# The inputs hold inf and NaN on purpose; the interpreter's numpy multiply warns about them.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning",
                            "ignore:invalid value encountered in multiply:RuntimeWarning")
def test_triton_bit_exact():
    pytest.importorskip("triton")
    from mixq.backends import get_backend

    backend = get_backend("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g, seed = fresh_generator()
    e = edge_values()
    cases = [("edges", e), ("softmax", softmax_rows(g, (2, 5, 37))), ("bf16", softmax_rows(g, (3, 19)).bfloat16()),
             ("fp16", e.half()), ("float64", softmax_rows(g, (4, 9)).double()),
             ("transposed", softmax_rows(g, (6, 13)).t()), ("empty", torch.rand(0, 5))]
    for bits in BITS:
        for kind in KINDS:
            for what, p in cases:
                got = backend.quantize_probs(p.to(device), bits, kind).cpu()
                want = formats.quantize_probs(p, bits, kind)
                assert got.shape == p.shape and torch.equal(got, want), f"{what} bits={bits} {kind} seed={seed}"
