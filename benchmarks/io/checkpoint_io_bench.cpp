// What checkpoint checksums cost, on the host (no GPU needed). Prints Markdown tables:
//
//   1. CRC-32C throughput: the crc32 instruction in three lanes, and the slicing-by-8 table, over
//      256 KiB (in cache) and 1 GiB (from memory); best of a few rounds of at least 0.3 s.
//   2. A checkpoint of GPT-2's parameters (--layers 48: 1.56B) as a Precision<bf16, fp32_master>,
//      AdamW<> trainer saves it: per parameter a BF16 tensor, its F32 master, F32 exp_avg and F32
//      exp_avg_sq (14 bytes, 21.8 GB at 1.56B), written with write_safetensors (fsync included)
//      with and without checksums, then read back tensor by tensor with SafetensorsFile::read
//      (which checks each tensor's checksum when the file has them): cold (the file's pages
//      dropped with posix_fadvise after writing) and, when the file is under a third of the
//      machine's memory, warm (read again at once). Wall time, and this process's CPU time, which
//      a disk shared with other work disturbs far less: the checksums' cost is the difference.
//
// Every tensor's bytes are a prefix of one buffer the size of the largest tensor (wte in F32,
// 0.32 GB), given as a span, as a Host trainer's save gives its arenas; reads go into a buffer of
// that size. So memory stays small at any --layers, and the disk needs room for one file.
//
//   alloy_bench_checkpoint_io [--dir D (default: the temporary directory)] [--layers L (48)]
//                             [--rounds R (1)]
#include "../gpt2_shapes.hpp"

