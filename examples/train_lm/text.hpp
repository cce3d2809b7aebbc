#pragma once
// The data side of moe-train-lm: UTF-8 text to character ids, a deterministic
// train/validation split, and batches drawn as a pure function of
// (seed, step) so that a resumed run sees exactly the batches it would have.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <moe/core/error.hpp>
#include <moe/math/random.hpp>
#include <string>
#include <vector>

namespace train_lm {

// Decodes UTF-8 into code points; malformed input is an error naming the
// byte offset (a character model must not silently invent characters).
inline std::vector<char32_t> decode_utf8(const std::string& bytes, const std::string& source) {
  std::vector<char32_t> out;
  out.reserve(bytes.size());
  std::size_t i = 0;
  const auto fail = [&](const char* what) {
    throw moe::Error(moe::detail::concat("moe-train-lm: ", source, ": invalid UTF-8 (", what,
                                         ") at byte offset ", i));
  };
  while (i < bytes.size()) {
    const auto b0 = static_cast<unsigned char>(bytes[i]);
    int extra = 0;
    char32_t cp = 0;
    if (b0 < 0x80) {
      cp = b0;
    } else if ((b0 & 0xE0) == 0xC0) {
      extra = 1, cp = b0 & 0x1F;
    } else if ((b0 & 0xF0) == 0xE0) {
      extra = 2, cp = b0 & 0x0F;
    } else if ((b0 & 0xF8) == 0xF0) {
      extra = 3, cp = b0 & 0x07;
    } else {
      fail("bad lead byte");
    }
    if (i + static_cast<std::size_t>(extra) >= bytes.size()) fail("truncated sequence");
    for (int k = 1; k <= extra; ++k) {
      const auto b = static_cast<unsigned char>(bytes[i + static_cast<std::size_t>(k)]);
      if ((b & 0xC0) != 0x80) fail("bad continuation byte");
      cp = (cp << 6) | (b & 0x3F);
    }
    static constexpr char32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[extra]) fail("overlong encoding");
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) fail("not a Unicode scalar value");
    out.push_back(cp);
    i += static_cast<std::size_t>(extra) + 1;
  }
  return out;
}

inline std::string encode_utf8(char32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw moe::Error(
        moe::detail::concat("moe-train-lm: --data ", path.string(), ": cannot open the file"));
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The default corpus: English quotations, verse and prose from Debian's
// `fortunes` package (installed by `bash scripts/dev.sh examples`), a curated
// list of its files (about 1.4 MB). Overstrikes (c BACKSPACE c, old-style
// bold/underline) are removed and the "%" separators become blank lines.
// Without the package, the licence texts every Debian system carries
// (/usr/share/common-licenses, package base-files) stand in: only 240 KB,
// and repetitive, so a model soon memorises them.
inline constexpr const char* kFortunesDir = "/usr/share/games/fortunes";
inline constexpr const char* kLicencesDir = "/usr/share/common-licenses";
inline constexpr const char* kFortuneFiles[] = {
    "computers",     "education",   "food",       "fortunes", "goedel",     "humorists",
    "kids",          "law",         "literature", "love",     "magic",      "medicine",
    "miscellaneous", "paradoxum",   "people",     "pets",     "platitudes", "riddles",
    "science",       "songs-poems", "sports",     "tao",      "wisdom",     "work"};

inline std::string clean_fortunes(const std::string& raw) {
  std::string out;
  out.reserve(raw.size());
  std::size_t line_start = 0;
  for (std::size_t i = 0; i < raw.size(); ++i) {
    const char c = raw[i];
    if (c == '\b') {  // c BACKSPACE c: keep one c
      if (!out.empty() && out.size() > line_start) out.pop_back();
      continue;
    }
    if (c == '\n') {
      // A line holding only "%" separates two fortunes.
      if (out.size() == line_start + 1 && out.back() == '%')
        out.back() = '\n';
      else
        out += c;
      line_start = out.size();
      continue;
    }
    if (c == '\r' || (static_cast<unsigned char>(c) < 0x20 && c != '\t')) continue;
    out += c;
  }
  return out;
}

struct DefaultCorpus {
  std::string text;
  std::string source;
};

inline DefaultCorpus read_default_corpus() {
  namespace fs = std::filesystem;
  DefaultCorpus c;
  std::size_t found = 0;
  for (const char* name : kFortuneFiles) {
    const fs::path p = fs::path(kFortunesDir) / name;
    if (!fs::is_regular_file(p)) continue;
    c.text += clean_fortunes(read_file(p));
    c.text += '\n';
    ++found;
  }
  if (found == std::size(kFortuneFiles)) {
    c.source =
        std::string(kFortunesDir) + " (" + std::to_string(found) + " files of Debian's fortunes)";
    return c;
  }
  c.text.clear();
  std::vector<fs::path> paths;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(kLicencesDir, ec))
    if (entry.is_regular_file() && !entry.is_symlink()) paths.push_back(entry.path());
  if (ec || paths.empty())
    throw moe::Error(moe::detail::concat("moe-train-lm: no default corpus: neither ", kFortunesDir,
                                         " (apt-get install fortunes) nor ", kLicencesDir,
                                         " exists; pass --data PATH with any UTF-8 text file"));
  std::sort(paths.begin(), paths.end());
  for (const auto& p : paths) c.text += read_file(p) + '\n';
  c.source = std::string(kLicencesDir) + " (" + std::to_string(paths.size()) +
             " licence texts; install Debian's fortunes for the default corpus)";
  std::fprintf(stderr,
               "moe-train-lm: %zu of the %zu default files in %s/ found (apt-get install "
               "fortunes): training on the licence texts instead, which a model soon memorises\n",
               found, std::size(kFortuneFiles), kFortunesDir);
  return c;
}

