#pragma once
// What lets a backward trust its cache: the layer that filled it and the
// version of that layer's parameters its forward saw. Both are numbers from
// one counter for the whole program, so no two layers, and no two versions
// of one layer's parameters, ever share one.

#include <atomic>
#include <cstdint>

namespace moe::detail {

inline std::uint64_t next_layer_number() noexcept {
  static std::atomic<std::uint64_t> counter{0};
  return ++counter;
}

// A layer's identity: a copy or a moved-to layer is a new layer (with its
// own caches); an assigned-to layer keeps its own, and its parameters'
// version changes instead.
class LayerId {
 public:
  LayerId() noexcept : value_(next_layer_number()) {}
  LayerId(const LayerId&) noexcept : value_(next_layer_number()) {}
  LayerId& operator=(const LayerId&) noexcept { return *this; }
  std::uint64_t value() const noexcept { return value_; }

 private:
  std::uint64_t value_;
};

// The parameters' version: new whenever they may have changed (taken for
// writing, initialised, or the layer copied, moved or assigned to).
class ParametersVersion {
 public:
  ParametersVersion() noexcept : value_(next_layer_number()) {}
  ParametersVersion(const ParametersVersion&) noexcept : value_(next_layer_number()) {}
  ParametersVersion& operator=(const ParametersVersion&) noexcept {
    renew();
    return *this;
  }
  void renew() noexcept { value_ = next_layer_number(); }
  std::uint64_t value() const noexcept { return value_; }

 private:
  std::uint64_t value_;
};

}  // namespace moe::detail
