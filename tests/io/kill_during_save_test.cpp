// A process saving checkpoints in a loop, killed with SIGKILL at random moments: after every kill
// the checkpoint on disk loads and is, byte for byte, the one the interrupted save was replacing
// or the one it was writing, and a temporary file a killed save leaves is removed by a later
// save, so none piles up for a later save to trip over (at most one is ever there). ALLOY_KILL_SAVE_ROUNDS sets the
// number of kills (25 by default; docs/reliability.md has the long run's figures).

#include "../optim/reference.hpp"
#include "../support/temp_dir.hpp"
#include "../support/test_support.hpp"

#include <alloy/alloy.hpp>

#include <gtest/gtest.h>

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace alloy;
namespace fs = std::filesystem;
using test::read_all;

// One parameter pulled toward fixed targets; large enough (a 7 MB checkpoint) that a save spends
// milliseconds writing, so kills land inside the write as well as around the rename.
class PullModel {
 public:
  using batch_type = int;
  static constexpr std::int64_t numel = std::int64_t(1) << 19;

  void declare(ParamRegistry& r) { handle_ = r.declare("weight", {512, numel / 512}, Init::uniform(-1.0f, 1.0f)); }

  template <class Ctx>
  float forward_backward(Ctx& ctx, int) {
    using G = typename Ctx::grad_type;
    const auto p = ctx.param(handle_);
    const auto g = ctx.grad(handle_);
    double loss = 0.0;
    for (std::int64_t i = 0; i < numel; ++i) {
      const float d = to_float(p[i]) - static_cast<float>(i % 7) * 0.25f;
      loss += 0.5 * double(d) * double(d);
      g[i] = round_nearest<G>(d / static_cast<float>(numel) * ctx.loss_scale());
    }
    return static_cast<float>(loss / double(numel));
  }

 private:
  ParamHandle handle_{};
};

using Tr = Trainer<PullModel, Precision<bf16, fp32_master>, AdamW<>, Host>;

// What the saving process tells the test, in memory shared across the fork.
struct Progress {
  std::atomic<std::uint64_t> begun;  // the save started last
  std::atomic<std::uint64_t> done;   // the save completed last
  std::atomic<int> failed;
  char message[1024];
};

// Save i writes states[i % states.size()]; it never returns: it is killed, or exits on an error.
[[noreturn]] void save_forever(std::vector<Tr>& states, const fs::path& target, std::uint64_t first,
                               Progress* progress) {
  try {
    for (std::uint64_t i = first;; ++i) {
      progress->begun.store(i);
      states[i % states.size()].save(target);
      progress->done.store(i);
    }
  } catch (const std::exception& e) {
    std::snprintf(progress->message, sizeof progress->message, "%s", e.what());
    progress->failed.store(1);
  }
  ::_exit(1);
}

int rounds_from_environment() {
  const char* v = std::getenv("ALLOY_KILL_SAVE_ROUNDS");
  if (!v || !*v) return 25;
  const int n = std::atoi(v);
  if (n < 1) throw std::invalid_argument(std::string("ALLOY_KILL_SAVE_ROUNDS='") + v + "': a positive number");
  return n;
}

// The names in `dir` other than `keep`.
std::vector<std::string> others_in(const fs::path& dir, const std::string& keep) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename() != keep) names.push_back(e.path().filename().string());
  }
  return names;
}

