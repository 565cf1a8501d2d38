//! @file
//! Umbrella header of kvc with its CUDA parts: everything in kvc/kvc.hpp plus the GPU paged
//! store (page pool, page tables, allocator, policy update and evict kernels, the store-side
//! prefill), the decode and prefill attention kernels, the score hook, the double-precision
//! oracle decode attention and the KVCache facade. Needs nvcc.
#pragma once

#include "kvc/attention/decode.cuh"
#include "kvc/attention/prefill.cuh"
#include "kvc/attention/reference_decode.cuh"
#include "kvc/attention/score_hook.hpp"
#include "kvc/cache/paged_store.cuh"
#include "kvc/cache/paged_view.hpp"
#include "kvc/cache/prefill.cuh"
#include "kvc/cache/step_report.hpp"
#include "kvc/cache/store_config.hpp"
#include "kvc/cache/store_layout.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/engine/kv_cache.cuh"
#include "kvc/kvc.hpp"
