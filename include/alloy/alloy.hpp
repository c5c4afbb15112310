// alloy: mixed-precision training for C++ models. Include this header for the public surface.
#pragma once

#include <alloy/backend/backend.hpp>
#include <alloy/config.hpp>
#include <alloy/error.hpp>
#include <alloy/memory/activation.hpp>
#include <alloy/memory/layout.hpp>
#include <alloy/memory/registry.hpp>
#include <alloy/memory/tensor_view.hpp>
#include <alloy/memory/workspace.hpp>
#include <alloy/numeric/numeric.hpp>
#include <alloy/optim/optimizers.hpp>
#include <alloy/optim/state.hpp>
#include <alloy/precision/loss_scale.hpp>
#include <alloy/precision/precision.hpp>
#include <alloy/train/context.hpp>
#include <alloy/train/model.hpp>
#include <alloy/train/optimizer_step.hpp>
#include <alloy/train/param_store.hpp>
#include <alloy/train/policies.hpp>
#include <alloy/train/recompute.hpp>
#include <alloy/train/schedule.hpp>
#include <alloy/train/trainer.hpp>

#define ALLOY_VERSION_MAJOR 0
#define ALLOY_VERSION_MINOR 1
#define ALLOY_VERSION_PATCH 0
