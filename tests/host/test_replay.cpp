// kvc-replay: trace config validation, trace directory validation, the command line, the
// comparison of two backends, and an end-to-end replay per policy whose files must equal what
// the per-policy reference functions compute when called directly.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/io/json.hpp"
#include "kvc/io/npy.hpp"
#include "kvc/io/trace.hpp"
#include "kvc/reference/dmc.hpp"
#include "kvc/reference/full.hpp"
#include "kvc/reference/h2o.hpp"
#include "kvc/reference/tova.hpp"

#include "../../tools/replay/replay.hpp"
#include "../../tools/replay/synthetic.hpp"
#include "test_support.hpp"

using namespace kvc;
using namespace kvc::io;
using namespace kvc::replay;

namespace {

//! A scratch directory removed at scope exit.
struct ScratchDir {
  std::filesystem::path path;
  explicit ScratchDir(std::string const& name) {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("kvc_replay_" + name + "_" + std::to_string(test::test_seed()) + "_" +
            std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code error;
    std::filesystem::remove_all(path, error);
  }
  std::string str() const { return path.string(); }
  std::string file(std::string const& name) const { return (path / name).string(); }
};

//! Runs kvc-replay in-process with `arguments`; returns the exit code and captures the streams.
int run_cli(std::vector<std::string> const& arguments, std::string* out_text = nullptr,
            std::string* err_text = nullptr) {
  std::vector<char const*> argv{"kvc-replay"};
  for (std::string const& argument : arguments) argv.push_back(argument.c_str());
  std::ostringstream out, err;
  int const code = main_entry(static_cast<int>(argv.size()), argv.data(), out, err);
  if (out_text != nullptr) *out_text = out.str();
  if (err_text != nullptr) *err_text = err.str();
  return code;
}

JsonValue base_config() {
  JsonValue config;
  REQUIRE(
      parse_json(R"({"policy": "full", "dtype": "bf16", "q_heads": 8, "kv_heads": 2, "head_dim": 16,
                         "rope": "rotate_half", "rope_theta": 10000, "prompt_tokens": 4,
                         "unknown_key": [1, {"x": null}]})",
                 config)
          .ok());
  return config;
}

//! Asserts parse_trace_config fails on `config` with a message containing `needle`.
void require_config_error(JsonValue const& config, std::string const& needle) {
  TraceConfig parsed;
  IoStatus const status = parse_trace_config(config, parsed);
  INFO("config: " << to_json(config, 0) << "\nmessage: " << status.message);
  REQUIRE_FALSE(status.ok());
  CHECK(status.message.find(needle) != std::string::npos);
}

//! What the per-policy reference functions give when called directly (not through LayerCache).
struct DirectResult {
  std::vector<float> out;           // [T, Hq, D]
  std::vector<std::int32_t> slots;  // [T, Hkv]
  std::vector<reference::HeadCache> heads;
};

template <class State, class Prefill, class Decode>
DirectResult run_direct(Trace const& trace, State state, Prefill prefill, Decode decode) {
  reference::LayerSpec const& spec = trace.config.spec;
  std::size_t const q_row = static_cast<std::size_t>(spec.num_q_heads) * spec.head_dim;
  std::size_t const kv_row = static_cast<std::size_t>(spec.num_kv_heads) * spec.head_dim;
  int const prompt = trace.config.prompt_tokens;
  DirectResult result;
  auto record = [&](int count) {
    for (int i = 0; i < count; ++i) {
      for (auto const& head : state.heads) result.slots.push_back(head.size());
    }
  };
  if (prompt > 0) {
    reference::PrefillInput const input{prompt,
                                        {trace.q.data(), prompt * q_row},
                                        {trace.k.data(), prompt * kv_row},
                                        {trace.v.data(), prompt * kv_row}};
    reference::AttentionOutput output;
    REQUIRE(prefill(state, input, output) == Status::kSuccess);
    result.out.insert(result.out.end(), output.out.begin(), output.out.end());
    record(prompt);
  }
  for (int t = prompt; t < trace.num_tokens; ++t) {
    reference::DecodeInput const input{{trace.q.data() + t * q_row, q_row},
                                       {trace.k.data() + t * kv_row, kv_row},
                                       {trace.v.data() + t * kv_row, kv_row}};
    reference::AttentionOutput output;
    REQUIRE(decode(state, input, output) == Status::kSuccess);
    result.out.insert(result.out.end(), output.out.begin(), output.out.end());
    record(1);
  }
  result.heads = state.heads;
  return result;
}

