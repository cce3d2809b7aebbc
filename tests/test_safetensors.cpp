// Safetensors files and layer checkpoints: round trips, a byte-exact file,
// files in the reference writer's layout, every kind of bad file (each an
// moe::Error naming what is wrong, never a crash), layers restored bitwise
// and left unchanged by a file that does not fit, and atomic writes.

#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <new>
#include <set>

#include "moe/io/checkpoint.hpp"
#include "moe/io/safetensors.hpp"
#include "support.hpp"

using namespace moe;
using namespace moe::test;
using io::DType;
using io::Safetensors;
using io::SafetensorsWriter;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<std::byte>;

Bytes bytes_of(std::string_view s) {
  Bytes b(s.size());
  if (!s.empty()) std::memcpy(b.data(), s.data(), s.size());  // data() may be null when empty
  return b;
}

// A file from its parts: the header length is the header's unless given.
Bytes make_file(const std::string& header, const Bytes& data = {},
                std::optional<std::uint64_t> header_length = std::nullopt) {
  const std::uint64_t n = header_length.value_or(header.size());
  Bytes out(8);
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((n >> (8 * i)) & 0xFF);
  const Bytes h = bytes_of(header);
  out.insert(out.end(), h.begin(), h.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

// The message of the moe::Error that f throws ("" and a failed check if none).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL_CHECK("expected moe::Error");
  return "";
}

// Parsing `file` fails with a message containing every fragment.
void check_bad_file(const Bytes& file, std::initializer_list<const char*> fragments) {
  const std::string what = error_of([&] { (void)Safetensors::parse(file); });
  CAPTURE(what);
  for (const char* fragment : fragments) CHECK(what.find(fragment) != std::string::npos);
}

// A scratch directory removed at the end of the test.
class ScratchDir {
 public:
  ScratchDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() / ("moe_test_safetensors_" + std::to_string(::getpid()) +
                                         "_" + std::to_string(++counter));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  const fs::path& path() const { return path_; }
  std::set<std::string> listing() const {
    std::set<std::string> names;
    for (const auto& entry : fs::directory_iterator(path_)) names.insert(entry.path().filename());
    return names;
  }

 private:
  fs::path path_;
};

Bytes read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return bytes_of(s);
}

// One small valid file: two tensors and metadata.
Bytes small_file() {
  SafetensorsWriter w;
  const std::vector<float> a{1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.5f};
  const std::vector<std::int64_t> b{-3, 1LL << 40};
  w.add<float>("a", a, {2, 3});
  w.add<std::int64_t>("b", b, {2});
  w.set_metadata("note", "small");
  return w.serialize();
}

}  // namespace

TEST_CASE("dtype names, sizes and C++ types") {
  static_assert(io::dtype_of<float>() == DType::F32);
  static_assert(io::dtype_of<double>() == DType::F64);
  static_assert(io::dtype_of<std::int64_t>() == DType::I64);
  static_assert(io::dtype_of<long long>() == DType::I64);
  static_assert(io::dtype_of<std::uint64_t>() == DType::U64);
  static_assert(io::dtype_of<std::int32_t>() == DType::I32);
  static_assert(io::dtype_of<std::uint32_t>() == DType::U32);
  static_assert(io::dtype_of<std::int16_t>() == DType::I16);
  static_assert(io::dtype_of<std::uint16_t>() == DType::U16);
  static_assert(io::dtype_of<std::int8_t>() == DType::I8);
  static_assert(io::dtype_of<std::uint8_t>() == DType::U8);
  static_assert(io::dtype_of<bool>() == DType::BOOL);
  const std::pair<DType, std::size_t> sizes[] = {
      {DType::BOOL, 1}, {DType::U8, 1},   {DType::I8, 1},  {DType::U16, 2}, {DType::I16, 2},
      {DType::F16, 2},  {DType::BF16, 2}, {DType::U32, 4}, {DType::I32, 4}, {DType::F32, 4},
      {DType::U64, 8},  {DType::I64, 8},  {DType::F64, 8}};
  for (const auto& entry : sizes) {
    const DType dtype = entry.first;  // not a structured binding: clang 14 cannot capture one
    CAPTURE(io::dtype_name(dtype));
    CHECK(io::dtype_size(dtype) == entry.second);
    CHECK(io::dtype_from_name(io::dtype_name(dtype)) == dtype);
  }
  CHECK(std::string(io::dtype_name(DType::BF16)) == "BF16");
  CHECK(!io::dtype_from_name("F8_E4M3"));
  CHECK(!io::dtype_from_name("f32"));
}

