// Error handling shared by every family.
//
// Host code never returns error codes and never prints-and-returns: a failed
// check throws. The binding layer (csrc/bindings.cpp) turns
//   inferops::ValueError -> Python ValueError   (caller passed bad arguments)
//   inferops::TypeError  -> Python TypeError    (wrong dtype)
//   inferops::Error      -> Python RuntimeError (CUDA failure, broken invariant)
// Every message carries the file, the line and the failed condition.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace inferops {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class ValueError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class TypeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <typename Exc, typename... Args>
[[noreturn]] void fail(const char* file, int line, const char* cond, const Args&... args) {
  std::string msg = concat(args...);
  throw Exc(concat(msg, msg.empty() ? "" : " ", "(check `", cond, "` failed at ", file, ":", line,
                   ")"));
}

}  // namespace detail
}  // namespace inferops

// Argument checks: the caller gave something the op cannot take.
#define INFEROPS_CHECK_ARG(cond, ...)                                                     \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      ::inferops::detail::fail<::inferops::ValueError>(__FILE__, __LINE__, #cond,         \
                                                       ##__VA_ARGS__);                    \
    }                                                                                     \
  } while (0)

#define INFEROPS_CHECK_TYPE(cond, ...)                                                              \
  do {                                                                                              \
    if (!(cond)) {                                                                                  \
      ::inferops::detail::fail<::inferops::TypeError>(__FILE__, __LINE__, #cond, ##__VA_ARGS__);   \
    }                                                                                               \
  } while (0)

// Internal invariants: failing one is a bug in inferops or a runtime failure.
#define INFEROPS_CHECK(cond, ...)                                                             \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      ::inferops::detail::fail<::inferops::Error>(__FILE__, __LINE__, #cond, ##__VA_ARGS__);  \
    }                                                                                         \
  } while (0)

// Every op's host entry ends with this: in a CUDA build it runs `launch`
// (a statement, or several separated by semicolons, in braces); in a host-only
// build, after the same argument checks, it raises naming the op.
//   INFEROPS_LAUNCH_CUDA("merge_states", stream, { launch_merge_states(p, ...); });
#ifdef INFEROPS_WITH_CUDA
#define INFEROPS_LAUNCH_CUDA(op, stream, ...) \
  do {                                        \
    (void)(stream);                           \
    __VA_ARGS__                               \
  } while (0)
#else
#define INFEROPS_LAUNCH_CUDA(op, stream, ...)                                              \
  do {                                                                                     \
    (void)(stream);                                                                        \
    INFEROPS_CHECK(false, "inferops was built without CUDA: " op " has no CUDA kernel");   \
  } while (0)
#endif