#include <alloy/io/crc32c.hpp>
#include <alloy/io/safetensors.hpp>

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace alloy;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// This process's CPU time (user and system, all threads): on a shared machine the wall time of a
// save swings with the disk and the other users, its CPU time much less.
double cpu_seconds() {
  timespec t{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// Wall and CPU seconds of f().
template <class F>
std::pair<double, double> timed(F&& f) {
  const auto start = Clock::now();
  const double cpu = cpu_seconds();
  f();
  return {seconds_since(start), cpu_seconds() - cpu};
}

// Best GB/s of `rounds` rounds, each repeating f over `bytes` for at least 0.3 s.
template <class F>
double best_rate(std::size_t bytes, F&& f, int rounds = 5) {
  double best = 0;
  for (int r = 0; r < rounds; ++r) {
    std::size_t done = 0;
    const auto start = Clock::now();
    do {
      f();
      done += bytes;
    } while (seconds_since(start) < 0.3);
    best = std::max(best, static_cast<double>(done) / seconds_since(start) / 1e9);
  }
  return best;
}

volatile std::uint32_t sink;

void crc_table() {
  std::vector<std::byte> data(std::size_t(1) << 30);
  std::mt19937_64 rng(1);
  for (std::size_t i = 0; i < data.size(); i += 8) {
    const std::uint64_t v = rng();
    std::memcpy(data.data() + i, &v, 8);
  }
  std::printf("| CRC-32C path | 256 KiB, in cache | 1 GiB, from memory |\n| --- | --- | --- |\n");
  auto row = [&](const char* name, auto&& crc) {
    const std::span<const std::byte> small(data.data(), 256 << 10), large(data);
    const double a = best_rate(small.size(), [&] { sink = crc(small); });
    const double b = best_rate(
        large.size(), [&] { sink = crc(large); }, 3);
    std::printf("| %s | %.2f GB/s | %.2f GB/s |\n", name, a, b);
  };
  if (detail::crc32c_hardware_available()) {
    row("crc32 instruction, 3 lanes (alloy::crc32c here)",
        [](std::span<const std::byte> b) { return ~detail::crc32c_hardware(~0u, b.data(), b.size()); });
  } else {
    std::printf("| crc32 instruction | not on this CPU | |\n");
  }
  row("slicing-by-8 table",
      [](std::span<const std::byte> b) { return ~detail::crc32c_portable(~0u, b.data(), b.size()); });
}

struct Tensor {
  std::string name;
  SafetensorsDtype dtype;
  std::vector<std::int64_t> shape;
  std::size_t bytes;
};

std::vector<Tensor> checkpoint_tensors(int layers) {
  const ParamRegistry r = bench::gpt2_registry({"", 1600, layers});
  std::vector<Tensor> f32, bf16;
  for (const auto& spec : r.specs()) {
    std::size_t n = 1;
    for (auto d : spec.shape) n *= static_cast<std::size_t>(d);
    bf16.push_back({spec.name, SafetensorsDtype::bf16, spec.shape, 2 * n});
    f32.push_back({"alloy/master/" + spec.name, SafetensorsDtype::f32, spec.shape, 4 * n});
    for (const char* slot : {"/exp_avg", "/exp_avg_sq"}) {
      f32.push_back({"alloy/state/" + spec.name + slot, SafetensorsDtype::f32, spec.shape, 4 * n});
    }
  }
  f32.insert(f32.end(), bf16.begin(), bf16.end());  // wider dtypes first, as save_checkpoint writes
  return f32;
}

void drop_from_page_cache(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

std::pair<double, double> read_all(const std::filesystem::path& path, std::vector<std::byte>& buffer) {
  return timed([&] {
    const SafetensorsFile file = SafetensorsFile::open(path);
    for (const auto& t : file.tensors()) file.read(t.name, std::span(buffer.data(), t.size));
  });
}

void checkpoint_table(const std::filesystem::path& dir, int layers, int rounds) {
  const auto tensors = checkpoint_tensors(layers);
  std::size_t largest = 0, total = 0;
  for (const auto& t : tensors) largest = std::max(largest, t.bytes), total += t.bytes;
  std::vector<std::byte> data(largest);
  std::mt19937_64 rng(2);
  for (auto& b : data) b = std::byte(rng() & 0xFF);
  std::vector<TensorToWrite> to_write;
  for (const auto& t : tensors) {
    to_write.push_back({t.name, t.dtype, t.shape, std::span<const std::byte>(data.data(), t.bytes)});
  }
  const std::map<std::string, std::string> metadata = {{"alloy.format", "alloy-checkpoint-3"}};
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  const bool warm = static_cast<double>(total) < static_cast<double>(pages) * static_cast<double>(page) / 3;
  std::vector<std::byte> buffer(largest);
  const auto path = dir / "alloy_bench_checkpoint.safetensors";
  std::printf("\n%d layers: %zu tensors, %.2f GB (%.3fB parameters)\n\n", layers, tensors.size(), total / 1e9,
              total / 14.0 / 1e9);
  std::printf("Seconds, wall (CPU of this process in brackets).\n\n");
  std::printf("| checksums | save | cold load | warm load |\n| --- | --- | --- | --- |\n");
  auto cell = [](std::pair<double, double> t) { std::printf(" %.2f (%.2f) |", t.first, t.second); };
  for (int round = 0; round < rounds; ++round) {
    for (const bool checksums : {false, true}) {
      SafetensorsWriteOptions options;
      options.checksums = checksums;
      const auto save = timed([&] { write_safetensors(path, to_write, metadata, options); });
      drop_from_page_cache(path);
      const auto cold = read_all(path, buffer);
      std::printf("| %s |", checksums ? "yes" : "no");
      cell(save);
      cell(cold);
      if (warm) {
        cell(read_all(path, buffer));
      } else {
        std::printf(" (file over a third of memory) |");
      }
      std::printf("\n");
      std::fflush(stdout);
      std::filesystem::remove(path);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::filesystem::path dir = std::filesystem::temp_directory_path();
  int layers = 48, rounds = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--dir") {
      dir = argv[i + 1];
    } else if (flag == "--layers") {
      layers = std::atoi(argv[i + 1]);
    } else if (flag == "--rounds") {
      rounds = std::atoi(argv[i + 1]);
    }
  }
  crc_table();
  if (layers > 0) checkpoint_table(dir, layers, rounds);
}
