// libFuzzer target: Trainer::load (load_checkpoint) over arbitrary bytes, into a trainer of
// fuzz_model.hpp. Loading either succeeds or throws alloy::error; anything else (another
// exception, a sanitizer report, a leak, a hang) is a finding, and so is a refused load that
// changed the trainer. A checkpoint it accepts must then resume: saved again and loaded into a
// fresh trainer it gives the same state, and one more step gives the same report and bytes in both
// (or the same alloy::error).
// Half the mutations keep the file well-formed (checkpoint_mutator.hpp), to reach the value checks
// and training on what they let through.

#include "checkpoint_mutator.hpp"
#include "fuzz_model.hpp"
#include "fuzz_support.hpp"

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace {

using namespace alloy;
using fuzz::finding;

fuzz::Counts counts{"alloy_fuzz_checkpoint", "inputs"};

bool same_report(const StepReport& a, const StepReport& b) {
  return std::bit_cast<std::uint32_t>(a.loss) == std::bit_cast<std::uint32_t>(b.loss) &&
         std::bit_cast<std::uint64_t>(a.grad_norm) == std::bit_cast<std::uint64_t>(b.grad_norm) && a.lr == b.lr &&
         a.loss_scale == b.loss_scale && a.skipped == b.skipped && a.step == b.step &&
         a.applied_steps == b.applied_steps && a.skipped_steps == b.skipped_steps && a.overflows == b.overflows;
}

template <class Tr>
void resumes(Tr& loaded, const fuzz::ScratchDirectory& scratch) {
  const std::string who = Tr::signature();
  const auto path = scratch / "resaved.safetensors";
  Tr copy(fuzz::SmallModel{}, fuzz::config<Tr>(2));
  try {
    fuzz::only_alloy_errors("Trainer::save", [&] { loaded.save(path); });
    fuzz::only_alloy_errors("Trainer::load of a saved checkpoint", [&] { copy.load(path); });
  } catch (const alloy::error& e) {
    finding(who + ": an accepted checkpoint, saved again, does not load: " + e.what());
  }
  if (fuzz::store_bytes(copy.store()) != fuzz::store_bytes(loaded.store()) || copy.steps() != loaded.steps() ||
      copy.loss_scale() != loaded.loss_scale()) {
    finding(who + ": an accepted checkpoint, saved and loaded again, is another state");
  }
  const std::vector<fuzz::TargetBatch> batches(static_cast<std::size_t>(loaded.micro_batches()),
                                               fuzz::SmallModel::batch(17));
  // A step may refuse to go on (alloy::error: a dynamic scale that would fall below its minimum,
  // as training that diverged can reach too); then both refuse alike.
  auto step = [&](Tr& trainer, StepReport& report) -> std::string {
    try {
      fuzz::only_alloy_errors("Trainer::step",
                              [&] { report = trainer.step(std::span<const fuzz::TargetBatch>(batches)); });
    } catch (const alloy::error& e) {
      return e.what();
    }
    return "";
  };
  StepReport a, b;
  const std::string refused_a = step(loaded, a), refused_b = step(copy, b);
  if (refused_a != refused_b || !same_report(a, b) ||
      fuzz::store_bytes(copy.store()) != fuzz::store_bytes(loaded.store())) {
    finding(who + ": the step after a load differs from the step after saving and loading that state again ('" +
            refused_a + "', '" + refused_b + "')");
  }
}

template <class Tr>
void load_into(const std::filesystem::path& path, const fuzz::ScratchDirectory& scratch) {
  Tr trainer(fuzz::SmallModel{}, fuzz::config<Tr>(1));
  const auto before = fuzz::store_bytes(trainer.store());
  const auto steps = trainer.steps();
  const float scale = trainer.loss_scale();
  try {
    fuzz::only_alloy_errors("Trainer::load", [&] { trainer.load(path); });
  } catch (const alloy::error&) {
    ++counts.refused;
    if (fuzz::store_bytes(trainer.store()) != before || trainer.steps() != steps || trainer.loss_scale() != scale) {
      finding(Tr::signature() + ": a refused load changed the trainer");
    }
    return;
  }
  ++counts.accepted;
  resumes(trainer, scratch);
}

}  // namespace

// Each input is loaded into one trainer: the one whose signature it names, so a valid checkpoint
// goes the whole way; else one picked by its size, which refuses it (a signature check, or earlier).
// One load per input rather than one per trainer keeps the target fast.
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static fuzz::InputFile input;
  static fuzz::ScratchDirectory scratch;
  const auto& path = input.hold(data, size);
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  constexpr std::size_t trainers = std::tuple_size_v<fuzz::FuzzTrainers>;
  std::size_t chosen = size % trainers, index = 0;
  fuzz::for_each_trainer_type([&]<class Tr>(std::type_identity<Tr>) {
    if (bytes.find('"' + Tr::signature() + '"') != std::string_view::npos) chosen = index;
    ++index;
  });
  index = 0;
  fuzz::for_each_trainer_type([&]<class Tr>(std::type_identity<Tr>) {
    if (index++ != chosen) return;
    ++counts.inputs;
    load_into<Tr>(path, scratch);
  });
  return 0;
}

namespace {

// A fresh and a trained checkpoint of every trainer, as bytes.
std::vector<std::vector<std::uint8_t>> valid_checkpoints() {
  static fuzz::ScratchDirectory scratch;
  std::vector<std::vector<std::uint8_t>> out;
  fuzz::for_each_trainer_type([&]<class Tr>(std::type_identity<Tr>) {
    Tr trainer(fuzz::SmallModel{}, fuzz::config<Tr>(3));
    const std::vector<fuzz::TargetBatch> batches(static_cast<std::size_t>(trainer.micro_batches()),
                                                 fuzz::SmallModel::batch(5));
    for (int s = 0; s < 2; ++s) {
      const auto path = scratch / "valid.safetensors";
      trainer.save(path);
      out.push_back(fuzz::file_bytes(path));
      trainer.step(std::span<const fuzz::TargetBatch>(batches));
    }
  });
  return out;
}

}  // namespace

extern "C" std::size_t LLVMFuzzerMutate(std::uint8_t* data, std::size_t size, std::size_t max_size);

// Half the turns libFuzzer's own mutations, half a structured one (checkpoint_mutator.hpp).
extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data, std::size_t size, std::size_t max_size,
                                               unsigned int seed) {
  static fuzz::CheckpointMutator mutator(valid_checkpoints());
  std::minstd_rand rng(seed);
  if (rng() % 2 == 0) return LLVMFuzzerMutate(data, size, max_size);
  const auto mutated = mutator.mutate(data, size, rng);
  if (!mutated || mutated->size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
  std::memcpy(data, mutated->data(), mutated->size());
  return mutated->size();
}
