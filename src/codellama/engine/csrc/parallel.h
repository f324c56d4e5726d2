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

// Run fn(begin, end) over [0, n) split in at::get_num_threads() contiguous parts; the calling thread runs
// the first. Serial when n < 2 * grain, when called from inside a loop, or while another thread's loop runs.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);
