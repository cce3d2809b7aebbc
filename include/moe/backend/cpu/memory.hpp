#pragma once
// Host memory for the CPU backend's parameters, gradients and state: blocks
// of 2 MiB and more are aligned to 2 MiB and offered to Linux's transparent
// huge pages (madvise), smaller ones come from operator new.
//
// Why: decode reads each active expert's weights once from DRAM, and on 4 KiB
// pages every page is a TLB miss and a fresh start for the hardware
// prefetcher. On huge pages the skinny kernel streams weights 10 to 15%
// faster (bench/README.md, "Decode"). Where THP is off ("never") the advice
// is ignored and the pages stay 4 KiB.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory_resource>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace moe::cpu {

class HugePageResource final : public std::pmr::memory_resource {
 public:
  static constexpr std::size_t kHugePage = std::size_t{2} << 20;

  // The one instance (resources compare equal by identity). Never
  // destroyed, like std::pmr::new_delete_resource(): buffers that outlive
  // static destruction may still give their memory back.
  static HugePageResource* instance() {
    static auto* const resource = new HugePageResource;
    return resource;
  }

 private:
  static bool huge(std::size_t bytes) { return bytes >= kHugePage; }
  static std::align_val_t huge_alignment(std::size_t alignment) {
    return std::align_val_t{std::max(alignment, kHugePage)};
  }

  void* do_allocate(std::size_t bytes, std::size_t alignment) override {
    if (!huge(bytes)) return ::operator new (bytes, std::align_val_t{alignment});
    if (bytes > SIZE_MAX - kHugePage) throw std::bad_alloc();
    // A whole number of huge pages, so that no other allocation shares one.
    const std::size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = ::operator new(rounded, huge_alignment(alignment));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)::madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure keeps 4 KiB pages
#endif
    return p;
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment) override {
    ::operator delete (p, huge(bytes) ? huge_alignment(alignment) : std::align_val_t{alignment});
  }
  bool do_is_equal(const std::pmr::memory_resource& other) const noexcept override {
    return this == &other;
  }
};

}  // namespace moe::cpu
