#pragma once
// SafetensorsWriter: builds a safetensors file in memory and writes it
// atomically (a temporary file in the target's directory, fsync, rename).

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/core/error.hpp"
#include "moe/io/format.hpp"

namespace moe::io {

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
    detail::require(text.size() <= kMaxHeaderBytes, "moe::io::SafetensorsWriter: a header of ",
                    text.size(), " bytes exceeds the limit of ", kMaxHeaderBytes, " bytes");
    std::vector<std::byte> bytes(8 + text.size());
    detail::store_u64_le(text.size(), bytes.data());
    std::memcpy(bytes.data() + 8, text.data(), text.size());
    return {std::move(bytes), std::move(order)};
  }

  Tensors tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moe::io
