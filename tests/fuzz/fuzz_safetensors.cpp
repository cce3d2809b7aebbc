// Fuzz target for moe::io::Safetensors::parse (libFuzzer entry point; also
// linked into driver.cpp for a deterministic ctest).
//
// Any input may be rejected with moe::Error. Anything else is a bug: another
// exception escapes and terminates, a sanitizer reports, or one of the
// invariants below fails and aborts. For a file that parses, every tensor is
// read in its own dtype, and the file written back by SafetensorsWriter must
// parse to the same names, dtypes, shapes, metadata and bytes.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "moe/io/safetensors.hpp"

namespace {

using moe::io::DType;
using moe::io::Safetensors;
using moe::io::SafetensorsWriter;
using moe::io::TensorInfo;

void invariant(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_safetensors: invariant violated: %s\n", what);
    std::abort();
  }
}

// Reads the tensor as T and adds it to `writer` (nothing if its BOOL bytes
// are not 0/1, which copy_to rejects with moe::Error).
template <class T>
void read_as(const Safetensors& file, const TensorInfo& t, SafetensorsWriter& writer) {
  const auto n = static_cast<std::size_t>(t.elements());
  std::unique_ptr<T[]> out(new T[n]);
  try {
    file.copy_to<T>(t.name, std::span<T>(out.get(), n), t.shape);
  } catch (const moe::Error&) {
    invariant(t.dtype == DType::BOOL, "copy_to refused a tensor that parse accepted");
    return;
  }
  writer.add<T>(t.name, std::span<const T>(out.get(), n), t.shape);
}

// F16 and BF16 have no C++20 type: their bits, from raw(), as U16.
void read_half(const Safetensors& file, const TensorInfo& t, SafetensorsWriter& writer) {
  const auto raw = file.raw(t.name);
  std::vector<std::uint16_t> bits(raw.size() / 2);
  moe::io::detail::copy_little_endian(raw.data(), reinterpret_cast<std::byte*>(bits.data()),
                                      bits.size(), 2);
  writer.add<std::uint16_t>(t.name, bits, t.shape);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::optional<Safetensors> file;
  try {
    file.emplace(Safetensors::parse({reinterpret_cast<const std::byte*>(data), size}));
  } catch (const moe::Error&) {
    return 0;  // a rejected file: fine
  }

  SafetensorsWriter writer;
  std::uint64_t covered = 0;
  for (const std::string& name : file->names()) {
    const TensorInfo& t = file->info(name);
    invariant(t.name == name && t.begin <= t.end, "info");
    invariant(file->raw(name).size() == t.end - t.begin, "raw size");
    covered += t.end - t.begin;
    switch (t.dtype) {
      case DType::BOOL:
        read_as<bool>(*file, t, writer);
        break;
      case DType::U8:
        read_as<std::uint8_t>(*file, t, writer);
        break;
      case DType::I8:
        read_as<std::int8_t>(*file, t, writer);
        break;
      case DType::U16:
        read_as<std::uint16_t>(*file, t, writer);
        break;
      case DType::I16:
        read_as<std::int16_t>(*file, t, writer);
        break;
      case DType::U32:
        read_as<std::uint32_t>(*file, t, writer);
        break;
      case DType::I32:
        read_as<std::int32_t>(*file, t, writer);
        break;
      case DType::F32:
        read_as<float>(*file, t, writer);
        break;
      case DType::U64:
        read_as<std::uint64_t>(*file, t, writer);
        break;
      case DType::I64:
        read_as<std::int64_t>(*file, t, writer);
        break;
      case DType::F64:
        read_as<double>(*file, t, writer);
        break;
      case DType::F16:
      case DType::BF16:
        read_half(*file, t, writer);
        break;
    }
  }
  invariant(size >= 8 + covered, "the tensors cover more than the file");
  for (const auto& [key, value] : file->metadata()) writer.set_metadata(key, value);

  // Written back and read again, the file says the same.
  const std::vector<std::byte> again = writer.serialize();
  const Safetensors reread = Safetensors::parse(again);  // must not throw
  invariant(reread.metadata() == file->metadata(), "metadata round trip");
  for (const std::string& name : reread.names()) {
    const TensorInfo& a = file->info(name);
    const TensorInfo& b = reread.info(name);
    const bool half = a.dtype == DType::F16 || a.dtype == DType::BF16;
    invariant(b.dtype == (half ? DType::U16 : a.dtype), "dtype round trip");
    invariant(b.shape == a.shape, "shape round trip");
    const auto ra = file->raw(name), rb = reread.raw(name);
    invariant(ra.size() == rb.size() && std::equal(ra.begin(), ra.end(), rb.begin()),
              "bytes round trip");
  }
  return 0;
}