DirectResult run_direct_reference(Trace const& trace) {
  using namespace kvc::reference;
  LayerSpec const& spec = trace.config.spec;
  PolicyConfig const& policy = trace.config.policy;
  switch (policy.kind) {
    case PolicyKind::kFull:
      return run_direct(
          trace, make_full_state(spec),
          [&](FullLayerState& s, PrefillInput const& in, AttentionOutput& o) {
            return full_prefill(spec, policy.full, s, in, o);
          },
          [&](FullLayerState& s, DecodeInput const& in, AttentionOutput& o) {
            return full_decode_step(spec, policy.full, s, in, o);
          });
    case PolicyKind::kDmc:
      return run_direct(
          trace, make_dmc_state(spec, policy.dmc),
          [&](DmcLayerState& s, PrefillInput const& in, AttentionOutput& o) {
            return dmc_prefill(spec, policy.dmc, s, in, o);
          },
          [&](DmcLayerState& s, DecodeInput const& in, AttentionOutput& o) {
            return dmc_decode_step(spec, policy.dmc, s, in, o);
          });
    case PolicyKind::kH2O:
      return run_direct(
          trace, make_h2o_state(spec),
          [&](H2OLayerState& s, PrefillInput const& in, AttentionOutput& o) {
            return h2o_prefill(spec, policy.h2o, s, in, o);
          },
          [&](H2OLayerState& s, DecodeInput const& in, AttentionOutput& o) {
            return h2o_decode_step(spec, policy.h2o, s, in, o);
          });
    case PolicyKind::kTova:
      return run_direct(
          trace, make_tova_state(spec),
          [&](TovaLayerState& s, PrefillInput const& in, AttentionOutput& o) {
            return tova_prefill(spec, policy.tova, s, in, o);
          },
          [&](TovaLayerState& s, DecodeInput const& in, AttentionOutput& o) {
            return tova_decode_step(spec, policy.tova, s, in, o);
          });
  }
  FAIL("unknown policy");
  return {};
}

//! A backend that returns the CPU reference's result with out[index] moved by `delta`: stands in
//! for the GPU backend to test the two-backend path.
class PerturbedBackend final : public Backend {
 public:
  PerturbedBackend(std::size_t index, float delta) : index_(index), delta_(delta) {}
  std::string name() const override { return "fake-gpu"; }
  IoStatus run(Trace const& trace, ReplayResult& result) override {
    KVC_IO_RETURN_IF_ERROR(CpuReferenceBackend().run(trace, result));
    result.out[index_] += delta_;
    return IoStatus::success();
  }

 private:
  std::size_t index_;
  float delta_;
};

}  // namespace