TEST_CASE("floats, doubles, integers and bools round-trip with metadata") {
  const std::vector<float> f{1.0f,
                             -0.0f,
                             std::numeric_limits<float>::denorm_min(),
                             std::numeric_limits<float>::infinity(),
                             3.0e38f,
                             -1e-20f};
  const std::vector<double> d{3.141592653589793, -2.5, 1e300, std::nan("")};
  const std::vector<std::int64_t> i64{std::numeric_limits<std::int64_t>::min(), -1, 0,
                                      std::numeric_limits<std::int64_t>::max()};
  const std::vector<std::uint8_t> u8{0, 1, 255};
  const std::vector<std::int32_t> i32{-7};
  const bool flags[] = {true, false, true};
  SafetensorsWriter w;
  w.add<float>("layer.f", f, {2, 3});
  w.add<double>("d", d, {4});
  w.add<std::int64_t>("i64", i64, {2, 1, 2});
  w.add<std::uint8_t>("u8", u8, {3});
  w.add<std::int32_t>("scalar", i32, {});  // rank 0: one element
  w.add<float>("empty", std::span<const float>(), {0, 5});
  w.add<bool>("flags", flags, {3});
  w.set_metadata("format", "pt");
  w.set_metadata("ünïcode ✓", "a \"quoted\"\nvalue");
  const Bytes bytes = w.serialize();

  const Safetensors file = Safetensors::parse(bytes);
  CHECK(file.names() ==
        std::vector<std::string>{"d", "empty", "flags", "i64", "layer.f", "scalar", "u8"});
  CHECK(file.metadata() ==
        std::map<std::string, std::string>{{"format", "pt"}, {"ünïcode ✓", "a \"quoted\"\nvalue"}});
  CHECK(file.contains("d"));
  CHECK(!file.contains("D"));
  const auto f2 = file.get<float>("layer.f", {2, 3});
  CHECK(same_bits(f2, f));
  const auto d2 = file.get<double>("d", {4});
  CHECK(same_bits(d2, d));  // NaN included
  CHECK(file.get<std::int64_t>("i64", {2, 1, 2}) == i64);
  CHECK(file.get<std::uint8_t>("u8", {3}) == u8);
  CHECK(file.get<std::int32_t>("scalar", {}) == i32);
  CHECK(file.get<float>("empty", {0, 5}).empty());
  CHECK(file.get<bool>("flags", {3}) == std::vector<bool>{true, false, true});
  const io::TensorInfo& info = file.info("i64");
  CHECK(info.name == "i64");
  CHECK(info.dtype == DType::I64);
  CHECK(info.shape == std::vector<std::int64_t>{2, 1, 2});
  CHECK(info.end - info.begin == 32);
  CHECK(info.elements() == 4);
  // The largest elements come first, so every tensor is aligned to its size.
  for (const auto& name : file.names()) {
    const auto& t = file.info(name);
    CAPTURE(name);
    CHECK(t.begin % io::dtype_size(t.dtype) == 0);
  }
  // copy_to into caller memory, with the shape as a span.
  std::vector<float> out(6);
  const std::vector<std::int64_t> shape{2, 3};
  file.copy_to<float>("layer.f", std::span<float>(out), shape);
  CHECK(same_bits(out, f));
  // Serializing is deterministic, and what was read writes back identically.
  CHECK(w.serialize() == bytes);
}

TEST_CASE("a tiny file is byte-exact") {
  SafetensorsWriter w;
  const std::vector<float> a{1.0f, -2.0f};
  const std::vector<std::int16_t> b{258};  // 0x0102
  w.add<std::int16_t>("b", b, {1});
  w.add<float>("a", a, {2});
  w.set_metadata("k", "v");
  // Header: metadata first, then F32 "a" (larger elements first), then I16
  // "b"; 133 bytes of JSON padded with 3 spaces to 136, a multiple of 8.
  const std::string json =
      R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"I16","shape":[1],"data_offsets":[8,10]}})";
  REQUIRE(json.size() == 133);
  const std::string padded = json + std::string(3, ' ');  // 136 = 17 * 8
  Bytes expected = {std::byte{136}, std::byte{0}, std::byte{0}, std::byte{0},
                    std::byte{0},   std::byte{0}, std::byte{0}, std::byte{0}};
  const Bytes text = bytes_of(padded);
  expected.insert(expected.end(), text.begin(), text.end());
  // 1.0f = 0x3F800000, -2.0f = 0xC0000000, 258 = 0x0102, little-endian.
  for (int v : {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0, 0x02, 0x01})
    expected.push_back(static_cast<std::byte>(v));
  CHECK(w.serialize() == expected);
  CHECK(Safetensors::parse(expected).get<std::int16_t>("b", {1}) == b);
}

TEST_CASE("files in the reference writer's layout are read") {
  // As Python's safetensors writes {"weight": float64 (2, 2), "bias":
  // float16 (2)} with metadata {"format": "pt"}: compact JSON, largest dtype
  // first, header padded with spaces to a multiple of 8.
  const std::string json =
      R"({"__metadata__":{"format":"pt"},"weight":{"dtype":"F64","shape":[2,2],)"
      R"("data_offsets":[0,32]},"bias":{"dtype":"F16","shape":[2],"data_offsets":[32,36]}})";
  const std::string padded = json + std::string((8 - json.size() % 8) % 8, ' ');
  Bytes data;
  for (double v : {1.0, 2.0, -3.0, 0.5}) {
    std::uint64_t bits;
    std::memcpy(&bits, &v, 8);
    for (int i = 0; i < 8; ++i) data.push_back(static_cast<std::byte>((bits >> (8 * i)) & 0xFF));
  }
  for (int v : {0x00, 0x3C, 0x00, 0xC0}) data.push_back(static_cast<std::byte>(v));  // 1, -2 (F16)
  const Safetensors file = Safetensors::parse(make_file(padded, data));
  CHECK(file.metadata().at("format") == "pt");
  CHECK(file.get<double>("weight", {2, 2}) == std::vector<double>{1.0, 2.0, -3.0, 0.5});
  CHECK(file.info("bias").dtype == DType::F16);
  const auto raw = file.raw("bias");
  REQUIRE(raw.size() == 4);
  CHECK(std::to_integer<int>(raw[1]) == 0x3C);
  CHECK(std::to_integer<int>(raw[3]) == 0xC0);

  // Other writers: keys in any order, whitespace, no padding (data not
  // aligned), unknown keys, an empty file with only metadata.
  const std::string loose =
      "{ \"x\" : {\"data_offsets\": [0, 4], \"extra\": {\"k\": [1, 2]}, \"shape\": [ 1 ],\n"
      "  \"dtype\": \"I32\"} }";
  const Safetensors other = Safetensors::parse(
      make_file(loose, {std::byte{5}, std::byte{0}, std::byte{0}, std::byte{0}}));
  CHECK(other.get<std::int32_t>("x", {1}) == std::vector<std::int32_t>{5});
  CHECK(Safetensors::parse(make_file("{}")).names().empty());
  CHECK(Safetensors::parse(make_file(R"({"__metadata__":{}})")).metadata().empty());
}

