// Freed large outputs of the CPU kernels, kept for the next output of the same size (issue 16).
//
// glibc serves an allocation above 32 MiB (its mmap threshold's ceiling) with a fresh mmap and
// unmaps it on free, so every 16384 x 4096 output is new memory that the Linux kernel zeroes page
// by page on the first write: measured, that costs 1.7 copy times per output and caps any
// out-of-place norm at ~0.42 of copy bandwidth. PyTorch's CUDA allocator caches freed blocks for
// the same reason. This pool does it for this library's own outputs only, within a byte limit:
//
//   - allocate(n): n below kMinBytes goes to torch's CPU allocator (glibc reuses those itself);
//     otherwise the most recently freed cached block of n to n + n/4 bytes, else a new one;
//   - a freed block is cached, the least recently freed blocks going first when the cache would
//     exceed its limit (default 1 GiB; 0 turns the pool off); empty() frees every cached block,
//     and so does an allocation that fails, before it is tried again.
//
// A block handed out again still holds its last tensor's values; the kernels overwrite every
// element of their outputs. The profiler sees each hand-out as an allocation and each return as
// a free, as for torch's own allocator, so memory reports stay what the user's tensors hold.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstddef>
#ifndef _WIN32
#include <pthread.h>
#endif
#include <list>
#include <mutex>
#include <utility>

namespace hf_adanorm {

class OutputPool final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(32) << 20;

  static OutputPool& instance() {
    static OutputPool* pool = create();  // never destroyed: tensors may outlive static destructors
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    Block block{nullptr, 0};
    if (n < kMinBytes || !take(n, block)) return c10::GetDefaultCPUAllocator()->allocate(n);
    if (block.ptr == nullptr) {
      try {
        block = {c10::alloc_cpu(n), n};
      } catch (const c10::Error&) {  // out of memory (ulimit -v, no overcommit): give the cache back first
        empty();
        block = {c10::alloc_cpu(n), n};
      }
    }
    c10::profiledCPUMemoryReporter().New(block.ptr, n);
    return {block.ptr, new Block(block), &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Bytes held in the cache now, and the limit.
  std::pair<size_t, size_t> info() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {cached_, limit_};
  }

  void set_limit(size_t bytes) {
    std::list<Block> dropped;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      limit_ = bytes;
      trim(dropped);
    }
    free_all(dropped);
  }

  void empty() {
    std::list<Block> dropped;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      dropped.swap(blocks_);
      cached_ = 0;
    }
    free_all(dropped);
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  static OutputPool* create() {
    OutputPool* pool = new OutputPool();
#ifndef _WIN32
    // A fork (DataLoader workers) while another thread holds the mutex would leave it locked
    // for good in the child: hold it across the fork, and release it on both sides.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
#endif
    return pool;
  }

  // Under one lock: false if the pool is off (limit 0); else true, with `block` the most recently
  // freed block that fits n with at most a quarter to spare, or left {nullptr, 0} if none does.
  bool take(size_t n, Block& block) {
    std::lock_guard<std::mutex> guard(mutex_);
    if (limit_ == 0) return false;
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      if (it->size >= n && it->size - n <= n / 4) {
        block = *it;
        blocks_.erase(std::next(it).base());
        cached_ -= block.size;
        break;
      }
    }
    return true;
  }

  static void release(void* context) {
    Block* block = static_cast<Block*>(context);
    c10::profiledCPUMemoryReporter().Delete(block->ptr);
    instance().give_back(*block);
    delete block;
  }

  void give_back(Block block) {
    std::list<Block> dropped;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (block.size <= limit_) {
        blocks_.push_back(block);
        cached_ += block.size;
      } else {
        dropped.push_back(block);
      }
      trim(dropped);
    }
    free_all(dropped);
  }

  // Moves the least recently freed blocks to `dropped` until the cache fits its limit.
  void trim(std::list<Block>& dropped) {
    while (cached_ > limit_ && !blocks_.empty()) {
      cached_ -= blocks_.front().size;
      dropped.splice(dropped.end(), blocks_, blocks_.begin());
    }
  }

  static void free_all(std::list<Block>& blocks) {
    for (const Block& block : blocks) c10::free_cpu(block.ptr);
  }

  std::mutex mutex_;
  std::list<Block> blocks_;  // oldest first
  size_t cached_ = 0;
  size_t limit_ = size_t(1) << 30;  // cpu_kernels.py sets it when it loads the library
};

}  // namespace hf_adanorm
