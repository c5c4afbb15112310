// The numeric layer: 16-bit value types, dtype tags, traits, rounding, random bits.
#pragma once

#include <alloy/numeric/bf16.hpp>
#include <alloy/numeric/dtype.hpp>
#include <alloy/numeric/fp16.hpp>
#include <alloy/numeric/fp_ops.hpp>
#include <alloy/numeric/math.hpp>
#include <alloy/numeric/minifloat8.hpp>
#include <alloy/numeric/random.hpp>
#include <alloy/numeric/rounding.hpp>
#include <alloy/numeric/traits.hpp>
