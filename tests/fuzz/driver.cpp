// A deterministic stand-in for libFuzzer, so that every build (sanitizers
// included) runs the fuzz target as a ctest:
//
//   fuzz_safetensors_driver [--iterations N] [--seed S] [files or dirs...]
//       runs LLVMFuzzerTestOneInput on the built-in seeds and the given
//       files, then on N mutations of them (bit flips, byte edits,
//       truncations, splices, header edits with the length kept right).
//   fuzz_safetensors_driver --write-seeds DIR
//       writes the built-in seeds, as a corpus for libFuzzer.
//
// The target aborts on a bug and uncaught exceptions terminate, so the exit
// status is the verdict.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "moe/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

using Input = std::vector<std::uint8_t>;

// splitmix64: a fixed sequence on every platform.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  std::size_t below(std::size_t n) { return n == 0 ? 0 : static_cast<std::size_t>(next() % n); }

 private:
  std::uint64_t state_;
};

Input from_bytes(const std::vector<std::byte>& b) {
  Input out(b.size());
  if (!b.empty()) std::memcpy(out.data(), b.data(), b.size());
  return out;
}

Input with_header(const std::string& header, const Input& data) {
  Input out(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>((header.size() >> (8 * i)) & 0xFF);
  std::copy(header.begin(), header.end(), out.begin() + 8);
  std::copy(data.begin(), data.end(), out.begin() + 8 + static_cast<std::ptrdiff_t>(header.size()));
  return out;
}

std::vector<Input> builtin_seeds() {
  std::vector<Input> seeds;
  {
    moe::io::SafetensorsWriter w;
    const std::vector<float> f{1.0f, -2.5f, 3.0f, 0.0f, 1e-30f, 7.0f};
    const std::vector<double> d{3.14, -1.0};
    const std::vector<std::int64_t> i{-1, 1LL << 40, 0};
    const std::vector<std::uint8_t> u{0, 1, 1};
    const bool b[] = {true, false};
    w.add<float>("layer.weight", f, {2, 3});
    w.add<double>("layer.bias", d, {2});
    w.add<std::int64_t>("steps", i, {3});
    w.add<std::uint8_t>("mask", u, {3, 1});
    w.add<bool>("flags", b, {2});
    w.add<float>("empty", std::span<const float>(), {0, 4});
    w.add<std::int32_t>("scalar", std::vector<std::int32_t>{42}, {});
    w.set_metadata("format", "moe.layer");
    w.set_metadata("d_model", "3");
    seeds.push_back(from_bytes(w.serialize()));
  }
  {
    moe::io::SafetensorsWriter w;
    w.add<float>("x", std::vector<float>{0.5f}, {1});
    seeds.push_back(from_bytes(w.serialize()));
  }
  // The reference writer's layout with F16, keys in another order, whitespace.
  seeds.push_back(with_header(
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F64","shape":[1,2],"data_offsets":[0,16]},)"
      R"("h":{"dtype":"F16","shape":[2],"data_offsets":[16,20]}}    )",
      Input{0, 0, 0, 0, 0, 0, 0xF0, 0x3F, 0, 0, 0, 0, 0, 0, 0, 0xC0, 0x00, 0x3C, 0x00, 0xBC}));
  seeds.push_back(
      with_header("{ \"t\" : { \"data_offsets\" : [0, 2], \"shape\" : [ 1 ], \"dtype\" : \"BF16\", "
                  "\"x\": [1, {\"y\": null}] } }",
                  Input{0x80, 0x3F}));
  seeds.push_back(with_header("{}", {}));
  return seeds;
}

// Mutations that reach past the first checks: most keep the length prefix
// consistent with an edited header.
Input mutate(const std::vector<Input>& pool, Rng& rng) {
  Input in = pool[rng.below(pool.size())];
  const int edits = 1 + static_cast<int>(rng.below(4));
  for (int e = 0; e < edits; ++e) {
    std::uint64_t n = 0;
    for (int i = 7; in.size() >= 8 && i >= 0; --i) n = (n << 8) | in[static_cast<std::size_t>(i)];
    const bool framed = in.size() >= 8 && n <= in.size() - 8;
    switch (rng.below(9)) {
      case 0:  // bit flip
        if (!in.empty()) in[rng.below(in.size())] ^= static_cast<std::uint8_t>(1u << rng.below(8));
        break;
      case 1: {  // an interesting byte
        static const std::uint8_t kBytes[] = {0,   0xFF, '{', '}', '[', ']', '"',  ',',  ':',
                                              ' ', '-',  '0', '9', 'e', '.', 0x80, 0xC3, '\\'};
        if (!in.empty()) in[rng.below(in.size())] = kBytes[rng.below(sizeof kBytes)];
        break;
      }
      case 2:  // truncate
        in.resize(rng.below(in.size() + 1));
        break;
      case 3: {  // splice the tail of another input
        const Input& other = pool[rng.below(pool.size())];
        const std::size_t at = rng.below(in.size() + 1), from = rng.below(other.size() + 1);
        in.resize(at);
        in.insert(in.end(), other.begin() + static_cast<std::ptrdiff_t>(from), other.end());
        break;
      }
      case 4: {  // the header length itself
        static const std::uint64_t kLengths[] = {
            0, 1, 7, 8, 100'000'000, 100'000'001, ~std::uint64_t{0}, 1ull << 63};
        const std::uint64_t v = rng.below(2) ? kLengths[rng.below(8)] : n + rng.below(17) - 8;
        for (int i = 0; i < 8 && in.size() >= 8; ++i)
          in[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>((v >> (8 * i)) & 0xFF);
        break;
      }
      default: {  // edit the header text, keeping the length prefix right
        if (!framed) break;
        std::string header(in.begin() + 8, in.begin() + 8 + static_cast<std::ptrdiff_t>(n));
        const Input data(in.begin() + 8 + static_cast<std::ptrdiff_t>(n), in.end());
        std::vector<std::size_t> digits;
        for (std::size_t i = 0; i < header.size(); ++i)
          if (header[i] >= '0' && header[i] <= '9') digits.push_back(i);
        const std::size_t at = rng.below(header.size() + 1);
        switch (rng.below(5)) {
          case 0:  // a digit becomes another, or gains neighbours
            if (!digits.empty()) {
              const std::size_t d = digits[rng.below(digits.size())];
              if (rng.below(2))
                header[d] = static_cast<char>('0' + rng.below(10));
              else
                header.insert(d, rng.below(2) ? "9999999999" : "-");
            }
            break;
          case 1:  // delete a stretch
            header.erase(at, rng.below(8));
            break;
          case 2: {  // insert a token
            static const char* kTokens[] = {"\"dtype\":\"F32\",",
                                            "\"shape\":[],",
                                            "\"data_offsets\":[0,0],",
                                            "\"__metadata__\"",
                                            "{\"a\":\"b\"}",
                                            "1.5",
                                            "-1",
                                            "null",
                                            "[",
                                            "]",
                                            "{",
                                            "}",
                                            ",",
                                            "\"BF16\"",
                                            "\"U64\"",
                                            "18446744073709551615",
                                            "4294967296",
                                            "\"x\":{}",
                                            "\"\\u0000\""};
            header.insert(at, kTokens[rng.below(sizeof kTokens / sizeof *kTokens)]);
            break;
          }
          case 3:  // copy one stretch of the header over another place
            if (!header.empty()) {
              const std::size_t from = rng.below(header.size());
              header.insert(at, header.substr(from, rng.below(24)));
            }
            break;
          default:  // pad with spaces, or grow or shrink the data
            if (rng.below(2))
              header.append(rng.below(9), ' ');
            else {
              Input resized = data;
              resized.resize(rng.below(data.size() + 9));
              in = with_header(header, resized);
              continue;
            }
        }
        in = with_header(header, data);
      }
    }
  }
  return in;
}

bool write_seeds(const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  const auto seeds = builtin_seeds();
  for (std::size_t i = 0; i < seeds.size(); ++i) {
    std::ofstream out(dir / ("seed-" + std::to_string(i) + ".safetensors"), std::ios::binary);
    out.write(reinterpret_cast<const char*>(seeds[i].data()),
              static_cast<std::streamsize>(seeds[i].size()));
    if (!out) return false;
  }
  std::printf("fuzz driver: wrote %zu seeds to %s\n", seeds.size(), dir.c_str());
  return true;
}

void add_file(std::vector<Input>& pool, const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  pool.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

int main(int argc, char** argv) {
  long iterations = 30000;
  std::uint64_t seed = 1;
  std::vector<Input> pool = builtin_seeds();
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--write-seeds" && i + 1 < argc) return write_seeds(argv[++i]) ? 0 : 1;
    if (arg == "--iterations" && i + 1 < argc) {
      iterations = std::stol(argv[++i]);
    } else if (arg == "--seed" && i + 1 < argc) {
      seed = std::stoull(argv[++i]);
    } else if (std::filesystem::is_directory(arg)) {
      for (const auto& entry : std::filesystem::directory_iterator(arg))
        if (entry.is_regular_file()) add_file(pool, entry.path());
    } else if (std::filesystem::is_regular_file(arg)) {
      add_file(pool, arg);
    } else {
      std::fprintf(stderr,
                   "usage: %s [--iterations N] [--seed S] [files or dirs...] | "
                   "--write-seeds DIR\n",
                   argv[0]);
      return 2;
    }
  }

  long accepted = 0;
  auto run = [&](const Input& in) {
    LLVMFuzzerTestOneInput(in.data(), in.size());
    try {
      (void)moe::io::Safetensors::parse({reinterpret_cast<const std::byte*>(in.data()), in.size()});
      ++accepted;
    } catch (const moe::Error&) {
    }
  };
  for (const Input& in : pool) run(in);
  const long seeds_accepted = accepted;
  Rng rng(seed);
  for (long i = 0; i < iterations; ++i) run(mutate(pool, rng));
  std::printf("fuzz driver: %zu seeds (%ld valid), %ld mutations (%ld valid files)\n", pool.size(),
              seeds_accepted, iterations, accepted - seeds_accepted);
  // A driver whose mutations never produce a valid file tests only the first
  // checks: fail rather than pass vacuously.
  if (seeds_accepted == 0 || accepted - seeds_accepted < iterations / 100) {
    std::fprintf(stderr, "fuzz driver: too few valid inputs to be meaningful\n");
    return 1;
  }
  return 0;
}
