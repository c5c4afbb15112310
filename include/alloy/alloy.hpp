// alloy: mixed-precision training for C++ models. Include this header for the public surface.
#pragma once

#include <alloy/backend/backend.hpp>
#include <alloy/config.hpp>
#include <alloy/error.hpp>
#include <alloy/numeric/numeric.hpp>

#define ALLOY_VERSION_MAJOR 0
#define ALLOY_VERSION_MINOR 1
#define ALLOY_VERSION_PATCH 0
