"""Static sm_90a analysis of the mixed-bit GEMM: compile ahead of time, no GPU needed.

For each (w_bits, config) it compiles ``_mixed_gemm_kernel`` with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``, specialized the way the JIT specializes a real launch (integer
arguments equal to 1 become constexprs, the others divisible by 16 and every pointer carry
``tt.divisibility = 16``), then reads

* ``ptxas --gpu-name sm_90a -v`` on the PTX: registers, spill stores/loads, stack frame;
* ``nvdisasm`` on the cubin: IGMMA (int8 wgmma) count, STL/LDL (local-memory spills), and the
  integer ops (LOP3, SHF, PRMT, IADD3, IMAD, SGXT, I2I...) of the main K loop, per weight.

Why the specialization matters: compiled without it (every int a plain i32, no divisibility),
the loads cannot vectorize and W8 128x128 sits at 255 registers with 1,696 B of spills; with the
specialization a launch really gets, the same kernel uses ~150 registers and spills nothing.

These are compile-time counts, not timings. ``python bench/gpu_static.py [--quick]`` prints a
Markdown table; the GPU check runs it too (triton's ptxas/nvdisasm ship in
``triton/backends/nvidia/bin`` on both machines).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INT_OPS = ("LOP3", "SHF", "PRMT", "IADD3", "IMAD", "SGXT", "I2I", "LEA", "BFE", "BMSK", "VIADD", "SEL", "IABS")


def nvidia_bin(tool: str) -> str:
    """Path of ptxas / nvdisasm: triton's bundled copy first, then $PATH, then /usr/local/cuda."""
    import triton

    for cand in (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool,
                 Path(shutil.which(tool) or "/nonexistent"), Path("/usr/local/cuda/bin") / tool):
        if cand.exists():
            return str(cand)
    raise FileNotFoundError(f"{tool} not found (triton bin, PATH, /usr/local/cuda/bin)")


