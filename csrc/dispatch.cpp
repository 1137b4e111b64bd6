// Run-time choice between the VNNI, AVX2 + FMA and portable scalar kernels.
#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace mixq {

namespace {
int initial_cap() {
  const char* scalar = std::getenv("MIXQ_CPU_SCALAR");
  if (scalar != nullptr && std::strcmp(scalar, "1") == 0) return static_cast<int>(Isa::kScalar);
  const char* isa = std::getenv("MIXQ_CPU_ISA");
  if (isa != nullptr) {
    if (std::strcmp(isa, "scalar") == 0) return static_cast<int>(Isa::kScalar);
    if (std::strcmp(isa, "avx2") == 0) return static_cast<int>(Isa::kAvx2);
  }
  return static_cast<int>(Isa::kVnni);
}
std::atomic<int> g_cap{initial_cap()};
}  // namespace

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

bool cpu_has_vnni() {
#if defined(__x86_64__)
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512vnni") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

Isa active_isa() {
  const int cap = g_cap.load(std::memory_order_relaxed);
  const int best = cpu_has_vnni() ? 2 : (cpu_has_avx2() ? 1 : 0);
  return static_cast<Isa>(cap < best ? cap : best);
}

bool use_avx2() { return active_isa() >= Isa::kAvx2; }

void set_max_isa(Isa isa) { g_cap.store(static_cast<int>(isa), std::memory_order_relaxed); }

void set_force_scalar(bool force) { set_max_isa(force ? Isa::kScalar : Isa::kVnni); }

const char* kernel_path_name() {
  switch (active_isa()) {
    case Isa::kVnni: return "vnni";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace mixq
