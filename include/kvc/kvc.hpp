//! @file
//! Umbrella header of everything that compiles with a host compiler alone: core types, policy
//! maths and the CPU reference. `kvc/kvc.cuh` adds the GPU store and kernels.
#pragma once

#include "kvc/version.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/macros.hpp"
#include "kvc/core/math.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/core/shape.hpp"
#include "kvc/core/status.hpp"
#include "kvc/engine/kv_cache_config.hpp"
#include "kvc/policy/kind.hpp"
#include "kvc/reference/attention.hpp"
#include "kvc/reference/dmc.hpp"
#include "kvc/reference/full.hpp"
#include "kvc/reference/h2o.hpp"
#include "kvc/reference/layer_cache.hpp"
#include "kvc/reference/tova.hpp"
