"""The reference backend: pure PyTorch on any device, the ground truth of every kernel.

Integer products are exact: the GEMM runs in float64 when every partial sum fits in the
53-bit mantissa (always, for K < 2**38 at 8 bits), which works on every device including
CUDA, where int64 matmul is not implemented.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import formats
from . import register_backend


class ReferenceBackend:
    name = "reference"
    priority = 0

    def available(self, device: torch.device) -> bool:
        return True

    def prepack(self, packed: torch.Tensor, w_bits: int, k: int) -> torch.Tensor:
        return packed

    def quantize_dynamic(self, x: torch.Tensor, a_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        return formats.quantize_act_dynamic(x, a_bits)

    def quantize_static(self, x: torch.Tensor, inv_scale: torch.Tensor, a_bits: int) -> torch.Tensor:
        return formats.quantize_with_inv_scale(x, inv_scale, a_bits)

    def layernorm_quantize(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, inv_scale: torch.Tensor, a_bits: int
    ) -> torch.Tensor:
        return formats.quantize_with_inv_scale(formats.layer_norm_fp32(x, weight, bias, eps), inv_scale, a_bits)

    def int_gemm(self, xq: torch.Tensor, w: torch.Tensor, w_bits: int, k: int, n: int) -> torch.Tensor:
        wq = formats.unpack_weight(w, w_bits, k)
        acc = xq.to(torch.float64) @ wq.to(torch.float64).T
        return acc.to(torch.int32)

    def packed_linear(
        self,
        xq: torch.Tensor,
        a_scale: torch.Tensor,
        w: torch.Tensor,
        w_scale: torch.Tensor,
        bias: Optional[torch.Tensor],
        w_bits: int,
        k: int,
        n: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        acc = self.int_gemm(xq, w, w_bits, k, n).to(torch.float32)
        out = acc * a_scale.to(torch.float32).reshape(-1, 1) * w_scale.to(torch.float32).reshape(1, -1)
        if bias is not None:
            out = out + bias.to(torch.float32)
        return out.to(out_dtype)


register_backend(ReferenceBackend())