def count_sass(cubin: bytes) -> dict[str, int]:
    """Opcode counts of a cubin's SASS (nvdisasm), plus 'loop_*' counts inside the hottest loop."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([nvidia_bin("nvdisasm"), path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    # the main loop: the span between a backward branch and its target that holds the IGMMAs
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\.(L_x_\d+):", line.strip()))}
    best = None
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b[^`]*`\(\.(L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = lines[labels[m.group(1)]:i + 1]
            if any(re.search(r"\bI(?:G)?MMA\b", b) for b in body):  # int8 wgmma, or mma.sync
                if best is None or len(body) < len(best):
                    best = body
    if best:
        for b in best:
            m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", b)
            if m:
                counts["loop_" + m.group(1)] = counts.get("loop_" + m.group(1), 0) + 1
        counts["loop_len"] = sum(1 for b in best if re.search(r"/\*[0-9a-f]{4,}\*/", b))
    return counts


def launch_signature(w_bits: int, cfg, m: int, n: int, k: int, scaled: bool = True, has_bias: bool = True,
                     fused_a_bits: int = 0):
    """(signature, constexprs, attrs) of _mixed_gemm_kernel as a launch of mixed_gemm specializes it."""
    from mixq.kernels import gemm
    from mixq.kernels.layout import K_TILE, SUB_K, k_tiles, tile_bytes

    fn = gemm._mixed_gemm_kernel
    kt = k_tiles(k)
    per = -(-kt // cfg.split_k)
    split = -(-kt // per)
    ints = dict(M=m, N=n, K=k, tiles_per_split=per, stride_am=k, stride_ak=1, stride_wn=kt * tile_bytes(w_bits),
                stride_os=(m * n if split > 1 else 0), stride_om=n, stride_on=1, stride_as=1 if scaled else 0)
    scaled_here = scaled and split == 1
    ptrs = {"a_ptr": "*i8", "w_ptr": "*i8", "out_ptr": "*bf16" if scaled_here else "*i32",
            "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32",
            "a_scale_mul_ptr": "*fp32"}
    consts = dict(W_BITS=w_bits, K_TILE=K_TILE, SUB_K=SUB_K[w_bits], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  GROUP_M=cfg.group_m, SCALED=scaled_here, HAS_BIAS=has_bias and scaled_here,
                  SWAP_AB=bool(getattr(cfg, "swap_ab", 0)), ASM=bool(getattr(cfg, "asm_unpack", 0)), INT64=max(m * k, n * kt * tile_bytes(w_bits), split * m * n) >= 2**31)
    from mixq import formats

    consts.update(A_FLOAT=bool(fused_a_bits), QMAX=formats.qmax(fused_a_bits) if fused_a_bits else 127,
                  EPS=formats.SCALE_EPS, HAS_A_SCALE_MUL=False)
    if fused_a_bits:
        ptrs["a_ptr"] = "*bf16"
    sig, cex, attrs = specialize(fn, ptrs, consts, ints)
    return fn, sig, cex, attrs


def specialize(fn, ptrs: dict, consts: dict, ints: dict):
    """(signature, constexprs, attrs) as the JIT specializes a launch: pointers 16-byte aligned, integer
    arguments equal to 1 constant, the others divisible by 16 marked so."""
    consts = {name: v for name, v in consts.items() if name in fn.arg_names}
    sig, cex, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in consts:
            sig[name] = "constexpr"
            cex[(i,)] = consts[name]
        else:
            v = ints[name]
            if v == 1:
                sig[name] = "constexpr"
                cex[(i,)] = 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, cex, attrs


def compile_stats(fn, sig: dict, cex: dict, attrs: dict, num_warps: int, num_stages: int) -> dict:
    """Compile one specialized kernel for sm_90a; ptxas -v figures and the SASS opcode counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    kern = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cex, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   "enable_fp_fusion": False})  # as mixq.kernels launches it
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kern.asm["ptx"])
        ptx = f.name
    try:
        rep = subprocess.run([nvidia_bin("ptxas"), "--gpu-name", "sm_90a", "-v", ptx, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    finally:
        os.unlink(ptx)
    num = lambda pat: int(m_.group(1)) if (m_ := re.search(pat, rep)) else -1  # noqa: E731
    sass = count_sass(kern.asm["cubin"])
    loop_int = sum(v for op, v in sass.items() if op.startswith("loop_") and op[5:] in INT_OPS)
    return dict(regs=num(r"Used (\d+) registers"), spill_st=num(r"(\d+) bytes spill stores"),
                spill_ld=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
                smem=kern.metadata.shared, igmma=sass.get("IGMMA", 0), imma=sass.get("IMMA", 0),
                stl=sass.get("STL", 0), ldl=sass.get("LDL", 0), loop_len=sass.get("loop_len", 0),
                loop_igmma=sass.get("loop_IGMMA", 0), loop_int=loop_int,
                loop_ops={op[5:]: v for op, v in sass.items() if op.startswith("loop_") and op[5:] in INT_OPS},
                sass=sass, compile_s=time.time() - t0)


def analyze(w_bits: int, cfg, m: int = 4096, n: int = 2304, k: int = 768, fused_a_bits: int = 0) -> dict:
    """Compile one config for sm_90a and return its static figures (``fused_a_bits``: quantize fused in)."""
    fn, sig, cex, attrs = launch_signature(w_bits, cfg, m, n, k, fused_a_bits=fused_a_bits)
    r = compile_stats(fn, sig, cex, attrs, cfg.num_warps, cfg.num_stages)
    # weights one thread unpacks per K tile: BLOCK_N x K_TILE / threads
    from mixq.kernels.layout import K_TILE

    per_thread = cfg.block_n * K_TILE / (32 * cfg.num_warps)
    r.update(w_bits=w_bits, cfg=cfg, int_per_w=r["loop_int"] / per_thread if r["loop_len"] else float("nan"))
    return r


# ----------------------------------------------------------------------------- attention kernels


def attention_signature(op: str, cfg, batch: int, n: int, m: int, d: int, p_bits: int = 8, p_grid: str = "log2"):
    """(fn, signature, constexprs, attrs) of the attention kernels as a launch on contiguous
    [batch, tokens, d] tensors specializes them (bf16 out)."""
    from mixq.kernels import attention as att

    if op == "qk":
        fn = att._qk_kernel
        ints = dict(N=n, M=m, D=d, tiles_n=-(-n // cfg.block_n), tiles_m=-(-m // cfg.block_m),
                    stride_qb=n * d, stride_qn=d, stride_qd=1, stride_kb=m * d, stride_km=d, stride_kd=1,
                    stride_qsb=n, stride_qsn=1, stride_ksb=m, stride_ksm=1, stride_ob=n * m, stride_on=m, stride_om=1)
        ptrs = {"q_ptr": "*i8", "k_ptr": "*i8", "qs_ptr": "*fp32", "ks_ptr": "*fp32", "out_ptr": "*bf16"}
        consts = dict(BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_D=64 if d % 64 == 0 else 32,
                      INT64=batch * n * m >= 2**31)
    else:
        fn = att._pv_kernel
        ints = dict(N=n, M=m, D=d, tiles_n=-(-n // cfg.block_n),
                    stride_pb=n * m, stride_pn=m, stride_pm=1, stride_vb=m * d, stride_vm=d, stride_vd=1,
                    stride_vsb=d, stride_vsd=1, stride_ob=n * d, stride_on=d, stride_od=1)
        ptrs = {"p_ptr": "*u8", "v_ptr": "*i8", "vs_ptr": "*fp32", "out_ptr": "*bf16"}
        consts = dict(**att.pv_constants(p_bits, p_grid), BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m,
                      BLOCK_D=max(16, 1 << (d - 1).bit_length()), INT64=batch * n * m >= 2**31)
    sig, cex, attrs = specialize(fn, ptrs, consts, ints)
    return fn, sig, cex, attrs


def attention_cases(quick: bool = False) -> list[tuple]:
    """(label, op, config, batch, n, m, d, p_bits, p_grid): the default tiles (attention.default_config)
    at ViT-B and SAM-B global, and P V on one warpgroup for comparison."""
    import torch

    from mixq.kernels.attention import AttentionConfig, default_config

    gpu = torch.device("cuda")
    vit, sam = ("ViT-B 12x197x64", 12, 197, 197, 64), ("SAM-B global 12x4096x64", 12, 4096, 4096, 64)
    qk = lambda s: (s[0], "qk", default_config("qk", s[2], s[3], gpu), *s[1:], 8, "log2")  # noqa: E731
    pv = lambda s, b, k, cfg=None: (s[0], "pv", cfg or default_config("pv", s[2], s[3], gpu), *s[1:], b, k)  # noqa: E731
    if quick:
        return [qk(vit), pv(vit, 8, "log2")]
    out = [qk(vit), qk(sam)]
    out += [pv(vit, b, k) for b, k in ((8, "log2"), (6, "log2"), (4, "log2"), (8, "uniform"))]
    out += [pv(sam, 8, "log2"), pv(sam, 4, "log2"), pv(sam, 8, "uniform")]
    one_warpgroup = AttentionConfig(64, 64, num_warps=4, num_stages=3)
    out += [pv(vit, 8, "log2", one_warpgroup), pv(sam, 8, "log2", one_warpgroup)]
    return out


def analyze_attention(case: tuple) -> dict:
    label, op, cfg, batch, n, m, d, p_bits, p_grid = case
    fn, sig, cex, attrs = attention_signature(op, cfg, batch, n, m, d, p_bits, p_grid)
    r = compile_stats(fn, sig, cex, attrs, cfg.num_warps, cfg.num_stages)
    r.update(label=label, op=op, cfg=cfg, what=f"P{p_bits} {p_grid}" if op == "pv" else "A8")
    return r


def attention_markdown(results: list[dict]) -> str:
    out = ["| kernel | shape (B x N x D) | probs | BLOCK_N x BLOCK_M | warps | stages | regs | spill st/ld B | smem B | "
           "IGMMA (loop) | IMMA | int ops in loop | loop int ops |",
           "|---|---|---|---|---:|---:|---:|---|---:|---|---:|---:|---|"]
    for r in results:
        c = r["cfg"]
        ops = " ".join(f"{k}:{v}" for k, v in sorted(r["loop_ops"].items()))
        out.append(f"| {r['op']} | {r['label']} | {r['what']} | {c.block_n}x{c.block_m} | {c.num_warps} | {c.num_stages} | "
                   f"{r['regs']} | {r['spill_st']}/{r['spill_ld']} | {r['smem']} | {r['igmma']} ({r['loop_igmma']}) | "
                   f"{r['imma']} | {r['loop_int']} | {ops} |")
    return "\n".join(out) + "\n"


def default_configs(quick: bool = False, shipped: bool = False):
    from mixq.kernels import GemmConfig

    if quick:
        return [(8, GemmConfig(64, 64, num_warps=4, num_stages=2))]
    if shipped:  # the tile shapes the shipped tables use: fits the GPU check's time limit
        cfgs = [(128, 128, 8, 3, 0, 0), (128, 128, 8, 3, 1, 1), (64, 128, 4, 4, 1, 1)]
        return [(b, GemmConfig(bm, bn, num_warps=w, num_stages=s, swap_ab=sw, asm_unpack=asm if b != 8 else 0))
                for b in (8, 6, 4) for bm, bn, w, s, sw, asm in cfgs]
    cfgs = [(128, 128, 8, 3, 0), (128, 256, 8, 3, 0), (64, 128, 4, 4, 0), (128, 128, 4, 3, 0), (64, 64, 4, 4, 0),
            (128, 128, 8, 3, 1), (128, 128, 4, 3, 1), (64, 128, 4, 4, 1), (128, 64, 4, 4, 1), (256, 128, 8, 3, 1)]
    out = [(8, GemmConfig(bm, bn, num_warps=w, num_stages=s, swap_ab=sw)) for bm, bn, w, s, sw in cfgs]
    for b in (6, 4):  # byte-wise Triton ops on the main tile, inline-PTX word ops on every tile
        out += [(b, GemmConfig(128, 128, num_warps=8, num_stages=3, swap_ab=sw)) for sw in (0, 1)]
        out += [(b, GemmConfig(bm, bn, num_warps=w, num_stages=s, swap_ab=sw, asm_unpack=1))
                for bm, bn, w, s, sw in cfgs]
    return out


def markdown(results: list[dict]) -> str:
    out = ["| W | BLOCK_M x BLOCK_N | swap | asm | warps | stages | regs | spill st/ld B | smem B | IGMMA (loop) | "
           "int ops in loop | int ops / weight | loop int ops |",
           "|---|---|---|---|---:|---:|---:|---|---:|---|---:|---:|---|"]
    for r in results:
        c = r["cfg"]
        ops = " ".join(f"{k}:{v}" for k, v in sorted(r["loop_ops"].items()))
        out.append(f"| {r['w_bits']} | {c.block_m}x{c.block_n} | {getattr(c, 'swap_ab', 0)} | {getattr(c, 'asm_unpack', 0)} | {c.num_warps} | {c.num_stages} | {r['regs']} | "
                   f"{r['spill_st']}/{r['spill_ld']} | {r['smem']} | {r['igmma']} ({r['loop_igmma']}) | {r['loop_int']} | "
                   f"{r['int_per_w']:.2f} | {ops} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one small config (the dry run)")
    p.add_argument("--shipped", action="store_true", help="only the tile shapes of the shipped tables")
    p.add_argument("--out", help="also write the table here")
    p.add_argument("--shape", default="4096,2304,768", help="M,N,K the launch is specialized for")
    p.add_argument("--attention", choices=("also", "only", "no"), default="also",
                   help="the attention kernels (mixq.kernels.attention) too, only them, or not")
    args = p.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # an interpreted kernel cannot be compiled
    m, n, k = (int(v) for v in args.shape.split(","))
    results = []
    text = ""
    if args.attention != "only":
        for w_bits, cfg in default_configs(args.quick, args.shipped):
            try:
                r = analyze(w_bits, cfg, m, n, k)
                results.append(r)
                print(f"W{w_bits} {cfg}: regs {r['regs']} spills {r['spill_st']} IGMMA {r['igmma']} "
                      f"loop int ops/weight {r['int_per_w']:.2f} ({r['compile_s']:.1f} s)", flush=True)
            except Exception as e:
                print(f"W{w_bits} {cfg}: static compile failed: {type(e).__name__}: {e}", flush=True)
        text += f"Static sm_90a compile (no GPU; specialized for M,N,K = {m},{n},{k}):\n\n" + markdown(results)
    att = []
    if args.attention != "no":
        for case in attention_cases(args.quick):
            try:
                r = analyze_attention(case)
                att.append(r)
                print(f"attention {r['op']} {r['label']} {r['what']} {r['cfg']}: regs {r['regs']} spills "
                      f"{r['spill_st']} IGMMA {r['igmma']} IMMA {r['imma']} ({r['compile_s']:.1f} s)", flush=True)
            except Exception as e:
                print(f"attention {case[:2]} {case[2]}: static compile failed: {type(e).__name__}: {e}", flush=True)
        text += ("\nStatic sm_90a compile of the attention kernels (mixq.kernels.attention, bf16 out, contiguous "
                 "[B, tokens, D]):\n\n" + attention_markdown(att))
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0 if (results or args.attention == "only") and (att or args.attention == "no") else 1


if __name__ == "__main__":
    sys.exit(main())
