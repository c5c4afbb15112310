// Runs a function as every rank of a HostWorld, one thread a rank, and hands back what each
// rank returned or the message of the alloy::error it threw.
#pragma once

#include <alloy/dist/host_communicator.hpp>

#include <chrono>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace alloy::test {

template <class R>
struct RankResult {
  std::optional<R> value;
  std::string error;  // the alloy::error's message, or "" when the rank returned
};

// f(HostCommunicator&) -> R on each of `world_size` ranks. A rank's communicator is destroyed
// when f returns or throws, which aborts the world for the others (HostWorld::leave).
template <class R>
std::vector<RankResult<R>> run_ranks(int world_size, const std::function<R(HostCommunicator&)>& f,
                                     std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  HostWorld world(world_size, timeout);
  std::vector<RankResult<R>> out(static_cast<std::size_t>(world_size));
  std::vector<std::thread> threads;
  for (int r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r] {
      try {
        HostCommunicator comm(world, r);
        out[r].value = f(comm);
      } catch (const alloy::error& e) {
        out[r].error = e.what();
      } catch (const std::exception& e) {
        out[r].error = std::string("not an alloy::error: ") + e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return out;
}

}  // namespace alloy::test