TEST_CASE("every truncation of a valid file is an error, never a crash") {
  const Bytes file = small_file();
  REQUIRE_NOTHROW(Safetensors::parse(file));
  for (std::size_t n = 0; n < file.size(); ++n) {
    CAPTURE(n);
    CHECK_THROWS_AS(Safetensors::parse(std::span<const std::byte>(file.data(), n)), Error);
  }
  check_bad_file(Bytes(7), {"7 bytes", "expected at least 8"});
}

TEST_CASE("bad header lengths") {
  check_bad_file(make_file("{}", {}, 100'000'001), {"header length 100000001", "limit"});
  check_bad_file(make_file("{}", {}, std::numeric_limits<std::uint64_t>::max()),
                 {"header length 18446744073709551615"});
  check_bad_file(make_file("{}", {}, 3), {"header length 3", "past the end", "2 bytes follow"});
  check_bad_file(make_file("", {}, 0), {"does not start with '{'", "empty header"});
}

TEST_CASE("bad JSON") {
  check_bad_file(make_file("{\"a\": "), {"not valid JSON"});
  check_bad_file(make_file("{} x"), {"not valid JSON"});
  check_bad_file(make_file("[]"), {"does not start with '{'"});
  check_bad_file(make_file(" {}"), {"does not start with '{'"});
  check_bad_file(make_file("{\"\xff\": 1}"), {"not valid JSON"});  // not UTF-8
  check_bad_file(make_file("{\"a\": 1e999}"), {"not valid JSON"});
  check_bad_file(make_file(R"({"a": {"dtype":"U8","shape":[0],"data_offsets":[0,0]},)"
                           R"( "a": {"dtype":"U8","shape":[0],"data_offsets":[0,0]}})"),
                 {"duplicate key 'a'", "top level"});
  check_bad_file(
      make_file(R"({"a": {"dtype":"U8","shape":[1],"dtype":"F32","data_offsets":[0,1]}})",
                {std::byte{1}}),
      {"duplicate key 'dtype'", "nested"});
  // Deep nesting under an unknown key: refused before anything recurses.
  const std::string deep = "{\"x\":" + std::string(200, '[') + std::string(200, ']') + "}";
  check_bad_file(make_file(deep), {"deeper than 128"});
  const std::string ok_depth = "{\"__x\":" + std::string(100, '[') + std::string(100, ']') + "}";
  check_bad_file(make_file(ok_depth), {"tensor '__x' is a JSON array"});  // parsed, then refused
}

TEST_CASE("bad tensor entries") {
  const Bytes four(4);
  check_bad_file(make_file(R"({"t": 3})"), {"tensor 't' is a JSON number", "expected an object"});
  check_bad_file(make_file(R"({"t": {"shape":[1],"data_offsets":[0,4]}})", four),
                 {"tensor 't' has no \"dtype\""});
  check_bad_file(make_file(R"({"t": {"dtype":"F32","data_offsets":[0,4]}})", four),
                 {"tensor 't' has no \"shape\""});
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":[1]}})", four),
                 {"tensor 't' has no \"data_offsets\""});
  check_bad_file(make_file(R"({"t": {"dtype":4,"shape":[1],"data_offsets":[0,4]}})", four),
                 {"dtype=4", "expected a string"});
  check_bad_file(make_file(R"({"t": {"dtype":"F33","shape":[1],"data_offsets":[0,4]}})", four),
                 {"tensor 't' has unknown dtype \"F33\"", "BOOL, U8", "F64"});
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":1,"data_offsets":[0,4]}})", four),
                 {"shape=1", "expected an array of integers"});
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", four),
                 {"tensor 't': shape[0]=-1", "expected an integer in [0, 9223372036854775807]"});
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", four),
                 {"shape[0]=1.0"});
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":["1"],"data_offsets":[0,4]}})", four),
                 {"shape[0]=\"1\""});
  check_bad_file(
      make_file(R"({"t": {"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,4]}})",
                four),
      {"shape[0]=9223372036854775808"});
  // 2^32 * 2^32 elements overflow 64 bits; 2^31 * 2^31 F32 elements are 2^64 bytes.
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":[4294967296,4294967296],)"
                           R"("data_offsets":[0,4]}})",
                           four),
                 {"shape [4294967296, 4294967296] of dtype F32", "overflows"});
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":[2147483648,2147483648],)"
                           R"("data_offsets":[0,4]}})",
                           four),
                 {"overflows"});
  // "-0" is zero (nlohmann parses it as a signed integer).
  CHECK(
      Safetensors::parse(make_file(R"({"t": {"dtype":"F32","shape":[-0],"data_offsets":[-0,0]}})"))
          .info("t")
          .elements() == 0);
  // A zero dimension makes the product zero, whatever the others are.
  CHECK(Safetensors::parse(make_file(R"({"t": {"dtype":"F32","shape":[4294967296,4294967296,0],)"
                                     R"("data_offsets":[0,0]}})"))
            .info("t")
            .elements() == 0);
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":[1],"data_offsets":[0]}})", four),
                 {"data_offsets=[0]", "expected [begin, end]"});
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":[1],"data_offsets":[0,-4]}})", four),
                 {"data_offsets[1]=-4"});
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", four),
                 {"data_offsets [4, 0] begin > end"});
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":[1],"data_offsets":[0,8]}})", four),
                 {"data_offsets [0, 8] end past the data buffer of 4 bytes"});
  check_bad_file(make_file(R"({"t": {"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", four),
                 {"span 4 bytes, expected 8 for shape [2] of dtype F32"});
}

