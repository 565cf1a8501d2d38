//! @file
//! Replay traces: one layer of one sequence as a directory holding `config.json`, `q.npy`
//! [T, Hq, D] (pre-RoPE), `k.npy` and `v.npy` [T, Hkv, D] (pre-RoPE), all float32, as written by
//! `numpy.save`. This header reads such a directory and validates it completely before anything
//! runs: the config's keys and types, the policy parameters, the array shapes against the config,
//! and the values against the dtype.
//!
//! config.json keys (unknown keys are ignored, and so are the keys of the other policies):
//! - `policy` (string, required): `full`, `dmc`, `h2o` or `tova`;
//! - `dtype` (string, required): `fp32`, `fp16`, `bf16` (or an alias `kvc::parse_dtype` knows);
//! - `q_heads`, `kv_heads`, `head_dim` (integers, required): q_heads a multiple of kv_heads,
//!   head_dim even;
//! - `rope` (string, required): `none`, `rotate_half` or `interleaved`;
//! - `rope_theta` (number > 0): required unless rope is `none`;
//! - `prompt_tokens` (integer, required): 0 <= P <= T tokens go through prefill;
//! - dmc: `mode` (string, required): `checkpoint` or `paper`; `window` (integer, optional,
//!   0..kDmcMaxWindow, default the mode's: 12 or 0);
//! - h2o: `heavy`, `recent` (integers >= 0, required, heavy + recent > 0);
//! - tova: `budget` (integer > 0, required), `protect_new` (boolean, optional, default false).
//!
//! "Integer" means a JSON number with an integral value (`4`, `4.0` and `4e0` are all 4).
//!
//! Values: every q, k and v element must be finite. By default each must also be exactly
//! representable in `dtype` (the reference rounds its inputs to the dtype, so a value that is not
//! would silently change; it usually means the tensors were dumped from a different dtype): such a
//! value is an error naming the file and element. With ValueCheck::kRound they are rounded to the
//! nearest representable value instead (round to nearest even) and counted; a value that rounds
//! to infinity (beyond the fp16 range) is still an error.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/io/io_status.hpp"
#include "kvc/io/json.hpp"
#include "kvc/io/npy.hpp"
#include "kvc/policy/kind.hpp"
#include "kvc/reference/types.hpp"

