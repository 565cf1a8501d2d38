// The KVCache facade and one reference::LayerCache per (sequence, layer), driven together: a
// decode step or a prefill step runs on the device and on copies of the references, and the
// copies replace the references only if the device took the step (a refused step must leave
// the cache as it was). After every step the outputs, LSE and the whole cache (keys, values,
// positions, scores, tokens seen, page accounting) are compared. Used by test_kv_cache.cu and
// the GPU differential fuzzer (test_fuzz_gpu.cu).
#pragma once

#include <algorithm>
#include <cstddef>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/core/dtype_traits.hpp"
#include "kvc/engine/kv_cache.cuh"
#include "kvc/reference/layer_cache.hpp"

#include "support_store.cuh"

namespace kvc::test {

struct Tolerances {
  Tolerance scores{1e-6, 1e-5};
};

//! A facade and its reference, driven together. T: the storage type of config.dtype.
template <class Backend, class Prefill = LibraryPrefillAttention, class T = __nv_bfloat16>
struct Harness {
  static constexpr DType kDType = DTypeTraits<T>::kDType;
  using Cache = BasicKVCache<Backend, Prefill>;
  KVCacheConfig config;
  Cache cache;
  Stream stream;
  reference::LayerSpec spec;
  std::map<int, std::vector<reference::LayerCache>> refs;  // sequence id -> [layers]
  DeviceBuffer<T> q, k, v, out;
  DeviceBuffer<float> lse;
  Tolerances tolerances;
  double merge_probability = 0.7;

  explicit Harness(KVCacheConfig const& c) : config(c) {
    KVC_STATUS_REQUIRE(Cache::create(config, stream.get(), cache));
    PagedStoreConfig store;
    REQUIRE(config.to_store_config(store) == Status::kSuccess);
    spec = layer_spec(store);
    std::size_t const rows = static_cast<std::size_t>(
        std::max({config.batch_capacity(), config.max_prefill_tokens, 64}));
    q.resize(rows * q_row());
    k.resize(rows * kv_row());
    v.resize(rows * kv_row());
    out.resize(rows * q_row());
    lse.resize(rows * config.shape.num_q_heads);
  }
  std::size_t q_row() const {
    return static_cast<std::size_t>(config.shape.num_q_heads) * config.shape.head_dim;
  }
  std::size_t kv_row() const {
    return static_cast<std::size_t>(config.shape.num_kv_heads) * config.shape.head_dim;
  }

  //! A device output waiting for its step's verdict, with the reference's.
  struct Check {
    std::string where;
    std::vector<float> out, lse;
    reference::AttentionOutput want;
  };
  static std::vector<float> slice(std::vector<float> const& all, std::size_t first,
                                  std::size_t count) {
    return std::vector<float>(all.begin() + static_cast<std::ptrdiff_t>(first),
                              all.begin() + static_cast<std::ptrdiff_t>(first + count));
  }
  void upload_inputs(std::vector<float> const& qh, std::vector<float> const& kh,
                     std::vector<float> const& vh) {
    q.upload(to_storage<T>(qh), stream.get());
    k.upload(to_storage<T>(kh), stream.get());
    v.upload(to_storage<T>(vh), stream.get());
    out.poison(stream.get());
    lse.poison(stream.get());
  }
  //! A taken step: every output against the reference. A refused one: allowed, and out of pages.
  void settle(Status status, bool may_refuse, std::vector<Check> const& checks,
              std::string const& what) {
    if (status != Status::kSuccess) {
      INFO(what << ": step refused with " << to_string(status));
      REQUIRE(may_refuse);
      REQUIRE(status == Status::kErrorOutOfPages);
      return;
    }
    for (Check const& check : checks) {
      require_close(check.out, check.want.out, default_tolerance(kDType), check.where + " out");
      require_close(check.lse, check.want.lse, {5e-4, 1e-4}, check.where + " lse");
    }
  }

  int join() {
    int seq = -1;
    KVC_STATUS_REQUIRE(cache.add_sequence(seq, stream.get()));
    std::vector<reference::LayerCache> layers(static_cast<std::size_t>(config.shape.num_layers));
    for (reference::LayerCache& layer : layers) {
      KVC_STATUS_REQUIRE(reference::LayerCache::create(spec, config.policy, layer));
    }
    refs[seq] = std::move(layers);
    return seq;
  }
  void leave(int seq) {
    KVC_STATUS_REQUIRE(cache.release_sequence(seq, stream.get()));
    refs.erase(seq);
  }

  //! Pre-RoPE inputs of `rows` tokens: q [rows, Hq, D], k and v [rows, Hkv, D], in the dtype.
  //! DMC's decision neuron merges with probability merge_probability.
  void draw(std::mt19937_64& rng, std::size_t rows, std::vector<float>& qh, std::vector<float>& kh,
            std::vector<float>& vh) {
    qh = random_normal(rng, rows * q_row(), kDType);
    kh = random_normal(rng, rows * kv_row(), kDType);
    vh = random_normal(rng, rows * kv_row(), kDType);
    if (config.policy.kind == PolicyKind::kDmc) {
      std::uniform_real_distribution<double> unit(0.0, 1.0);
      DmcConfig const& dmc = config.policy.dmc;
      std::size_t const d = static_cast<std::size_t>(config.shape.head_dim);
      std::size_t const neuron =
          static_cast<std::size_t>(dmc.decision_index(config.shape.head_dim));
      for (std::size_t row = 0; row < rows * config.shape.num_kv_heads; ++row) {
        kh[row * d + neuron] = dmc.offset + (unit(rng) < merge_probability ? 1.0f : -1.0f);
      }
    }
  }