TEST_CASE("the tensors must cover the data buffer exactly") {
  const Bytes eight(8), twelve(12);
  check_bad_file(make_file(R"({"a": {"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"( "b": {"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                           eight),
                 {"tensor 'b' [4, 8) overlaps tensor 'a' [0, 8)"});
  // An empty tensor inside another's bytes overlaps it too (as in the reference).
  check_bad_file(make_file(R"({"a": {"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"( "e": {"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                           eight),
                 {"tensor 'e' [4, 4) overlaps"});
  check_bad_file(make_file(R"({"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                           R"( "b": {"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                           twelve),
                 {"bytes [4, 8) of the data buffer belong to no tensor", "before 'b'"});
  check_bad_file(make_file(R"({"b": {"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight),
                 {"bytes [0, 4)"});
  check_bad_file(make_file(R"({"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", eight),
                 {"4 trailing bytes", "the data buffer has 8 bytes, the tensors cover 4"});
  check_bad_file(make_file("{}", eight), {"8 trailing bytes"});
  // Boundaries touching and empty tensors at a boundary are fine.
  CHECK_NOTHROW(
      Safetensors::parse(make_file(R"({"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                   R"( "e": {"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                                   R"( "b": {"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                   eight)));
}

TEST_CASE("bad metadata") {
  check_bad_file(make_file(R"({"__metadata__": {"a": "x", "n": 3}})"),
                 {"__metadata__ key 'n' has number value 3", "expected a string"});
  check_bad_file(make_file(R"({"__metadata__": {"n": null}})"), {"key 'n' has null value"});
  check_bad_file(make_file(R"({"__metadata__": ["a"]})"),
                 {"__metadata__ is a JSON array", "expected an object of strings"});
}

TEST_CASE("reading names the tensor, what it has and what was expected") {
  const Safetensors file = Safetensors::parse(small_file());
  CHECK(error_of([&] { file.info("c"); }) ==
        "moe::io::Safetensors (in memory): no tensor named 'c' (the file has 'a', 'b')");
  CHECK(error_of([&] {
          file.get<double>("a", {2, 3});
        }) == "moe::io::Safetensors (in memory): tensor 'a' has dtype F32, expected F64");
  CHECK(error_of([&] {
          file.get<float>("a", {3, 2});
        }) == "moe::io::Safetensors (in memory): tensor 'a' has shape [2, 3], expected [3, 2]");
  CHECK(error_of([&] { file.get<float>("a", {6}); }).find("expected [6]") != std::string::npos);
  std::vector<float> small(5);
  CHECK(error_of([&] {
          file.copy_to<float>("a", std::span<float>(small), {2, 3});
        }).find("tensor 'a' has 6 elements, the output span holds 5") != std::string::npos);
  CHECK(error_of([&] { file.get<std::int32_t>("b", {2}); }).find("dtype I64, expected I32") !=
        std::string::npos);
  // A BOOL byte other than 0 or 1 is no valid bool.
  const Safetensors bools =
      Safetensors::parse(make_file(R"({"f": {"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})",
                                   {std::byte{1}, std::byte{0}, std::byte{2}}));
  bool out[3] = {false, true, true};
  CHECK(error_of([&] {
          bools.copy_to<bool>("f", std::span<bool>(out), {3});
        }).find("tensor 'f' element 2 is byte 2, expected 0 or 1") != std::string::npos);
  CHECK((!out[0] && out[1] && out[2]));  // unchanged
  CHECK(error_of([&] { bools.get<bool>("f", {3}); }).find("element 2 is byte 2") !=
        std::string::npos);
  CHECK(error_of([&] { bools.get<std::uint8_t>("f", {3}); }).find("dtype BOOL, expected U8") !=
        std::string::npos);
}

TEST_CASE("the writer refuses what would make a bad file") {
  SafetensorsWriter w;
  const std::vector<float> v(6);
  w.add<float>("x", v, {2, 3});
  CHECK(error_of([&] { w.add<float>("x", v, {6}); }).find("duplicate tensor name 'x'") !=
        std::string::npos);
  CHECK(error_of([&] {
          w.add<float>("y", v, {2, 2});
        }).find("tensor 'y': 6 elements, expected 4 for shape [2, 2]") != std::string::npos);
  CHECK(error_of([&] {
          w.add<float>("y", v, {-2, -3});
        }).find("shape[0]=-2, expected >= 0") != std::string::npos);
  CHECK(error_of([&] {
          w.add<float>("y", v, {1LL << 32, 1LL << 32});
        }).find("overflows") != std::string::npos);
  CHECK(error_of([&] { w.add<float>("__metadata__", v, {6}); }).find("reserved") !=
        std::string::npos);
  CHECK(error_of([&] { w.add<float>("bad\xff", v, {6}); }).find("not valid UTF-8") !=
        std::string::npos);
  CHECK(error_of([&] { w.set_metadata("k", "\xc3"); }).find("not valid UTF-8") !=
        std::string::npos);
  // Only the first add went in.
  CHECK(Safetensors::parse(w.serialize()).names() == std::vector<std::string>{"x"});
}

// ---------------------------------------------------------------------------
// Layers and buffers

