// Allocator-level memory accounting (include/unswag/memory.h): a counting
// wrapper around LibTorch's CPU allocator, and the CUDA caching allocator's
// counters.
#include "unswag/memory.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <unordered_map>

#ifdef UNSWAG_WITH_CUDA
namespace unswag::ops {
int64_t cuda_allocated_bytes(int device);
int64_t cuda_peak_allocated_bytes(int device);
void cuda_reset_peak(int device);
}  // namespace unswag::ops
#endif

namespace unswag {
namespace {

// Wraps the default CPU allocator. The context of each DataPtr is its data
// pointer (as raw_allocate() requires), and the sizes live in a side table.
class CountingCPUAllocator final : public c10::Allocator {
 public:
  explicit CountingCPUAllocator(c10::Allocator* base) : base_(base), base_free_(base->raw_deleter()) {
    TORCH_CHECK(base_free_ != nullptr, "unswag::track_cpu_memory: the CPU allocator has no raw deleter");
  }

  c10::DataPtr allocate(size_t nbytes) override {
    c10::DataPtr inner = base_->allocate(nbytes);
    void* data = inner.get();
    TORCH_INTERNAL_ASSERT(data == inner.get_context(), "unswag: unexpected CPU allocator layout");
    inner.release_context();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sizes_[data] = nbytes;
      live_ += int64_t(nbytes);
      peak_ = std::max(peak_, live_);
    }
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  int64_t live() {
    std::lock_guard<std::mutex> lock(mutex_);
    return live_;
  }
  int64_t peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    return peak_;
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    peak_ = live_;
  }

 private:
  static void release(void* data);
  c10::Allocator* base_;
  c10::DeleterFnPtr base_free_;
  std::mutex mutex_;
  std::unordered_map<void*, size_t> sizes_;
  int64_t live_ = 0, peak_ = 0;
  friend CountingCPUAllocator* counting_allocator();
};

CountingCPUAllocator* g_counting = nullptr;

void CountingCPUAllocator::release(void* data) {
  if (data == nullptr) return;
  CountingCPUAllocator* self = g_counting;
  {
    std::lock_guard<std::mutex> lock(self->mutex_);
    auto it = self->sizes_.find(data);
    if (it != self->sizes_.end()) {
      self->live_ -= int64_t(it->second);
      self->sizes_.erase(it);
    }
  }
  self->base_free_(data);
}

CountingCPUAllocator* counting_allocator() {
  static CountingCPUAllocator* alloc = [] {
    // Leaked on purpose: tensors may outlive static destruction.
    g_counting = new CountingCPUAllocator(c10::GetCPUAllocator());
    c10::SetCPUAllocator(g_counting, /*priority=*/100);
    return g_counting;
  }();
  return alloc;
}

}  // namespace

void track_cpu_memory() { counting_allocator(); }

int64_t allocated_bytes(const c10::Device& device) {
  if (device.is_cpu()) return counting_allocator()->live();
#ifdef UNSWAG_WITH_CUDA
  if (device.is_cuda()) return ops::cuda_allocated_bytes(device.has_index() ? device.index() : 0);
#endif
  TORCH_CHECK(false, "unswag::allocated_bytes: unsupported device ", device);
}

int64_t peak_allocated_bytes(const c10::Device& device) {
  if (device.is_cpu()) return counting_allocator()->peak();
#ifdef UNSWAG_WITH_CUDA
  if (device.is_cuda()) return ops::cuda_peak_allocated_bytes(device.has_index() ? device.index() : 0);
#endif
  TORCH_CHECK(false, "unswag::peak_allocated_bytes: unsupported device ", device);
}

void reset_peak_bytes(const c10::Device& device) {
  if (device.is_cpu()) return counting_allocator()->reset_peak();
#ifdef UNSWAG_WITH_CUDA
  if (device.is_cuda()) return ops::cuda_reset_peak(device.has_index() ? device.index() : 0);
#endif
  TORCH_CHECK(false, "unswag::reset_peak_bytes: unsupported device ", device);
}

}  // namespace unswag
