"""The triton backend against the reference backend: bit-exact integers, float within rounding.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1 before anything imports triton); with a GPU the same tests run on CUDA
tensors. The interpreter is slow, so shapes are small and odd (no dimension a multiple of a
block size). Inputs are fresh random draws; the seed is in every failure message.
"""

from __future__ import annotations

import dataclasses
import json
import secrets

import pytest
import torch

from mixq import formats, ops

triton = pytest.importorskip("triton")

from mixq import kernels  # noqa: E402
from mixq.backends import get_backend  # noqa: E402
from mixq.kernels import tuning  # noqa: E402
from mixq.kernels.layout import K_TILE, gpu_layout_shape  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BITS = (4, 6, 8)
BACKEND = get_backend("triton")
REF = get_backend("reference")


def weights(backend, canon: torch.Tensor, bits: int, k: int, n: int, scale=None, bias=None, device=None):
    """``backend``'s PackedWeight of canonical rows (on ``device``, default DEVICE for triton), unit scales."""
    device = device or (DEVICE if backend is BACKEND else "cpu")
    scale = torch.ones(n) if scale is None else scale
    return backend.pack(canon.to(device), scale.to(device), None if bias is None else bias.to(device), bits, k, n)


def ref_gemm(xq: torch.Tensor, canon: torch.Tensor, bits: int, k: int, n: int) -> torch.Tensor:
    return REF.int_gemm(xq, weights(REF, canon, bits, k, n, device=xq.device))


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


def rand_int(g: torch.Generator, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    lim = formats.qmax(bits)
    return torch.randint(-lim, lim + 1, shape, generator=g, dtype=torch.int8)


def rand_weights(g: torch.Generator, bits: int, n: int, k: int) -> torch.Tensor:
    """Canonical packed weights [n, row_bytes] holding every value of the grid, the extremes included."""
    q = rand_int(g, bits, (n, k))
    q.view(-1)[:2] = torch.tensor([formats.qmax(bits), -formats.qmax(bits)], dtype=torch.int8)[: q.numel()]
    return formats.pack_weight(q, bits)


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [1, 13, 70, 128, 129, 300])
def test_prepack_round_trips_to_canonical(bits, k):
    g, seed = fresh_generator()
    canon = rand_weights(g, bits, 5, k)
    gpu = kernels.prepack_gpu(canon, bits, k)
    assert tuple(gpu.shape) == gpu_layout_shape(5, k, bits), seed
    assert torch.equal(kernels.unprepack_gpu(gpu, bits, k), canon), seed


def test_prepack_puts_int4_sub_tiles_in_nibbles():
    # value k sits in the low nibble of byte k, value 64 + k in the high nibble (see layout docstring)
    q = torch.zeros(1, K_TILE, dtype=torch.int8)
    q[0, 3], q[0, 64 + 3] = 5, -2
    gpu = kernels.prepack_gpu(formats.pack_weight(q, 4), 4, K_TILE)
    assert gpu[0, 0, 3].item() == 5 | ((-2 & 0xF) << 4)
    assert int(gpu[0, 0].to(torch.int32).sum()) == gpu[0, 0, 3].item()