  //! One decode step of `ids` through the facade and the reference (run on copies, kept only if
  //! the device took the step); compares every layer's outputs and LSE, then the whole cache.
  //! Returns the step's status: kSuccess, or (only when `may_refuse`) kErrorOutOfPages, after
  //! which the cache must be as it was.
  Status step(std::mt19937_64& rng, std::vector<int> const& ids, std::string const& what,
              bool may_refuse = false) {
    std::size_t const rows = ids.size();
    std::size_t const hq = static_cast<std::size_t>(config.shape.num_q_heads);
    std::map<int, std::vector<reference::LayerCache>> next;
    for (int id : ids) next[id] = refs.at(id);
    std::vector<Check> checks;
    KVC_STATUS_REQUIRE(cache.begin_step(ids.data(), static_cast<int>(rows), stream.get()));
    for (int l = 0; l < config.shape.num_layers; ++l) {
      std::vector<float> qh, kh, vh;
      draw(rng, rows, qh, kh, vh);
      upload_inputs(qh, kh, vh);
      KVC_STATUS_REQUIRE(cache.decode_layer(l, q.data(), k.data(), v.data(), out.data(),
                                            stream.get(), lse.data()));
      std::vector<float> const got = to_floats(out.download(stream.get(), rows * q_row()));
      std::vector<float> const got_lse = lse.download(stream.get(), rows * hq);
      for (std::size_t r = 0; r < rows; ++r) {
        reference::DecodeInput const input{
            reference::ConstSpan(qh.data() + r * q_row(), q_row()),
            reference::ConstSpan(kh.data() + r * kv_row(), kv_row()),
            reference::ConstSpan(vh.data() + r * kv_row(), kv_row())};
        reference::AttentionOutput want;
        KVC_STATUS_REQUIRE(next.at(ids[r])[static_cast<std::size_t>(l)].decode_step(input, want));
        checks.push_back(
            Check{what + " layer " + std::to_string(l) + " seq " + std::to_string(ids[r]),
                  slice(got, r * q_row(), q_row()), slice(got_lse, r * hq, hq), std::move(want)});
      }
    }
    KVC_STATUS_REQUIRE(cache.end_step(stream.get()));
    Status const status = cache.step_status_sync();
    settle(status, may_refuse, checks, what);
    if (status == Status::kSuccess) {
      for (auto& [id, layers] : next) refs[id] = std::move(layers);
    }
    compare_cache(what);
    return status;
  }

  //! One prefill step through the facade and the reference's prefill: row r is a chunk of
  //! tokens[r] tokens of sequence ids[r] (appended to its cache). `per_layer`: the one-sequence
  //! shorthand prefill_layer(seq, layer, ...) (a step per layer) instead of begin_prefill /
  //! prefill_layer / end_prefill. Compares every layer's outputs and LSE, then the whole cache.
  //! Returns kSuccess, or (only when `may_refuse`) kErrorOutOfPages for the step (per_layer:
  //! for some layer; the layers that took their chunk keep it, in the reference too).
  Status prefill(std::mt19937_64& rng, std::vector<int> const& ids, std::vector<int> const& tokens,
                 std::string const& what, bool per_layer = false, bool may_refuse = false) {
    REQUIRE(ids.size() == tokens.size());
    REQUIRE((!per_layer || ids.size() == 1));
    std::size_t total = 0;
    for (int t : tokens) total += static_cast<std::size_t>(t);
    std::size_t const hq = static_cast<std::size_t>(config.shape.num_q_heads);
    std::map<int, std::vector<reference::LayerCache>> next;
    for (int id : ids) next[id] = refs.at(id);
    std::vector<Check> checks;
    Status result = Status::kSuccess;
    if (!per_layer) {
      KVC_STATUS_REQUIRE(cache.begin_prefill(ids.data(), tokens.data(),
                                             static_cast<int>(ids.size()), stream.get()));
    }
    for (int l = 0; l < config.shape.num_layers; ++l) {
      std::size_t const layer = static_cast<std::size_t>(l);
      std::vector<float> qh, kh, vh;
      draw(rng, total, qh, kh, vh);
      upload_inputs(qh, kh, vh);
      if (per_layer) {
        KVC_STATUS_REQUIRE(cache.prefill_layer(ids[0], l, tokens[0], q.data(), k.data(), v.data(),
                                               out.data(), stream.get(), lse.data()));
      } else {
        KVC_STATUS_REQUIRE(cache.prefill_layer(l, q.data(), k.data(), v.data(), out.data(),
                                               stream.get(), lse.data()));
      }
      std::vector<float> const got = to_floats(out.download(stream.get(), total * q_row()));
      std::vector<float> const got_lse = lse.download(stream.get(), total * hq);
      std::size_t first = 0;
      for (std::size_t r = 0; r < ids.size(); ++r) {
        std::size_t const n = static_cast<std::size_t>(tokens[r]);
        reference::PrefillInput const input{
            tokens[r], reference::ConstSpan(qh.data() + first * q_row(), n * q_row()),
            reference::ConstSpan(kh.data() + first * kv_row(), n * kv_row()),
            reference::ConstSpan(vh.data() + first * kv_row(), n * kv_row())};
        reference::AttentionOutput want;
        KVC_STATUS_REQUIRE(next.at(ids[r])[layer].prefill(input, want));
        checks.push_back(
            Check{what + " layer " + std::to_string(l) + " seq " + std::to_string(ids[r]),
                  slice(got, first * q_row(), n * q_row()), slice(got_lse, first * hq, n * hq),
                  std::move(want)});
        first += n;
      }
      if (per_layer) {  // one step per layer: settle it and keep its layer if it was taken
        Status const status = cache.step_status_sync();
        settle(status, may_refuse, checks, what);
        if (status == Status::kSuccess) {
          refs.at(ids[0])[layer] = next.at(ids[0])[layer];
        } else {
          result = status;
        }
        checks.clear();
      }
    }
    if (!per_layer) {
      KVC_STATUS_REQUIRE(cache.end_prefill(stream.get()));
      result = cache.step_status_sync();
      settle(result, may_refuse, checks, what);
      if (result == Status::kSuccess) {
        for (auto& [id, layers] : next) refs[id] = std::move(layers);
      }
    }
    compare_cache(what);
    return result;
  }

