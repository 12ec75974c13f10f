// Argument checks shared by every tdconv entry point: TDCONV_CHECK and friends, and the message
// helpers behind them.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace tdconv {

// Error messages are assembled with std::string and std::to_string, never with std::ostream:
// TORCH_CHECK's own formatting streams every argument through a std::ostringstream compiled into
// this library, and where the C++ runtime loaded into the process differs from the one the library
// was compiled against, those stream internals crash (seen with torch 2.11 + GCC 13: a segfault in
// ostream::_M_insert<long> inside the failing check). A single std::string argument is passed
// through by c10 untouched.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, double v) { s += std::to_string(v); }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
}  // namespace detail
}  // namespace tdconv

#define TDCONV_CHECK(cond, ...) TORCH_CHECK(cond, ::tdconv::detail::message(__VA_ARGS__))
#define TDCONV_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::tdconv::detail::message(__VA_ARGS__))

#define TDCONV_CHECK_FLOAT(t, name)                                                          \
  TDCONV_CHECK_TYPE((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble,      \
                    "tdconv: ", name, " must be float32 or float64, got ", (t).scalar_type())

#define TDCONV_CHECK_SAME_DEVICE(a, b, name_a, name_b)                                        \
  TDCONV_CHECK((a).device() == (b).device(), "tdconv: ", name_a, " is on ", (a).device(),     \
               " but ", name_b, " is on ", (b).device())
