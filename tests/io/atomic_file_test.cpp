#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"

#include <alloy/io/atomic_file.hpp>

#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
using alloy::test::message_of;
using alloy::test::random_bytes;
using alloy::test::read_all;

// Each test gets its own directory under the system's temporary directory.
class AtomicFile : public ::testing::Test {
 protected:
  // Everything in the test's directory: a leftover temporary file shows up here.
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_.path())) names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  alloy::test::TempDir dir_{"alloy_atomic_file"};
};

void write_plain(const fs::path& path, const std::vector<std::byte>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

TEST_F(AtomicFile, CreatesTheTargetWithReadableMode) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto bytes = random_bytes(rng, 1000);
  const fs::path target = dir_ / "new.bin";
  const std::span<const std::byte> piece(bytes);
  alloy::write_file_atomically(target, std::span(&piece, 1));
  EXPECT_EQ(read_all(target), bytes);
  EXPECT_EQ(listing(), std::vector<std::string>{"new.bin"});

  const ::mode_t mask = ::umask(0);
  ::umask(mask);
  struct stat info {};
  ASSERT_EQ(::stat(target.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0644u & ~mask);
}

TEST_F(AtomicFile, ReplacesTheTargetWhole) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const fs::path target = dir_ / "ckpt.bin";
  write_plain(target, random_bytes(rng, 5000));
  const auto replacement = random_bytes(rng, 17);  // shorter: no tail of the old file may survive
  alloy::write_file_atomically(target, [&](alloy::FileWriter& out) { out.write(replacement); });
  EXPECT_EQ(read_all(target), replacement);
  EXPECT_EQ(listing(), std::vector<std::string>{"ckpt.bin"});
}

TEST_F(AtomicFile, StreamsChunksInOrder) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto bytes = random_bytes(rng, 3'000'000);
  const fs::path target = dir_ / "streamed.bin";
  std::uint64_t reported = 0;
  alloy::write_file_atomically(target, [&](alloy::FileWriter& out) {
    std::size_t at = 0;
    while (at < bytes.size()) {
      const std::size_t n = std::min<std::size_t>(bytes.size() - at, rng() % 70'000);
      out.write(std::span(bytes).subspan(at, n));
      at += n;
    }
    reported = out.bytes_written();
  });
  EXPECT_EQ(reported, bytes.size());
  EXPECT_EQ(read_all(target), bytes);
}

TEST_F(AtomicFile, PiecesAreConcatenated) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const auto a = random_bytes(rng, 31), b = random_bytes(rng, 0), c = random_bytes(rng, 4096);
  const std::vector<std::span<const std::byte>> pieces{a, b, c};
  alloy::write_file_atomically(dir_ / "pieces.bin", pieces);
  std::vector<std::byte> expected = a;
  expected.insert(expected.end(), c.begin(), c.end());
  EXPECT_EQ(read_all(dir_ / "pieces.bin"), expected);
}

