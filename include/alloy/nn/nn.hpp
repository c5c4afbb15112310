// alloy::nn: ready layers for the examples and for users who want them. The trainer does not
// depend on them; a model may own its forward and backward instead.
#pragma once

#include <alloy/nn/activation.hpp>
#include <alloy/nn/attention.hpp>
#include <alloy/nn/embedding.hpp>
#include <alloy/nn/gelu.hpp>
#include <alloy/nn/input.hpp>
#include <alloy/nn/layernorm.hpp>
#include <alloy/nn/linear.hpp>
#include <alloy/nn/lm_head.hpp>
#include <alloy/nn/loss.hpp>
#include <alloy/nn/sequential.hpp>
#include <alloy/nn/transformer.hpp>
