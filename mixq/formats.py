"""Number formats: the contract every backend obeys (DESIGN.md, "Number formats"; docs/DESIGN_NOTES.md).

Weights are symmetric per output channel, signed integers in [-qmax, qmax] with
qmax = 2**(bits-1) - 1, stored in the canonical packed layout along K:

* int8: one value per byte (two's complement).
* int4: two values per byte, low nibble first (two's complement nibbles).
* int6: two bit planes per row: first the low-4-bit plane (two per byte, low
  nibble first, Kp/2 bytes) then the high-2-bit plane (four per byte, lowest bit
  pair first, Kp/4 bytes). The 6-bit two's complement code u = q & 0x3F splits
  into lo = u & 0xF and hi = u >> 4.

K is padded with zeros to a multiple of the packing unit (1, 2, 4 for 8, 4, 6
bits); the true K travels beside the packed tensor.

Activations are quantized with q = round_half_even(clamp(x * inv_scale, -qmax,
qmax)) in fp32, where inv_scale is an fp32 reciprocal; the multiply (not a
divide) keeps every backend bit-identical, since IEEE multiplication is
correctly rounded everywhere while GPU division defaults to an approximation.
"""

from __future__ import annotations

import math
import re
import struct

import torch

SUPPORTED_BITS: tuple[int, ...] = (4, 6, 8)
PACK_UNIT: dict[int, int] = {8: 1, 4: 2, 6: 4}
# Smallest amax treated as non-zero when a scale is derived from data.
SCALE_EPS: float = 1e-8


def check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported {what}={bits!r}: mixq supports {list(SUPPORTED_BITS)}")
    return bits


_BIT_PAIR = re.compile(r"^\s*(?:w(\d+)a(\d+)|(\d+)\s*/\s*(\d+))\s*$", re.IGNORECASE)


def parse_bit_pair(text: str) -> tuple[int, int]:
    """'W8A8', 'w4a8' or '4/8' -> (w_bits, a_bits), each in SUPPORTED_BITS."""
    m = _BIT_PAIR.match(text)
    pair = tuple(int(g) for g in (m.group(1, 2) if m.group(1) else m.group(3, 4))) if m else ()
    if len(pair) != 2 or not all(b in SUPPORTED_BITS for b in pair):
        raise ValueError(f"cannot read bit config {text!r}; write e.g. 'W8A8', 'W4A8' or '4/8' "
                         f"(bits in {', '.join(map(str, SUPPORTED_BITS))})")
    return pair[0], pair[1]


def qmax(bits: int) -> int:
    return 2 ** (check_bits(bits) - 1) - 1


def padded_k(k: int, bits: int) -> int:
    unit = PACK_UNIT[check_bits(bits)]
    return (k + unit - 1) // unit * unit


def row_bytes(k: int, bits: int) -> int:
    """Bytes per output channel in the canonical packed layout."""
    return padded_k(k, bits) * bits // 8


# ----------------------------------------------------------------------------- packing


