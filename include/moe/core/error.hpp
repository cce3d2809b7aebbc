#pragma once
// moe::Error: the one exception type of the library. Every message names the
// argument, its value and what was expected, e.g.
//   "moe::Layer::forward: x.cols()=511, expected d_model=512".

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moe {

class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& what) : std::invalid_argument(what) {}
};

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

// Throws moe::Error with the concatenated message when `ok` is false. The
// message is only built on failure, so checks cost one branch.
template <class... Parts>
void require(bool ok, Parts&&... parts) {
  if (!ok) throw Error(concat(std::forward<Parts>(parts)...));
}

// Counters and seeds kept in double state buffers (exact below 2^53) must be
// whole numbers in [0, 2^bits) before they are cast back to integers: the
// cast of anything else is undefined behaviour.
inline void require_whole(double value, int bits, const char* where, const char* name) {
  require(value >= 0 && value < std::ldexp(1.0, bits) && value == std::floor(value), where, ": ",
          name, "=", value, ", expected a whole number in [0, 2^", bits, ")");
}

}  // namespace detail
}  // namespace moe
