// The backend layer: Host and Cuda tags, buffers, byte accounting, algorithms.
#pragma once

#include <alloy/backend/algorithms.hpp>
#include <alloy/backend/buffer.hpp>
#include <alloy/backend/device.hpp>
#include <alloy/backend/memory_tracker.hpp>
#include <alloy/backend/tags.hpp>
