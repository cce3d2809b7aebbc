// A deterministic stand-in for libFuzzer for the layer's fuzz target
// (fuzz_layer.cpp), so that every build, sanitizers included, runs it as a
// ctest:
//
//   fuzz_layer_driver [--iterations N] [--seed S]
//       runs LLVMFuzzerTestOneInput on N random inputs of 0 to 96 bytes.
//
// The target aborts on a bug and uncaught exceptions terminate, so the exit
// status is the verdict.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

int main(int argc, char** argv) {
  std::uint64_t iterations = 2000, state = 0x6c61796572ull;  // "layer"
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--iterations")
      iterations = std::stoull(argv[i + 1]);
    else if (flag == "--seed")
      state = std::stoull(argv[i + 1]);
    else {
      std::fprintf(stderr, "usage: fuzz_layer_driver [--iterations N] [--seed S]\n");
      return 2;
    }
  }
  const auto next = [&] {  // splitmix64
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  std::vector<std::uint8_t> input;
  for (std::uint64_t it = 0; it < iterations; ++it) {
    input.resize(static_cast<std::size_t>(next() % 97));
    for (auto& b : input) b = static_cast<std::uint8_t>(next());
    LLVMFuzzerTestOneInput(input.data(), input.size());
  }
  std::printf("fuzz_layer_driver: %llu inputs, no finding\n",
              static_cast<unsigned long long>(iterations));
  return 0;
}
