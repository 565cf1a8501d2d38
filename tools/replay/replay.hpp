//! @file
//! The kvc-replay driver: command line, backend selection, comparison of two backends, and the
//! files written to OUT_DIR (out.npy, slots.npy, cache_k.npy, cache_v.npy, cache_pos.npy,
//! report.json). main.cpp only calls `main_entry`; tests call it too, in-process.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <ostream>
#include <string>
#include <system_error>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/io/json.hpp"
#include "kvc/io/npy.hpp"
#include "kvc/io/trace.hpp"
#include "kvc/version.hpp"

#include "backend.hpp"

namespace kvc::replay {

//! Exit codes of kvc-replay.
enum ExitCode : int {
  kExitOk = 0,        //!< replayed; backends (if two ran) agree within tolerance
  kExitBadInput = 1,  //!< the trace or OUT_DIR is unusable (message names the file and problem)
  kExitUsage = 2,     //!< bad command line
  kExitDevice =
      3,  //!< the requested device cannot run (GPU backend not built, no device, GPU error)
  kExitMismatch = 4,  //!< the GPU result differs from the reference beyond the dtype's tolerance
};

//! Where to run: `auto` = GPU (plus the reference) when built and present, else the CPU
//! reference; `cpu` = the reference only; `gpu` = GPU plus the reference, an error if unavailable.
enum class Device : int { kAuto = 0, kCpu = 1, kGpu = 2 };

struct Options {
  std::string trace_dir;
  std::string out_dir;
  Device device = Device::kAuto;
  bool round = false;  //!< round unrepresentable input values instead of rejecting them
  bool quiet = false;  //!< no summary on stdout
};

inline constexpr char kUsage[] =
    "usage: kvc-replay TRACE_DIR --out OUT_DIR [--device auto|cpu|gpu] [--round] [--quiet]\n"
    "\n"
    "Replays one layer of one sequence through a kvc cache policy and writes what it computed.\n"
    "\n"
    "TRACE_DIR holds config.json, q.npy [T, Hq, D], k.npy and v.npy [T, Hkv, D] (float32,\n"
    "pre-RoPE). The first prompt_tokens tokens go through prefill (one chunk), the rest through\n"
    "decode steps. OUT_DIR (created if needed) receives out.npy [T, Hq, D], slots.npy [T, Hkv],\n"
    "cache_k.npy / cache_v.npy [Hkv, max_slots, D], cache_pos.npy [Hkv, max_slots] and\n"
    "report.json. See docs/replay.md.\n"
    "\n"
    "options:\n"
    "  -o, --out DIR     output directory (required)\n"
    "  --device D        auto (default): the GPU and the CPU reference when the GPU backend is\n"
    "                    built and a device is present, else the CPU reference; cpu: the\n"
    "                    reference only; gpu: the GPU and the reference (an error if unavailable)\n"
    "  --round           round q/k/v values that the dtype cannot represent (default: reject)\n"
    "  -q, --quiet       print nothing on success\n"
    "  -h, --help        this text\n"
    "  --version         the kvc version\n"
    "\n"
    "exit codes: 0 ok, 1 bad input, 2 usage, 3 device unavailable or failed,\n"
    "            4 GPU and reference differ beyond the dtype's tolerance\n";

inline std::string version_string() {
  return std::to_string(KVC_VERSION_MAJOR) + "." + std::to_string(KVC_VERSION_MINOR) + "." +
         std::to_string(KVC_VERSION_PATCH);
}

//! Parses the command line. Returns -1 to go on, or the exit code to stop with (0 after
//! --help/--version, kExitUsage after a usage error, which is printed to `err`).
inline int parse_arguments(int argc, char const* const* argv, Options& options, std::ostream& out,
                           std::ostream& err) {
  Options parsed;
  std::vector<std::string> positional;
  auto usage_error = [&](std::string const& what) {
    err << "kvc-replay: " << what << "\n"
        << "run 'kvc-replay --help' for usage\n";
    return static_cast<int>(kExitUsage);
  };
  bool out_given = false;
  for (int i = 1; i < argc; ++i) {
    std::string argument = argv[i] != nullptr ? argv[i] : "";
    std::string value;
    bool has_inline_value = false;
    if (argument.rfind("--", 0) == 0) {
      std::size_t const equals = argument.find('=');
      if (equals != std::string::npos) {
        value = argument.substr(equals + 1);
        argument = argument.substr(0, equals);
        has_inline_value = true;
      }
    }
    auto take_value = [&](std::string& target) {
      if (has_inline_value) {
        target = value;
        return true;
      }
      if (i + 1 >= argc || argv[i + 1] == nullptr) return false;
      target = argv[++i];
      return true;
    };
    auto no_value = [&] { return !has_inline_value; };
    if (argument == "-h" || argument == "--help") {
      out << kUsage;
      return kExitOk;
    }
    if (argument == "--version") {
      out << "kvc-replay " << version_string() << "\n";
      return kExitOk;
    }
    if (argument == "-o" || argument == "--out") {
      if (!take_value(parsed.out_dir) || parsed.out_dir.empty())
        return usage_error(argument + " needs a directory");
      out_given = true;
    } else if (argument == "--device") {
      std::string device;
      if (!take_value(device)) return usage_error("--device needs auto, cpu or gpu");
      if (device == "auto") {
        parsed.device = Device::kAuto;
      } else if (device == "cpu") {
        parsed.device = Device::kCpu;
      } else if (device == "gpu") {
        parsed.device = Device::kGpu;
      } else {
        return usage_error("unknown device '" + device + "' (expected auto, cpu or gpu)");
      }
    } else if (argument == "--round" && no_value()) {
      parsed.round = true;
    } else if ((argument == "-q" || argument == "--quiet") && no_value()) {
      parsed.quiet = true;
    } else if (argument.size() > 1 && argument[0] == '-') {
      return usage_error("unknown option '" + std::string(argv[i]) + "'");
    } else {
      positional.push_back(argument);
    }
  }
  if (positional.empty()) return usage_error("missing TRACE_DIR");
  if (positional.size() > 1)
    return usage_error("expected one TRACE_DIR, got " + std::to_string(positional.size()));
  if (!out_given) return usage_error("missing --out OUT_DIR");
  parsed.trace_dir = positional.front();
  options = std::move(parsed);
  return -1;
}

//! Error statistics of `actual` against `expected`. Relative error: |a - e| / max(|e|, atol), so
//! that elements near zero do not dominate it. `within` applies |a - e| <= atol + rtol * |e|.
struct ErrorStats {
  double max_abs = 0.0;
  double max_rel = 0.0;
  std::int64_t worst = -1;   //!< index of the largest absolute error (-1: none)
  std::int64_t outside = 0;  //!< elements beyond the tolerance (NaN counts)
  std::int64_t count = 0;

