#pragma once
// The safetensors reader's first pass over a header's JSON (SAX), before
// nlohmann::json builds the document.

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "moe/core/error.hpp"
#include "moe/io/format.hpp"

namespace moe::io::detail {

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

}  // namespace moe::io::detail
