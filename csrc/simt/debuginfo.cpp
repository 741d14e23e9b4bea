// Module layout and source locations for the instrumented build's reports (debuginfo.h).
#include "simt/debuginfo.h"

#include <dlfcn.h>
#include <link.h>

#include <cstdio>
#include <cstring>
#include <map>

namespace simt::debuginfo {

uintptr_t module_base() {
  static const uintptr_t base = [] {
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&module_base), &info);
    return reinterpret_cast<uintptr_t>(info.dli_fbase);
  }();
  return base;
}

namespace {

struct Segments {
  Range writable, image;
};

const Segments& segments() {
  static const Segments r = [] {
    Segments out;
    dl_iterate_phdr(
        [](dl_phdr_info* info, std::size_t, void* data) {
          if (info->dlpi_addr != module_base()) return 0;
          auto* r = static_cast<Segments*>(data);
          for (int i = 0; i < info->dlpi_phnum; ++i) {
            const ElfW(Phdr)& ph = info->dlpi_phdr[i];
            if (ph.p_type != PT_LOAD) continue;
            auto* lo = reinterpret_cast<unsigned char*>(info->dlpi_addr + ph.p_vaddr);
            auto* hi = lo + ph.p_memsz;
            if (ph.p_flags & PF_W) r->writable = Range{lo, hi};
            if (!r->image.lo || lo < r->image.lo) r->image.lo = lo;
            if (hi > r->image.hi) r->image.hi = hi;
          }
          return 1;
        },
        &out);
    return out;
  }();
  return r;
}

// "csrc/..." of an addr2line location, without its discriminator.
std::string trim_location(std::string l) {
  if (const auto k = l.find("csrc/"); k != std::string::npos) l = l.substr(k);
  if (const auto k = l.find(" (discriminator"); k != std::string::npos) l = l.substr(0, k);
  return l;
}

}  // namespace

// Static __shared__ objects are ordinary static variables (simt.h): the module's writable
// segment (.data, .bss) is where they are. (The rest of that segment is the executor's and the
// bindings' state, which kernel code only reads; constant tables are in read-only segments.)
const Range& writable_segment() { return segments().writable; }
const Range& image() { return segments().image; }

std::vector<std::string> run_addr2line(const char* flags, uintptr_t off) {
  std::vector<std::string> out;
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&module_base), &info) || !info.dli_fname) return out;
  char cmd[1024];
  std::snprintf(cmd, sizeof cmd, "addr2line %s -e '%s' 0x%lx 2>/dev/null", flags, info.dli_fname,
                static_cast<unsigned long>(off));
  FILE* p = popen(cmd, "r");
  if (!p) return out;
  char line[8192];
  while (std::fgets(line, sizeof line, p)) {
    line[std::strcspn(line, "\n")] = 0;
    out.emplace_back(line);
  }
  pclose(p);
  return out;
}

std::pair<std::string, std::string> function_and_line(uintptr_t off) {
  const std::vector<std::string> r = run_addr2line("-C -f", off);
  if (r.size() < 2) return {"?", "?"};
  std::string f = r[0];
  const std::string l = trim_location(r[1]);
  return {f.empty() ? "?" : f, l.empty() ? "?" : l};
}

std::string kernel_name(const void* kernel) {
  if (!kernel) return "?";
  std::string f = function_and_line(reinterpret_cast<uintptr_t>(kernel) - module_base()).first;
  if (f.size() > 160) f = f.substr(0, 157) + "...";
  return f;
}

std::string short_kernel_name(const void* kernel) {
  static std::map<const void*, std::string> cache;
  if (auto it = cache.find(kernel); it != cache.end()) return it->second;
  std::string f = kernel ? function_and_line(reinterpret_cast<uintptr_t>(kernel) - module_base()).first : "?";
  // Drop the return type, "(anonymous namespace)::" and the parameter list (the '(' at
  // template depth 0 that ends the name).
  if (f.rfind("void ", 0) == 0) f = f.substr(5);
  for (std::size_t k; (k = f.find("(anonymous namespace)::")) != std::string::npos;) f.erase(k, 23);
  int depth = 0;
  for (std::size_t i = 0; i < f.size(); ++i) {
    if (f[i] == '<') ++depth;
    if (f[i] == '>') --depth;
    if (f[i] == '(' && depth == 0 && i > 0) {
      f = f.substr(0, i);
      break;
    }
  }
  return cache[kernel] = f;
}

std::string source_of(uint32_t pc) {
  if (pc == 0) return "?";
  const auto [f, l] = function_and_line(pc - 1);
  return l + " (" + (f.size() > 160 ? f.substr(0, 157) + "..." : f) + ")";
}

std::string kernel_line(const void* pc) {
  static std::map<const void*, std::string> cache;
  if (auto it = cache.find(pc); it != cache.end()) return it->second;
  const std::vector<std::string> chain = run_addr2line("-i", reinterpret_cast<uintptr_t>(pc) - module_base() - 1);
  std::string inner = chain.empty() ? "?" : trim_location(chain[0]), out = inner;
  for (const std::string& raw : chain) {
    const std::string l = trim_location(raw);
    if (l.rfind("csrc/", 0) == 0 && l.rfind("csrc/common/", 0) != 0 && l.rfind("csrc/simt/", 0) != 0) {
      out = l == inner ? l : l + " (" + inner + ")";
      break;
    }
  }
  return cache[pc] = out;
}

}  // namespace simt::debuginfo