def test_gpu_layout_rejects_wrong_shapes():
    canon = formats.pack_weight(torch.zeros(4, 50, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="prepack"):
        kernels.mixed_gemm(torch.zeros(3, 50, dtype=torch.int8), canon, 4, 50, 4)
    gpu = kernels.prepack_gpu(canon, 4, 50)
    with pytest.raises(ValueError, match="int8"):
        kernels.mixed_gemm(torch.zeros(3, 51, dtype=torch.int8), gpu, 4, 50, 4)
    with pytest.raises(ValueError, match="canonical|row"):
        kernels.prepack_gpu(canon[:, :-1], 4, 50)


# ----------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize("w_bits", BITS)
@pytest.mark.parametrize("a_bits", BITS)
def test_int_gemm_is_bit_exact(w_bits, a_bits):
    g, seed = fresh_generator()

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    # one K inside a single 128-wide K tile, one spanning several (with a ragged last tile)
    for ks in ((13, 50, 70), (200, 259)):
        m, k, n = pick((1, 7, 33)), pick(ks), pick((5, 37))
        xq = rand_int(g, a_bits, (m, k))
        canon = rand_weights(g, w_bits, n, k)
        expected = ref_gemm(xq, canon, w_bits, k, n)
        got = ops.int_gemm(xq.to(DEVICE), weights(BACKEND, canon, w_bits, k, n))
        assert got.dtype == torch.int32 and got.shape == (m, n)
        assert torch.equal(got.cpu(), expected), f"seed={seed} m,k,n={m, k, n}"


@pytest.mark.parametrize("w_bits", BITS)
def test_int_gemm_at_the_grid_extremes(w_bits):
    # all-qmax rows give the largest sums
    m, k, n = 3, 300, 5
    lim = formats.qmax(w_bits)
    xq = torch.full((m, k), -127, dtype=torch.int8)
    canon = formats.pack_weight(torch.full((n, k), lim, dtype=torch.int8), w_bits)
    got = BACKEND.int_gemm(xq.to(DEVICE), weights(BACKEND, canon, w_bits, k, n))
    assert torch.equal(got.cpu(), torch.full((m, n), -127 * lim * k, dtype=torch.int32))
    with pytest.raises(ValueError, match="prepacked for 'reference'"):
        BACKEND.int_gemm(xq.to(DEVICE), weights(REF, canon, w_bits, k, n, device=DEVICE))


@pytest.mark.parametrize("w_bits", BITS)
@pytest.mark.parametrize("a_bits", BITS)
def test_fused_quantize_gemm_equals_quantize_then_gemm(w_bits, a_bits):
    # one launch (per-row amax, quantize and GEMM) gives the two-kernel path's scales and bits
    g, seed = fresh_generator()
    m, k, n = 11, K_TILE + 37, 19
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 5).to(torch.bfloat16)
    x[2] = 0  # an all-zero row takes the SCALE_EPS floor
    canon = rand_weights(g, w_bits, n, k)
    w_gpu = kernels.prepack_gpu(canon, w_bits, k).to(DEVICE)
    w_scale, bias = torch.rand(n, generator=g) * 1e-2 + 1e-3, torch.randn(n, generator=g)
    xq, a_scale = kernels.quantize_dynamic(x.to(DEVICE), a_bits)
    for cfg in (kernels.GemmConfig(16, 16, num_warps=4, num_stages=2),
                kernels.GemmConfig(16, 32, split_k=2, num_warps=4, num_stages=2, swap_ab=1, asm_unpack=1)):
        want = kernels.mixed_gemm(xq, w_gpu, w_bits, k, n, a_scale, w_scale.to(DEVICE), bias.to(DEVICE),
                                  torch.bfloat16, config=cfg)
        got, got_scale = kernels.quantized_linear_dynamic(x.to(DEVICE), w_gpu, w_bits, a_bits, k, n,
                                                          w_scale.to(DEVICE), bias.to(DEVICE), config=cfg)
        assert got.dtype == torch.bfloat16 and torch.equal(got_scale, a_scale), f"seed={seed} {cfg}"
        assert torch.equal(got, want), f"seed={seed} {cfg}"
    with pytest.raises(ValueError, match="float"):
        kernels.quantized_linear_dynamic(xq, w_gpu, w_bits, a_bits, k, n, w_scale.to(DEVICE))


