#pragma once
// The safetensors file format (https://github.com/huggingface/safetensors):
//
//   [u64 little-endian N] [N bytes of JSON header] [data buffer]
//
// The header maps each tensor name to {"dtype", "shape", "data_offsets":
// [begin, end]} (offsets into the data buffer) plus an optional
// "__metadata__" object of strings. Safetensors is an in-memory file that was
// validated in full on parse; SafetensorsWriter builds one and writes it
// atomically. Both are independent of the layer: see checkpoint.hpp for that.
//
// Integrity rules (the reference implementation's, made errors here): the
// header is at most 100 MB and starts with '{'; every entry has a known
// dtype, a non-negative shape and offsets whose length is prod(shape) times
// the element size; the tensors cover the data buffer exactly, without holes,
// overlaps or trailing bytes. Duplicate keys, which JSON parsers silently
// merge, and nesting deeper than 128 levels are rejected too.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/core/error.hpp"

namespace moe::io {

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

// First pass over the header: nlohmann::json would keep the last of two equal
// keys and recurse without limit elsewhere, so this SAX pass rejects both
// before the DOM is built. It also reports syntax errors with their position.
class HeaderChecker {
 public:
  static constexpr std::size_t kMaxDepth = 128;  // serde_json's default, as in the reference

  explicit HeaderChecker(std::string where) : where_(std::move(where)) {}

  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(nlohmann::json::number_integer_t) { return true; }
  bool number_unsigned(nlohmann::json::number_unsigned_t) { return true; }
  bool number_float(nlohmann::json::number_float_t, const nlohmann::json::string_t&) {
    return true;
  }
  bool string(nlohmann::json::string_t&) { return true; }
  bool binary(nlohmann::json::binary_t&) { return true; }
  bool start_object(std::size_t) {
    push();
    return true;
  }
  bool key(nlohmann::json::string_t& key) {
    // Only objects receive keys, so the top of the stack is one.
    require(scopes_.back().insert(key).second, where_, ": duplicate key '", key,
            "' in the JSON header (", scopes_.size() == 1 ? "top level" : "nested object", ")");
    return true;
  }
  bool end_object() {
    scopes_.pop_back();
    return true;
  }
  bool start_array(std::size_t) {
    push();
    return true;
  }
  bool end_array() {
    scopes_.pop_back();
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::json::exception& e) {
    throw Error(concat(where_, ": the header is not valid JSON: ", e.what()));
  }

 private:
  void push() {
    require(scopes_.size() < kMaxDepth, where_, ": the JSON header nests deeper than ", kMaxDepth,
            " levels");
    scopes_.emplace_back();
  }

  std::string where_;
  std::vector<std::set<std::string>> scopes_;  // the keys seen in each open object or array
};

}  // namespace detail

// An in-memory safetensors file, validated in full by parse(): afterwards
// every TensorInfo's byte range lies inside the data buffer and matches its
// dtype and shape, so accessors only check what the caller expects.
class Safetensors {
 public:
  static constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;  // the reference's limit

  static Safetensors parse(std::span<const std::byte> bytes) {
    return parse_owned(std::vector<std::byte>(bytes.begin(), bytes.end()),
                       "moe::io::Safetensors (in memory)");
  }