  void add(float a, float e, std::int64_t index, Tolerance tolerance) {
    double const diff = std::abs(static_cast<double>(a) - static_cast<double>(e));
    double const rel = diff / std::max(std::abs(static_cast<double>(e)), tolerance.atol);
    ++count;
    if (!(diff <= tolerance.atol + tolerance.rtol * std::abs(static_cast<double>(e)))) ++outside;
    if (std::isnan(diff)) {
      max_abs = max_rel = INFINITY;
      worst = index;
      return;
    }
    if (diff > max_abs || worst < 0) {
      max_abs = diff;
      worst = index;
    }
    max_rel = std::max(max_rel, rel);
  }
};

//! One step of a replay: the prefill chunk or one decode token.
struct StepError {
  bool prefill = false;
  int first_token = 0;
  int tokens = 0;
  ErrorStats out;
};

//! How a backend's result compares with the reference's.
struct Comparison {
  std::string backend;
  std::string reference;
  Tolerance tolerance{};
  ErrorStats out;
  std::vector<StepError> steps;
  std::int64_t slot_mismatches = 0;  //!< entries of slots.npy that differ
  bool caches_comparable = false;    //!< same final slot count per head
  ErrorStats cache_k;
  ErrorStats cache_v;
  std::int64_t position_mismatches = 0;

