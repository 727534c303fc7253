// The kernels' big buffers ([B, T, *]: projections, saved gates and states, gradients) come from
// a pool that keeps freed blocks mapped. glibc gives blocks this big back to the OS when they are
// freed (an mmap of their own, or a trimmed heap top), so without the pool every call page-faults
// its buffers afresh: about 1,000 to 2,000 faults per training step at (32, 80, 100, 64), each of
// which zeroes a page. Blocks are matched best-fit, at most twice the request; at most
// kIdleLimit bytes stay idle, anything beyond goes back to the OS at once. The tensors are plain
// CPU tensors (the pool is their storage's allocator, so resizing them works as usual).
#pragma once

#include <torch/types.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

namespace buffer_pool {

constexpr size_t kMinBytes = size_t(1) << 16;  // smaller ones stay on glibc's free lists anyway
constexpr size_t kIdleLimit = size_t(256) << 20;
constexpr size_t kPage = 4096;

class Pool final : public c10::Allocator {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool;  // never destroyed: tensors may be freed during static destruction
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kPage - 1) / kPage * kPage;
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.lower_bound(bytes);
      if (it != idle_.end() && it->first <= 2 * bytes) {
        block = it->second;
        idle_bytes_ -= block->bytes;
        idle_.erase(it);
        ++reused_;
      }
    }
    if (!block) block = new Block{c10::alloc_cpu(bytes), bytes};
    return {block->ptr, block, &Pool::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every idle block; returns the bytes given back.
  int64_t clear() {
    std::multimap<size_t, Block*> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    int64_t freed = 0;
    for (auto& entry : idle) {
      freed += int64_t(entry.second->bytes);
      discard(entry.second);
    }
    return freed;
  }

  // (idle bytes, idle blocks, allocations served from the pool so far)
  std::tuple<int64_t, int64_t, int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(idle_bytes_), int64_t(idle_.size()), reused_};
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    Pool& pool = instance();
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      if (pool.idle_bytes_ + block->bytes <= kIdleLimit) {
        pool.idle_.emplace(block->bytes, block);
        pool.idle_bytes_ += block->bytes;
        return;
      }
    }
    discard(block);
  }

  static void discard(Block* block) {
    c10::free_cpu(block->ptr);
    delete block;
  }

  std::mutex mutex_;
  std::multimap<size_t, Block*> idle_;  // by size
  size_t idle_bytes_ = 0;
  int64_t reused_ = 0;
};

// torch::empty on the pool (CPU, contiguous)
inline torch::Tensor empty(at::IntArrayRef sizes, const torch::TensorOptions& opts) {
  return at::detail::empty_generic(sizes, &Pool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()), c10::nullopt);
}

// t itself when contiguous, else a contiguous copy on the pool
inline torch::Tensor contiguous(const torch::Tensor& t) {
  if (t.is_contiguous()) return t;
  return empty(t.sizes(), t.options()).copy_(t);
}

}  // namespace buffer_pool