namespace {

using FloatLayer = Layer<router::TopK, estimator::DefaultEMA, cpu::Backend<float>, act::GELU>;
const LayerConfig kConfig{.d_model = 6, .d_ff = 5, .experts = 4, .dropout = 0.1};

// A few training steps, so that the EMA, the forward counter and the
// parameters all differ from a fresh layer's.
template <class L>
void train(L& layer, int steps, std::uint64_t seed = 1) {
  using S = typename L::Scalar;
  const Index d = layer.config().d_model;
  auto grads = layer.make_gradients();
  optim::Sgd sgd({.lr = 0.05});
  for (int s = 0; s < steps; ++s) {
    const auto x = random_matrix<S>(10, d, seed + static_cast<std::uint64_t>(s));
    const auto dy = random_matrix<S>(10, d, seed + 100 + static_cast<std::uint64_t>(s));
    Mat<S> y(10, d), dx(10, d);
    typename L::Cache cache;
    layer.forward(x, y, cache, Mode::train);
    grads.set_zero();
    layer.backward(x, cache, dy, dx, grads);
    sgd.step(layer.parameters(), grads);
    layer.end_step(static_cast<std::uint64_t>(s + 1));
  }
}

template <class L>
struct Snapshot {
  explicit Snapshot(const L& layer)
      : params(layer.parameters().flat().begin(), layer.parameters().flat().end()),
        state(layer.state().flat().begin(), layer.state().flat().end()) {}
  bool matches(const L& layer) const {
    return same_bits(layer.parameters().flat(), params) && same_bits(layer.state().flat(), state);
  }
  std::vector<typename L::Scalar> params;
  std::vector<double> state;
};

// A checkpoint of the layer's shape with other parameters (so that writing
// them would show) and `state` (a corrupt checkpoint whose format is valid).
template <class L>
Bytes file_with_state(const L& layer, const TensorBuffer<double>& state) {
  typename L::Parameters params = layer.parameters();
  for (auto& v : params.flat()) v += 1;
  SafetensorsWriter w;
  io::add_buffer(w, "param.", params);
  io::add_buffer(w, "state.", state);
  return w.serialize();
}

}  // namespace

TEST_CASE("a trained layer is saved and loaded bitwise, and trains on identically") {
  ScratchDir dir;
  const fs::path path = dir.path() / "layer.safetensors";
  FloatLayer layer(kConfig, router::TopK{.k = 2, .bias = true}, {.beta = 0.9}, 7);
  train(layer, 3);
  double ema_norm = 0;
  for (double v : layer.state()["estimator.ema"]) ema_norm += v * v;
  REQUIRE(ema_norm > 0);
  REQUIRE(layer.state()["layer.train_forwards"][0] == 3);
  io::save_layer(path, layer);

  FloatLayer restored(kConfig, router::TopK{.k = 2, .bias = true}, {.beta = 0.9}, /*seed*/ 99);
  REQUIRE(!Snapshot<FloatLayer>(layer).matches(restored));
  io::load_layer(path, restored);
  CHECK(Snapshot<FloatLayer>(layer).matches(restored));

  const Safetensors file = Safetensors::read(path);
  CHECK(file.metadata().at("format") == "moe.layer");
  CHECK(file.metadata().at("d_model") == "6");
  CHECK(file.metadata().at("d_ff") == "5");
  CHECK(file.metadata().at("experts") == "4");
  CHECK(file.metadata().at("router") == "topk");
  CHECK(file.metadata().at("estimator") == "default_ema");
  CHECK(file.metadata().at("activation") == "gelu");
  CHECK(file.metadata().at("scalar") == "F32");
  CHECK(file.info("param.experts.w1").dtype == DType::F32);
  CHECK(file.info("param.experts.w1").shape == std::vector<std::int64_t>{4, 6, 5});
  CHECK(file.info("state.estimator.ema").dtype == DType::F64);
  CHECK(file.contains("param.router.bias"));

  // The next training step (dropout mask included) is bitwise the same.
  train(layer, 1, 50);
  train(restored, 1, 50);
  CHECK(Snapshot<FloatLayer>(layer).matches(restored));
}

TEST_CASE("the ReLU router's lambda is restored into the loading layer's controller") {
  using L = Layer<router::ReluL1, estimator::Sparse, cpu::Backend<double>, act::ReLU>;
  auto controller = std::make_shared<router::LambdaController>(
      router::LambdaController::Options{.target_sparsity = 0.5, .initial_lambda = 0.1});
  L layer({.d_model = 4, .d_ff = 3, .experts = 4}, router::ReluL1{.controller = controller}, {}, 3);
  train(layer, 2);
  const double lambda = controller->lambda();
  REQUIRE(lambda != 0.1);  // the steps moved it
  REQUIRE(layer.state()["router.lambda"][0] == lambda);
  const Bytes bytes = [&] {
    SafetensorsWriter w;
    io::add_layer(w, layer, "block0.");
    return w.serialize();
  }();

  auto fresh = std::make_shared<router::LambdaController>(
      router::LambdaController::Options{.target_sparsity = 0.5, .initial_lambda = 0.1});
  L restored({.d_model = 4, .d_ff = 3, .experts = 4}, router::ReluL1{.controller = fresh}, {}, 8);
  io::load_layer(Safetensors::parse(bytes), restored, "block0.");
  CHECK(fresh->lambda() == lambda);
  CHECK(Snapshot<L>(layer).matches(restored));
  // The prefix is part of the name.
  CHECK(error_of([&] {
          io::load_layer(Safetensors::parse(bytes), restored);
        }).find("no tensor named 'param.router.weight'") != std::string::npos);
}

