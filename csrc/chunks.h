// Fixed chunks of (B, N) rows processed in parallel: shared by the CPU kernels (fastgrpo_cpu.cpp, matching_cpu.cpp).
// Each chunk's partial result is combined in chunk order, so results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fastgrpo_cpu {

constexpr int64_t CHUNK = 8192;

// Runs fn(job, row, begin, end) for each fixed chunk of each row, in parallel; jobs are row-major.
template <typename Fn>
void for_each_chunk(int64_t batch, int64_t n, const Fn& fn) {
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t row = job / chunks;
      const int64_t begin = row * n + (job % chunks) * CHUNK;
      fn(job, row, begin, std::min(begin + CHUNK, (row + 1) * n));
    }
  });
}

}  // namespace fastgrpo_cpu