  bool within_tolerance() const {
    return out.outside == 0 && slot_mismatches == 0 && caches_comparable && cache_k.outside == 0 &&
           cache_v.outside == 0 && position_mismatches == 0;
  }
};

inline Comparison compare_results(io::Trace const& trace, ReplayResult const& actual,
                                  ReplayResult const& expected, std::string backend,
                                  std::string reference) {
  reference::LayerSpec const& spec = trace.config.spec;
  Comparison comparison;
  comparison.backend = std::move(backend);
  comparison.reference = std::move(reference);
  comparison.tolerance = default_tolerance(spec.dtype);
  Tolerance const tolerance = comparison.tolerance;
  std::size_t const q_row = static_cast<std::size_t>(spec.num_q_heads) * spec.head_dim;
  int const prompt = trace.config.prompt_tokens;
  auto add_step = [&](bool prefill, int first, int tokens) {
    StepError step{prefill, first, tokens, {}};
    std::size_t const begin = static_cast<std::size_t>(first) * q_row;
    std::size_t const end = std::min(static_cast<std::size_t>(first + tokens) * q_row,
                                     std::min(actual.out.size(), expected.out.size()));
    for (std::size_t i = begin; i < end; ++i) {
      step.out.add(actual.out[i], expected.out[i], static_cast<std::int64_t>(i), tolerance);
      comparison.out.add(actual.out[i], expected.out[i], static_cast<std::int64_t>(i), tolerance);
    }
    comparison.steps.push_back(step);
  };
  if (prompt > 0) add_step(true, 0, prompt);
  for (int t = prompt; t < trace.num_tokens; ++t) add_step(false, t, 1);
  if (actual.out.size() != expected.out.size()) comparison.out.outside += 1;

  std::size_t const slot_entries = std::min(actual.slots.size(), expected.slots.size());
  for (std::size_t i = 0; i < slot_entries; ++i)
    comparison.slot_mismatches += actual.slots[i] != expected.slots[i];
  comparison.slot_mismatches += static_cast<std::int64_t>(
      std::max(actual.slots.size(), expected.slots.size()) - slot_entries);

  comparison.caches_comparable = actual.final_slots == expected.final_slots &&
                                 actual.cache_k.size() == expected.cache_k.size() &&
                                 actual.cache_v.size() == expected.cache_v.size();
  if (comparison.caches_comparable) {
    for (std::size_t i = 0; i < expected.cache_k.size(); ++i) {
      comparison.cache_k.add(actual.cache_k[i], expected.cache_k[i], static_cast<std::int64_t>(i),
                             tolerance);
      comparison.cache_v.add(actual.cache_v[i], expected.cache_v[i], static_cast<std::int64_t>(i),
                             tolerance);
    }
    for (std::size_t i = 0;
         i < expected.cache_positions.size() && i < actual.cache_positions.size(); ++i) {
      comparison.position_mismatches += actual.cache_positions[i] != expected.cache_positions[i];
    }
  }
  return comparison;
}

//! kSuccess when every array of `result` has the size the trace implies.
inline io::IoStatus check_result(io::Trace const& trace, ReplayResult const& result) {
  reference::LayerSpec const& spec = trace.config.spec;
  std::size_t const t = static_cast<std::size_t>(trace.num_tokens);
  std::size_t const hkv = static_cast<std::size_t>(spec.num_kv_heads);
  std::size_t const d = static_cast<std::size_t>(spec.head_dim);
  std::size_t const slots = static_cast<std::size_t>(std::max(result.max_slots, 0));
  int longest = 0;
  for (int count : result.final_slots) longest = std::max(longest, count);
  bool const ok = result.out.size() == t * static_cast<std::size_t>(spec.num_q_heads) * d &&
                  result.slots.size() == t * hkv && result.final_slots.size() == hkv &&
                  longest == result.max_slots && result.cache_k.size() == hkv * slots * d &&
                  result.cache_v.size() == hkv * slots * d &&
                  result.cache_positions.size() == hkv * slots;
  return ok ? io::IoStatus::success()
            : io::IoStatus::error("result arrays do not have the trace's shapes",
                                  Status::kErrorInternal);
}

//! Writes out.npy, slots.npy, cache_k.npy, cache_v.npy and cache_pos.npy into `dir`.
inline io::IoStatus write_result(std::string const& dir, io::Trace const& trace,
                                 ReplayResult const& result) {
  reference::LayerSpec const& spec = trace.config.spec;
  std::int64_t const t = trace.num_tokens, hq = spec.num_q_heads, hkv = spec.num_kv_heads,
                     d = spec.head_dim;
  std::int64_t const slots = result.max_slots;
  std::string const base = dir + "/";
  KVC_IO_RETURN_IF_ERROR(io::write_npy(base + "out.npy", {t, hq, d}, result.out));
  KVC_IO_RETURN_IF_ERROR(io::write_npy(base + "slots.npy", {t, hkv}, result.slots));
  KVC_IO_RETURN_IF_ERROR(io::write_npy(base + "cache_k.npy", {hkv, slots, d}, result.cache_k));
  KVC_IO_RETURN_IF_ERROR(io::write_npy(base + "cache_v.npy", {hkv, slots, d}, result.cache_v));
  KVC_IO_RETURN_IF_ERROR(
      io::write_npy(base + "cache_pos.npy", {hkv, slots}, result.cache_positions));
  return io::IoStatus::success();
}

inline io::JsonValue error_json(ErrorStats const& stats) {
  io::JsonValue json;
  json.set("max_abs", io::JsonValue::number(stats.max_abs));
  json.set("max_rel", io::JsonValue::number(stats.max_rel));
  json.set("worst_index", io::JsonValue::number(static_cast<double>(stats.worst)));
  json.set("outside_tolerance", io::JsonValue::number(static_cast<double>(stats.outside)));
  return json;
}

inline io::JsonValue comparison_json(Comparison const& comparison) {
  io::JsonValue json;
  json.set("backend", io::JsonValue::string(comparison.backend));
  json.set("reference", io::JsonValue::string(comparison.reference));
  json.set("atol", io::JsonValue::number(comparison.tolerance.atol));
  json.set("rtol", io::JsonValue::number(comparison.tolerance.rtol));
  json.set("within_tolerance", io::JsonValue::boolean(comparison.within_tolerance()));
  json.set("out", error_json(comparison.out));
  json.set("slot_mismatches",
           io::JsonValue::number(static_cast<double>(comparison.slot_mismatches)));
  json.set("caches_comparable", io::JsonValue::boolean(comparison.caches_comparable));
  if (comparison.caches_comparable) {
    json.set("cache_k", error_json(comparison.cache_k));
    json.set("cache_v", error_json(comparison.cache_v));
    json.set("position_mismatches",
             io::JsonValue::number(static_cast<double>(comparison.position_mismatches)));
  }
  io::JsonValue steps = io::JsonValue::array();
  for (StepError const& step : comparison.steps) {
    io::JsonValue entry;
    entry.set("kind", io::JsonValue::string(step.prefill ? "prefill" : "decode"));
    entry.set("first_token", io::JsonValue::number(step.first_token));
    entry.set("tokens", io::JsonValue::number(step.tokens));
    entry.set("max_abs", io::JsonValue::number(step.out.max_abs));
    entry.set("max_rel", io::JsonValue::number(step.out.max_rel));
    steps.push_back(std::move(entry));
  }
  json.set("steps", std::move(steps));
  return json;
}

inline io::JsonValue policy_params_json(PolicyConfig const& policy, int head_dim) {
  io::JsonValue json = io::JsonValue::object();
  switch (policy.kind) {
    case PolicyKind::kFull: break;
    case PolicyKind::kDmc:
      json.set("mode",
               io::JsonValue::string(policy.dmc.mode == DmcMode::kPaper ? "paper" : "checkpoint"));
      json.set("window", io::JsonValue::number(policy.dmc.window));
      json.set("decision_dim", io::JsonValue::number(policy.dmc.decision_index(head_dim)));
      json.set("offset", io::JsonValue::number(policy.dmc.offset));
      json.set("eps", io::JsonValue::number(policy.dmc.eps));
      break;
    case PolicyKind::kH2O:
      json.set("heavy", io::JsonValue::number(policy.h2o.heavy));
      json.set("recent", io::JsonValue::number(policy.h2o.recent));
      break;
    case PolicyKind::kTova:
      json.set("budget", io::JsonValue::number(policy.tova.budget));
      json.set("protect_new", io::JsonValue::boolean(policy.tova.protect_new));
      break;
  }
  return json;
}

//! The report.json document.
inline io::JsonValue make_report(Options const& options, io::Trace const& trace,
                                 std::vector<std::string> const& backends,
                                 ReplayResult const& result, Comparison const* comparison,
                                 std::string const& note) {
  using io::JsonValue;
  reference::LayerSpec const& spec = trace.config.spec;
  JsonValue report;
  report.set("tool", JsonValue::string("kvc-replay"));
  report.set("kvc_version", JsonValue::string(version_string()));
  report.set("trace_dir", JsonValue::string(options.trace_dir));
  report.set("policy", JsonValue::string(policy_name(trace.config.policy.kind)));
  report.set("policy_params", policy_params_json(trace.config.policy, spec.head_dim));
  report.set("dtype", JsonValue::string(dtype_name(spec.dtype)));
  JsonValue shape;
  shape.set("tokens", JsonValue::number(trace.num_tokens));
  shape.set("prompt_tokens", JsonValue::number(trace.config.prompt_tokens));
  shape.set("decode_tokens", JsonValue::number(trace.num_tokens - trace.config.prompt_tokens));
  shape.set("q_heads", JsonValue::number(spec.num_q_heads));
  shape.set("kv_heads", JsonValue::number(spec.num_kv_heads));
  shape.set("head_dim", JsonValue::number(spec.head_dim));
  shape.set("group_size", JsonValue::number(spec.group_size()));
  report.set("shape", std::move(shape));
  JsonValue rope;
  rope.set("layout", JsonValue::string(rope_layout_name(spec.rope.layout)));
  rope.set("theta", JsonValue::number(spec.rope.theta));
  report.set("rope", std::move(rope));
  report.set("value_check", JsonValue::string(options.round ? "round" : "reject"));
  report.set("rounded_values", JsonValue::number(static_cast<double>(trace.rounded_values)));
  JsonValue names = JsonValue::array();
  for (std::string const& name : backends) names.push_back(JsonValue::string(name));
  report.set("backends", std::move(names));
  report.set("outputs_from", JsonValue::string(backends.front()));

  JsonValue slots = JsonValue::array(), ratios = JsonValue::array();
  std::int64_t total_slots = 0;
  for (int count : result.final_slots) {
    slots.push_back(JsonValue::number(count));
    ratios.push_back(
        JsonValue::number(count > 0 ? static_cast<double>(result.tokens_seen) / count : 0.0));
    total_slots += count;
  }
  report.set("tokens_seen", JsonValue::number(static_cast<double>(result.tokens_seen)));
  report.set("slots_per_head", std::move(slots));
  report.set("max_slots", JsonValue::number(result.max_slots));
  report.set("compression_ratio_per_head", std::move(ratios));
  double const overall = total_slots > 0 ? static_cast<double>(result.tokens_seen) *
                                               static_cast<double>(result.final_slots.size()) /
                                               static_cast<double>(total_slots)
                                         : 0.0;
  report.set("compression_ratio", JsonValue::number(overall));
  report.set("comparison", comparison != nullptr ? comparison_json(*comparison) : JsonValue());
  report.set("note", JsonValue::string(note));
  return report;
}

inline io::IoStatus write_text(std::string const& path, std::string const& text) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  if (!file) return io::IoStatus::error(path + ": cannot open for writing");
  file << text;
  file.close();
  if (!file) return io::IoStatus::error(path + ": write error");
  return io::IoStatus::success();
}

