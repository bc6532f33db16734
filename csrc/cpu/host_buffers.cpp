#include "sdml/host_buffers.h"

#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

namespace sdml {
namespace {

constexpr size_t kMinBytes = size_t(4) << 20;  // below this torch's allocator is cheap enough
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMaxCachedBlocks = 4;
constexpr size_t kMaxCachedBytes = size_t(1) << 30;

struct Block {
  void* ptr;
  size_t bytes;
};

class BlockCache {
 public:
  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Best fit among blocks at most twice the request, so a small tensor never pins a huge block.
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t b = free_[i].bytes;
        if (b >= bytes && b <= 2 * bytes && (best == free_.size() || b < free_[best].bytes)) best = i;
      }
      if (best != free_.size()) {
        const Block block = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_bytes_ -= block.bytes;
        return block;
      }
    }
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = std::aligned_alloc(kHugePage, rounded);
    if (ptr == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(ptr, rounded, MADV_HUGEPAGE);  // advice only: failure just means 4 KiB pages
#endif
    return {ptr, rounded};
  }

  void give(Block block) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (free_.size() < kMaxCachedBlocks && cached_bytes_ + block.bytes <= kMaxCachedBytes) {
        free_.push_back(block);
        cached_bytes_ += block.bytes;
        return;
      }
    }
    std::free(block.ptr);
  }

  size_t release() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_bytes_ = 0;
    }
    size_t bytes = 0;
    for (const Block& b : blocks) {
      bytes += b.bytes;
      std::free(b.ptr);
    }
    return bytes;
  }

 private:
  std::mutex mutex_;
  std::vector<Block> free_;
  size_t cached_bytes_ = 0;
};

BlockCache& cache() {
  static BlockCache* instance = new BlockCache();  // never destroyed: tensors may outlive statics
  return *instance;
}

}  // namespace

at::Tensor empty_large_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kMinBytes) return at::empty(sizes, options);
  const Block block = cache().take(bytes);
  return at::from_blob(block.ptr, sizes, [block](void*) { cache().give(block); }, options);
}

size_t release_cached_host_buffers() { return cache().release(); }

}  // namespace sdml