TEST(KillDuringSave, TheCheckpointIsThePreviousOrTheNewOneAndNoTemporaryPilesUp) {
  ALLOY_SEEDED(seed);
  const int rounds = rounds_from_environment();
  test::TempDir dir("alloy_kill_save");
  test::TempDir expected_dir("alloy_kill_save_expected");
  const fs::path target = dir / "ckpt.safetensors";

  // Three states: save i writes state i % 3, so the state before a save and the state after it
  // differ from each other and from the third, which no kill may leave on disk.
  std::vector<Tr> states;
  states.reserve(3);
  for (int k = 0; k < 3; ++k) {
    states.emplace_back(PullModel{}, Tr::Config{.seed = 11});
    for (int s = 0; s < k; ++s) states.back().step([] { return 0; });
  }
  std::vector<std::vector<std::byte>> expected;
  for (int k = 0; k < 3; ++k) {
    const fs::path path = expected_dir / ("state" + std::to_string(k) + ".safetensors");
    states[k].save(path);
    expected.push_back(read_all(path));
  }
  ASSERT_NE(expected[0], expected[1]);
  ASSERT_NE(expected[1], expected[2]);

  // Kills fall uniformly in the first three saves' worth of time.
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 3; ++i) states[0].save(target);
  const double save_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 3;

  auto* progress = static_cast<Progress*>(
      ::mmap(nullptr, sizeof(Progress), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(progress, MAP_FAILED);

  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> delay(0.0, 3.0 * save_seconds);
  Tr reader(PullModel{}, Tr::Config{.seed = 99});
  std::uint64_t on_disk = 0;  // the index of the save whose state is on disk: state 0 now
  int before_first_save = 0, between_saves = 0, in_save_previous = 0, in_save_new = 0, temporary_left = 0,
      earlier_temporary_kept = 0;
  std::uint64_t saves_completed = 0;
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE("kill " + std::to_string(round + 1) + " of " + std::to_string(rounds));
    progress->begun.store(on_disk);
    progress->done.store(on_disk);
    progress->failed.store(0);
    progress->message[0] = '\0';
    const ::pid_t child = ::fork();
    ASSERT_GE(child, 0) << "fork failed";
    if (child == 0) save_forever(states, target, on_disk + 1, progress);
    std::this_thread::sleep_for(std::chrono::duration<double>(delay(rng)));
    ::kill(child, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        << "the saving process stopped before it was killed; its save failed with: " << progress->message;

    // Save `done` returned, so its rename happened; save `begun` may or may not have renamed.
    const std::uint64_t begun = progress->begun.load(), done = progress->done.load();
    ASSERT_TRUE(begun == done || begun == done + 1) << begun << " " << done;
    saves_completed += done - on_disk;
    const auto bytes = read_all(target);
    std::uint64_t found = 0;
    if (bytes == expected[begun % 3]) {
      found = begun;
    } else if (begun != done && bytes == expected[done % 3]) {
      found = done;
    } else {
      FAIL() << "after the kill the checkpoint (" << bytes.size() << " bytes) is neither the state of save " << done
             << " nor of save " << begun;
    }
    EXPECT_NO_THROW(reader.load(target));
    EXPECT_EQ(test::snapshot(reader.store()), test::snapshot(states[found % 3].store()));

    if (begun == on_disk) {
      ++before_first_save;
    } else if (begun == done) {
      ++between_saves;
    } else {
      ++(found == begun ? in_save_new : in_save_previous);
    }
    // At most one temporary file: the interrupted save's, or, when this process was killed before
    // its first save got to remove it, an earlier process's. A completed save removed earlier ones.
    const auto others = others_in(dir.path(), target.filename().string());
    const std::string own = target.filename().string() + ".tmp." + std::to_string(child) + ".";
    ASSERT_LE(others.size(), 1u) << "temporary files pile up: " << others.size() << ", first " << others.front();
    if (!others.empty()) {
      ++temporary_left;
      if (others.front().rfind(own, 0) != 0) {
        ++earlier_temporary_kept;
        EXPECT_EQ(done, on_disk) << others.front()
                                 << ", an earlier process's temporary file, outlived a completed save";
      }
    }
    on_disk = found;
  }
  ::munmap(progress, sizeof(Progress));

  // A later save succeeds and leaves the checkpoint alone in its directory.
  states[(on_disk + 1) % 3].save(target);
  EXPECT_EQ(read_all(target), expected[(on_disk + 1) % 3]);
  EXPECT_EQ(others_in(dir.path(), target.filename().string()), std::vector<std::string>{});

  EXPECT_GT(in_save_previous + in_save_new, 0) << "no kill landed inside a save: the test did not test saving";
  std::cout << "kill during save: " << rounds << " kills (save " << save_seconds * 1e3 << " ms, " << expected[0].size()
            << " bytes): " << in_save_previous << " inside a save left the previous checkpoint, " << in_save_new
            << " inside a save after its rename left the new one, " << between_saves << " between saves, "
            << before_first_save << " before the first save; " << temporary_left << " left a temporary file ("
            << earlier_temporary_kept
            << " of them an earlier process's: the kill came before the first save removed it), each removed by a "
               "later save; "
            << saves_completed << " saves completed\n";
}

}  // namespace
