// The optimizer update rules, one element at a time, written once for host and device with
// alloy::fp operations (each rounded on its own), so Host and Cuda produce the same bits.
// A rule sees the unscaled, clipped gradient g, the fp32 parameter p and its state slots s[],
// and per-block multipliers for the learning rate and weight decay (0 for no-decay tensors).
// Each rule follows the PyTorch update of the same name; scalars that depend only on the step
// (bias corrections) are computed once on the host in double precision. Rules launch nothing:
// kernels/fused_update.hpp applies them to the arenas (kernels/adafactor_update.hpp for
// Adafactor's per-tensor passes).
#pragma once

#include <alloy/optim/rules/adafactor.hpp>
#include <alloy/optim/rules/adamw.hpp>
#include <alloy/optim/rules/lion.hpp>
#include <alloy/optim/rules/sgd.hpp>
