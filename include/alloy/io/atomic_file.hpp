// Replacing a file so that a crash at any point leaves either the old file or the new one,
// whole: write a temporary file beside the target, fsync it, rename it over the target, fsync
// the directory. POSIX only.
#pragma once

#include <alloy/error.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <system_error>

namespace alloy {

namespace detail {
class TemporaryFile;
}

// Appends bytes to the file being written by write_file_atomically. Bytes go straight to the
// file descriptor, with no buffer in between: the caller chooses the chunk size.
class FileWriter {
 public:
  FileWriter(const FileWriter&) = delete;
  FileWriter& operator=(const FileWriter&) = delete;

  // Writes all of `bytes`, resuming after short writes and interrupted calls.
  void write(std::span<const std::byte> bytes);

  // Overwrites bytes already written, from `offset` (a header whose checksums are known only
  // once the data after it is written); the end of the file stays where it is.
  void write_at(std::uint64_t offset, std::span<const std::byte> bytes);

  std::uint64_t bytes_written() const noexcept { return written_; }

 private:
  friend class detail::TemporaryFile;
  explicit FileWriter(detail::TemporaryFile& file) : file_(file) {}

  detail::TemporaryFile& file_;
  std::uint64_t written_ = 0;
};

namespace detail {

inline std::string errno_text(int code) { return std::system_category().message(code); }

// Names differ within a process through the counter and across processes through the pid;
// O_EXCL settles any remaining clash.
inline std::atomic<std::uint64_t> temporary_file_counter{0};

// A file created beside the target; removed when destroyed unless it was renamed into place.
class TemporaryFile {
 public:
  explicit TemporaryFile(const std::filesystem::path& target) : target_(target), writer_(*this) {
    directory_ = target.parent_path();
    if (directory_.empty()) directory_ = ".";
    for (int attempt = 0;; ++attempt) {
      temporary_ = directory_ / (target.filename().string() + ".tmp." + std::to_string(::getpid()) + "." +
                                 std::to_string(temporary_file_counter.fetch_add(1)));
      fd_ = ::open(temporary_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      if (fd_ >= 0) break;
      if (errno == EINTR || (errno == EEXIST && attempt < 100)) continue;
      fail("create temporary file '" + temporary_.string() + "'", errno);
    }
  }

  TemporaryFile(const TemporaryFile&) = delete;
  TemporaryFile& operator=(const TemporaryFile&) = delete;

  ~TemporaryFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!renamed_) ::unlink(temporary_.c_str());
  }

  FileWriter& writer() noexcept { return writer_; }

  void write(std::span<const std::byte> bytes) {
    // Linux moves at most about 2 GiB per call; smaller calls keep each one bounded.
    constexpr std::size_t max_call = std::size_t(1) << 30;
    while (!bytes.empty()) {
      const ::ssize_t n = ::write(fd_, bytes.data(), std::min(bytes.size(), max_call));
      if (n < 0) {
        if (errno == EINTR) continue;
        fail("write to temporary file '" + temporary_.string() + "'", errno);
      }
      if (n == 0) fail("write to temporary file '" + temporary_.string() + "' (no progress)", EIO);
      bytes = bytes.subspan(static_cast<std::size_t>(n));
    }
  }

  void write_at(std::uint64_t offset, std::span<const std::byte> bytes) {
    constexpr std::size_t max_call = std::size_t(1) << 30;
    while (!bytes.empty()) {
      const ::ssize_t n = ::pwrite(fd_, bytes.data(), std::min(bytes.size(), max_call), static_cast<::off_t>(offset));
      if (n < 0) {
        if (errno == EINTR) continue;
        fail("write to temporary file '" + temporary_.string() + "'", errno);
      }
      if (n == 0) fail("write to temporary file '" + temporary_.string() + "' (no progress)", EIO);
      bytes = bytes.subspan(static_cast<std::size_t>(n));
      offset += static_cast<std::uint64_t>(n);
    }
  }

