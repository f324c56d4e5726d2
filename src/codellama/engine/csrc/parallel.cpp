#include "parallel.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <vector>

namespace {

thread_local int running_part = 0;  // pool_part()

constexpr int kSpin = 1 << 15;  // pause instructions before a worker sleeps (~1 ms)

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { work(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return int(workers_.size()) + 1; }

  // Every worker takes part in every loop (an empty part when n is small), so none can still be reading
  // this loop's fn_/n_ when the next one starts.
  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    fn_ = &fn, n_ = n;
    pending_.store(int(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(mutex_);  // a worker about to sleep re-checks generation under it
      if (sleeping_) wake_.notify_all();
    }
    part(0);
    while (pending_.load(std::memory_order_acquire)) _mm_pause();
  }

 private:
  void part(int i) {
    running_part = i;
    const int64_t parts = size(), chunk = (n_ + parts - 1) / parts, begin = i * chunk;
    const int64_t end = std::min(n_, begin + chunk);
    if (begin < end) (*fn_)(begin, end);
  }

  void work(int i) {
    uint64_t seen = 0;
    for (;;) {
      for (int s = 0; s < kSpin && generation_.load(std::memory_order_acquire) == seen; ++s) _mm_pause();
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleeping_;
        wake_.wait(lock, [&] { return stop_ || generation_.load(std::memory_order_acquire) != seen; });
        --sleeping_;
        if (stop_) return;
      }
      seen = generation_.load(std::memory_order_acquire);
      part(i);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::mutex mutex_;
  std::condition_variable wake_;
  int sleeping_ = 0;
  bool stop_ = false;
};

std::mutex pool_mutex;  // one loop at a time uses the pool
std::unique_ptr<Pool> pool;
thread_local bool inside = false;

// A forked child has none of the pool's threads: forget the pool (not destroyed: its threads cannot be
// joined there), so the child's first loop starts a new one instead of waiting forever.
const bool fork_handler = [] {
  pthread_atfork(nullptr, nullptr, [] { (void)pool.release(); });
  return true;
}();

}  // namespace

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int threads = at::get_num_threads();
  std::unique_lock<std::mutex> lock(pool_mutex, std::try_to_lock);
  if (threads <= 1 || n < 2 * grain || inside || !lock.owns_lock()) {
    fn(0, n);
    return;
  }
  if (!pool || pool->size() != threads) pool = std::make_unique<Pool>(threads);  // torch's thread count
  inside = true;
  pool->run(n, fn);
  inside = false;
}

int pool_part() { return running_part; }
