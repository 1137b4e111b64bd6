// Run-time CPU feature dispatch of the mixq kernels (kept free of ATen: cheap to compile).
#pragma once

namespace mixq {

// Kernel families, in order of preference. Each is compiled per function (target attribute)
// and used only when the CPU reports its features, so the extension loads on any x86-64.
enum class Isa : int {
  kScalar = 0,  // portable C++
  kAvx2 = 1,    // AVX2 + FMA + F16C: maddubs-based int8 kernels
  kVnni = 2,    // AVX-512 VNNI on 256-bit vectors (avx512vnni + avx512vl + avx512bw): vpdpbusd
};

// True when the CPU supports AVX2, FMA and F16C (the AVX2 kernels' target).
bool cpu_has_avx2();
// True when the CPU supports AVX-512 VNNI with VL and BW (the VNNI kernels' target).
bool cpu_has_vnni();
// The family the kernels use now: the best the CPU supports, capped by set_max_isa.
Isa active_isa();
// True when the AVX2 (or better) kernels run.
bool use_avx2();
// Cap the kernel family (tests check every path on one machine); MIXQ_CPU_ISA=scalar|avx2|vnni
// in the environment sets the cap at load time (MIXQ_CPU_SCALAR=1 = scalar, kept for old scripts).
void set_max_isa(Isa isa);
// Force the portable scalar path (true) or lift every cap (false).
void set_force_scalar(bool force);
// "vnni", "avx2" or "scalar": the family in use.
const char* kernel_path_name();

}  // namespace mixq
