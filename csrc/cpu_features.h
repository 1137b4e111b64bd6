// Run-time CPU feature dispatch of the mixq kernels (kept free of ATen: cheap to compile).
#pragma once

namespace mixq {

// True when the CPU supports AVX2, FMA and F16C (the AVX2 kernels' target).
bool cpu_has_avx2();
// True when the AVX2 kernels run: cpu_has_avx2() and the scalar path was not forced.
bool use_avx2();
// Force the portable scalar path (tests use it to check that path on AVX2 machines);
// MIXQ_CPU_SCALAR=1 in the environment sets it at load time.
void set_force_scalar(bool force);

}  // namespace mixq