def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer weights ``q`` [N, K] (values in [-qmax, qmax]) to uint8 [N, row_bytes]."""
    check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"pack_weight expects a 2-D [N, K] tensor, got shape {tuple(q.shape)}")
    if q.is_floating_point():
        raise TypeError("pack_weight expects an integer tensor; quantize first")
    lim = qmax(bits)
    if q.numel() and (int(q.min()) < -lim or int(q.max()) > lim):
        raise ValueError(f"values outside [-{lim}, {lim}] cannot be packed at {bits} bits")
    n, k = q.shape
    kp = padded_k(k, bits)
    u = torch.zeros((n, kp), dtype=torch.int16, device=q.device)
    u[:, :k] = q.to(torch.int16)
    u = u & ((1 << bits) - 1)  # two's complement code of `bits` bits
    if bits == 8:
        return u.to(torch.uint8)
    if bits == 4:
        return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)
    lo, hi = u & 0xF, u >> 4
    plane4 = lo[:, 0::2] | (lo[:, 1::2] << 4)
    plane2 = hi[:, 0::4] | (hi[:, 1::4] << 2) | (hi[:, 2::4] << 4) | (hi[:, 3::4] << 6)
    return torch.cat([plane4, plane2], dim=1).to(torch.uint8)


def _sign_extend(u: torch.Tensor, bits: int) -> torch.Tensor:
    u = u.to(torch.int16)
    return torch.where(u >= (1 << (bits - 1)), u - (1 << bits), u).to(torch.int8)


def unpack_weight(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: uint8 [N, row_bytes] -> int8 [N, k]."""
    check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed weights must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != row_bytes(k, bits):
        raise ValueError(
            f"packed row has {packed.shape[1]} bytes but k={k} at {bits} bits needs {row_bytes(k, bits)}"
        )
    p = packed.to(torch.int16)
    n = p.shape[0]
    if bits == 8:
        u = p
    elif bits == 4:
        u = torch.stack([p & 0xF, p >> 4], dim=2).reshape(n, -1)
    else:
        kp = padded_k(k, bits)
        plane4, plane2 = p[:, : kp // 2], p[:, kp // 2 :]
        lo = torch.stack([plane4 & 0xF, plane4 >> 4], dim=2).reshape(n, kp)
        hi = torch.stack([(plane2 >> s) & 0x3 for s in (0, 2, 4, 6)], dim=2).reshape(n, kp)
        u = lo | (hi << 4)
    return _sign_extend(u[:, :k], bits)


# ----------------------------------------------------------------------------- rounding


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # torch.round rounds half to even


def quantize_with_inv_scale(x: torch.Tensor, inv_scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The activation rounding rule of the contract, in fp32: int8 output.

    Non-finite values: ±inf clamps to ±qmax and NaN becomes 0, stated here rather than left to the
    float -> int8 cast (undefined in C for NaN; torch's CPU cast happens to give 0). A dynamic row
    holding NaN or inf gets a NaN or inf step, so its outputs are NaN, as nn.Linear's would be.
    """
    lim = float(qmax(bits))
    y = (x.to(torch.float32) * inv_scale.to(torch.float32)).clamp(-lim, lim)
    return round_half_even(y.nan_to_num(nan=0.0)).to(torch.int8)


def layer_norm_fp32(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim as every fused LayerNorm+quantize kernel computes it (the contract).

    Mean and variance in float64 (two passes), ``rstd = fp32(1 / sqrt(var + eps))`` in float64,
    then ``y = ((x - fp32(mean)) * rstd) * norm_weight + norm_bias`` in fp32, one rounding per operation, no
    FMA. float64 statistics keep rows with |x| up to ~1e154 finite (fp32 squares overflow at ~1e19,
    where ``F.layer_norm`` returns NaN), and the fixed order is what makes the integers the same on
    every path. Differences to a kernel's own float64 summation order move the mean by ~1e-16
    relative, which only matters if it lands exactly on an fp32 rounding boundary.
    """
    x32 = x.to(torch.float32)
    x64 = x32.to(torch.float64)
    mean = x64.mean(dim=-1, keepdim=True)
    var = (x64 - mean).square().mean(dim=-1, keepdim=True)
    rstd = (1.0 / torch.sqrt(var + eps)).to(torch.float32)
    return ((x32 - mean.to(torch.float32)) * rstd) * norm_weight.to(torch.float32) + norm_bias.to(torch.float32)


def reciprocal_fp32(scale: torch.Tensor) -> torch.Tensor:
    return torch.reciprocal(scale.to(torch.float32))


# ----------------------------------------------------------------------------- weights


def quantize_weight(
    w: torch.Tensor, bits: int, clip_search: bool = True, grid: int = 40, min_ratio: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization with an MSE-optimal clip per channel.

    Returns (q int8 [N, K], scale fp32 [N]). The clip ratio is searched on a grid in
    [min_ratio, 1] of each channel's amax; ratio 1 (plain min-max) is always a candidate,
    so the search never does worse than min-max.
    """
    check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"weights must be 2-D [N, K], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf; cannot quantize")
    w = w.detach().to(torch.float32)
    lim = qmax(bits)
    amax = w.abs().amax(dim=1).clamp_min(SCALE_EPS)
    ratios = torch.linspace(1.0, min_ratio, grid) if clip_search else torch.ones(1)
    best_err = torch.full_like(amax, math.inf)
    best_scale = amax / lim
    buf = torch.empty_like(w)
    with torch.no_grad():
        for r in ratios.tolist():
            scale = amax * r / lim
            # in place: round(clamp(w / scale)) * scale - w, squared and summed per channel
            torch.div(w, scale[:, None], out=buf)
            buf.clamp_(-lim, lim).round_().mul_(scale[:, None]).sub_(w)
            err = torch.linalg.vector_norm(buf, dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    q = round_half_even((w / best_scale[:, None]).clamp(-lim, lim)).to(torch.int8)
    return q, best_scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float64) * scale.to(torch.float64)[:, None]).to(dtype)


# ----------------------------------------------------------------------------- activations


def quantize_act_dynamic(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) dynamic quantization of x [M, K]: (q int8 [M, K], scale fp32 [M]).

    scale = max(amax_row, SCALE_EPS) / qmax, inv = 1 / scale (fp32), q = rne(clamp(x * inv)).
    """
    xf = x.to(torch.float32)
    lim = qmax(bits)
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] else torch.zeros(xf.shape[:-1])
    scale = amax.clamp_min(SCALE_EPS) / lim
    inv = reciprocal_fp32(scale)
    return quantize_with_inv_scale(xf, inv[..., None], bits), scale


# A dynamic step above this is scaled down by a power of two before the epilogue: acc (< 2**34 for
# any practical K) times the step then stays far from fp32's 2**128.
_MAX_EPILOGUE_STEP = 2.0**64


def epilogue_headroom(a_scale: torch.Tensor) -> torch.Tensor:
    """A power of two f <= 1 (0-dim fp32) for the epilogue ``(acc * a_scale * f) * w_scale + bias * f``,
    then ``/ f``: exactly the usual numbers when f = 1 (any input below ~1e21), and finite instead of
    inf for inputs up to fp32's range, where ``acc * a_scale`` alone overflows. Non-finite steps are
    ignored (a NaN row stays that row's business)."""
    top = a_scale.to(torch.float32).nan_to_num(0.0, posinf=0.0, neginf=0.0).amax().clamp_min(1.0)
    # floor(log2(top)) read off the exponent, exact on every device (fp32 log2 rounds values just
    # below 2**j up to j); the cpu kernels compute the same with frexp.
    e = (torch.frexp(top).exponent - (1 + int(math.log2(_MAX_EPILOGUE_STEP)))).clamp_min(0)
    return torch.pow(2.0, -e.to(torch.float32))


def search_clip_range(samples: torch.Tensor, bits: int, grid: int = 50, min_ratio: float = 0.3) -> torch.Tensor:
    """MSE-optimal symmetric clipping range for each column of ``samples`` [R, C] -> [C].

    Candidates are ratios of the column's amax in [min_ratio, 1]; the error is the squared
    error of fake-quantizing the samples with that range.
    """
    x = samples.to(torch.float32)
    lim = qmax(bits)
    amax = x.abs().amax(dim=0).clamp_min(SCALE_EPS)
    best_err = torch.full_like(amax, math.inf)
    best = amax.clone()
    for r in torch.linspace(1.0, min_ratio, grid).tolist():
        rng = amax * r
        scale = rng / lim
        xq = round_half_even((x / scale).clamp(-lim, lim)) * scale
        err = ((xq - x) ** 2).sum(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, rng, best)
    return best


def calibrate_per_tensor(samples: torch.Tensor, bits: int) -> torch.Tensor:
    """Static per-tensor step t (fp32 scalar tensor) from calibration samples [R, K]."""
    return search_clip_range(samples.reshape(-1, 1), bits).reshape(()) / qmax(bits)


def calibrate_channelwise(samples: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped channel-wise calibration: (channel factors s [K], per-tensor step t []).

    Each channel gets its own MSE-optimal range r_k; t is the median range over qmax and
    s_k = r_k / (t * qmax), so x / (s_k * t) spans the integer grid channel by channel and
    the s_k fold into the weight columns.
    """
    rng = search_clip_range(samples, bits)
    t = rng.median() / qmax(bits)
    s = rng / (t * qmax(bits))
    return s, t


def smooth_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Channel factors s_k = a_k^alpha / w_k^(1-alpha), geometric mean 1 (SmoothQuant's rule), with
    a_k = max(amax_k, median amax) and w_k = max(wmax_k, median wmax).

    Dividing input channel k by s_k and multiplying weight column k by it leaves the product
    unchanged while moving range from outlier activation channels into the weights; a dynamic
    per-token step then quantizes the flattened activations. The median floors mean smoothing only
    shrinks outliers: a channel quiet on the calibration images is never blown up (why: see
    docs/DESIGN_NOTES.md, "smooth"). alpha=1 moves all of it, alpha=0 none.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth alpha must be in [0, 1], got {alpha}")
    a = act_amax.detach().to(torch.float64).reshape(-1)
    if weight.dim() != 2 or weight.shape[1] != a.numel():
        raise ValueError(f"weight must be [N, {a.numel()}] to match the activation channels, got {tuple(weight.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError("activation amax contains NaN/Inf; check the calibration data")
    w = weight.detach().to(torch.float64).abs().amax(dim=0)
    a = torch.maximum(a, a.median()).clamp_min(SCALE_EPS)
    w = torch.maximum(w, w.median()).clamp_min(SCALE_EPS)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = s / torch.exp(torch.log(s).mean())
    return s.to(torch.float32)


def log2_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize post-softmax probabilities in [0, 1] on a log2 grid (simulation only).

    q = clamp(round(-log2 x), 0, 2**bits - 1); values whose code would exceed the grid
    become 0, as in the log2 quantizers of FQ-ViT / RepQ-ViT.
    """
    check_bits(bits)
    levels = 2**bits - 1
    xf = x.to(torch.float32).clamp_min(0)
    code = round_half_even(-torch.log2(xf.clamp_min(2.0 ** (-levels - 1))))
    out = torch.where(code > levels, torch.zeros_like(xf), torch.exp2(-code.clamp(0, levels)))
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- attention matmuls
#
# QK^T contracts over the head dim, so per-token (row) steps of Q and of K both factor out of the
# sum: Q and K use quantize_act_dynamic as they are. softmax(.)V contracts over tokens, so V's step
# must be constant along tokens: V is quantized per head-dim channel (dynamic, amax over the tokens
# of one (batch, head)), i.e. quantize_act_dynamic of V^T. Probabilities are unsigned codes in [0, 1]
# on a log2 grid (or a uniform one, for comparison). See docs/DESIGN_NOTES.md, "Attention matmuls".

P_GRIDS: tuple[str, ...] = ("log2", "uniform")
# Largest log2 code with a non-zero value: 2^-31 (~5e-10) is below anything a probability times a
# value can contribute, and it keeps the exact shift form of P.V inside int64 (|v| 2^31 N < 2^63).
LOG2_MAX_CODE: int = 31
# fp32(sqrt(1/2)): a mantissa m in [0.5, 1) below it has -log2(m) > 0.5 (sqrt(1/2) is irrational, no ties).
def _fp32(x: float) -> float:
    """x rounded to the nearest fp32 value (a Python float, so traced code sees a constant)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


_SQRT_HALF_F32 = _fp32(math.sqrt(0.5))


def check_p_grid(p_grid: str) -> str:
    """The probability grid name, checked: "log2" or "uniform"."""
    if p_grid not in P_GRIDS:
        raise ValueError(f"unknown probability grid p_grid={p_grid!r}; allowed: {list(P_GRIDS)}")
    return p_grid


def log2_max_code(bits: int) -> int:
    """Largest non-zero log2 code at ``bits``: min(2**bits - 2, 31) (the top code 2**bits - 1 is 0)."""
    return min(2 ** check_bits(bits) - 2, LOG2_MAX_CODE)


def prob_zero_code(bits: int, p_grid: str = "log2") -> int:
    """The code whose value is 0: 2**bits - 1 on the log2 grid, 0 on the uniform grid."""
    return 2 ** check_bits(bits) - 1 if check_p_grid(p_grid) == "log2" else 0


def quantize_probs(p: torch.Tensor, bits: int, p_grid: str = "log2") -> torch.Tensor:
    """Post-softmax probabilities p -> uint8 codes (the contract for every backend).

    log2: c = round(-log2 p), computed exactly from the fp32 exponent and mantissa
    (p = m 2^e, m in [0.5, 1): c = -e + (m < fp32(sqrt 1/2))), clamped below at 0 (p >= 1 -> 2^0);
    a code above :func:`log2_max_code` and p <= 0 or NaN give the zero code 2**bits - 1.
    uniform: c = rne(clamp(p * (2**bits - 1), 0, 2**bits - 1)), value c / (2**bits - 1).
    """
    check_p_grid(p_grid)
    pf = p.to(torch.float32)
    if p_grid == "uniform":
        lim = float(2 ** check_bits(bits) - 1)
        return round_half_even((pf * lim).clamp(0.0, lim).nan_to_num(nan=0.0)).to(torch.uint8)
    cmax = log2_max_code(bits)
    m, e = torch.frexp(pf)
    code = (-e.to(torch.int32) + (m < _SQRT_HALF_F32).to(torch.int32)).clamp_min(0)
    zero = (pf <= 0) | pf.isnan() | (code > cmax)
    return torch.where(zero, prob_zero_code(bits), code).to(torch.uint8)


def prob_values(codes: torch.Tensor, bits: int, p_grid: str = "log2", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of probability codes: 2^-c (0 for the zero code) on log2, c / (2**bits - 1) on uniform."""
    c = codes.to(torch.int32)
    if check_p_grid(p_grid) == "uniform":
        return (c.to(torch.float64) / (2 ** check_bits(bits) - 1)).to(dtype)
    v = torch.exp2(-c.to(torch.float64))
    return torch.where(c == prob_zero_code(bits), torch.zeros_like(v), v).to(dtype)


def prob_integer_weights(codes: torch.Tensor, bits: int, p_grid: str = "log2") -> tuple[torch.Tensor, float]:
    """(int64 weights w, fp32 step s) with value = w * s exactly: the integer form of P in P.V.

    log2: w = 2^(cmax - c) (a left shift of V's integers), 0 for the zero code, s = 2^-cmax;
    uniform: w = c, s = fp32(1 / (2**bits - 1)) (a rounded constant, the same on every path).
    """
    c = codes.to(torch.int64)
    if check_p_grid(p_grid) == "uniform":
        return c, _fp32(1.0 / (2 ** check_bits(bits) - 1))
    cmax = log2_max_code(bits)
    w = torch.where(c == prob_zero_code(bits), torch.zeros_like(c),
                    torch.ones_like(c) << (cmax - c.clamp(max=cmax)))
    return w, 2.0 ** -cmax


# --------------------------------------------------------------------- attention ops' operands

ATTENTION_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_attention_codes(t: torch.Tensor, dtype: torch.dtype, what: str, shape: str) -> None:
    if t.dtype != dtype or t.dim() < 2:
        raise ValueError(f"{what} must be a {dtype} tensor {shape} (at least 2-D), got {t.dtype} {tuple(t.shape)}")


def _check_attention_steps(t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if not t.dtype.is_floating_point or tuple(t.shape) != shape:
        raise ValueError(f"{what} must be a float tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}")


def check_attention_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in ATTENTION_OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def check_qk_operands(q: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                      out_dtype: torch.dtype) -> tuple[tuple[int, ...], int, int, int]:
    """``mixq::quantized_qk``'s operand contract, checked alike by every backend: int8 codes
    q [..., N, D], k [..., M, D] with equal leading dims and D, float steps [..., N] and [..., M].
    Returns (leading dims, N, M, D); devices and size limits are each backend's to check."""
    _check_attention_codes(q, torch.int8, "q", "[..., N, D]")
    _check_attention_codes(k, torch.int8, "k", "[..., M, D]")
    lead, (n, d), m = tuple(q.shape[:-2]), q.shape[-2:], k.shape[-2]
    if tuple(k.shape[:-2]) != lead or k.shape[-1] != d:
        raise ValueError(f"k must be [..., M, D] with q's leading dims {lead} and head dim {d} (no broadcasting), "
                         f"got {tuple(k.shape)}")
    _check_attention_steps(q_scale, (*lead, n), "q_scale")
    _check_attention_steps(k_scale, (*lead, m), "k_scale")
    check_attention_out_dtype(out_dtype)
    return lead, n, m, d


def check_pv_operands(p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, p_bits: int, p_grid: str,
                      out_dtype: torch.dtype) -> tuple[tuple[int, ...], int, int, int]:
    """``mixq::quantized_pv``'s operand contract: uint8 probability codes p [..., N, M] on an allowed
    grid and width, int8 v [..., M, D] with p's leading dims and M, float steps v_scale [..., D].
    Returns (leading dims, N, M, D); devices and size limits are each backend's to check."""
    check_bits(p_bits, "p_bits")
    check_p_grid(p_grid)
    _check_attention_codes(p, torch.uint8, "p (probability codes)", "[..., N, M]")
    _check_attention_codes(v, torch.int8, "v", "[..., M, D]")
    lead, (n, m), d = tuple(p.shape[:-2]), p.shape[-2:], v.shape[-1]
    if tuple(v.shape[:-2]) != lead or v.shape[-2] != m:
        raise ValueError(f"v must be [..., M, D] with p's leading dims and M = {m} keys (leading dims {lead}; no "
                         f"broadcasting), got {tuple(v.shape)}")
    _check_attention_steps(v_scale, (*lead, d), "v_scale")
    check_attention_out_dtype(out_dtype)
    return lead, n, m, d