TEST_SUITE("host") {
  TEST_CASE("replay: config validation") {
    TraceConfig parsed;
    IoStatus status = parse_trace_config(base_config(), parsed);
    INFO(status.message);
    REQUIRE(status.ok());
    CHECK(parsed.policy.kind == PolicyKind::kFull);
    CHECK(parsed.spec.dtype == DType::kBF16);
    CHECK(parsed.spec.num_q_heads == 8);
    CHECK(parsed.spec.num_kv_heads == 2);
    CHECK(parsed.spec.head_dim == 16);
    CHECK(parsed.spec.rope.layout == RopeLayout::kRotateHalf);
    CHECK(parsed.prompt_tokens == 4);

    auto with = [](std::string const& key, JsonValue value) {
      JsonValue config = base_config();
      config.set(key, std::move(value));
      return config;
    };
    auto without = [](std::string const& key) {
      JsonValue const config = base_config();
      JsonValue result = JsonValue::object();
      for (JsonMember const& member : config.as_object()) {
        if (member.key != key) result.set(member.key, member.value);
      }
      return result;
    };
    SUBCASE("missing keys") {
      for (char const* key : {"policy", "dtype", "q_heads", "kv_heads", "head_dim", "rope",
                              "rope_theta", "prompt_tokens"}) {
        require_config_error(without(key), std::string("missing required key \"") + key + "\"");
      }
      // rope_theta is optional without RoPE
      JsonValue config = without("rope_theta");
      config.set("rope", JsonValue::string("none"));
      CHECK(parse_trace_config(config, parsed).ok());
      require_config_error(with("policy", JsonValue::string("dmc")), "\"mode\"");
      require_config_error(with("policy", JsonValue::string("h2o")), "\"heavy\"");
      require_config_error(with("policy", JsonValue::string("tova")), "\"budget\"");
    }
    SUBCASE("wrong types") {
      require_config_error(with("policy", JsonValue::number(1)), "must be a string, got number");
      require_config_error(with("q_heads", JsonValue::string("8")),
                           "must be an integer, got string");
      require_config_error(with("q_heads", JsonValue::number(8.5)), "must be an integer, got 8.5");
      require_config_error(with("head_dim", JsonValue::number(-16)), "must be in [2,");
      require_config_error(with("prompt_tokens", JsonValue::number(-1)), "prompt_tokens");
      require_config_error(with("rope_theta", JsonValue::string("1e4")), "must be a number");
      require_config_error(with("rope_theta", JsonValue::number(0)), "must be > 0");
      require_config_error(JsonValue::array(), "must be a JSON object");
      JsonValue tova = with("policy", JsonValue::string("tova"));
      tova.set("budget", JsonValue::number(8));
      tova.set("protect_new", JsonValue::number(1));
      require_config_error(tova, "must be true or false");
      // integral numbers written as 8.0 are integers
      CHECK(parse_trace_config(with("q_heads", JsonValue::number(8.0)), parsed).ok());
    }
    SUBCASE("inconsistent shapes and bad values") {
      require_config_error(with("kv_heads", JsonValue::number(3)), "multiple of kv_heads");
      require_config_error(with("head_dim", JsonValue::number(15)), "must be even");
      require_config_error(with("policy", JsonValue::string("snapkv")),
                           "unknown policy \"snapkv\"");
      require_config_error(with("dtype", JsonValue::string("fp8")), "unknown dtype");
      require_config_error(with("rope", JsonValue::string("yarn")), "unknown RoPE layout");
      JsonValue dmc = with("policy", JsonValue::string("dmc"));
      dmc.set("mode", JsonValue::string("fast"));
      require_config_error(dmc, "unknown DMC mode");
      dmc.set("mode", JsonValue::string("paper"));
      dmc.set("window", JsonValue::number(kDmcMaxWindow + 1));
      require_config_error(dmc, "\"window\"");
      JsonValue h2o = with("policy", JsonValue::string("h2o"));
      h2o.set("heavy", JsonValue::number(0));
      h2o.set("recent", JsonValue::number(0));
      require_config_error(h2o, "heavy + recent");
      JsonValue tova = with("policy", JsonValue::string("tova"));
      tova.set("budget", JsonValue::number(0));
      require_config_error(tova, "\"budget\"");
    }
    SUBCASE("policy parameters and modes") {
      JsonValue dmc = with("policy", JsonValue::string("dmc"));
      dmc.set("mode", JsonValue::string("paper"));
      dmc.set("heavy", JsonValue::string("ignored: another policy's key"));
      REQUIRE(parse_trace_config(dmc, parsed).ok());
      CHECK(parsed.policy.dmc.mode == DmcMode::kPaper);
      CHECK(parsed.policy.dmc.window == 0);
      dmc.set("mode", JsonValue::string("checkpoint"));
      REQUIRE(parse_trace_config(dmc, parsed).ok());
      CHECK(parsed.policy.dmc.window == 12);
      CHECK(parsed.policy.dmc.decision_index(16) == 15);
      dmc.set("window", JsonValue::number(5));
      REQUIRE(parse_trace_config(dmc, parsed).ok());
      CHECK(parsed.policy.dmc.window == 5);
      JsonValue tova = with("policy", JsonValue::string("tova"));
      tova.set("budget", JsonValue::number(7));
      tova.set("protect_new", JsonValue::boolean(true));
      REQUIRE(parse_trace_config(tova, parsed).ok());
      CHECK(parsed.policy.tova.budget == 7);
      CHECK(parsed.policy.tova.protect_new);
    }
  }

  TEST_CASE("replay: trace directory validation") {
    ScratchDir dir("validate");
    SyntheticTrace synthetic;
    synthetic.policy = PolicyKind::kFull;
    synthetic.dtype = DType::kBF16;
    synthetic.tokens = 9;
    synthetic.prompt_tokens = 3;
    synthetic.seed = test::test_seed();
    REQUIRE(write_synthetic_trace(dir.str(), synthetic).ok());
    Trace trace;
    IoStatus status = read_trace(dir.str(), trace);
    INFO(status.message);
    REQUIRE(status.ok());
    CHECK(trace.num_tokens == 9);
    CHECK(trace.q.size() == 9u * 4 * 16);

    auto expect_error = [&](std::string const& needle, ValueCheck check = ValueCheck::kReject) {
      Trace untouched;
      IoStatus const result = read_trace(dir.str(), untouched, check);
      INFO("message: " << result.message);
      REQUIRE_FALSE(result.ok());
      CHECK(result.message.find(needle) != std::string::npos);
      CHECK(untouched.q.empty());
    };
    auto rewrite = [&](char const* name, std::vector<std::int64_t> shape,
                       std::vector<float> values) {
      REQUIRE(write_npy(dir.file(name), shape, values).ok());
    };
    std::vector<float> q, k, v;
    synthetic_tensors(synthetic, q, k, v);

    SUBCASE("missing or malformed files name the file") {
      std::filesystem::remove(dir.file("k.npy"));
      expect_error("k.npy: file not found");
      std::ofstream(dir.file("k.npy")) << "not numpy";
      expect_error("k.npy: not a .npy file");
      std::ofstream(dir.file("config.json")) << "{\"policy\": \"full\",}";
      expect_error("config.json: byte 18");
      Trace none;
      CHECK(read_trace(dir.file("nope"), none).message.find("not a directory") !=
            std::string::npos);
    }
    SUBCASE("shapes inconsistent with the config or each other") {
      rewrite("q.npy", {9, 2, 32}, q);
      expect_error("q.npy: shape (9, 2, 32) does not match the config");
      rewrite("q.npy", {9 * 4 * 16}, q);
      expect_error("expected 3 dimensions");
      synthetic_tensors(synthetic, q, k, v);
      rewrite("q.npy", {9, 4, 16}, q);
      rewrite("v.npy", {8, 2, 16}, std::vector<float>(v.begin(), v.begin() + 8 * 2 * 16));
      expect_error("token counts differ");
      rewrite("v.npy", {9, 2, 16}, v);
      REQUIRE(read_trace(dir.str(), trace).ok());
      rewrite("q.npy", {0, 4, 16}, {});
      rewrite("k.npy", {0, 2, 16}, {});
      rewrite("v.npy", {0, 2, 16}, {});
      expect_error("no tokens");
    }
    SUBCASE("prompt longer than the trace") {
      JsonValue config = synthetic_config(synthetic);
      config.set("prompt_tokens", JsonValue::number(10));
      std::ofstream(dir.file("config.json")) << to_json(config);
      expect_error("\"prompt_tokens\": 10 exceeds the trace's 9 tokens");
    }
    SUBCASE("values the dtype cannot represent: rejected, or rounded on request") {
      std::vector<float> changed = k;
      changed[2 * 16 + 5] = 0.1f;  // not a bf16 value
      rewrite("k.npy", {9, 2, 16}, changed);
      expect_error("k.npy: element [1, 0, 5] = 0.100000001 is not representable in bf16");
      Trace rounded;
      REQUIRE(read_trace(dir.str(), rounded, ValueCheck::kRound).ok());
      CHECK(rounded.rounded_values == 1);
      CHECK(rounded.k[2 * 16 + 5] == round_to_dtype(0.1f, DType::kBF16));
      changed[7] = std::nanf("");
      rewrite("k.npy", {9, 2, 16}, changed);
      expect_error("is not finite", ValueCheck::kRound);
    }
  }

  TEST_CASE("replay: command line") {
    std::string out, err;
    CHECK(run_cli({"--help"}, &out) == kExitOk);
    CHECK(out.find("usage: kvc-replay") == 0);
    CHECK(run_cli({}, nullptr, &err) == kExitUsage);
    CHECK(err.find("missing TRACE_DIR") != std::string::npos);
    CHECK(run_cli({"trace"}, nullptr, &err) == kExitUsage);
    CHECK(err.find("missing --out") != std::string::npos);
    CHECK(run_cli({"trace", "--out"}, nullptr, &err) == kExitUsage);
    CHECK(run_cli({"trace", "--out", "o", "--device", "tpu"}, nullptr, &err) == kExitUsage);
    CHECK(err.find("unknown device 'tpu'") != std::string::npos);
    CHECK(run_cli({"trace", "--out", "o", "--fast"}, nullptr, &err) == kExitUsage);
    CHECK(err.find("unknown option '--fast'") != std::string::npos);
    CHECK(run_cli({"a", "b", "--out", "o"}, nullptr, &err) == kExitUsage);

    ScratchDir dir("cli");
    SyntheticTrace synthetic;
    synthetic.seed = test::test_seed();
    REQUIRE(write_synthetic_trace(dir.str(), synthetic).ok());
    std::string const out_dir = dir.file("out");
    if (!kGpuBackendBuilt) {
      CHECK(run_cli({dir.str(), "--out", out_dir, "--device", "gpu"}, nullptr, &err) ==
            kExitDevice);
      CHECK(err.find("GPU backend not built yet") != std::string::npos);
      CHECK_FALSE(std::filesystem::exists(out_dir));
    }
    CHECK(run_cli({dir.file("missing"), "--out=" + out_dir, "--device=cpu"}, nullptr, &err) ==
          kExitBadInput);
    CHECK(err.find("missing: not a directory") != std::string::npos);
    std::filesystem::remove(dir.file("v.npy"));
    CHECK(run_cli({dir.str(), "-o", out_dir, "--device", "cpu"}, nullptr, &err) == kExitBadInput);
    CHECK(err.find("v.npy: file not found") != std::string::npos);
  }

  TEST_CASE("replay: each policy's outputs equal the reference called directly") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    struct Case {
      PolicyKind policy;
      DType dtype;
      RopeLayout rope;
      int q_heads, kv_heads, tokens, prompt;
      DmcMode mode;
    };
    std::vector<Case> const cases = {
        {PolicyKind::kFull, DType::kF32, RopeLayout::kRotateHalf, 4, 2, 20, 7,
         DmcMode::kCheckpoint},
        {PolicyKind::kDmc, DType::kBF16, RopeLayout::kRotateHalf, 4, 2, 40, 13,
         DmcMode::kCheckpoint},
        {PolicyKind::kDmc, DType::kF16, RopeLayout::kInterleaved, 2, 2, 30, 0, DmcMode::kPaper},
        {PolicyKind::kH2O, DType::kF16, RopeLayout::kInterleaved, 4, 1, 32, 12,
         DmcMode::kCheckpoint},
        {PolicyKind::kTova, DType::kBF16, RopeLayout::kNone, 6, 3, 32, 14, DmcMode::kCheckpoint},
        {PolicyKind::kTova, DType::kF32, RopeLayout::kRotateHalf, 2, 1, 24, 24,
         DmcMode::kCheckpoint},
    };
    for (Case const& c : cases) {
      ScratchDir dir(policy_name(c.policy));
      SyntheticTrace synthetic;
      synthetic.policy = c.policy;
      synthetic.mode = c.mode;
      synthetic.dtype = c.dtype;
      synthetic.rope = c.rope;
      synthetic.q_heads = c.q_heads;
      synthetic.kv_heads = c.kv_heads;
      synthetic.tokens = c.tokens;
      synthetic.prompt_tokens = c.prompt;
      synthetic.heavy = 5;
      synthetic.recent = 3;
      synthetic.budget = 9;
      synthetic.protect_new = rng() % 2 == 0;
      synthetic.seed = rng();
      CAPTURE(policy_name(c.policy));
      CAPTURE(dtype_name(c.dtype));
      CAPTURE(c.prompt);
      REQUIRE(write_synthetic_trace(dir.str(), synthetic).ok());
      std::string const out_dir = dir.file("out");
      std::string out_text, err_text;
      int const code =
          run_cli({dir.str(), "--out", out_dir, "--device", "cpu"}, &out_text, &err_text);
      INFO("stderr: " << err_text);
      REQUIRE(code == kExitOk);
      CHECK(out_text.find("compression ratio") != std::string::npos);

      Trace trace;
      REQUIRE(read_trace(dir.str(), trace).ok());
      DirectResult const direct = run_direct_reference(trace);
      int const hkv = c.kv_heads, d = 16;

      NpyArray<float> out, cache_k, cache_v;
      NpyArray<std::int32_t> slots, positions;
      REQUIRE(read_npy(out_dir + "/out.npy", out).ok());
      REQUIRE(read_npy(out_dir + "/slots.npy", slots).ok());
      REQUIRE(read_npy(out_dir + "/cache_k.npy", cache_k).ok());
      REQUIRE(read_npy(out_dir + "/cache_v.npy", cache_v).ok());
      REQUIRE(read_npy(out_dir + "/cache_pos.npy", positions).ok());
      CHECK(out.shape == std::vector<std::int64_t>{c.tokens, c.q_heads, d});
      test::require_close(out.data, direct.out, {0.0, 0.0}, "out.npy");
      CHECK(slots.shape == std::vector<std::int64_t>{c.tokens, hkv});
      CHECK(slots.data == direct.slots);

      int max_slots = 0;
      for (auto const& head : direct.heads) max_slots = std::max(max_slots, head.size());
      CHECK(cache_k.shape == std::vector<std::int64_t>{hkv, max_slots, d});
      CHECK(positions.shape == std::vector<std::int64_t>{hkv, max_slots});
      std::vector<float> expected_k(static_cast<std::size_t>(hkv) * max_slots * d, 0.0f);
      std::vector<float> expected_v = expected_k;
      std::vector<std::int32_t> expected_positions(static_cast<std::size_t>(hkv) * max_slots, -1);
      for (int h = 0; h < hkv; ++h) {
        auto const& head = direct.heads[h];
        std::copy(head.k.begin(), head.k.end(), expected_k.begin() + h * max_slots * d);
        std::copy(head.v.begin(), head.v.end(), expected_v.begin() + h * max_slots * d);
        for (int s = 0; s < head.size(); ++s)
          expected_positions[h * max_slots + s] = static_cast<int>(head.position[s]);
      }
      test::require_close(cache_k.data, expected_k, {0.0, 0.0}, "cache_k.npy");
      test::require_close(cache_v.data, expected_v, {0.0, 0.0}, "cache_v.npy");
      CHECK(positions.data == expected_positions);

      JsonValue report;
      REQUIRE(read_json_file(out_dir + "/report.json", report).ok());
      CHECK(report.find("policy")->as_string() == policy_name(c.policy));
      CHECK(report.find("dtype")->as_string() == dtype_name(c.dtype));
      CHECK(report.find("shape")->find("tokens")->as_number() == c.tokens);
      CHECK(report.find("comparison")->is_null());
      CHECK(report.find("note")->as_string().find("only the CPU reference ran") !=
            std::string::npos);
      JsonValue::Array const& per_head = report.find("slots_per_head")->as_array();
      JsonValue::Array const& ratios = report.find("compression_ratio_per_head")->as_array();
      REQUIRE(per_head.size() == static_cast<std::size_t>(hkv));
      int total = 0;
      for (int h = 0; h < hkv; ++h) {
        CHECK(per_head[h].as_number() == direct.heads[h].size());
        CHECK(ratios[h].as_number() == doctest::Approx(double(c.tokens) / direct.heads[h].size()));
        total += direct.heads[h].size();
      }
      CHECK(report.find("compression_ratio")->as_number() ==
            doctest::Approx(double(c.tokens) * hkv / total));
      if (c.policy == PolicyKind::kFull) CHECK(total == c.tokens * hkv);
      if (c.policy == PolicyKind::kTova) CHECK(max_slots == std::min(c.tokens, synthetic.budget));
      if (c.policy == PolicyKind::kH2O) CHECK(max_slots == std::min(c.tokens, 8));
      if (c.policy == PolicyKind::kDmc)
        CHECK(total < c.tokens * hkv);  // about half the tokens merge
    }
  }

  TEST_CASE("replay: two backends are compared step by step") {
    ScratchDir dir("compare");
    SyntheticTrace synthetic;
    synthetic.policy = PolicyKind::kDmc;
    synthetic.dtype = DType::kF16;
    synthetic.tokens = 20;
    synthetic.prompt_tokens = 6;
    synthetic.seed = test::test_seed();
    REQUIRE(write_synthetic_trace(dir.str(), synthetic).ok());
    Options options;
    options.trace_dir = dir.str();
    options.quiet = true;
    std::size_t const row = 4 * 16;  // one token of out: [Hq, D]
    for (float delta : {0.0f, 1e-5f, 0.25f}) {
      CAPTURE(delta);
      options.out_dir = dir.file("out" + std::to_string(delta));
      std::vector<std::unique_ptr<Backend>> backends;
      backends.push_back(
          std::make_unique<PerturbedBackend>(9 * row + 3, delta));  // token 9: a decode step
      backends.push_back(std::make_unique<CpuReferenceBackend>());
      std::ostringstream out, err;
      int const code = replay_with(options, backends, "", out, err);
      bool const tolerated = delta <= 1e-5f;
      CHECK(code == (tolerated ? kExitOk : kExitMismatch));
      CHECK(std::filesystem::exists(options.out_dir + "/reference/out.npy"));
      JsonValue report;
      REQUIRE(read_json_file(options.out_dir + "/report.json", report).ok());
      JsonValue const* comparison = report.find("comparison");
      REQUIRE(comparison != nullptr);
      REQUIRE(comparison->is_object());
      CHECK(comparison->find("backend")->as_string() == "fake-gpu");
      CHECK(comparison->find("within_tolerance")->as_bool() == tolerated);
      CHECK(comparison->find("out")->find("max_abs")->as_number() ==
            doctest::Approx(delta).epsilon(1e-3));
      CHECK(comparison->find("slot_mismatches")->as_number() == 0);
      JsonValue::Array const& steps = comparison->find("steps")->as_array();
      REQUIRE(steps.size() == 1u + 14u);  // the prefill chunk and 14 decode steps
      CHECK(steps[0].find("kind")->as_string() == "prefill");
      CHECK(steps[0].find("tokens")->as_number() == 6);
      for (std::size_t s = 1; s < steps.size(); ++s) {
        double const expected = s == 4 ? delta : 0.0;  // step 4 decodes token 9
        CHECK(steps[s].find("max_abs")->as_number() == doctest::Approx(expected).epsilon(1e-3));
      }
      NpyArray<float> primary, reference_out;
      REQUIRE(read_npy(options.out_dir + "/out.npy", primary).ok());
      REQUIRE(read_npy(options.out_dir + "/reference/out.npy", reference_out).ok());
      CHECK(primary.data[9 * row + 3] - reference_out.data[9 * row + 3] ==
            doctest::Approx(delta).epsilon(1e-3));
    }
  }
}