  // Makes the new contents durable, then visible under the target's name.
  void commit() {
    while (::fsync(fd_) != 0) {
      if (errno != EINTR) fail("fsync of temporary file '" + temporary_.string() + "'", errno);
    }
    const int fd = fd_;
    fd_ = -1;
    // Linux frees the descriptor even when close reports EINTR, so it is not retried.
    if (::close(fd) != 0 && errno != EINTR) fail("close of temporary file '" + temporary_.string() + "'", errno);
    if (::rename(temporary_.c_str(), target_.c_str()) != 0) {
      fail("rename of temporary file '" + temporary_.string() + "' over the target", errno);
    }
    renamed_ = true;
    // The rename is durable only once the directory itself is synced.
    int dir = -1;
    do {
      dir = ::open(directory_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } while (dir < 0 && errno == EINTR);
    if (dir < 0) {
      fail("open of directory '" + directory_.string() + "' to fsync the rename (the new file is in place)", errno);
    }
    int status = 0;
    while ((status = ::fsync(dir)) != 0 && errno == EINTR) {
    }
    const int fsync_errno = errno;
    ::close(dir);
    // EINVAL: the filesystem cannot sync directories, so there is nothing more to wait for.
    if (status != 0 && fsync_errno != EINVAL) {
      fail("fsync of directory '" + directory_.string() + "' after the rename (the new file is in place)", fsync_errno);
    }
  }

 private:
  [[noreturn]] void fail(const std::string& operation, int code) const {
    throw error("write_file_atomically: '" + target_.string() + "': " + operation + " failed: " + errno_text(code));
  }

  std::filesystem::path target_;
  std::filesystem::path directory_;
  std::filesystem::path temporary_;
  int fd_ = -1;
  bool renamed_ = false;
  FileWriter writer_;
};

}  // namespace detail

inline void FileWriter::write(std::span<const std::byte> bytes) {
  file_.write(bytes);
  written_ += bytes.size();
}

inline void FileWriter::write_at(std::uint64_t offset, std::span<const std::byte> bytes) {
  if (offset > written_ || bytes.size() > written_ - offset) {
    throw error("FileWriter::write_at: bytes [" + std::to_string(offset) + ", " +
                std::to_string(offset + bytes.size()) + ") reach past the " + std::to_string(written_) +
                " bytes written so far");
  }
  file_.write_at(offset, bytes);
}

// Where a write to `target` lands: a symbolic link (or a chain of them) is followed to the file
// it names, so the link stays a link and its target is replaced; a link that names no file yet
// gets that file created. Anything else is `target` itself.
inline std::filesystem::path write_destination(const std::filesystem::path& target) {
  std::filesystem::path p = target;
  for (int hops = 0;; ++hops) {
    std::error_code ec;
    if (!std::filesystem::is_symlink(std::filesystem::symlink_status(p, ec))) return p;
    if (hops == 40) throw error("write '" + target.string() + "': too many levels of symbolic links");
    const std::filesystem::path next = std::filesystem::read_symlink(p, ec);
    if (ec)
      throw error("write '" + target.string() + "': cannot read the symbolic link '" + p.string() +
                  "': " + ec.message());
    p = next.is_absolute() ? next : p.parent_path() / next;
  }
}

// Replaces `target` with what `write_contents` writes. On failure the temporary file is
// removed and `target` is left as it was; write_contents' own exceptions pass through
// unchanged, I/O failures throw alloy::error naming the path, the operation and the reason.
// A crash (not an exception) can leave a "<name>.tmp.<pid>.<n>" file beside the target.
// When `target` is a symbolic link, the file it names is replaced and the link is kept
// (write_destination): the temporary file is made beside that file, so the rename stays atomic.
inline void write_file_atomically(const std::filesystem::path& target,
                                  const std::function<void(FileWriter&)>& write_contents) {
  detail::TemporaryFile file(write_destination(target));
  write_contents(file.writer());
  file.commit();
}

// Replaces `target` with the concatenation of `pieces`.
inline void write_file_atomically(const std::filesystem::path& target,
                                  std::span<const std::span<const std::byte>> pieces) {
  write_file_atomically(target, [&](FileWriter& out) {
    for (const auto& piece : pieces) out.write(piece);
  });
}

}  // namespace alloy