  //! Every active sequence's slots (keys, values, positions, scores) against the reference.
  void compare_cache(std::string const& what) {
    StoreSnapshot<T> const snap = take_snapshot<T>(cache.store(), stream.get());
    check_page_accounting(snap);
    for (auto const& [seq, layers] : refs) {
      for (int l = 0; l < config.shape.num_layers; ++l) {
        reference::LayerCache const& ref = layers[static_cast<std::size_t>(l)];
        std::vector<reference::HeadCache> heads = ref.heads();
        // TOVA keeps its layer scores in KV head 0 only.
        if (config.policy.kind == PolicyKind::kTova) {
          for (std::size_t h = 1; h < heads.size(); ++h) heads[h].score.clear();
        }
        REQUIRE(snap.tokens_seen[static_cast<std::size_t>(snap.dims.layer_seq(l, seq))] ==
                ref.tokens_seen());
        for (int h = 0; h < config.shape.num_kv_heads; ++h) {
          reference::HeadCache got = snap.head(l, seq, h);
          if (heads[static_cast<std::size_t>(h)].score.empty()) got.score.clear();
          std::string const where = what + " cache layer " + std::to_string(l) + " seq " +
                                    std::to_string(seq) + " kv head " + std::to_string(h);
          reference::HeadCache const& want = heads[static_cast<std::size_t>(h)];
          REQUIRE_MESSAGE(got.position == want.position, where << ": positions differ");
          require_close(got.k, want.k, default_tolerance(kDType), where + " keys");
          require_close(got.v, want.v, default_tolerance(kDType), where + " values");
          if (!want.score.empty()) {
            require_close(got.score, want.score, tolerances.scores, where + " scores");
          }
        }
      }
    }
  }

  //! Random continuous batching: sequences join and leave; each step is a shuffled subset.
  //! Returns the number of sequences that left.
  int run(std::mt19937_64& rng, int steps, double leave_probability) {
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    int leaves = 0;
    for (int s = 0; s < steps; ++s) {
      std::vector<int> live;
      for (auto const& entry : refs) live.push_back(entry.first);
      for (int seq : live) {
        bool const too_long = refs.at(seq)[0].tokens_seen() >= config.max_tokens_per_seq;
        if (too_long || unit(rng) < leave_probability) {
          leave(seq);
          ++leaves;
        }
      }
      while (static_cast<int>(refs.size()) < config.max_seqs && (refs.empty() || unit(rng) < 0.4)) {
        join();
      }
      std::vector<int> ids;
      for (auto const& entry : refs) {
        if (unit(rng) < 0.8) ids.push_back(entry.first);
      }
      if (ids.empty()) ids.push_back(refs.begin()->first);
      std::shuffle(ids.begin(), ids.end(), rng);
      if (static_cast<int>(ids.size()) > config.batch_capacity()) {
        ids.resize(static_cast<std::size_t>(config.batch_capacity()));
      }
      step(rng, ids, "step " + std::to_string(s));
    }
    return leaves;
  }
};

//! True when the precompiled decode attention has a kernel for the config's shape and dtype.
inline bool precompiled_available(KVCacheConfig const& config) {
  return PrecompiledDecodeAttention::supported(config.dtype, config.shape.head_dim,
                                               config.shape.group_size());
}

}  // namespace kvc::test
