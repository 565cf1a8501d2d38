//! @file
//! The cache policies kvc implements, and one config that selects any of them at run time.
//! GQA is not a policy but the shape `num_q_heads = G * num_kv_heads`; every policy supports it.
#pragma once

#include <cstring>
#include <initializer_list>

#include "kvc/core/status.hpp"
#include "kvc/policy/dmc.hpp"
#include "kvc/policy/full.hpp"
#include "kvc/policy/h2o.hpp"
#include "kvc/policy/tova.hpp"

namespace kvc {

enum class PolicyKind : int { kFull = 0, kDmc = 1, kH2O = 2, kTova = 3 };

inline char const* policy_name(PolicyKind kind) {
  switch (kind) {
    case PolicyKind::kFull: return "full";
    case PolicyKind::kDmc: return "dmc";
    case PolicyKind::kH2O: return "h2o";
    case PolicyKind::kTova: return "tova";
  }
  return "?";
}

//! Parses `full`, `dmc`, `h2o`, `tova`. Returns false otherwise.
inline bool parse_policy(char const* text, PolicyKind& out) {
  for (PolicyKind kind : {PolicyKind::kFull, PolicyKind::kDmc, PolicyKind::kH2O, PolicyKind::kTova}) {
    if (std::strcmp(text, policy_name(kind)) == 0) {
      out = kind;
      return true;
    }
  }
  return false;
}

//! A policy chosen at run time: `kind` plus the config of that policy (the others are ignored).
struct PolicyConfig {
  PolicyKind kind = PolicyKind::kFull;
  FullConfig full{};
  DmcConfig dmc = DmcConfig::checkpoint();
  H2OConfig h2o{};
  TovaConfig tova{};

  Status validate(int head_dim) const {
    switch (kind) {
      case PolicyKind::kFull: return Status::kSuccess;
      case PolicyKind::kDmc: return dmc.validate(head_dim);
      case PolicyKind::kH2O: return h2o.validate();
      case PolicyKind::kTova: return tova.validate();
    }
    return Status::kErrorInvalidArgument;
  }
};

}  // namespace kvc