@pytest.mark.parametrize("w_bits", BITS)
def test_fused_gemm_step_multiplier_equals_scaling_a_scale_first(w_bits):
    # a_scale_mul (QuantLinear's power-of-two headroom) in the fused epilogue, with and without
    # split-K (whose reduce kernel applies it): same bits as mixed_gemm with a_scale * f
    g, seed = fresh_generator()
    m, k, n = 5, 2 * K_TILE + 11, 23
    x = torch.randn(m, k, generator=g) * 3
    x[1] *= 1e24  # its acc * step alone would overflow fp32
    canon = rand_weights(g, w_bits, n, k)
    w_gpu = kernels.prepack_gpu(canon, w_bits, k).to(DEVICE)
    w_scale, bias = (torch.rand(n, generator=g) * 1e-2 + 1e-3).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    f = torch.tensor(2.0**-20).to(DEVICE)
    xq, a_scale = kernels.quantize_dynamic(x.to(DEVICE), 8)
    for cfg in (kernels.GemmConfig(16, 16, num_warps=4, num_stages=2),
                kernels.GemmConfig(16, 32, split_k=3, num_warps=4, num_stages=2, swap_ab=1)):
        want = kernels.mixed_gemm(xq, w_gpu, w_bits, k, n, a_scale * f, w_scale, bias * f, torch.float32, config=cfg)
        got, got_scale = kernels.quantized_linear_dynamic(x.to(DEVICE), w_gpu, w_bits, 8, k, n, w_scale, bias * f,
                                                          torch.float32, config=cfg, a_scale_mul=f)
        assert torch.equal(got_scale, a_scale) and torch.equal(got, want), f"seed={seed} {cfg}"
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("w_bits", BITS)
@pytest.mark.parametrize("split_k", [1, 2])
def test_swapped_operands_give_the_same_integers(w_bits, split_k):
    # out^T = W @ X^T (weights as wgmma's register operand): same integers, same epilogue
    g, seed = fresh_generator()
    m, k, n = 19, 2 * K_TILE + 11, 21
    xq = rand_int(g, 8, (m, k))
    canon = rand_weights(g, w_bits, n, k)
    w_gpu = kernels.prepack_gpu(canon, w_bits, k).to(DEVICE)
    cfg = kernels.GemmConfig(block_m=16, block_n=32, split_k=split_k, num_warps=4, num_stages=2, swap_ab=1)
    got = kernels.mixed_gemm(xq.to(DEVICE), w_gpu, w_bits, k, n, config=cfg)
    assert torch.equal(got.cpu(), ref_gemm(xq, canon, w_bits, k, n)), f"seed={seed}"
    a_scale, w_scale = torch.rand(m, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    bias = torch.randn(n, generator=g)
    lin = kernels.mixed_gemm(xq.to(DEVICE), w_gpu, w_bits, k, n, a_scale.to(DEVICE), w_scale.to(DEVICE),
                             bias.to(DEVICE), torch.bfloat16, config=cfg)
    plain = kernels.mixed_gemm(xq.to(DEVICE), w_gpu, w_bits, k, n, a_scale.to(DEVICE), w_scale.to(DEVICE),
                               bias.to(DEVICE), torch.bfloat16, config=dataclasses.replace(cfg, swap_ab=0))
    assert torch.equal(lin, plain), f"seed={seed}"


@pytest.mark.parametrize("w_bits", BITS)
def test_64_bit_offsets_give_the_same_integers(w_bits, monkeypatch):
    # the INT64 variant is chosen only past 2**31 elements; force it on a small odd shape
    from mixq.kernels import gemm

    g, seed = fresh_generator()
    m, k, n = 9, K_TILE + 5, 13
    xq = rand_int(g, 8, (m, k))
    canon = rand_weights(g, w_bits, n, k)
    monkeypatch.setattr(gemm, "INT64_THRESHOLD", 0)
    for split_k in (1, 2):
        cfg = kernels.GemmConfig(block_m=16, block_n=16, split_k=split_k, num_warps=4, num_stages=2)
        got = kernels.mixed_gemm(xq.to(DEVICE), BACKEND.prepack(canon, w_bits, k).to(DEVICE), w_bits, k, n, config=cfg)
        assert torch.equal(got.cpu(), ref_gemm(xq, canon, w_bits, k, n)), f"seed={seed} split_k={split_k}"


@pytest.mark.parametrize("w_bits", [4, 6])
def test_k_past_the_preshifted_accumulator_is_refused(w_bits):
    k = 200_000
    w = torch.zeros(gpu_layout_shape(1, k, w_bits), dtype=torch.uint8)
    with pytest.raises(ValueError, match="too large"):
        kernels.mixed_gemm(torch.zeros(1, k, dtype=torch.int8), w, w_bits, k, 1)


class _Ptx:
    """Just enough of PTX (shl/and/or .b32 on registers and immediates) to run the unpack asm on the CPU."""

    def __init__(self, asm: str, args: list[int]):
        self.regs = {f"${i + 1}": a for i, a in enumerate(args)}
        for stmt in asm.replace("{", ";").replace("}", ";").split(";"):
            stmt = stmt.strip()
            if not stmt or stmt.startswith(".reg"):
                continue
            op, rest = stmt.split(None, 1)
            dst, x, y = (t.strip() for t in rest.split(","))
            a, b = self.val(x), self.val(y)
            r = {"shl.b32": lambda: a << b, "and.b32": lambda: a & b, "or.b32": lambda: a | b}[op]()
            self.regs[dst] = r & 0xFFFFFFFF

    def val(self, tok: str) -> int:
        return int(tok, 0) if tok[0].isdigit() else self.regs[tok]


def _asm_of(fn) -> str:
    import inspect
    import re

    src = inspect.getsource(fn.fn if hasattr(fn, "fn") else fn)
    return "".join(re.findall(r'"([^"]*)"', src.split("inline_asm_elementwise(", 1)[1].split('"=r', 1)[0]))


def test_inline_ptx_unpack_matches_the_bytewise_ops_on_every_byte():
    # The asm path runs only on a GPU; here its PTX text is executed on 32-bit words (4 bytes) and
    # compared with the byte-wise Triton ops that the interpreter tests check bit-exactly.
    from mixq.kernels import gemm

    def s8(v):
        return ((v & 0xFF) ^ 0x80) - 0x80

    g, seed = fresh_generator()
    rest = torch.randint(0, 256, (256, 3, 3), generator=g).tolist()
    for v in range(256):
        for lane in range(4):
            words = []
            for j in range(3):
                bytes_ = rest[v][j][:lane] + [v if j == 0 else (v * 7 + j) & 0xFF] + rest[v][j][lane:]
                words.append(sum(b << (8 * i) for i, b in enumerate(bytes_[:4])))
            b0, b1, b2 = (s8(w >> (8 * lane)) for w in words)
            lane_of = lambda w: s8(w >> (8 * lane))  # noqa: E731
            assert lane_of(_Ptx(_asm_of(gemm._w4_lo), words[:1]).regs["$0"]) == s8(b0 << 4), seed
            assert lane_of(_Ptx(_asm_of(gemm._w4_hi), words[:1]).regs["$0"]) == s8(b0 & -16), seed
            assert lane_of(_Ptx(_asm_of(gemm._w6_top), words[:1]).regs["$0"]) == s8(b0 & -4), seed
            want = s8((b0 << 6) | ((b1 & 3) << 4) | ((b2 & 3) << 2))
            assert lane_of(_Ptx(_asm_of(gemm._w6_last), words).regs["$0"]) == want, seed


@pytest.mark.parametrize("w_bits", BITS)
@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_gives_the_same_integers(w_bits, split_k):
    g, seed = fresh_generator()
    m, k, n = 5, 3 * K_TILE - 17, 37
    xq = rand_int(g, 8, (m, k))
    canon = rand_weights(g, w_bits, n, k)
    w_gpu = kernels.prepack_gpu(canon, w_bits, k).to(DEVICE)
    cfg = kernels.GemmConfig(block_m=16, block_n=32, split_k=split_k, num_warps=4, num_stages=2)
    got = kernels.mixed_gemm(xq.to(DEVICE), w_gpu, w_bits, k, n, config=cfg)
    assert torch.equal(got.cpu(), ref_gemm(xq, canon, w_bits, k, n)), f"seed={seed}"
    a_scale, w_scale = torch.rand(m, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    lin = kernels.mixed_gemm(xq.to(DEVICE), w_gpu, w_bits, k, n, a_scale.to(DEVICE), w_scale.to(DEVICE),
                             None, torch.float32, config=cfg)
    ref = REF.linear(xq, a_scale, weights(REF, canon, w_bits, k, n, w_scale), torch.float32)
    torch.testing.assert_close(lin.cpu(), ref, rtol=2e-7, atol=0, msg=lambda s: f"seed={seed}: {s}")


def test_int_gemm_reads_strided_activations():
    g, seed = fresh_generator()
    m, k, n = 7, 50, 5
    wide = rand_int(g, 8, (m, 2 * k))
    xq = wide[:, ::2]  # stride 2 along K
    canon = rand_weights(g, 6, n, k)
    got = BACKEND.int_gemm(xq.to(DEVICE), weights(BACKEND, canon, 6, k, n))
    assert torch.equal(got.cpu(), ref_gemm(xq.contiguous(), canon, 6, k, n)), f"seed={seed}"


@pytest.mark.parametrize("w_bits", BITS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token", [True, False])
def test_linear_matches_float64(w_bits, out_dtype, per_token):
    g, seed = fresh_generator()
    m, k, n = 7, 70, 37
    xq = rand_int(g, 6, (m, k))
    canon = rand_weights(g, w_bits, n, k)
    a_scale = torch.rand(m if per_token else 1, generator=g) * 0.01 + 1e-3
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g) if per_token else None
    got = ops.linear(xq.to(DEVICE), a_scale.to(DEVICE), weights(BACKEND, canon, w_bits, k, n, w_scale, bias),
                     out_dtype).cpu()
    assert got.dtype == out_dtype and got.shape == (m, n)
    acc = ref_gemm(xq, canon, w_bits, k, n).double()
    product = acc * a_scale.double()[:, None] * w_scale.double()[None, :]
    b64 = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()
    exact = product + b64
    # fp32 roundings of the product and the bias add (relative to their own sizes, since the add
    # may cancel), then one rounding to out_dtype
    eps32, eps_out = torch.finfo(torch.float32).eps, torch.finfo(out_dtype).eps
    tol = 3 * eps32 * product.abs() + eps32 * b64.abs() + eps_out * exact.abs() + 1e-7
    assert ((got.double() - exact).abs() <= tol).all(), f"seed={seed}"
    if DEVICE == "cpu":  # the interpreter does no FMA contraction: the same bits as the reference
        ref = REF.linear(xq, a_scale, weights(REF, canon, w_bits, k, n, w_scale, bias), out_dtype)
        assert torch.equal(got, ref), f"seed={seed}"


# ----------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("a_bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_dynamic_is_bit_exact(a_bits, dtype):
    g, seed = fresh_generator()
    m, k = 9, 77
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10).to(dtype)
    x[3] = 0  # an all-zero row takes the SCALE_EPS floor
    x[4, :5] = torch.tensor([2.5, -2.5, 0.5, 1.5, 127.0]).to(dtype)  # ties after scaling by qmax/127
    q, scale = ops.quantize_act_dynamic(x.to(DEVICE), a_bits, "triton")
    q_ref, scale_ref = REF.quantize_dynamic(x, a_bits)
    assert torch.equal(scale.cpu(), scale_ref), f"seed={seed}"
    assert torch.equal(q.cpu(), q_ref), f"seed={seed}"


@pytest.mark.parametrize("a_bits", BITS)
@pytest.mark.parametrize("channelwise", [True, False])
def test_quantize_static_is_bit_exact_and_rounds_half_to_even(a_bits, channelwise):
    g, seed = fresh_generator()
    m, k = 11, 37
    x = torch.randn(m, k, generator=g) * 4
    x[0, :6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    inv = torch.rand(k if channelwise else 1, generator=g) * 3 + 0.5
    inv[:6] = 1.0  # row 0's first entries are exact ties
    q = ops.quantize_act_static(x.to(DEVICE), inv.to(DEVICE), a_bits, "triton").cpu()
    assert torch.equal(q, REF.quantize_static(x, inv, a_bits)), f"seed={seed}"
    assert q[0, :6].tolist() == [0, 2, 2, 0, -2, -2]


def _layernorm_q_ok(got: torch.Tensor, x, gamma, beta, eps, inv, a_bits) -> torch.Tensor:
    """Per element: equal to the fp64 rule, or 1 LSB off where the fp64 value is a near-tie."""
    lim = formats.qmax(a_bits)
    k = x.shape[1]
    y = torch.nn.functional.layer_norm(x.double(), (k,), None if gamma is None else gamma.double(),
                                       None if beta is None else beta.double(), eps)
    y = (y * inv.double()).clamp(-lim, lim)
    want = torch.round(y)
    near_tie = ((y - y.floor()) - 0.5).abs() < 1e-4 * y.abs().clamp_min(1.0)
    diff = (got.double() - want).abs()
    return (diff == 0) | ((diff == 1) & near_tie)


@pytest.mark.parametrize("a_bits", BITS)
@pytest.mark.parametrize("channelwise", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_quantize_matches_float64(a_bits, channelwise, affine):
    g, seed = fresh_generator()
    m, k = 6, 70
    x = (torch.randn(m, k, generator=g) * 3 + torch.randn(m, 1, generator=g)).to(torch.bfloat16)
    gamma = torch.randn(k, generator=g) if affine else None
    beta = torch.randn(k, generator=g) if affine else None
    inv = torch.rand(k if channelwise else 1, generator=g) * formats.qmax(a_bits) / 2 + 0.5
    to_dev = (lambda t: None if t is None else t.to(DEVICE))
    if affine:  # the custom op, as QuantLinear calls it
        got = ops.layernorm_quantize(x.to(DEVICE), gamma.to(DEVICE), beta.to(DEVICE), 1e-6, inv.to(DEVICE), a_bits,
                                     "triton")
    else:
        got = BACKEND.layernorm_quantize(x.to(DEVICE), to_dev(gamma), to_dev(beta), 1e-6, inv.to(DEVICE), a_bits)
    assert got.dtype == torch.int8 and got.shape == (m, k)
    ok = _layernorm_q_ok(got.cpu(), x, gamma, beta, 1e-6, inv, a_bits)
    assert ok.all(), f"seed={seed}: {int((~ok).sum())} elements off"
    assert got.abs().max() > 0 and got.abs().max() <= formats.qmax(a_bits)


@pytest.mark.parametrize("a_bits", BITS)
def test_layernorm_quantize_equals_the_reference_on_huge_rows_and_ties(a_bits):
    # the kernel computes formats.layer_norm_fp32 (float64 statistics, fp32 affine part): rows at
    # |x| ~ 1e20 (fp32 squares overflow there) and rows whose quantized values are exact ties give
    # the reference's integers, not merely values within an LSB
    g, seed = fresh_generator()
    m, k = 7, 70
    x = torch.randn(m, k, generator=g) * 3 + torch.randn(m, 1, generator=g)
    x[0] = torch.randn(k, generator=g) * 1e20
    x[1] = 2.0**66 * torch.tensor([1.0, -1.0]).repeat(k // 2)  # mean 0, variance 2**132
    x[2] = 2.0**10 * torch.tensor([1.0, -1.0]).repeat(k // 2)  # normalizes to exactly +-1
    x[3] = x[2] * -1e19
    gamma, beta = torch.randn(k, generator=g), torch.randn(k, generator=g)
    gamma[:12], beta[:12] = 0.5, 2.0  # +-1 * 0.5 + 2 = 2.5 or 1.5: ties at inv = 1
    inv = torch.rand(k, generator=g) * formats.qmax(a_bits) / 2 + 0.5
    inv[:12] = 1.0
    want = REF.layernorm_quantize(x, gamma, beta, 1e-6, inv, a_bits)
    assert want[2, :12].tolist() == [2] * 12 and want[1, :12].tolist() == [2] * 12
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        ref = REF.layernorm_quantize(xd, gamma, beta, 1e-6, inv, a_bits)
        got = ops.layernorm_quantize(xd.to(DEVICE), gamma.to(DEVICE), beta.to(DEVICE), 1e-6, inv.to(DEVICE),
                                     a_bits, "triton").cpu()
        assert torch.equal(got, ref), f"seed={seed} {dtype}: rows {sorted(set((got != ref).nonzero()[:, 0].tolist()))}"


def test_quantize_kernels_reject_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        kernels.quantize_dynamic(torch.zeros(2, 3, 4, device=DEVICE), 8)
    with pytest.raises(ValueError, match="float"):
        kernels.quantize_dynamic(torch.zeros(2, 3, dtype=torch.int32, device=DEVICE), 8)
    with pytest.raises(ValueError, match="inv_scale"):
        kernels.quantize_static(torch.zeros(2, 3, device=DEVICE), torch.ones(2, device=DEVICE), 8)
    with pytest.raises(ValueError, match="exceeds"):
        kernels.quantize_dynamic(torch.zeros(1, kernels.quantize.MAX_ROW + 1, device=DEVICE), 8)
    with pytest.raises(ValueError, match="unsupported"):
        BACKEND.quantize_dynamic(torch.zeros(2, 3, device=DEVICE), 5)


# ----------------------------------------------------------------------------- backend wiring


def test_backend_is_registered_and_only_claims_cuda_devices():
    assert BACKEND.name == "triton" and BACKEND.priority == 20
    assert not BACKEND.available(torch.device("cpu"))
    assert BACKEND.available(torch.device("cuda")) == (
        torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    )


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU refusal outside the interpreter")
def test_cpu_tensors_are_refused_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        BACKEND.quantize_dynamic(torch.zeros(2, 3), 8)


def test_quantlinear_on_the_triton_backend_matches_the_reference():
    from mixq.nn import QuantLinear

    g, seed = fresh_generator()
    lin = torch.nn.Linear(50, 37).to(DEVICE)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(37, 50, generator=g))
    x = torch.randn(2, 3, 50, generator=g).to(DEVICE)
    fast = QuantLinear.from_float(lin, 4, 8, backend="triton")
    slow = QuantLinear.from_float(lin, 4, 8, backend="reference")
    assert fast.backend == "triton" and fast.packed.codes.dim() == 3
    torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5, msg=lambda s: f"seed={seed}: {s}")


def test_backend_fused_dynamic_linear_equals_quantize_then_linear():
    g, seed = fresh_generator()
    m, k, n = 6, 70, 37
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEVICE)
    canon = rand_weights(g, 4, n, k)
    w = weights(BACKEND, canon, 4, k, n, torch.rand(n, generator=g) * 1e-2, torch.randn(n, generator=g))
    out = BACKEND.linear_dynamic(x, w, 8, torch.bfloat16)
    xq, a_scale = BACKEND.quantize_dynamic(x, 8)
    assert torch.equal(out, BACKEND.linear(xq, a_scale, w, torch.bfloat16)), f"seed={seed}"


def _dynamic_layer_pair(g, w_bits, a_bits, mode, k, n):
    """The same float layer quantized for the triton and the reference backends (and simulated)."""
    from mixq.nn import QuantLinear

    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        lin.bias.copy_(torch.randn(n, generator=g))
    samples = torch.randn(32, k, generator=g) * torch.linspace(0.1, 8, k) if mode == "smooth" else None
    make = lambda **kw: QuantLinear.from_float(lin, w_bits, a_bits, act_quant=mode, act_samples=samples,  # noqa: E731
                                               clip_search=False, **kw)
    return make(backend="triton").to(DEVICE), make(backend="reference"), make(simulate=True)


@pytest.mark.parametrize("w_bits", BITS)
@pytest.mark.parametrize("a_bits", BITS)
@pytest.mark.parametrize("mode", ["dynamic", "smooth"])
def test_quantlinear_fused_dynamic_path_is_bit_identical_to_the_reference(w_bits, a_bits, mode):
    # small M runs one fused kernel on triton; the reference runs quantize then GEMM, and the
    # simulation fake-quantizes in float: all three agree bit for bit, also with a row so large that
    # the power-of-two headroom f < 1 is in play
    from mixq.backends import triton as triton_backend

    g, seed = fresh_generator()
    k, n = 45, 19
    fast, slow, sim = _dynamic_layer_pair(g, w_bits, a_bits, mode, k, n)
    x = torch.randn(1, 7, k, generator=g) * torch.rand(1, 7, 1, generator=g) * 4
    x[0, 6] = 0  # the SCALE_EPS floor
    xs = [x]
    if (w_bits, a_bits) == (4, 8):
        big = x.clone()
        big[0, 1] *= 1e25  # step ~1e23 > 2**64: the headroom scales the epilogue
        xs += [big, x.to(torch.bfloat16)]
    for xi in xs:
        assert xi.shape[1] <= triton_backend.FUSED_DYNAMIC_MAX_M
        want = slow(xi)
        got = fast(xi.to(DEVICE)).cpu()
        assert got.dtype == xi.dtype and got.shape == (1, 7, n)
        assert torch.equal(got, want), f"seed={seed} {xi.dtype}: max diff {(got - want).abs().max()}"
        assert torch.equal(sim(xi), want), f"seed={seed} simulation, {xi.dtype}"
    assert torch.isfinite(want).all()


def test_quantlinear_past_the_fused_bound_quantizes_then_runs_the_gemm(monkeypatch):
    from mixq.backends import triton as triton_backend

    g, seed = fresh_generator()
    fast, slow, _ = _dynamic_layer_pair(g, 6, 6, "smooth", 33, 21)
    x = torch.randn(5, 33, generator=g)
    fused = fast(x.to(DEVICE)).cpu()
    calls = []
    real = BACKEND.quantize_dynamic
    monkeypatch.setattr(BACKEND, "quantize_dynamic", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(triton_backend, "FUSED_DYNAMIC_MAX_M", 4)
    two_step = fast(x.to(DEVICE)).cpu()
    assert calls, "M above FUSED_DYNAMIC_MAX_M should take the two-kernel path"
    assert torch.equal(fused, two_step) and torch.equal(fused, slow(x)), f"seed={seed}"


def test_fused_kernel_step_multiplier_equals_the_composition():
    # kernels.quantized_linear_dynamic's a_scale_mul (the headroom factor the backend passes) multiplies
    # each step in the epilogue only: the reference's quantize, then linear with a_scale * f
    g, seed = fresh_generator()
    m, k, n = 5, 40, 13
    x = torch.randn(m, k, generator=g) * 3
    canon = rand_weights(g, 6, n, k)
    w_scale, bias = torch.rand(n, generator=g) * 1e-2, torch.randn(n, generator=g)
    f = torch.tensor(0.25)
    xq, a_scale = REF.quantize_dynamic(x, 8)
    want = REF.linear(xq, a_scale * f, weights(REF, canon, 6, k, n, w_scale, bias), torch.float32)
    w = weights(BACKEND, canon, 6, k, n)
    got, _ = kernels.quantized_linear_dynamic(x.to(DEVICE), w.codes, 6, 8, k, n, w_scale.to(DEVICE), bias.to(DEVICE),
                                              torch.float32, a_scale_mul=f.to(DEVICE))
    assert torch.equal(got.cpu(), want), f"seed={seed}"
    with pytest.raises(ValueError, match="one fp32 value"):
        kernels.quantized_linear_dynamic(x.to(DEVICE), w.codes, 6, 8, k, n, w_scale.to(DEVICE), None, torch.float32,
                                         a_scale_mul=torch.ones(2).to(DEVICE))


def test_fused_layernorm_quantlinear_on_the_triton_backend_matches_the_reference():
    from mixq.nn import QuantLinear

    g, seed = fresh_generator()
    k, n = 70, 37
    norm = torch.nn.LayerNorm(k)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(k, generator=g) * 0.1)
        lin.weight.copy_(torch.randn(n, k, generator=g))
    x = torch.randn(9, k, generator=g) * torch.linspace(0.1, 5, k)
    samples = norm(torch.randn(64, k, generator=g) * torch.linspace(0.1, 5, k)).detach()
    layers = {}
    for name in ("triton", "reference"):
        q = QuantLinear.from_float(lin, 6, 8, act_quant="channel", act_samples=samples, backend=name)
        layers[name] = q.fold_layernorm(norm).to(DEVICE)
    fast, slow = layers["triton"](x.to(DEVICE)).cpu(), layers["reference"](x.to(DEVICE)).cpu()
    # a near-tie activation may round one LSB apart, moving an output by at most one dequantized weight
    ref = layers["reference"]
    lsb_effect = (formats.qmax(6) * ref.w_scale.abs().max() * ref.act_scale).item()
    assert (fast - slow).abs().max().item() <= 2 * lsb_effect, f"seed={seed}"
    assert fast.abs().mean() > 10 * lsb_effect  # the bound is tight next to the outputs' size


# ----------------------------------------------------------------------------- configs


def test_pick_config_without_cuda_uses_small_interpreter_tiles():
    cfg = tuning.pick_config(8, 197, 2304, 768, torch.device("cpu"))
    assert cfg.block_m == 16 and cfg.split_k == 1


@pytest.mark.parametrize("m,n,k", [(1, 256, 3072), (8, 768, 768), (197, 768, 3072)])
def test_heuristic_splits_k_only_when_tiles_cannot_fill_the_gpu(m, n, k):
    cfg = tuning.heuristic_config(m, n, k, sm_count=132)
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    k_tiles = -(-k // K_TILE)
    assert 1 <= cfg.split_k <= k_tiles
    assert (cfg.split_k > 1) == (tiles < 66)
    big = tuning.heuristic_config(4096, 2304, 768)
    assert big.split_k == 1 and big.block_m == 128


def test_shipped_tables_parse_and_name_valid_configs():
    files = sorted(tuning.CONFIG_DIR.glob("*.json"))
    assert any(f.name == "h100.json" for f in files)
    for f in files:
        table = tuning.load_table(str(f))
        assert table, f"{f.name} has no entries"
        for (w_bits, bucket, n, k), cfg in table.items():
            assert w_bits in BITS and bucket in tuning.M_BUCKETS and n > 0 and k > 0
            assert isinstance(cfg, kernels.GemmConfig)
        assert "source" in json.loads(f.read_text())
    assert any(f.name == "h200.json" for f in files)
    assert tuning.table_path_for("NVIDIA H100 80GB HBM3").name == "h100.json"
    assert tuning.table_path_for("NVIDIA H200").name == "h200.json"
    assert tuning.table_path_for("NVIDIA GeForce RTX 4090") is None


def test_table_env_variable_overrides_the_gpu_name(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.TABLE_ENV, str(tmp_path / "mine.json"))
    assert tuning.table_path_for("NVIDIA H100 80GB HBM3") == tmp_path / "mine.json"


def test_broken_table_entry_is_reported(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": [{"w_bits": 8, "m_bucket": 16, "n": 8, "k": 8, "block_m": 24,
                                            "block_n": 16}]}))
    with pytest.raises(ValueError, match="entry 0"):
        tuning.load_table(str(bad))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("w_bits", BITS)
def test_gpu_gemm_on_a_sam_shape_and_with_the_table_config(w_bits):
    g, seed = fresh_generator()
    m, k, n = 4096 + 3, 768, 2304
    xq = rand_int(g, 8, (m, k))
    canon = rand_weights(g, w_bits, n, k)
    got = BACKEND.int_gemm(xq.cuda(), weights(BACKEND, canon, w_bits, k, n))
    assert torch.equal(got, ref_gemm(xq.cuda(), canon, w_bits, k, n)), f"seed={seed}"


@pytest.mark.gpu
def test_gpu_linear_stack_replays_in_a_cuda_graph_and_compiles():
    from mixq.nn import QuantLinear

    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[QuantLinear.from_float(torch.nn.Linear(768, 768).cuda(), 4, 8) for _ in range(3)])
    assert all(layer.backend == "triton" for layer in layers)
    x = torch.randn(197, 768, device="cuda", dtype=torch.bfloat16)
    eager = layers(x)
    static_x = x.clone()
    layers(static_x)  # warm-up: compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layers(static_x)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    compiled = torch.compile(layers, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
