#pragma once
// Safetensors: an in-memory safetensors file, read from a path or parsed from
// bytes and validated in full (see safetensors.hpp for the rules).

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <map>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/core/error.hpp"
#include "moe/io/format.hpp"
#include "moe/io/header_checker.hpp"

namespace moe::io {

namespace detail {

// The most bytes one in-memory buffer may take: the machine's physical
// memory (where sysconf knows it), and size_t's range.
inline std::uint64_t memory_limit() {
  std::uint64_t limit = std::numeric_limits<std::size_t>::max();
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) {
    const auto total =
        checked_mul(static_cast<std::uint64_t>(pages), static_cast<std::uint64_t>(page));
    if (total && *total < limit) limit = *total;
  }
  return limit;
}

// Closes a file descriptor on every way out of a scope.
struct FdCloser {
  int fd;
  ~FdCloser() { ::close(fd); }
};

}  // namespace detail

// An in-memory safetensors file, validated in full by parse(): afterwards
// every TensorInfo's byte range lies inside the data buffer and matches its
// dtype and shape, so accessors only check what the caller expects. Only the
// data buffer is kept: the header's bytes are dropped once parsed.
class Safetensors {
 public:
  static constexpr std::uint64_t kMaxHeaderBytes = io::kMaxHeaderBytes;

  static Safetensors parse(std::span<const std::byte> bytes) {
    Safetensors file;
    file.where_ = "moe::io::Safetensors (in memory)";
    const std::uint64_t data_offset = file.parse_header(bytes, bytes.size());
    const auto data = bytes.subspan(static_cast<std::size_t>(data_offset));
    file.data_.assign(data.begin(), data.end());
    return file;
  }

  // Reads and checks the header first, then the data; every error names the
  // path. The file's type is checked before it is opened (opening a FIFO
  // would block until a writer came), and a file whose header does not fit
  // its size is refused before its data is read or allocated; so is a data
  // buffer larger than the machine's memory.
  static Safetensors read(const std::filesystem::path& path) {
    const std::string where = detail::concat("moe::io::Safetensors '", path.string(), "'");
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0)
      throw Error(detail::concat(where, ": cannot stat: ", detail::errno_text(errno)));
    detail::require(S_ISREG(st.st_mode), where, ": not a regular file");
    // O_NONBLOCK: should the path have become a FIFO since the stat, open
    // returns at once (and the fstat below refuses it).
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) throw Error(detail::concat(where, ": cannot open: ", detail::errno_text(errno)));
    const detail::FdCloser closer{fd};
    if (::fstat(fd, &st) != 0)
      throw Error(detail::concat(where, ": cannot stat: ", detail::errno_text(errno)));
    detail::require(S_ISREG(st.st_mode), where, ": not a regular file");
    Safetensors file;
    file.where_ = where;
    const auto size = static_cast<std::uint64_t>(st.st_size);
    const std::uint64_t data_offset = file.read_header(fd, size);
    file.read_data(fd, data_offset, size - data_offset);
    return file;
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
    return {data_.data() + t.begin, static_cast<std::size_t>(t.end - t.begin)};
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
    const std::byte* src = data_.data() + t.begin;
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

  // Fills `out` with the file's bytes from `offset` on.
  void read_at(int fd, std::uint64_t offset, std::span<std::byte> out) const {
    std::size_t done = 0;
    while (done < out.size()) {
      const ::ssize_t n =
          ::pread(fd, out.data() + done, out.size() - done, static_cast<::off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw Error(detail::concat(where_, ": cannot read: ", detail::errno_text(errno)));
      detail::require(n > 0, where_, ": the file ended after ", offset + done, " bytes, expected ",
                      offset + out.size(), " (it shrank while being read)");
      done += static_cast<std::size_t>(n);
    }
  }

  // Reads and checks the header of a file of `size` bytes (its length first,
  // then as many bytes as a valid length says); returns the data's offset.
  std::uint64_t read_header(int fd, std::uint64_t size) {
    std::vector<std::byte> head(static_cast<std::size_t>(std::min<std::uint64_t>(size, 8)));
    read_at(fd, 0, head);
    if (size >= 8) {  // else parse_header says what is wrong
      const std::uint64_t n = detail::load_u64_le(head.data());
      if (n <= kMaxHeaderBytes && n <= size - 8) {
        head.resize(static_cast<std::size_t>(8 + n));
        read_at(fd, 8, std::span<std::byte>(head).subspan(8));
      }
    }
    return parse_header(head, size);
  }

  // Allocates and reads the data buffer once the header fits the file. More
  // than the machine's memory is refused up front: with overcommit the
  // allocation may succeed and the read then exhaust memory.
  void read_data(int fd, std::uint64_t offset, std::uint64_t bytes) {
    const std::uint64_t limit = detail::memory_limit();
    detail::require(bytes <= limit, where_, ": the data buffer of ", bytes,
                    " bytes does not fit in memory (at most ", limit, " bytes)");
    try {
      data_.resize(static_cast<std::size_t>(bytes));
    } catch (const std::bad_alloc&) {
      throw Error(detail::concat(where_, ": cannot allocate the data buffer of ", bytes, " bytes"));
    }
    read_at(fd, offset, data_);
  }

  // Checks the header of a file of `size` bytes whose first bytes are `head`
  // (at least 8 + the header length when that fits the file); returns the
  // data buffer's offset in the file.
  std::uint64_t parse_header(std::span<const std::byte> head, std::uint64_t size) {
    const std::string& w = where_;
    detail::require(size >= 8, w, ": ", size,
                    " bytes, expected at least 8 (the little-endian u64 header length)");
    const std::uint64_t n = detail::load_u64_le(head.data());
    detail::require(n <= kMaxHeaderBytes, w, ": header length ", n, " exceeds the limit of ",
                    kMaxHeaderBytes, " bytes");
    detail::require(n <= size - 8, w, ": header length ", n, " points past the end of the file (",
                    size - 8, " bytes follow the length)");
    const char* text = reinterpret_cast<const char*>(head.data() + 8);
    detail::require(n > 0 && text[0] == '{', w,
                    ": the header does not start with '{' (a JSON object), got ",
                    n == 0 ? std::string("an empty header")
                           : detail::concat("byte ", std::to_integer<unsigned>(head[8])));
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

    const std::uint64_t data_offset = 8 + n;
    const std::uint64_t data_size = size - data_offset;
    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        parse_metadata(value);
      } else {
        TensorInfo t = parse_entry(key, value, data_size);
        tensors_.emplace(key, std::move(t));
      }
    }
    check_coverage(data_size);
    return data_offset;
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
  std::vector<std::byte> data_;  // the data buffer (without the header)
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moe::io
