// Software prefetch for a decode kernel's weight stream.
//
// A decode GEMV reads each weight once, front to back, and the hardware prefetchers usually
// keep up. Where they did not, an explicit prefetch into L2 a fixed distance ahead helped:
// looplm's AVX2 bf16 GEMV (each bf16 weight widened to fp32 before its FMA) decoded Ouro-1.4B
// 1.2-1.4x faster with it (2-core Zen 4 VM, AVX2 kernels forced, two A/B runs in one
// process each), and on a real AVX2-only Zen 3 the int4 AVX2 kernel streamed 1.11-1.20x
// faster with it (2-16 KiB ahead, one UT step of Ouro-1.4B's 168 projections, 11 interleaved
// rounds in one process), the int8 AVX2 kernel 1.03-1.11x (two runs of 9 rounds; on the Zen 4
// with AVX2 forced it had lost up to 11%). Elsewhere it did not pay and is not used: the
// AVX-512 BF16 GEMV got about 10% slower, the VNNI integer kernels gained 1-3%. 8-24 KiB ahead
// did about as well as each other. A prefetch past the end of a thread's rows fetches lines
// another thread (or nobody) reads; it never faults.

#pragma once

#include <immintrin.h>

#include <cstdint>

namespace looplm {

// Bytes ahead (default 16 KiB); 0 turns prefetching off, so a benchmark can compare both in
// one process. Set by the extension's set_prefetch_bytes; defined in gemv.cpp. Kernels copy
// it to a local once per call.
extern int64_t prefetch_bytes;

// Call once per 64 bytes of the stream, with the address about to be loaded.
inline void prefetch_ahead(const void* p, int64_t ahead) {
  if (ahead) _mm_prefetch(static_cast<const char*>(p) + ahead, _MM_HINT_T1);
}

}  // namespace looplm
