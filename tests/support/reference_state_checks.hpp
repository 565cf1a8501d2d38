//! @file
//! State comparison for the host reference tests of the evicting policies: a rejected call must
//! leave the layer state (every KV head's slots and scores, tokens seen) and the output as they
//! were.
#pragma once

#include <cstddef>

#include <doctest/doctest.h>

#include "kvc/reference/types.hpp"

namespace kvc::test {

//! Checks that `state` (a state with `heads` and `tokens_seen`) and `out` equal the copies
//! `before` and `out_before` taken earlier: tokens seen, every head's k, v, positions and
//! scores, and the output's values and LSE.
template <class State>
void check_state_unchanged(State const& state, State const& before,
                           reference::AttentionOutput const& out,
                           reference::AttentionOutput const& out_before) {
  CHECK(state.tokens_seen == before.tokens_seen);
  REQUIRE(state.heads.size() == before.heads.size());
  for (std::size_t h = 0; h < before.heads.size(); ++h) {
    CHECK(state.heads[h].k == before.heads[h].k);
    CHECK(state.heads[h].v == before.heads[h].v);
    CHECK(state.heads[h].position == before.heads[h].position);
    CHECK(state.heads[h].score == before.heads[h].score);
  }
  CHECK(out.out == out_before.out);
  CHECK(out.lse == out_before.lse);
}

}  // namespace kvc::test
