// The one parallel-for of the CPU kernels.
//
// An exception that leaves a worker of torch's thread pool aborts the whole
// process ("terminate called after throwing ..."). fastvision::parallel_for
// catches the first exception thrown by `fn` in any worker, lets the other
// workers skip the ranges they have not started, and rethrows it on the
// calling thread after the loop. A std::bad_alloc (or std::length_error) from
// per-thread scratch becomes OutOfMemory naming the op. Use it instead of
// torch::stable::parallel_for everywhere.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>

#include "check.h"

namespace fastvision {

namespace detail {
[[noreturn]] inline void rethrow_from_worker(const char* op, std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const OutOfMemory&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw OutOfMemory(std::string("fastvision.") + op + ": out of memory allocating per-thread scratch");
  } catch (const std::length_error&) {
    throw OutOfMemory(std::string("fastvision.") + op + ": out of memory allocating per-thread scratch");
  }
}
}  // namespace detail

// fn(begin, end) over [begin, end) in parallel, chunks of at least `grain`.
template <typename F>
void parallel_for(const char* op, int64_t begin, int64_t end, int64_t grain, const F& fn) {
  if (begin >= end) return;
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  std::mutex mutex;
  auto guarded = [&](int64_t b, int64_t e) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      fn(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  };
  try {
    torch::stable::parallel_for(begin, end, grain, guarded);
  } catch (const std::exception&) {
    // torch could not run the loop at all (its message names a header path).
    if (!error)
      throw std::runtime_error(std::string("fastvision.") + op + ": torch's parallel_for failed to run");
  }
  if (error) detail::rethrow_from_worker(op, error);
}

}  // namespace fastvision
