// Output tensors of map size allocated on transparent huge pages (issue 12).
//
// glibc serves an allocation above its mmap threshold (at most 32 MiB) with a fresh mmap, so every training step
// pays one page fault per 4 KiB page of each large output on first touch: 17 ms for a 51 MB float32 gradient at
// 32×512×28×28 on the CI machine class (1.4 µs per fault), more than the kernel's own work on it. Memory
// aligned to 2 MiB and marked MADV_HUGEPAGE faults once per 2 MiB instead (the same as PyTorch's opt-in
// THP_MEM_ALLOC_ENABLE=1, here only for these outputs). Smaller tensors, and platforms without madvise, use
// at::empty. The tensor owns its memory (freed by its storage's deleter) and is otherwise an ordinary CPU tensor.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastexplain {

constexpr int64_t kHugePage = int64_t(2) << 20;
constexpr int64_t kLargeOutputBytes = int64_t(8) << 20;

// A contiguous tensor of the given sizes and options (dtype, CPU device).
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (bytes >= kLargeOutputBytes && options.device().is_cpu()) {
    const int64_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* memory = nullptr;
    if (posix_memalign(&memory, static_cast<size_t>(kHugePage), static_cast<size_t>(rounded)) == 0) {
      madvise(memory, static_cast<size_t>(rounded), MADV_HUGEPAGE);  // advice only: ignored where THP is off
      return at::from_blob(memory, sizes, [](void* p) { std::free(p); }, options.memory_format(std::nullopt));
    }
  }
#endif
  return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace fastexplain
