// Where things are in the executor module, for the instrumented build's reports (race.cpp,
// metrics.cpp; that build has -g): the module's load address, its writable segment (where the
// static __shared__ variables are, simt.h) and its whole image, and source locations through
// addr2line. Not part of the kernel-side API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace simt::debuginfo {

struct Range {
  unsigned char* lo = nullptr;
  unsigned char* hi = nullptr;
  bool contains(const void* p) const {
    const auto* c = static_cast<const unsigned char*>(p);
    return c >= lo && c < hi;
  }
  std::size_t size() const { return std::size_t(hi - lo); }
};

uintptr_t module_base();
const Range& writable_segment();  // .data and .bss: static __shared__ variables, the executor's globals
const Range& image();             // every loaded segment (code, constants, data)

// The output lines of `addr2line <flags>` on this module for the instruction at offset `off`.
std::vector<std::string> run_addr2line(const char* flags, uintptr_t off);
// {function, "file:line"} of the instruction at offset `off` (paths from csrc/ on).
std::pair<std::string, std::string> function_and_line(uintptr_t off);
// The kernel's demangled name (with its parameter list) / without the parameter list.
std::string kernel_name(const void* kernel);
std::string short_kernel_name(const void* kernel);
// "file:line (function)" of the call whose return address is `pc` (an offset in the module).
std::string source_of(uint32_t pc);
// The source line of the call whose return address is `pc`: the innermost location of its
// inline chain in kernel code (csrc/ outside csrc/common/ and csrc/simt/), followed by the
// innermost location in parentheses when that is a wrapper (csrc/common/mma.cuh:...). Cached.
std::string kernel_line(const void* pc);

}  // namespace simt::debuginfo
