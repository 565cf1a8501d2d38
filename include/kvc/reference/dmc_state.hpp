//! @file
//! The running DMC state of one (sequence, layer, KV head), as the CPU reference keeps it. The GPU
//! store keeps the same quantities in device arrays and tests compare them element by element.
#pragma once

#include <cstdint>
#include <vector>

#include "kvc/policy/dmc.hpp"

namespace kvc::reference {

//! Open-group accumulators of one KV head. All fp32, pre-RoPE, decision dim of keys zero.
struct DmcHeadState {
  std::vector<float> k_sum;   //!< [head_dim] sum of omega*k' over the open group's window
  std::vector<float> v_sum;   //!< [head_dim] sum of omega*v over the open group's window
  float weight_sum = 0.0f;    //!< sum of omega over the open group's window
  int group_length = 0;       //!< tokens in the open group (all of them, not capped by the window)
  std::vector<float> ring_k;  //!< [window, head_dim] term omega*k' of token t at row t % window
  std::vector<float> ring_v;  //!< [window, head_dim] term omega*v of token t at row t % window
  std::vector<float> ring_w;  //!< [window] omega of token t at t % window

  static DmcHeadState make(int head_dim, DmcConfig const& config) {
    DmcHeadState state;
    state.k_sum.assign(head_dim, 0.0f);
    state.v_sum.assign(head_dim, 0.0f);
    state.ring_k.assign(static_cast<std::size_t>(config.window) * head_dim, 0.0f);
    state.ring_v.assign(static_cast<std::size_t>(config.window) * head_dim, 0.0f);
    state.ring_w.assign(config.window, 0.0f);
    return state;
  }
};

}  // namespace kvc::reference