TEST_CASE("a file that does not fit leaves the layer unchanged") {
  ScratchDir dir;
  FloatLayer target(kConfig, {}, {}, 5);
  train(target, 2);
  const Snapshot<FloatLayer> before(target);
  auto unchanged = [&] { CHECK(before.matches(target)); };

  SUBCASE("another shape: the error names the tensor and both shapes") {
    FloatLayer wider({.d_model = 6, .d_ff = 8, .experts = 4}, {}, {}, 1);
    const fs::path path = dir.path() / "wider.safetensors";
    io::save_layer(path, wider);
    CHECK(error_of([&] {
            io::load_layer(path, target);
          }).find("tensor 'param.experts.w1' has shape [4, 6, 8], expected [4, 6, 5]") !=
          std::string::npos);
    unchanged();
  }
  SUBCASE("a NaN or Inf weight or EMA value") {
    for (const char* name : {"param.experts.w2", "state.estimator.ema"}) {
      CAPTURE(name);
      FloatLayer poisoned(kConfig, {}, {}, 5);
      train(poisoned, 2);
      if (std::string(name) == "param.experts.w2")
        poisoned.parameters()["experts.w2"][3] = std::numeric_limits<float>::infinity();
      else
        poisoned.state()["estimator.ema"][3] = std::nan("");
      SafetensorsWriter w;
      io::add_layer(w, poisoned);
      const std::string what =
          error_of([&] { io::load_layer(Safetensors::parse(w.serialize()), target); });
      CAPTURE(what);
      CHECK(what.find("[3]=") != std::string::npos);
      CHECK(what.find("expected finite values") != std::string::npos);
      unchanged();
    }
  }
  SUBCASE("another scalar type") {
    Layer<router::TopK, estimator::DefaultEMA, cpu::Backend<double>, act::GELU> twin(kConfig);
    SafetensorsWriter w;
    io::add_layer(w, twin);
    CHECK(error_of([&] {
            io::load_layer(Safetensors::parse(w.serialize()), target);
          }).find("tensor 'param.router.weight' has dtype F64, expected F32") != std::string::npos);
    unchanged();
  }
  SUBCASE("a tensor the layer lacks (a router bias)") {
    FloatLayer biased(kConfig, router::TopK{.k = 2, .bias = true}, {}, 1);
    SafetensorsWriter w;
    io::add_layer(w, biased);
    CHECK(error_of([&] {
            io::load_layer(Safetensors::parse(w.serialize()), target);
          }).find("tensor 'param.router.bias' has no counterpart in the layer's parameters") !=
          std::string::npos);
    unchanged();
  }
  SUBCASE("a missing state tensor, after every parameter fits") {
    Layer<router::TopK, estimator::Sparse, cpu::Backend<float>, act::GELU> sparse(kConfig);
    SafetensorsWriter w;
    io::add_layer(w, sparse);
    CHECK(error_of([&] {
            io::load_layer(Safetensors::parse(w.serialize()), target);
          }).find("no tensor named 'state.estimator.ema'") != std::string::npos);
    unchanged();
  }
  SUBCASE("another activation, same shapes (save_layer's metadata)") {
    Layer<router::TopK, estimator::DefaultEMA, cpu::Backend<float>, act::ReLU> relu(kConfig);
    const fs::path path = dir.path() / "relu.safetensors";
    io::save_layer(path, relu);
    CHECK(error_of([&] {
            io::load_layer(path, target);
          }).find("holds a layer with activation=relu, this layer has activation=gelu") !=
          std::string::npos);
    // The tensors alone would fit: load_layer(file) does not read metadata.
    FloatLayer scratch = target;
    CHECK_NOTHROW(io::load_layer(Safetensors::read(path), scratch));
    unchanged();
  }
  SUBCASE("not a layer file") {
    const fs::path path = dir.path() / "plain.safetensors";
    SafetensorsWriter w;
    io::add_layer(w, target);
    w.write(path);
    CHECK(error_of([&] {
            io::load_layer(path, target);
          }).find("__metadata__ format=(none), expected 'moe.layer'") != std::string::npos);
    unchanged();
  }
  SUBCASE("a corrupt file") {
    const fs::path path = dir.path() / "layer.safetensors";
    io::save_layer(path, target);
    Bytes bytes = read_file(path);
    bytes.resize(bytes.size() - 1);
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(bytes.data()),
                static_cast<std::streamsize>(bytes.size()));
    }
    const std::string what = error_of([&] { io::load_layer(path, target); });
    CHECK(what.find(path.string()) != std::string::npos);
    CHECK(what.find("end past the data buffer") != std::string::npos);
    CHECK(error_of([&] {
            io::load_layer(dir.path() / "missing.safetensors", target);
          }).find("cannot stat: No such file or directory") != std::string::npos);
    unchanged();
  }
  SUBCASE("state values a layer cannot hold (valid format)") {
    TensorBuffer<double> state = target.state();
    state["layer.dropout_seed"][1] = 0.5;
    CHECK(error_of([&] {
            io::load_layer(Safetensors::parse(file_with_state(target, state)), target);
          }).find("layer.dropout_seed[1]=0.5, expected a whole number in [0, 2^32)") !=
          std::string::npos);
    unchanged();
    state = target.state();
    state["layer.train_forwards"][0] = -1;
    CHECK(error_of([&] {
            io::load_layer(Safetensors::parse(file_with_state(target, state)), target);
          }).find("layer.train_forwards=-1") != std::string::npos);
    unchanged();
  }
}

