#pragma once
// The safetensors format's vocabulary (Hugging Face's tensor file format):
// dtypes and their sizes, TensorInfo and the little-endian byte helpers.
// reader.hpp and writer.hpp use them; safetensors.hpp includes all three.

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

#include "moe/core/error.hpp"

namespace moe::io {

// The largest JSON header a file may have (the reference implementation's limit).
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

enum class DType { BOOL, U8, I8, U16, I16, F16, BF16, U32, I32, F32, U64, I64, F64 };

inline constexpr DType kAllDTypes[] = {DType::BOOL, DType::U8,   DType::I8,  DType::U16, DType::I16,
                                       DType::F16,  DType::BF16, DType::U32, DType::I32, DType::F32,
                                       DType::U64,  DType::I64,  DType::F64};

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::BOOL:
      return "BOOL";
    case DType::U8:
      return "U8";
    case DType::I8:
      return "I8";
    case DType::U16:
      return "U16";
    case DType::I16:
      return "I16";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::U32:
      return "U32";
    case DType::I32:
      return "I32";
    case DType::F32:
      return "F32";
    case DType::U64:
      return "U64";
    case DType::I64:
      return "I64";
    case DType::F64:
      return "F64";
  }
  return "?";
}

// Bytes per element.
inline std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::BOOL:
    case DType::U8:
    case DType::I8:
      return 1;
    case DType::U16:
    case DType::I16:
    case DType::F16:
    case DType::BF16:
      return 2;
    case DType::U32:
    case DType::I32:
    case DType::F32:
      return 4;
    case DType::U64:
    case DType::I64:
    case DType::F64:
      return 8;
  }
  return 0;
}

inline std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType d : kAllDTypes)
    if (name == dtype_name(d)) return d;
  return std::nullopt;
}

namespace detail {
// So that detail::require and detail::concat mean moe's inside moe::io too.
using moe::detail::concat;
using moe::detail::require;

template <class>
inline constexpr bool kAlwaysFalse = false;
}  // namespace detail

// The dtype a C++ element type is stored as. F16 and BF16 have no C++20 type:
// read them with Safetensors::raw().
template <class T>
constexpr DType dtype_of() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, bool>) {
    static_assert(sizeof(bool) == 1, "BOOL is one byte per element");
    return DType::BOOL;
  } else if constexpr (std::is_same_v<U, float>) {
    static_assert(std::numeric_limits<float>::is_iec559 && sizeof(float) == 4);
    return DType::F32;
  } else if constexpr (std::is_same_v<U, double>) {
    static_assert(std::numeric_limits<double>::is_iec559 && sizeof(double) == 8);
    return DType::F64;
  } else if constexpr (std::is_integral_v<U> && !std::is_same_v<U, char> &&
                       !std::is_same_v<U, wchar_t> && !std::is_same_v<U, char8_t> &&
                       !std::is_same_v<U, char16_t> && !std::is_same_v<U, char32_t>) {
    // By width and signedness, so that long and long long both map to I64.
    constexpr bool s = std::is_signed_v<U>;
    if constexpr (sizeof(U) == 1)
      return s ? DType::I8 : DType::U8;
    else if constexpr (sizeof(U) == 2)
      return s ? DType::I16 : DType::U16;
    else if constexpr (sizeof(U) == 4)
      return s ? DType::I32 : DType::U32;
    else if constexpr (sizeof(U) == 8)
      return s ? DType::I64 : DType::U64;
    else
      static_assert(detail::kAlwaysFalse<T>, "moe::io::dtype_of: no dtype of this width");
  } else {
    static_assert(detail::kAlwaysFalse<T>,
                  "moe::io::dtype_of: T must be bool, float, double or a fixed-width integer "
                  "(plain char's signedness is platform-defined: use int8_t or uint8_t)");
  }
}

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  // byte range in the data buffer

  std::uint64_t elements() const { return (end - begin) / dtype_size(dtype); }
};

namespace detail {

static_assert(std::endian::native == std::endian::little || std::endian::native == std::endian::big,
              "moe::io: mixed-endian hosts are not supported");

// The file is little-endian: a plain copy on little-endian hosts, each
// element's bytes reversed on big-endian ones. The same operation converts
// in both directions. Byte-wise, so neither pointer needs alignment.
inline void copy_little_endian(const std::byte* src, std::byte* dst, std::size_t elements,
                               std::size_t element_size) {
  if (elements == 0) return;
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(dst, src, elements * element_size);
  } else {
    for (std::size_t i = 0; i < elements; ++i)
      for (std::size_t b = 0; b < element_size; ++b)
        dst[i * element_size + b] = src[i * element_size + element_size - 1 - b];
  }
}

inline std::uint64_t load_u64_le(const std::byte* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | std::to_integer<std::uint64_t>(p[i]);
  return v;
}

inline void store_u64_le(std::uint64_t v, std::byte* p) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xFF);
}

// a * b, or nullopt when it does not fit in 64 bits.
inline std::optional<std::uint64_t> checked_mul(std::uint64_t a, std::uint64_t b) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return std::nullopt;
  return a * b;
}

template <class Int>
std::string shape_string(std::span<const Int> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  return shape_string(std::span<const std::int64_t>(shape));
}

inline std::string errno_text(int error) { return std::generic_category().message(error); }

}  // namespace detail

}  // namespace moe::io