// The characters of the text, in code point order, and the text as ids.
struct Corpus {
  std::vector<char32_t> alphabet;  // id -> code point
  std::vector<int> train, valid;   // ids
  std::string source;              // for messages and the summary
  double valid_fraction = 0;
  std::uint64_t fingerprint = 0;  // of the ids: a resumed run must see the same data

  int vocab_size() const { return static_cast<int>(alphabet.size()); }
};

// The last `valid_fraction` of the text is the validation split: contiguous,
// so no validation window overlaps a training one except at the seam.
inline Corpus make_corpus(const std::string& bytes, const std::string& source,
                          double valid_fraction, int context) {
  moe::detail::require(valid_fraction > 0 && valid_fraction < 1,
                       "moe-train-lm: --valid-fraction=", valid_fraction,
                       ", expected a value in (0, 1)");
  const auto chars = decode_utf8(bytes, source);
  Corpus c;
  c.source = source;
  std::map<char32_t, int> ids;
  for (char32_t cp : chars) ids.emplace(cp, 0);
  for (auto& [cp, id] : ids) {
    id = static_cast<int>(c.alphabet.size());
    c.alphabet.push_back(cp);
  }
  const auto n = chars.size();
  const auto n_valid = static_cast<std::size_t>(static_cast<double>(n) * valid_fraction);
  const auto min_split = static_cast<std::size_t>(context) + 2;
  moe::detail::require(n_valid >= min_split && n - n_valid >= min_split, "moe-train-lm: ", source,
                       " has ", n, " characters, too few for a split with --context=", context,
                       " and --valid-fraction=", valid_fraction);
  c.train.reserve(n - n_valid);
  c.valid.reserve(n_valid);
  for (std::size_t i = 0; i < n; ++i)
    (i < n - n_valid ? c.train : c.valid).push_back(ids[chars[i]]);
  c.valid_fraction = valid_fraction;
  c.fingerprint = moe::math::mix64(n_valid);
  for (char32_t cp : chars) c.fingerprint = moe::math::mix64(c.fingerprint ^ cp);
  return c;
}

// Positions t (predicting text[t] from text[t-n..t-1]) of the batch of a step:
// uniform over the split, a pure function of (seed, step, row).
inline void sample_positions(std::uint64_t seed, std::uint64_t step, int context,
                             std::size_t text_size, std::vector<std::size_t>& positions) {
  const std::size_t range = text_size - static_cast<std::size_t>(context);
  // A stream of its own: the initialisation draws from (seed, 1..) too.
  constexpr std::uint64_t kBatchStream = 0x6261746368ull;  // "batch"
  const std::uint64_t step_key = moe::math::hash3(seed, kBatchStream, step);
  for (std::size_t r = 0; r < positions.size(); ++r) {
    const auto h = moe::math::hash3(step_key, 0, r);
    positions[r] = static_cast<std::size_t>(context) + static_cast<std::size_t>(h % range);
  }
}

}  // namespace train_lm