  // Reads the whole file, then parses it; every error names the path.
  static Safetensors read(const std::filesystem::path& path) {
    const std::string where = detail::concat("moe::io::Safetensors '", path.string(), "'");
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error(detail::concat(where, ": cannot open: ", detail::errno_text(errno)));
    std::vector<std::byte> bytes;
    try {
      struct stat st {};
      if (::fstat(fd, &st) != 0)
        throw Error(detail::concat(where, ": cannot stat: ", detail::errno_text(errno)));
      detail::require(S_ISREG(st.st_mode), where, ": not a regular file");
      bytes.resize(static_cast<std::size_t>(st.st_size));
      std::size_t done = 0;
      while (true) {
        if (done == bytes.size()) bytes.resize(bytes.size() + 65536);  // the file grew
        const ::ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw Error(detail::concat(where, ": cannot read: ", detail::errno_text(errno)));
        if (n == 0) break;
        done += static_cast<std::size_t>(n);
      }
      bytes.resize(done);
    } catch (...) {
      ::close(fd);
      throw;
    }
    ::close(fd);
    return parse_owned(std::move(bytes), where);
  }

  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& entry : tensors_) out.push_back(entry.first);
    return out;
  }

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  const TensorInfo& info(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) {
      std::string known;
      for (const auto& entry : tensors_) known += (known.empty() ? "'" : ", '") + entry.first + "'";
      throw Error(detail::concat(where_, ": no tensor named '", name, "' (the file has ",
                                 tensors_.empty() ? "none" : known, ")"));
    }
    return it->second;
  }

  // How errors name the file: "moe::io::Safetensors '<path>'" (read) or
  // "moe::io::Safetensors (in memory)" (parse).
  const std::string& source() const { return where_; }

  // The tensor's bytes as stored (little-endian), e.g. for F16 and BF16.
  std::span<const std::byte> raw(const std::string& name) const {
    const TensorInfo& t = info(name);
    return {bytes_.data() + data_offset_ + t.begin, static_cast<std::size_t>(t.end - t.begin)};
  }

  // The tensor's info after checking that it exists with dtype_of<T>() and
  // the expected shape; each error names the tensor, what it has and what was
  // expected.
  template <class T>
  const TensorInfo& check(const std::string& name,
                          std::span<const std::int64_t> expected_shape) const {
    const TensorInfo& t = info(name);
    detail::require(t.dtype == dtype_of<T>(), where_, ": tensor '", name, "' has dtype ",
                    dtype_name(t.dtype), ", expected ", dtype_name(dtype_of<T>()));
    detail::require(
        std::equal(t.shape.begin(), t.shape.end(), expected_shape.begin(), expected_shape.end()),
        where_, ": tensor '", name, "' has shape ", detail::shape_string(t.shape), ", expected ",
        detail::shape_string(expected_shape));
    return t;
  }
  template <class T>
  const TensorInfo& check(const std::string& name,
                          std::initializer_list<std::int64_t> expected_shape) const {
    return check<T>(name,
                    std::span<const std::int64_t>(expected_shape.begin(), expected_shape.size()));
  }

  // Checks as check<T>() does, then copies the tensor into `out`, which must
  // hold exactly its elements. BOOL bytes other than 0 and 1 are an error
  // (they are no valid bool).
  template <class T>
  void copy_to(const std::string& name, std::span<T> out,
               std::span<const std::int64_t> expected_shape) const {
    static_assert(!std::is_const_v<T>, "moe::io::Safetensors::copy_to: out must be writable");
    const TensorInfo& t = check<T>(name, expected_shape);
    const std::uint64_t n = t.elements();
    detail::require(out.size() == n, where_, ": tensor '", name, "' has ", n,
                    " elements, the output span holds ", out.size());
    const std::byte* src = bytes_.data() + data_offset_ + t.begin;
    if constexpr (std::is_same_v<T, bool>) {
      for (std::size_t i = 0; i < out.size(); ++i) {  // all checked first: out unchanged on error
        const auto b = std::to_integer<unsigned>(src[i]);
        detail::require(b <= 1, where_, ": tensor '", name, "' element ", i, " is byte ", b,
                        ", expected 0 or 1 for BOOL");
      }
      for (std::size_t i = 0; i < out.size(); ++i) out[i] = src[i] == std::byte{1};
    } else {
      detail::copy_little_endian(src, reinterpret_cast<std::byte*>(out.data()), out.size(),
                                 sizeof(T));
    }
  }
  template <class T>
  void copy_to(const std::string& name, std::span<T> out,
               std::initializer_list<std::int64_t> expected_shape) const {
    copy_to<T>(name, out,
               std::span<const std::int64_t>(expected_shape.begin(), expected_shape.size()));
  }

  template <class T>
  std::vector<T> get(const std::string& name, std::span<const std::int64_t> expected_shape) const {
    const auto n = static_cast<std::size_t>(check<T>(name, expected_shape).elements());
    if constexpr (std::is_same_v<T, bool>) {  // vector<bool> has no data()
      auto tmp = std::make_unique<bool[]>(n);
      copy_to<bool>(name, std::span<bool>(tmp.get(), n), expected_shape);
      return std::vector<bool>(tmp.get(), tmp.get() + n);
    } else {
      std::vector<T> out(n);
      copy_to<T>(name, std::span<T>(out), expected_shape);
      return out;
    }
  }
  template <class T>
  std::vector<T> get(const std::string& name,
                     std::initializer_list<std::int64_t> expected_shape) const {
    return get<T>(name,
                  std::span<const std::int64_t>(expected_shape.begin(), expected_shape.size()));
  }

 private:
  using Json = nlohmann::json;

  Safetensors() = default;  // only parse() and read() make one: always validated

  static Safetensors parse_owned(std::vector<std::byte> bytes, std::string where) {
    Safetensors file;
    file.where_ = std::move(where);
    file.bytes_ = std::move(bytes);
    file.parse_header();
    return file;
  }

  void parse_header() {
    const std::string& w = where_;
    const std::uint64_t size = bytes_.size();
    detail::require(size >= 8, w, ": ", size,
                    " bytes, expected at least 8 (the little-endian u64 header length)");
    const std::uint64_t n = detail::load_u64_le(bytes_.data());
    detail::require(n <= kMaxHeaderBytes, w, ": header length ", n, " exceeds the limit of ",
                    kMaxHeaderBytes, " bytes");
    detail::require(n <= size - 8, w, ": header length ", n, " points past the end of the file (",
                    size - 8, " bytes follow the length)");
    const char* text = reinterpret_cast<const char*>(bytes_.data() + 8);
    detail::require(n > 0 && text[0] == '{', w,
                    ": the header does not start with '{' (a JSON object), got ",
                    n == 0 ? std::string("an empty header")
                           : detail::concat("byte ", std::to_integer<unsigned>(bytes_[8])));
    // The spec pads the header with spaces; JSON treats them (and any JSON
    // whitespace) as insignificant.
    Json header;
    try {
      detail::HeaderChecker checker(w);
      Json::sax_parse(text, text + n, &checker);
      header = Json::parse(text, text + n);
    } catch (const Json::exception& e) {  // not expected after the checker's pass
      throw Error(detail::concat(w, ": the header is not valid JSON: ", e.what()));
    }
    detail::require(header.is_object(), w, ": the header is a JSON ", header.type_name(),
                    ", expected an object");

    data_offset_ = 8 + n;
    const std::uint64_t data_size = size - data_offset_;
    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        parse_metadata(value);
      } else {
        TensorInfo t = parse_entry(key, value, data_size);
        tensors_.emplace(key, std::move(t));
      }
    }
    check_coverage(data_size);
  }

  void parse_metadata(const Json& value) {
    detail::require(value.is_object(), where_, ": __metadata__ is a JSON ", value.type_name(),
                    ", expected an object of strings");
    for (const auto& [key, v] : value.items()) {
      detail::require(v.is_string(), where_, ": __metadata__ key '", key, "' has ", v.type_name(),
                      " value ", v.dump(), ", expected a string");
      metadata_.emplace(key, v.get<std::string>());
    }
  }

  // A non-negative JSON integer. nlohmann parses those as unsigned, except
  // "-0", which is a signed zero (and zero all the same).
  std::uint64_t non_negative(const Json& v, const std::string& name, const std::string& field,
                             std::uint64_t max) const {
    const bool is_zero =
        v.is_number_integer() && !v.is_number_unsigned() && v.get<std::int64_t>() == 0;
    detail::require(is_zero || (v.is_number_unsigned() && v.get<std::uint64_t>() <= max), where_,
                    ": tensor '", name, "': ", field, "=", v.dump(),
                    ", expected an integer in [0, ", max, "]");
    return is_zero ? 0 : v.get<std::uint64_t>();
  }

  TensorInfo parse_entry(const std::string& name, const Json& entry,
                         std::uint64_t data_size) const {
    const std::string& w = where_;
    detail::require(entry.is_object(), w, ": tensor '", name, "' is a JSON ", entry.type_name(),
                    ", expected an object with dtype, shape and data_offsets");
    auto field = [&](const char* key) -> const Json& {
      auto it = entry.find(key);
      detail::require(it != entry.end(), w, ": tensor '", name, "' has no \"", key, "\"");
      return *it;
    };
    TensorInfo t;
    t.name = name;

    const Json& dtype = field("dtype");
    detail::require(dtype.is_string(), w, ": tensor '", name, "': dtype=", dtype.dump(),
                    ", expected a string");
    const auto parsed = dtype_from_name(dtype.get_ref<const std::string&>());
    if (!parsed) {
      std::string known;
      for (DType d : kAllDTypes) known += (known.empty() ? "" : ", ") + std::string(dtype_name(d));
      throw Error(detail::concat(w, ": tensor '", name, "' has unknown dtype ", dtype.dump(),
                                 ", expected one of ", known));
    }
    t.dtype = *parsed;

    const Json& shape = field("shape");
    detail::require(shape.is_array(), w, ": tensor '", name, "': shape=", shape.dump(),
                    ", expected an array of integers");
    for (std::size_t i = 0; i < shape.size(); ++i) {
      t.shape.push_back(
          static_cast<std::int64_t>(non_negative(shape[i], name, detail::concat("shape[", i, "]"),
                                                 std::numeric_limits<std::int64_t>::max())));
    }
    // A zero dimension makes the product zero whatever the others are.
    std::optional<std::uint64_t> bytes = dtype_size(t.dtype);
    if (std::find(t.shape.begin(), t.shape.end(), 0) != t.shape.end()) bytes = 0;
    for (std::int64_t dim : t.shape)
      if (bytes) bytes = detail::checked_mul(*bytes, static_cast<std::uint64_t>(dim));
    detail::require(bytes.has_value(), w, ": tensor '", name, "': shape ",
                    detail::shape_string(t.shape), " of dtype ", dtype_name(t.dtype),
                    " needs 2^64 bytes or more (the size overflows)");
    const std::uint64_t expected_bytes = *bytes;

    const Json& offsets = field("data_offsets");
    detail::require(offsets.is_array() && offsets.size() == 2, w, ": tensor '", name,
                    "': data_offsets=", offsets.dump(), ", expected [begin, end]");
    constexpr auto kMax = std::numeric_limits<std::uint64_t>::max();
    t.begin = non_negative(offsets[0], name, "data_offsets[0]", kMax);
    t.end = non_negative(offsets[1], name, "data_offsets[1]", kMax);
    detail::require(t.begin <= t.end, w, ": tensor '", name, "': data_offsets [", t.begin, ", ",
                    t.end, "] begin > end");
    detail::require(t.end <= data_size, w, ": tensor '", name, "': data_offsets [", t.begin, ", ",
                    t.end, "] end past the data buffer of ", data_size, " bytes");
    detail::require(t.end - t.begin == expected_bytes, w, ": tensor '", name, "': data_offsets [",
                    t.begin, ", ", t.end, "] span ", t.end - t.begin, " bytes, expected ",
                    expected_bytes, " for shape ", detail::shape_string(t.shape), " of dtype ",
                    dtype_name(t.dtype));
    return t;
  }

  // The tensors, ordered by offset, must tile [0, data_size) exactly.
  void check_coverage(std::uint64_t data_size) const {
    std::vector<const TensorInfo*> order;
    order.reserve(tensors_.size());
    for (const auto& entry : tensors_) order.push_back(&entry.second);
    std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);
    });
    std::uint64_t covered = 0;
    const TensorInfo* previous = nullptr;
    for (const TensorInfo* t : order) {
      detail::require(t->begin >= covered, where_, ": tensor '", t->name, "' [", t->begin, ", ",
                      t->end, ") overlaps tensor '", previous ? previous->name : "", "' [",
                      previous ? previous->begin : 0, ", ", covered, ")");
      detail::require(t->begin == covered, where_, ": bytes [", covered, ", ", t->begin,
                      ") of the data buffer belong to no tensor (a hole before '", t->name, "')");
      covered = t->end;
      previous = t;
    }
    detail::require(covered == data_size, where_, ": ", data_size - covered,
                    " trailing bytes after the last tensor (the data buffer has ", data_size,
                    " bytes, the tensors cover ", covered, ")");
  }

  std::string where_;
  std::vector<std::byte> bytes_;   // the whole file
  std::uint64_t data_offset_ = 0;  // where the data buffer starts in bytes_
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Builds a safetensors file: tensors are copied (as little-endian bytes) when
// added, so their sources may change afterwards.
class SafetensorsWriter {
 public:
  template <class T>
  void add(std::string name, std::span<const T> data, std::vector<std::int64_t> shape) {
    constexpr const char* w = "moe::io::SafetensorsWriter::add";
    detail::require(name != "__metadata__", w, ": the tensor name '__metadata__' is reserved");
    detail::require(tensors_.count(name) == 0, w, ": duplicate tensor name '", name, "'");
    require_utf8(name, "tensor name");
    std::uint64_t elements = 1;
    for (std::size_t i = 0; i < shape.size(); ++i) {
      detail::require(shape[i] >= 0, w, ": tensor '", name, "': shape[", i, "]=", shape[i],
                      ", expected >= 0");
      const auto product = detail::checked_mul(elements, static_cast<std::uint64_t>(shape[i]));
      detail::require(product.has_value(), w, ": tensor '", name, "': shape ",
                      detail::shape_string(shape), " overflows 64 bits");
      elements = *product;
    }
    detail::require(elements == data.size(), w, ": tensor '", name, "': ", data.size(),
                    " elements, expected ", elements, " for shape ", detail::shape_string(shape));
    Entry e{dtype_of<T>(), std::move(shape), std::vector<std::byte>(data.size() * sizeof(T))};
    detail::copy_little_endian(reinterpret_cast<const std::byte*>(data.data()), e.bytes.data(),
                               data.size(), sizeof(T));
    tensors_.emplace(std::move(name), std::move(e));
  }
  void set_metadata(std::string key, std::string value) {
    require_utf8(key, "metadata key");
    require_utf8(value, "metadata value");
    metadata_[std::move(key)] = std::move(value);
  }

