// Run-time choice between the AVX2 + FMA kernels and the portable scalar path.
#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace mixq {

namespace {
std::atomic<bool> g_force_scalar{[] {
  const char* env = std::getenv("MIXQ_CPU_SCALAR");
  return env != nullptr && std::strcmp(env, "1") == 0;
}()};
}  // namespace

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

bool use_avx2() { return cpu_has_avx2() && !g_force_scalar.load(std::memory_order_relaxed); }

void set_force_scalar(bool force) { g_force_scalar.store(force, std::memory_order_relaxed); }

}  // namespace mixq