inline io::IoStatus make_directory(std::string const& dir) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error || !std::filesystem::is_directory(dir)) {
    return io::IoStatus::error(dir + ": cannot create the output directory" +
                               (error ? " (" + error.message() + ")" : std::string()));
  }
  return io::IoStatus::success();
}

//! Replays with the given backends: the first one's outputs go to OUT_DIR, and when there are
//! two, the second (the reference) is compared with the first and its outputs go to
//! OUT_DIR/reference. `note` goes into the report when nothing is compared. Returns an ExitCode.
inline int replay_with(Options const& options,
                       std::vector<std::unique_ptr<Backend>> const& backends, std::string note,
                       std::ostream& out, std::ostream& err) {
  auto fail = [&](io::IoStatus const& status, int code) {
    err << "kvc-replay: " << status.message << "\n";
    return code;
  };
  if (backends.empty() || backends.size() > 2) {
    return fail(io::IoStatus::error("one or two backends expected"), kExitUsage);
  }
  io::Trace trace;
  io::IoStatus status = io::read_trace(
      options.trace_dir, trace, options.round ? io::ValueCheck::kRound : io::ValueCheck::kReject);
  if (!status.ok()) return fail(status, kExitBadInput);
  status = make_directory(options.out_dir);
  if (!status.ok()) return fail(status, kExitBadInput);

  // --device auto: a GPU backend without a kernel for this trace's shape steps aside.
  std::vector<Backend*> running;
  for (auto const& backend : backends) running.push_back(backend.get());
  std::string why;
  if (options.device == Device::kAuto && running.size() > 1 &&
      !running.front()->supports(trace, why)) {
    note = running.front()->name() + " skipped (" + why +
           "): only the CPU reference ran, there is nothing to compare";
    running.erase(running.begin());
  }

  std::vector<ReplayResult> results(running.size());
  std::vector<std::string> names;
  for (std::size_t b = 0; b < running.size(); ++b) {
    names.push_back(running[b]->name());
    status = running[b]->run(trace, results[b]);
    if (status.ok())
      status = check_result(trace, results[b]).with_context(names.back() + " backend");
    if (!status.ok()) return fail(status, b + 1 < running.size() ? kExitDevice : kExitBadInput);
  }

  status = write_result(options.out_dir, trace, results.front());
  if (!status.ok()) return fail(status, kExitBadInput);
  std::unique_ptr<Comparison> comparison;
  if (running.size() > 1) {
    std::string const reference_dir = options.out_dir + "/reference";
    status = make_directory(reference_dir);
    if (status.ok()) status = write_result(reference_dir, trace, results.back());
    if (!status.ok()) return fail(status, kExitBadInput);
    comparison = std::make_unique<Comparison>(
        compare_results(trace, results.front(), results.back(), names.front(), names.back()));
    note = comparison->within_tolerance() ? "the backends agree within the dtype's tolerance"
                                          : "the backends DIFFER beyond the dtype's tolerance";
  }
  io::JsonValue const report =
      make_report(options, trace, names, results.front(), comparison.get(), note);
  status = write_text(options.out_dir + "/report.json", io::to_json(report) + "\n");
  if (!status.ok()) return fail(status, kExitBadInput);

  if (!options.quiet) {
    reference::LayerSpec const& spec = trace.config.spec;
    out << "kvc-replay: " << policy_name(trace.config.policy.kind) << ", " << dtype_name(spec.dtype)
        << ", T=" << trace.num_tokens << " (prompt " << trace.config.prompt_tokens
        << "), Hq=" << spec.num_q_heads << " Hkv=" << spec.num_kv_heads << " D=" << spec.head_dim
        << "\n";
    out << "  backends:";
    for (std::string const& name : names) out << " " << name;
    out << "\n  slots per KV head:";
    for (int count : results.front().final_slots) out << " " << count;
    char ratio[32];
    std::snprintf(ratio, sizeof ratio, "%.3f", report.find("compression_ratio")->as_number());
    out << "\n  compression ratio: " << ratio << "\n";
    if (comparison != nullptr) {
      out << "  max abs error (out): " << comparison->out.max_abs
          << ", max rel: " << comparison->out.max_rel << "\n";
    }
    out << "  " << note << "\n  wrote " << options.out_dir
        << "/{out,slots,cache_k,cache_v,cache_pos}.npy and report.json\n";
  }
  if (comparison != nullptr && !comparison->within_tolerance()) {
    err << "kvc-replay: " << comparison->backend << " and " << comparison->reference
        << " differ beyond the tolerance (see report.json)\n";
    return kExitMismatch;
  }
  return kExitOk;
}