TEST_CASE("a rejected router state leaves the layer and its controller unchanged") {
  using L = Layer<router::ReluL1, estimator::DefaultEMA, cpu::Backend<double>, act::ReLU>;
  auto controller = std::make_shared<router::LambdaController>(
      router::LambdaController::Options{.target_sparsity = 0.5, .initial_lambda = 0.1});
  L layer({.d_model = 4, .d_ff = 3, .experts = 4}, router::ReluL1{.controller = controller}, {}, 3);
  train(layer, 2);
  const Snapshot<L> before(layer);
  const double lambda = controller->lambda();
  TensorBuffer<double> state = layer.state();
  state["router.lambda"][0] = -1;
  state["estimator.ema"][0] = 123;  // would be visible if the state were copied
  CHECK(error_of([&] {
          io::load_layer(Safetensors::parse(file_with_state(layer, state)), layer);
        }).find("lambda=-1, expected a finite value > 0") != std::string::npos);
  CHECK(before.matches(layer));
  CHECK(controller->lambda() == lambda);

  using S = Layer<router::RandomFrozen<router::schedule::Linear>, estimator::Sparse,
                  cpu::Backend<double>, act::ReLU>;
  S scheduled(
      {.d_model = 4, .d_ff = 3, .experts = 4},
      router::random_frozen(router::schedule::Linear{.k_min = 1, .k_max = 4, .total_steps = 8}), {},
      2);
  train(scheduled, 2);
  const Snapshot<S> scheduled_before(scheduled);
  TensorBuffer<double> bad = scheduled.state();
  bad["router.step"][0] = -3;
  CHECK(error_of([&] {
          io::load_layer(Safetensors::parse(file_with_state(scheduled, bad)), scheduled);
        }).find("router.step=-3") != std::string::npos);
  CHECK(scheduled_before.matches(scheduled));
  CHECK(scheduled.router().k() == 2);  // k_at(2 of 8 steps) of 1..4, unchanged
}

TEST_CASE("buffers: prefixed names, every tensor checked before any is written") {
  auto layout = std::make_shared<TensorLayout>();
  layout->add("a", {2, 2});
  layout->add("b", {3});
  TensorBuffer<double> source(layout);
  for (std::size_t i = 0; i < source.flat().size(); ++i) source.flat()[i] = 0.5 + i;
  SafetensorsWriter w;
  io::add_buffer(w, "opt.m.", source);
  const Safetensors file = Safetensors::parse(w.serialize());
  CHECK(file.names() == std::vector<std::string>{"opt.m.a", "opt.m.b"});
  TensorBuffer<double> target(layout);
  io::load_buffer(file, "opt.m.", target);
  CHECK(same_bits(target.flat(), source.flat()));

  // "a" fits, "b" does not: "a" must not have been written either.
  auto other = std::make_shared<TensorLayout>();
  other->add("a", {2, 2});
  other->add("b", {4});
  TensorBuffer<double> mismatched(other);
  CHECK(error_of([&] {
          io::load_buffer(file, "opt.m.", mismatched);
        }).find("tensor 'opt.m.b' has shape [3], expected [4]") != std::string::npos);
  for (double v : mismatched.flat()) CHECK(v == 0);
  TensorBuffer<float> floats(layout);
  CHECK(error_of([&] {
          io::load_buffer(file, "opt.m.", floats);
        }).find("tensor 'opt.m.a' has dtype F64, expected F32") != std::string::npos);
}

// ---------------------------------------------------------------------------
// Files

TEST_CASE("reading a file names the path") {
  ScratchDir dir;
  const fs::path missing = dir.path() / "nope.safetensors";
  CHECK(error_of([&] { (void)Safetensors::read(missing); }) ==
        "moe::io::Safetensors '" + missing.string() + "': cannot stat: No such file or directory");
  CHECK(error_of([&] { (void)Safetensors::read(dir.path()); }).find("not a regular file") !=
        std::string::npos);
  const fs::path empty = dir.path() / "empty.safetensors";
  std::ofstream(empty).close();
  CHECK(error_of([&] { (void)Safetensors::read(empty); }) ==
        "moe::io::Safetensors '" + empty.string() +
            "': 0 bytes, expected at least 8 (the little-endian u64 header length)");
  const fs::path good = dir.path() / "good.safetensors";
  Safetensors::parse(small_file());  // sanity
  {
    SafetensorsWriter w;
    const std::vector<float> v{1, 2};
    w.add<float>("v", v, {2});
    w.write(good);
  }
  const Safetensors file = Safetensors::read(good);
  CHECK(file.get<float>("v", {2}) == std::vector<float>{1, 2});
  CHECK(error_of([&] {
          file.get<float>("v", {3});
        }).find("moe::io::Safetensors '" + good.string() + "': tensor 'v' has shape [2]") !=
        std::string::npos);
}

