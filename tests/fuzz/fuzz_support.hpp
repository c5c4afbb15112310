// What both fuzz targets share: the input handed to the reader as a file, a scratch directory for
// files they write, the rule that anything but alloy::error is a finding, and counts printed at
// exit, which show that inputs reach the end of loading (tests/fuzz/run_fuzzer.cmake checks them).
#pragma once

#include <alloy/error.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <typeinfo>
#include <vector>

namespace alloy::fuzz {

// A crash libFuzzer records, with the input that caused it.
[[noreturn]] inline void finding(const std::string& what) {
  std::fprintf(stderr, "alloy fuzz finding: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// Runs f; alloy::error passes through, any other exception is a finding.
template <class F>
void only_alloy_errors(const char* during, F&& f) {
  try {
    f();
  } catch (const alloy::error&) {
    throw;
  } catch (const std::exception& e) {
    finding(std::string(during) + " threw " + typeid(e).name() + ", not alloy::error: " + e.what());
  } catch (...) {
    finding(std::string(during) + " threw something that is not a std::exception");
  }
}

// The input as a file the reader opens by path: an anonymous memory file (memfd), so no disk is
// touched, opened again through /proc/self/fd like any regular file.
class InputFile {
 public:
  InputFile() {
    fd_ = ::memfd_create("alloy_fuzz_input", MFD_CLOEXEC);
    if (fd_ < 0) finding(std::string("memfd_create failed: ") + std::strerror(errno));
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }

  const std::filesystem::path& hold(const std::uint8_t* data, std::size_t size) {
    if (::ftruncate(fd_, 0) != 0) finding(std::string("ftruncate failed: ") + std::strerror(errno));
    for (std::size_t done = 0; done < size;) {
      const ::ssize_t n = ::pwrite(fd_, data + done, size - done, static_cast<::off_t>(done));
      if (n <= 0) finding(std::string("pwrite failed: ") + std::strerror(errno));
      done += static_cast<std::size_t>(n);
    }
    return path_;
  }

 private:
  int fd_ = -1;
  std::filesystem::path path_;
};

// A directory for files the targets write: under /dev/shm where there is one (a save fsyncs),
// else the system's temporary directory; removed at exit.
class ScratchDirectory {
 public:
  ScratchDirectory() {
    std::error_code ec;
    const std::filesystem::path base = std::filesystem::is_directory("/dev/shm", ec) && ::access("/dev/shm", W_OK) == 0
                                           ? std::filesystem::path("/dev/shm")
                                           : std::filesystem::temp_directory_path();
    std::string pattern = (base / "alloy_fuzz_XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) finding("mkdtemp " + pattern + ": " + std::strerror(errno));
    path_ = pattern;
  }
  ~ScratchDirectory() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

// The whole file, read in one call.
inline std::vector<std::uint8_t> file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(in.tellg()));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
  if (!in) finding("cannot read " + path.string());
  return out;
}

// How many inputs ran and how many were accepted, printed when the process exits.
struct Counts {
  const char* target;
  const char* unit;  // what `inputs` counts
  std::uint64_t inputs = 0, accepted = 0, refused = 0;
  ~Counts() {
    std::fprintf(stderr, "%s: %llu %s: %llu accepted, %llu refused with alloy::error\n", target,
                 static_cast<unsigned long long>(inputs), unit, static_cast<unsigned long long>(accepted),
                 static_cast<unsigned long long>(refused));
  }
};

}  // namespace alloy::fuzz