//! Runs a parsed command line: picks the backends for --device, then replay_with. Returns an
//! ExitCode.
inline int run(Options const& options, std::ostream& out, std::ostream& err) {
  std::vector<std::unique_ptr<Backend>> backends;
  std::string note;
  bool const want_gpu = options.device == Device::kGpu ||
                        (options.device == Device::kAuto && gpu_backend_available());
  if (want_gpu) {
    std::unique_ptr<Backend> gpu;
    io::IoStatus const status = make_gpu_backend(gpu);
    if (!status.ok()) {
      err << "kvc-replay: --device gpu: " << status.message << "\n";
      return kExitDevice;
    }
    backends.push_back(std::move(gpu));
  } else if (options.device == Device::kAuto) {
    note = kGpuBackendBuilt
               ? "no CUDA device: only the CPU reference ran, there is nothing to compare"
               : "GPU backend not built: only the CPU reference ran, there is nothing to compare";
  } else {
    note = "--device cpu: only the CPU reference ran, there is nothing to compare";
  }
  backends.push_back(std::make_unique<CpuReferenceBackend>());
  return replay_with(options, backends, std::move(note), out, err);
}

//! The whole program: parse `argv`, run, return the exit code. Never throws.
inline int main_entry(int argc, char const* const* argv, std::ostream& out, std::ostream& err) {
  try {
    Options options;
    int const code = parse_arguments(argc, argv, options, out, err);
    if (code >= 0) return code;
    return run(options, out, err);
  } catch (std::exception const& exception) {
    err << "kvc-replay: " << exception.what() << "\n";
    return kExitBadInput;
  }
}

}  // namespace kvc::replay