TEST_F(AtomicFile, WriterExceptionLeavesOldFileAndNoTemporary) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const fs::path target = dir_ / "ckpt.bin";
  const auto old_bytes = random_bytes(rng, 10'000);
  write_plain(target, old_bytes);
  const auto new_bytes = random_bytes(rng, 20'000);
  try {
    alloy::write_file_atomically(target, [&](alloy::FileWriter& out) {
      out.write(std::span(new_bytes).first(12'345));
      throw std::runtime_error("device copy failed");
    });
    FAIL() << "the writer's exception did not pass through";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "device copy failed");  // the caller's own exception, unchanged
  }
  EXPECT_EQ(read_all(target), old_bytes);
  EXPECT_EQ(listing(), std::vector<std::string>{"ckpt.bin"});
}

TEST_F(AtomicFile, FailedWriteNamesTheReasonAndLeavesOldFile) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const fs::path target = dir_ / "ckpt.bin";
  const auto old_bytes = random_bytes(rng, 100);
  write_plain(target, old_bytes);
  // A file size limit makes write(2) fail with EFBIG, like a full disk would with ENOSPC.
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit old_limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  rlimit small = old_limit;
  small.rlim_cur = 4096;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const auto big = random_bytes(rng, 100'000);
  const std::string message =
      message_of([&] { alloy::write_file_atomically(target, [&](alloy::FileWriter& out) { out.write(big); }); });
  ::setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_NE(message.find(target.string()), std::string::npos) << message;
  EXPECT_NE(message.find("write to temporary file"), std::string::npos) << message;
  EXPECT_NE(message.find("File too large"), std::string::npos) << message;
  EXPECT_EQ(read_all(target), old_bytes);
  EXPECT_EQ(listing(), std::vector<std::string>{"ckpt.bin"});
}

TEST_F(AtomicFile, MissingDirectoryFailsNamingThePath) {
  const fs::path target = dir_ / "no_such_dir" / "ckpt.bin";
  const std::string message = message_of([&] { alloy::write_file_atomically(target, [](alloy::FileWriter&) {}); });
  EXPECT_NE(message.find(target.string()), std::string::npos) << message;
  EXPECT_NE(message.find("create temporary file"), std::string::npos) << message;
  EXPECT_NE(message.find("No such file or directory"), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(target));
}

TEST_F(AtomicFile, FailedRenameRemovesTheTemporary) {
  // A non-empty directory cannot be replaced by a file: the rename is the step that fails.
  const fs::path target = dir_ / "occupied";
  fs::create_directory(target);
  write_plain(target / "keep.txt", {std::byte{1}});
  const std::string message =
      message_of([&] { alloy::write_file_atomically(target, [](alloy::FileWriter& out) { out.write({}); }); });
  EXPECT_NE(message.find("rename"), std::string::npos) << message;
  EXPECT_NE(message.find(target.string()), std::string::npos) << message;
  EXPECT_EQ(listing(), std::vector<std::string>{"occupied"});
  EXPECT_TRUE(fs::exists(target / "keep.txt"));
}

TEST_F(AtomicFile, ConcurrentWritersLeaveOneWholeVersion) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const fs::path target = dir_ / "shared.bin";
  std::vector<std::vector<std::byte>> versions;
  for (int i = 0; i < 8; ++i) versions.push_back(random_bytes(rng, 50'000 + 1000 * static_cast<std::size_t>(i)));
  std::vector<std::thread> threads;
  for (const auto& v : versions) {
    threads.emplace_back([&target, &v] {
      for (int round = 0; round < 5; ++round) {
        alloy::write_file_atomically(target, [&](alloy::FileWriter& out) {
          out.write(std::span(v).first(v.size() / 2));
          out.write(std::span(v).subspan(v.size() / 2));
        });
      }
    });
  }
  for (auto& t : threads) t.join();
  const auto result = read_all(target);
  EXPECT_NE(std::find(versions.begin(), versions.end(), result), versions.end());
  EXPECT_EQ(listing(), std::vector<std::string>{"shared.bin"});
}

// Temporary files a killed writer left beside the target are removed by the next write: those of
// other processes, and those named for this process's next temporary files (a restarted process
// that got its predecessor's pid, as in a container), more of them than the 100 names a write
// tries. Files that only look alike stay.
TEST_F(AtomicFile, StaleTemporariesOfTheTargetAreRemovedByTheNextWrite) {
  ALLOY_SEEDED(seed);
  std::mt19937_64 rng(seed);
  const fs::path target = dir_ / "ckpt.bin";
  const std::string pid = std::to_string(::getpid());
  write_plain(dir_ / "ckpt.bin.tmp.4000001.7", random_bytes(rng, 3000));
  write_plain(dir_ / "ckpt.bin.tmp.4000002.0", {});
  const std::uint64_t next = alloy::detail::temporary_file_counter.load();
  for (std::uint64_t n = next; n < next + 150; ++n) {
    write_plain(dir_ / ("ckpt.bin.tmp." + pid + "." + std::to_string(n)), random_bytes(rng, 10));
  }
  const std::vector<std::string> lookalikes = {"ckpt.bin.tmp.12", "ckpt.bin.tmp.x.1", "ckpt.bin.tmpl.1.2",
                                               "other.bin.tmp.1.2", "ckpt.bin.tmp.1.2.bak"};
  for (const auto& name : lookalikes) write_plain(dir_ / name, {std::byte{7}});
  const auto bytes = random_bytes(rng, 500);
  alloy::write_file_atomically(target, [&](alloy::FileWriter& out) { out.write(bytes); });
  EXPECT_EQ(read_all(target), bytes);
  std::vector<std::string> expected = lookalikes;
  expected.push_back("ckpt.bin");
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(listing(), expected);
}

// A temporary file whose writer holds its lock is being written: it stays until the lock goes.
TEST_F(AtomicFile, ALockedTemporaryIsAWriterAtWorkAndStays) {
  const fs::path target = dir_ / "ckpt.bin";
  const fs::path live = dir_ / "ckpt.bin.tmp.4000003.0";
  const int fd = ::open(live.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);
  alloy::write_file_atomically(target, [](alloy::FileWriter& out) { out.write(std::vector<std::byte>(9)); });
  EXPECT_EQ(listing(), (std::vector<std::string>{"ckpt.bin", "ckpt.bin.tmp.4000003.0"}));
  ::close(fd);
  alloy::write_file_atomically(target, [](alloy::FileWriter& out) { out.write(std::vector<std::byte>(9)); });
  EXPECT_EQ(listing(), std::vector<std::string>{"ckpt.bin"});
}

}  // namespace
