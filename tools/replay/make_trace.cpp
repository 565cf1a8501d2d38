// kvc-make-trace: writes a random replay trace (config.json, q.npy, k.npy, v.npy) with kvc's
// own .npy writer, for tests and for trying kvc-replay without Python. See docs/replay.md.
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <system_error>

#include "synthetic.hpp"

namespace {

constexpr char kUsage[] =
    "usage: kvc-make-trace DIR [--policy full|dmc|h2o|tova] [--mode checkpoint|paper]\n"
    "         [--dtype fp32|fp16|bf16] [--rope none|rotate_half|interleaved] [--tokens T]\n"
    "         [--prompt P] [--q-heads N] [--kv-heads N] [--head-dim D] [--window W]\n"
    "         [--heavy H] [--recent R] [--budget B] [--protect-new] [--seed S]\n";

bool parse_int(char const* text, long minimum, long maximum, int& out) {
  char* end = nullptr;
  long const value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || value < minimum || value > maximum) return false;
  out = static_cast<int>(value);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace kvc;
  replay::SyntheticTrace trace;
  std::string dir;
  for (int i = 1; i < argc; ++i) {
    std::string const argument = argv[i];
    auto value = [&]() -> char const* { return i + 1 < argc ? argv[++i] : nullptr; };
    auto bad = [&](char const* what) {
      std::cerr << "kvc-make-trace: " << what << "\n" << kUsage;
      return 2;
    };
    bool ok = true;
    if (argument == "-h" || argument == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (argument == "--policy") {
      char const* text = value();
      ok = text != nullptr && parse_policy(text, trace.policy);
    } else if (argument == "--mode") {
      char const* text = value();
      ok = text != nullptr && (std::string(text) == "checkpoint" || std::string(text) == "paper");
      if (ok) trace.mode = std::string(text) == "paper" ? DmcMode::kPaper : DmcMode::kCheckpoint;
    } else if (argument == "--dtype") {
      char const* text = value();
      ok = text != nullptr && parse_dtype(text, trace.dtype);
    } else if (argument == "--rope") {
      char const* text = value();
      std::string const name = text != nullptr ? text : "";
      ok = name == "none" || name == "rotate_half" || name == "interleaved";
      trace.rope = name == "none"          ? RopeLayout::kNone
                   : name == "interleaved" ? RopeLayout::kInterleaved
                                           : RopeLayout::kRotateHalf;
    } else if (argument == "--tokens" || argument == "--prompt" || argument == "--q-heads" ||
               argument == "--kv-heads" || argument == "--head-dim" || argument == "--window" ||
               argument == "--heavy" || argument == "--recent" || argument == "--budget") {
      int* target = argument == "--tokens"     ? &trace.tokens
                    : argument == "--prompt"   ? &trace.prompt_tokens
                    : argument == "--q-heads"  ? &trace.q_heads
                    : argument == "--kv-heads" ? &trace.kv_heads
                    : argument == "--head-dim" ? &trace.head_dim
                    : argument == "--window"   ? &trace.window
                    : argument == "--heavy"    ? &trace.heavy
                    : argument == "--recent"   ? &trace.recent
                                               : &trace.budget;
      char const* text = value();
      ok = text != nullptr && parse_int(text, 0, 1 << 20, *target);
    } else if (argument == "--protect-new") {
      trace.protect_new = true;
    } else if (argument == "--seed") {
      char const* text = value();
      int seed = 0;
      ok = text != nullptr && parse_int(text, 0, 2147483647L, seed);
      trace.seed = static_cast<std::uint64_t>(seed);
    } else if (!argument.empty() && argument[0] == '-') {
      return bad(("unknown option " + argument).c_str());
    } else if (dir.empty()) {
      dir = argument;
    } else {
      return bad("more than one DIR");
    }
    if (!ok) return bad(("bad value for " + argument).c_str());
  }
  if (dir.empty()) {
    std::cerr << kUsage;
    return 2;
  }
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  io::IoStatus const status = replay::write_synthetic_trace(dir, trace);
  if (!status.ok()) {
    std::cerr << "kvc-make-trace: " << status.message << "\n";
    return 1;
  }
  return 0;
}