namespace kvc::io {

//! What read_trace does with a value that the dtype cannot represent exactly.
enum class ValueCheck : int {
  kReject = 0,  //!< an error naming the file and element (the default)
  kRound = 1,   //!< round to nearest even and count it
};

//! A validated config.json.
struct TraceConfig {
  PolicyConfig policy;        //!< kind plus that policy's parameters
  reference::LayerSpec spec;  //!< heads, head dim, dtype and RoPE (scale: 1/sqrt(D))
  int prompt_tokens = 0;      //!< tokens that go through prefill (one chunk)
};

//! A validated trace directory, ready to replay.
struct Trace {
  TraceConfig config;
  int num_tokens = 0;               //!< T
  std::vector<float> q;             //!< [T, q_heads, head_dim] pre-RoPE
  std::vector<float> k;             //!< [T, kv_heads, head_dim] pre-RoPE
  std::vector<float> v;             //!< [T, kv_heads, head_dim]
  std::int64_t rounded_values = 0;  //!< values changed by ValueCheck::kRound
};

//! Largest T a trace may have (token indices and slot counts are int).
inline constexpr std::int64_t kTraceMaxTokens = std::numeric_limits<std::int32_t>::max() / 2;

namespace detail {

inline IoStatus config_error(std::string const& key, std::string const& what) {
  return IoStatus::error("key \"" + key + "\": " + what);
}

inline std::string json_type_of(JsonValue const& value) {
  return json_type_name(value.type());
}

//! Reads an optional or required string member.
inline IoStatus config_string(JsonValue const& config, std::string const& key, bool required,
                              std::string& out, bool& present) {
  JsonValue const* value = config.find(key);
  present = value != nullptr;
  if (value == nullptr) {
    return required ? IoStatus::error("missing required key \"" + key + "\"") : IoStatus::success();
  }
  if (!value->is_string())
    return config_error(key, "must be a string, got " + json_type_of(*value));
  out = value->as_string();
  return IoStatus::success();
}

//! Reads an optional or required integer member in [minimum, maximum].
inline IoStatus config_int(JsonValue const& config, std::string const& key, bool required,
                           int minimum, int maximum, int& out) {
  JsonValue const* value = config.find(key);
  if (value == nullptr) {
    return required ? IoStatus::error("missing required key \"" + key + "\"") : IoStatus::success();
  }
  if (!value->is_number())
    return config_error(key, "must be an integer, got " + json_type_of(*value));
  double const number = value->as_number();
  char text[64];
  std::snprintf(text, sizeof text, "%.17g", number);
  if (std::floor(number) != number)
    return config_error(key, std::string("must be an integer, got ") + text);
  if (number < minimum || number > maximum) {
    return config_error(key, std::string("must be in [") + std::to_string(minimum) + ", " +
                                 std::to_string(maximum) + "], got " + text);
  }
  out = static_cast<int>(number);
  return IoStatus::success();
}

inline IoStatus check_array(NpyArray<float> const& array, char const* name, std::int64_t heads,
                            std::int64_t head_dim, char const* heads_key) {
  if (array.rank() != 3) {
    return IoStatus::error(std::string(name) + ": expected 3 dimensions [T, " + heads_key +
                           ", head_dim], got shape " + npy_shape_string(array.shape));
  }
  if (array.shape[1] != heads || array.shape[2] != head_dim) {
    return IoStatus::error(std::string(name) + ": shape " + npy_shape_string(array.shape) +
                           " does not match the config: expected [T, " + std::to_string(heads) +
                           ", " + std::to_string(head_dim) + "] (" + heads_key + " = " +
                           std::to_string(heads) + ", head_dim = " + std::to_string(head_dim) +
                           ")");
  }
  return IoStatus::success();
}

//! Checks (or rounds) every element of a [T, H, D] array against `dtype`.
inline IoStatus check_values(std::vector<float>& values, std::vector<std::int64_t> const& shape,
                             char const* name, DType dtype, ValueCheck check,
                             std::int64_t& rounded) {
  std::int64_t changed = 0;
  std::vector<float> result = values;
  for (std::size_t i = 0; i < result.size(); ++i) {
    float const value = result[i];
    auto where = [&] {
      std::int64_t const d = shape[2], h = shape[1];
      std::int64_t const index = static_cast<std::int64_t>(i);
      return std::string(name) + ": element [" + std::to_string(index / (h * d)) + ", " +
             std::to_string(index / d % h) + ", " + std::to_string(index % d) + "]";
    };
    if (!std::isfinite(value))
      return IoStatus::error(where() + " is not finite: traces must be finite");
    float const nearest = round_to_dtype(value, dtype);
    if (nearest == value) continue;
    char text[96];
    std::snprintf(text, sizeof text, " = %.9g is not representable in %s (nearest: %.9g)", value,
                  dtype_name(dtype), nearest);
    if (!std::isfinite(nearest)) return IoStatus::error(where() + text + ", out of range");
    if (check == ValueCheck::kReject) {
      return IoStatus::error(
          where() + text +
          "; dump the tensors in the config's dtype (then .float()), or pass --round");
    }
    result[i] = nearest;
    ++changed;
  }
  values = std::move(result);
  rounded += changed;
  return IoStatus::success();
}

}  // namespace detail

//! Validates a parsed config.json (see the table in this file's summary). Messages name the key;
//! the caller adds the file name. `out` is set only on success.
inline IoStatus parse_trace_config(JsonValue const& config, TraceConfig& out) {
  using detail::config_error;
  if (!config.is_object()) {
    return IoStatus::error(std::string("the document must be a JSON object, got ") +
                           json_type_name(config.type()));
  }
  TraceConfig result;
  bool present = false;

  std::string policy;
  KVC_IO_RETURN_IF_ERROR(detail::config_string(config, "policy", true, policy, present));
  if (!parse_policy(policy.c_str(), result.policy.kind)) {
    return config_error("policy",
                        "unknown policy \"" + policy + "\" (expected full, dmc, h2o or tova)");
  }

  std::string dtype;
  KVC_IO_RETURN_IF_ERROR(detail::config_string(config, "dtype", true, dtype, present));
  if (!parse_dtype(dtype.c_str(), result.spec.dtype)) {
    return config_error("dtype", "unknown dtype \"" + dtype + "\" (expected fp32, fp16 or bf16)");
  }

  constexpr int kMaxCount = 1 << 16;
  KVC_IO_RETURN_IF_ERROR(
      detail::config_int(config, "q_heads", true, 1, kMaxCount, result.spec.num_q_heads));
  KVC_IO_RETURN_IF_ERROR(
      detail::config_int(config, "kv_heads", true, 1, kMaxCount, result.spec.num_kv_heads));
  KVC_IO_RETURN_IF_ERROR(
      detail::config_int(config, "head_dim", true, 2, kMaxCount, result.spec.head_dim));
  if (result.spec.num_q_heads % result.spec.num_kv_heads != 0) {
    return config_error("q_heads", "must be a multiple of kv_heads (" +
                                       std::to_string(result.spec.num_q_heads) + " q heads, " +
                                       std::to_string(result.spec.num_kv_heads) + " KV heads)");
  }
  if (result.spec.head_dim % 2 != 0) {
    return config_error("head_dim", "must be even (RoPE rotates pairs), got " +
                                        std::to_string(result.spec.head_dim));
  }

  std::string rope;
  KVC_IO_RETURN_IF_ERROR(detail::config_string(config, "rope", true, rope, present));
  if (rope == "none") {
    result.spec.rope.layout = RopeLayout::kNone;
  } else if (rope == "rotate_half") {
    result.spec.rope.layout = RopeLayout::kRotateHalf;
  } else if (rope == "interleaved") {
    result.spec.rope.layout = RopeLayout::kInterleaved;
  } else {
    return config_error(
        "rope", "unknown RoPE layout \"" + rope + "\" (expected none, rotate_half or interleaved)");
  }
  if (JsonValue const* theta = config.find("rope_theta")) {
    if (!theta->is_number())
      return config_error("rope_theta", "must be a number, got " + detail::json_type_of(*theta));
    if (!(theta->as_number() > 0.0)) return config_error("rope_theta", "must be > 0");
    result.spec.rope.theta = theta->as_number();
  } else if (result.spec.rope.layout != RopeLayout::kNone) {
    return IoStatus::error("missing required key \"rope_theta\" (needed unless rope is \"none\")");
  }

  KVC_IO_RETURN_IF_ERROR(detail::config_int(
      config, "prompt_tokens", true, 0, static_cast<int>(kTraceMaxTokens), result.prompt_tokens));

  switch (result.policy.kind) {
    case PolicyKind::kFull: break;
    case PolicyKind::kDmc: {
      std::string mode;
      KVC_IO_RETURN_IF_ERROR(
          detail::config_string(config, "mode", true, mode, present).with_context("policy dmc"));
      if (mode == "checkpoint") {
        result.policy.dmc = DmcConfig::checkpoint();
      } else if (mode == "paper") {
        result.policy.dmc = DmcConfig::paper();
      } else {
        return config_error("mode",
                            "unknown DMC mode \"" + mode + "\" (expected checkpoint or paper)");
      }
      KVC_IO_RETURN_IF_ERROR(
          detail::config_int(config, "window", false, 0, kDmcMaxWindow, result.policy.dmc.window));
      break;
    }
    case PolicyKind::kH2O:
      KVC_IO_RETURN_IF_ERROR(
          detail::config_int(config, "heavy", true, 0, kMaxCount * 16, result.policy.h2o.heavy)
              .with_context("policy h2o"));
      KVC_IO_RETURN_IF_ERROR(
          detail::config_int(config, "recent", true, 0, kMaxCount * 16, result.policy.h2o.recent)
              .with_context("policy h2o"));
      if (result.policy.h2o.validate() != Status::kSuccess) {
        return config_error("heavy", "heavy + recent must be > 0");
      }
      break;
    case PolicyKind::kTova: {
      KVC_IO_RETURN_IF_ERROR(
          detail::config_int(config, "budget", true, 1, kMaxCount * 16, result.policy.tova.budget)
              .with_context("policy tova"));
      if (JsonValue const* protect = config.find("protect_new")) {
        if (!protect->is_bool()) {
          return config_error("protect_new",
                              "must be true or false, got " + detail::json_type_of(*protect));
        }
        result.policy.tova.protect_new = protect->as_bool();
      }
      break;
    }
  }
  if (result.spec.validate() != Status::kSuccess) return IoStatus::error("invalid layer shape");
  if (result.policy.validate(result.spec.head_dim) != Status::kSuccess) {
    return IoStatus::error(std::string("invalid ") + policy_name(result.policy.kind) +
                           " parameters");
  }
  out = std::move(result);
  return IoStatus::success();
}

//! Reads and validates a JSON file. Errors start with the path.
inline IoStatus read_json_file(std::string const& path, JsonValue& out) {
  std::string bytes;
  KVC_IO_RETURN_IF_ERROR(detail::read_file_bytes(path, bytes).with_context(path));
  return parse_json(bytes, out).with_context(path);
}

//! The checks of a trace that come after its four files have been decoded: shapes [T, Hq, D] /
//! [T, Hkv, D] against `config` with one T in [1, kTraceMaxTokens], prompt_tokens <= T, and the
//! values (see ValueCheck). `names` are the four file names used in messages (config, q, k, v).
//! Consumes the arrays' data; `out` is set only on success. read_trace and the parser fuzzers
//! share it.
inline IoStatus assemble_trace(TraceConfig const& config, NpyArray<float>&& q, NpyArray<float>&& k,
                               NpyArray<float>&& v, std::string const (&names)[4], Trace& out,
                               ValueCheck check = ValueCheck::kReject) {
  Trace trace;
  trace.config = config;
  reference::LayerSpec const& spec = trace.config.spec;
  KVC_IO_RETURN_IF_ERROR(
      detail::check_array(q, names[1].c_str(), spec.num_q_heads, spec.head_dim, "q_heads"));
  KVC_IO_RETURN_IF_ERROR(
      detail::check_array(k, names[2].c_str(), spec.num_kv_heads, spec.head_dim, "kv_heads"));
  KVC_IO_RETURN_IF_ERROR(
      detail::check_array(v, names[3].c_str(), spec.num_kv_heads, spec.head_dim, "kv_heads"));
  std::int64_t const tokens = q.shape[0];
  std::string const prefix = names[1].substr(0, names[1].size() - 5);  // "<dir>/" of "<dir>/q.npy"
  if (k.shape[0] != tokens || v.shape[0] != tokens) {
    return IoStatus::error(prefix + "{q,k,v}.npy: token counts differ: q has " +
                           std::to_string(tokens) + ", k " + std::to_string(k.shape[0]) + ", v " +
                           std::to_string(v.shape[0]));
  }
  if (tokens < 1) return IoStatus::error(names[1] + ": the trace has no tokens (T = 0)");
  if (tokens > kTraceMaxTokens)
    return IoStatus::error(names[1] + ": too many tokens (" + std::to_string(tokens) + ")");
  if (trace.config.prompt_tokens > tokens) {
    return IoStatus::error(
        names[0] + ": key \"prompt_tokens\": " + std::to_string(trace.config.prompt_tokens) +
        " exceeds the trace's " + std::to_string(tokens) + " tokens");
  }
  trace.num_tokens = static_cast<int>(tokens);
  KVC_IO_RETURN_IF_ERROR(detail::check_values(q.data, q.shape, names[1].c_str(), spec.dtype, check,
                                              trace.rounded_values));
  KVC_IO_RETURN_IF_ERROR(detail::check_values(k.data, k.shape, names[2].c_str(), spec.dtype, check,
                                              trace.rounded_values));
  KVC_IO_RETURN_IF_ERROR(detail::check_values(v.data, v.shape, names[3].c_str(), spec.dtype, check,
                                              trace.rounded_values));
  trace.q = std::move(q.data);
  trace.k = std::move(k.data);
  trace.v = std::move(v.data);
  out = std::move(trace);
  return IoStatus::success();
}

//! Reads the trace directory `dir` (config.json, q.npy, k.npy, v.npy) and validates all of it:
//! the config, then each file, then assemble_trace's checks. Every error message names the file.
//! `out` is set only on success.
inline IoStatus read_trace(std::string const& dir, Trace& out,
                           ValueCheck check = ValueCheck::kReject) {
  std::string const base = dir.empty() || dir.back() == '/' ? dir : dir + "/";
  std::error_code error;
  if (!std::filesystem::is_directory(dir, error)) return IoStatus::error(dir + ": not a directory");

  std::string const names[4] = {base + "config.json", base + "q.npy", base + "k.npy",
                                base + "v.npy"};
  JsonValue json;
  TraceConfig config;
  KVC_IO_RETURN_IF_ERROR(read_json_file(names[0], json));
  KVC_IO_RETURN_IF_ERROR(parse_trace_config(json, config).with_context(names[0]));
  NpyArray<float> q, k, v;
  KVC_IO_RETURN_IF_ERROR(read_npy(names[1], q));
  KVC_IO_RETURN_IF_ERROR(read_npy(names[2], k));
  KVC_IO_RETURN_IF_ERROR(read_npy(names[3], v));
  return assemble_trace(config, std::move(q), std::move(k), std::move(v), names, out, check);
}

}  // namespace kvc::io
