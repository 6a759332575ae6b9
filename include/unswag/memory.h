// Measuring memory the way the allocator sees it, on CPU and CUDA: how many
// bytes live tensors hold now and at peak. On CPU UnSwag installs a counting
// wrapper around LibTorch's CPU allocator (track_cpu_memory()); on CUDA it
// reads the caching allocator's own counters. Used by tests (saved bytes of a
// block under each policy) and by the demo.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>

namespace unswag {

// Installs the counting CPU allocator (idempotent). Tensors allocated before
// the call are not counted, and their release is not subtracted.
void track_cpu_memory();

// Bytes held by live tensors on `device` (CPU needs track_cpu_memory()).
int64_t allocated_bytes(const c10::Device& device);
// Peak of allocated_bytes since the last reset_peak_bytes(device).
int64_t peak_allocated_bytes(const c10::Device& device);
void reset_peak_bytes(const c10::Device& device);

}  // namespace unswag