  // The header's layout follows the reference writer: "__metadata__" first
  // (when there is any), then the tensors with the largest elements first
  // and by name, so each tensor is aligned to its element size; the header
  // is padded with spaces so the data starts at a multiple of 8.
  std::vector<std::byte> serialize() const {
    const auto [header, order] = layout();
    std::uint64_t total = header.size();
    for (const auto* entry : order) total += entry->second.bytes.size();
    std::vector<std::byte> out;
    out.reserve(static_cast<std::size_t>(total));
    auto append = [&](const std::byte* p, std::size_t n) { out.insert(out.end(), p, p + n); };
    append(header.data(), header.size());
    for (const auto* entry : order) append(entry->second.bytes.data(), entry->second.bytes.size());
    return out;
  }

  // Atomic: the file is written to a new temporary file in the same
  // directory, flushed to disk and renamed over `path`, so readers see the
  // old file or the new one, never a part. On failure the temporary file is
  // removed and `path` is untouched. POSIX only.
  void write(const std::filesystem::path& path) const {
    const std::string where =
        detail::concat("moe::io::SafetensorsWriter::write: '", path.string(), "'");
    detail::require(path.has_filename(), where, ": the path has no file name");
    const auto [header, order] = layout();
    const std::filesystem::path dir = path.parent_path().empty() ? "." : path.parent_path();

    std::filesystem::path temp;
    int fd = -1;
    static std::atomic<std::uint64_t> counter{0};
    const auto stamp =
        static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    for (int attempt = 0; fd < 0; ++attempt) {
      temp = dir / detail::concat(path.filename().string(), ".tmp-", ::getpid(), "-", ++counter,
                                  "-", stamp % 1000000007);
      // 0666 under the umask, as a file created directly would be.
      fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd < 0 && (errno != EEXIST || attempt >= 100))
        throw Error(detail::concat(where, ": cannot create the temporary file '", temp.string(),
                                   "': ", detail::errno_text(errno)));
    }
    // Every failure after the temporary file exists removes it.
    auto fail = [&](const std::string& what) {
      const int error = errno;
      if (fd >= 0) ::close(fd);
      ::unlink(temp.c_str());
      throw Error(detail::concat(where, ": ", what, ": ", detail::errno_text(error)));
    };
    const std::string temp_name = detail::concat("'", temp.string(), "'");
    auto write_all = [&](const std::byte* p, std::size_t n) {
      while (n > 0) {
        const ::ssize_t done = ::write(fd, p, n);
        if (done < 0 && errno == EINTR) continue;
        if (done < 0) fail("cannot write the temporary file " + temp_name);
        p += done;
        n -= static_cast<std::size_t>(done);
      }
    };
    write_all(header.data(), header.size());
    for (const auto* entry : order)
      write_all(entry->second.bytes.data(), entry->second.bytes.size());
    if (::fsync(fd) != 0) fail("cannot flush the temporary file " + temp_name);
    const int closed = ::close(fd);
    fd = -1;
    if (closed != 0) fail("cannot close the temporary file " + temp_name);
    if (::rename(temp.c_str(), path.c_str()) != 0)
      fail("cannot rename the temporary file " + temp_name + " to it");
    // Make the rename itself durable; a failure here loses nothing written.
    const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd >= 0) {
      (void)::fsync(dir_fd);
      ::close(dir_fd);
    }
  }

 private:
  struct Entry {
    DType dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> bytes;
  };
  using Tensors = std::map<std::string, Entry>;

  // nlohmann::json refuses to dump invalid UTF-8; say which string it was.
  static void require_utf8(const std::string& s, const char* what) {
    try {
      (void)nlohmann::json(s).dump();
    } catch (const nlohmann::json::exception&) {
      throw Error(detail::concat("moe::io::SafetensorsWriter: the ", what,
                                 " is not valid UTF-8 (JSON strings must be)"));
    }
  }

  // The padded header (length prefix included) and the data order.
  std::pair<std::vector<std::byte>, std::vector<const Tensors::value_type*>> layout() const {
    std::vector<const Tensors::value_type*> order;
    order.reserve(tensors_.size());
    for (const auto& entry : tensors_) order.push_back(&entry);
    std::stable_sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
      return dtype_size(a->second.dtype) > dtype_size(b->second.dtype);  // names already sorted
    });

    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const auto* entry : order) {
      const Entry& e = entry->second;
      nlohmann::ordered_json info = nlohmann::ordered_json::object();
      info["dtype"] = dtype_name(e.dtype);
      info["shape"] = e.shape;
      info["data_offsets"] = nlohmann::ordered_json::array({offset, offset + e.bytes.size()});
      header[entry->first] = std::move(info);
      offset += e.bytes.size();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    detail::require(text.size() <= Safetensors::kMaxHeaderBytes,
                    "moe::io::SafetensorsWriter: a header of ", text.size(),
                    " bytes exceeds the limit of ", Safetensors::kMaxHeaderBytes, " bytes");
    std::vector<std::byte> bytes(8 + text.size());
    detail::store_u64_le(text.size(), bytes.data());
    std::memcpy(bytes.data() + 8, text.data(), text.size());
    return {std::move(bytes), std::move(order)};
  }

  Tensors tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moe::io