TEST_CASE("a FIFO is refused without blocking, and a header is checked before any data is read") {
  ScratchDir dir;
  // Opening a FIFO for reading blocks until a writer comes: read() looked
  // before it opened (this test hung before).
  const fs::path fifo = dir.path() / "fifo.safetensors";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  CHECK(error_of([&] { (void)Safetensors::read(fifo); }).find("not a regular file") !=
        std::string::npos);
  // A 64 GiB file (sparse: no disk) whose header is bad: refused by its
  // header, before its data is allocated or read (read() used to read every
  // byte into memory first, and failed with std::bad_alloc here).
  const fs::path huge = dir.path() / "huge.safetensors";
  {
    const Bytes header = bytes_of(std::string("\x02\0\0\0\0\0\0\0{x", 10));
    std::ofstream out(huge, std::ios::binary);
    out.write(reinterpret_cast<const char*>(header.data()),
              static_cast<std::streamsize>(header.size()));
  }
  fs::resize_file(huge, std::uintmax_t{64} << 30);
  const std::string what = error_of([&] { (void)Safetensors::read(huge); });
  CAPTURE(what);
  CHECK(what.find("not valid JSON") != std::string::npos);
  // A valid header of a file that ends early: the data is missing.
  const fs::path short_file = dir.path() / "short.safetensors";
  {
    Bytes bytes = small_file();
    bytes.resize(bytes.size() - 3);
    std::ofstream out(short_file, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
  }
  CHECK(error_of([&] { (void)Safetensors::read(short_file); }).find("end past the data buffer") !=
        std::string::npos);
}

TEST_CASE("a valid header over more data than memory is moe::Error, quickly, not std::bad_alloc") {
  ScratchDir dir;
  const fs::path path = dir.path() / "sparse.safetensors";
  // A sparse file (no disk) of 2^46 bytes, or 2^43 where the file system
  // stops below (ext4: 16 TiB), whose one U8 tensor spans all of its data:
  // read() allocated the whole file first and threw std::bad_alloc.
  constexpr std::uint64_t kHeader = 96;  // padded with spaces, as the spec allows
  std::uint64_t size = 0;
  for (int bits : {46, 43}) {
    const std::uint64_t data = (std::uint64_t{1} << bits) - 8 - kHeader;
    std::string header = "{\"t\":{\"dtype\":\"U8\",\"shape\":[" + std::to_string(data) +
                         "],\"data_offsets\":[0," + std::to_string(data) + "]}}";
    REQUIRE(header.size() <= kHeader);
    header.resize(kHeader, ' ');
    const Bytes head = make_file(header);
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(head.data()),
                static_cast<std::streamsize>(head.size()));
    }
    std::error_code ec;
    fs::resize_file(path, std::uintmax_t{1} << bits, ec);
    if (!ec) {
      size = std::uint64_t{1} << bits;
      break;
    }
  }
  REQUIRE(size != 0);
  const std::string data = std::to_string(size - 8 - kHeader);
  const auto start = std::chrono::steady_clock::now();
  std::string what;
  try {
    (void)Safetensors::read(path);
    FAIL_CHECK("expected moe::Error");
  } catch (const Error& e) {
    what = e.what();
  } catch (const std::bad_alloc&) {
    FAIL_CHECK("std::bad_alloc escaped");
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CAPTURE(what);
  CHECK(what.find("moe::io::Safetensors '" + path.string() + "'") != std::string::npos);
  CHECK(what.find("data buffer of " + data + " bytes") != std::string::npos);
  CHECK(seconds < 5);

  // Within the machine's memory but past the address-space limit: the
  // failed allocation itself becomes moe::Error (not under AddressSanitizer,
  // whose shadow memory takes the address space and whose operator new aborts).
  const std::uint64_t gib = std::uint64_t{1} << 30;
  if (!test::kAddressSanitizer && io::detail::memory_limit() > 2 * gib) {
    const std::string header =
        R"({"t":{"dtype":"U8","shape":[2147483648],"data_offsets":[0,2147483648]}})";
    const Bytes head = make_file(header);
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(head.data()),
                static_cast<std::streamsize>(head.size()));
    }
    fs::resize_file(path, head.size() + 2 * gib);
    std::string failed;
    bool limited = false;
    {
      test::AddressSpaceLimit limit(gib);
      limited = limit.active();
      if (limited) failed = error_of([&] { (void)Safetensors::read(path); });
    }
    if (limited) {
      CAPTURE(failed);
      const std::string expected = "cannot allocate the data buffer of 2147483648 bytes";
      CHECK(failed.find(path.string() + "': " + expected) != std::string::npos);
    }
  }
}

TEST_CASE("writes are atomic: no temporary file is left, and the target changes only on success") {
  ScratchDir dir;
  SafetensorsWriter w;
  const std::vector<float> v(64, 1.0f);
  w.add<float>("v", v, {64});

  SUBCASE("a directory that does not exist") {
    const fs::path path = dir.path() / "no" / "such" / "dir" / "x.safetensors";
    const std::string what = error_of([&] { w.write(path); });
    CHECK(what.find("'" + path.string() + "'") != std::string::npos);
    CHECK(what.find("No such file or directory") != std::string::npos);
    CHECK(dir.listing().empty());
  }
  SUBCASE("an existing file is replaced on success") {
    const fs::path path = dir.path() / "x.safetensors";
    std::ofstream(path) << "old";
    w.write(path);
    CHECK(read_file(path) == w.serialize());
    CHECK(dir.listing() == std::set<std::string>{"x.safetensors"});
  }
  SUBCASE("a failed write (file size limit) leaves the existing file as it was") {
    const fs::path path = dir.path() / "x.safetensors";
    std::ofstream(path) << "old";
    // RLIMIT_FSIZE makes write() fail with EFBIG even for root, for whom
    // permission bits would not.
    rlimit saved{};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
    const auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
    rlimit small = saved;
    small.rlim_cur = 100;  // less than the file
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
    const std::string what = error_of([&] { w.write(path); });
    ::setrlimit(RLIMIT_FSIZE, &saved);
    ::signal(SIGXFSZ, old_handler);
    CHECK(what.find("cannot write the temporary file") != std::string::npos);
    CHECK(what.find(path.string()) != std::string::npos);
    CHECK(what.find("File too large") != std::string::npos);
    CHECK(read_file(path) == bytes_of("old"));
    CHECK(dir.listing() == std::set<std::string>{"x.safetensors"});
  }
  SUBCASE("a failed rename (the target is a directory) leaves it as it was") {
    const fs::path path = dir.path() / "x.safetensors";
    fs::create_directories(path / "inside");
    const std::string what = error_of([&] { w.write(path); });
    CHECK(what.find("cannot rename the temporary file") != std::string::npos);
    CHECK(fs::is_directory(path / "inside"));
    CHECK(dir.listing() == std::set<std::string>{"x.safetensors"});
  }
  SUBCASE("a path without a file name") {
    CHECK(error_of([&] { w.write(dir.path() / ""); }).find("has no file name") !=
          std::string::npos);
  }
}
