// A small thread pool for the kernels' parallel loops, in place of at::parallel_for (OpenMP).
//
// A decode step makes ~150 short parallel loops (a few tens of microseconds each). OpenMP workers sleep
// between loops whenever the process has more OpenMP threads than cores, which is the case as soon as a
// second Python thread (the server's engine thread) runs torch: every loop then pays a futex wake-up,
// and a decode step took twice as long on the engine thread as on the main thread. These workers spin
// for about a millisecond before sleeping, so the loops of one step find them awake.
#pragma once
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

// Run fn(begin, end) over [0, n) split in at::get_num_threads() contiguous parts; the calling thread runs
// the first. Serial when n < 2 * grain, when called from inside a loop, or while another thread's loop runs.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
// The part of the running parallel_for loop the calling thread runs: part i of every loop runs on the same
// thread (0: the caller's), so what one loop's part i pulls into cache, the next loop's part i finds there
int pool_part();

// Ranges of memory one thread pulls into L2 a few lines at a time, beside work of its own (SidePull)
struct PullLines {
  std::vector<std::pair<const char*, int64_t>> ranges;  // start, bytes
  int64_t per_step = 0;  // lines each step() pulls: spread(steps) sets it
  size_t range = 0;
  int64_t offset = 0;

  int64_t lines() const {
    int64_t n = 0;
    for (const auto& r : ranges) n += (r.second + 63) / 64;
    return n;
  }
  // Put one line of each 4 KB page first, then all of it: on CPUs whose prefetches walk the page tables
  // (AMD Zen 4 here), lines pulled in order waited in turn for their page's walk; the walks then overlap
  void pages_first() {
    std::vector<std::pair<const char*, int64_t>> firsts;
    for (const auto& [start, bytes] : ranges) {
      const uintptr_t end = reinterpret_cast<uintptr_t>(start) + bytes;
      for (uintptr_t a = reinterpret_cast<uintptr_t>(start); a < end; a = (a & ~uintptr_t(4095)) + 4096)
        firsts.emplace_back(reinterpret_cast<const char*>(a), 64);
    }
    ranges.insert(ranges.begin(), firsts.begin(), firsts.end());
  }
  // pull all of it in about `steps` calls of step()
  void spread(int64_t steps) { per_step = steps > 0 ? (lines() + steps - 1) / steps : lines(); }
  // the next per_step lines (prefetcht1 written out: GCC 12 deleted loops of _mm_prefetch as doing nothing)
  void step() {
    for (int64_t i = 0; i < per_step && range < ranges.size(); ++i) {
      asm volatile("prefetcht1 %0" : : "m"(ranges[range].first[offset]));
      if ((offset += 64) >= ranges[range].second) ++range, offset = 0;
    }
  }
};
// What each part of a loop pulls: [i] for part i (pool_part)
using SidePull = std::vector<PullLines>;
