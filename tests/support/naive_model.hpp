//! @file
//! An independent, naive model of one (sequence, layer) cache under every policy, written from
//! the semantics of the design brief rather than from the reference's code: it keeps the whole
//! input history and recomputes what a cache must hold directly (Full: every token; DMC: groups
//! from the decision sequence and each slot's windowed weighted mean summed afresh in double;
//! H2O/TOVA: scores from this model's own attention probabilities, victims by a plain scan).
//! Only the documented conventions are shared with the reference: inputs are rounded to the
//! dtype, RoPE angles are evaluated in double and their cos/sin rounded to float, RoPE products
//! and sums are float operations, and stored keys/values are rounded to the dtype.
//!
//! Where the reference computes in fp32 (DMC running sums, H2O/TOVA scores) the model computes in
//! double and carries an error bound ("slack") per element, so the differential checker can
//! compare within what fp32 rounding explains and nothing more. Discrete choices that depend on
//! such values (victims, the kept set of a prefill cut) are checked against the model's scores
//! within their slack and then adopted, so one near-tie does not make the rest of a run diverge.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/rope.hpp"
#include "kvc/policy/kind.hpp"
#include "kvc/reference/types.hpp"

namespace kvc::test::naive {

//! Unit roundoff of fp32.
inline constexpr double kF32Unit = 1.0 / (1 << 24);

//! Unit roundoff of a storage dtype (half an ulp relative).
inline double dtype_unit(DType dtype) {
  switch (dtype) {
    case DType::kF16: return 1.0 / (1 << 11);
    case DType::kBF16: return 1.0 / (1 << 8);
    case DType::kF32: break;
  }
  return kF32Unit;
}

//! RoPE of one head vector at `position`, from the documented convention: pair i (rotate-half:
//! dims i and i + D/2; interleaved: 2i and 2i + 1) turns by position * theta^(-2i/D), angle in
//! double, cos and sin rounded to float; first' = first*c - second*s, second' = second*c +
//! first*s, every product and sum a float operation. // x: [head_dim]
inline void rope(std::vector<float>& x, RopeConfig const& config, std::int64_t position) {
  if (config.layout == RopeLayout::kNone) return;
  int const dim = static_cast<int>(x.size());
  for (int i = 0; i < dim / 2; ++i) {
    int const a = config.layout == RopeLayout::kInterleaved ? 2 * i : i;
    int const b = config.layout == RopeLayout::kInterleaved ? 2 * i + 1 : i + dim / 2;
    double const angle =
        static_cast<double>(position) * std::pow(config.theta, -2.0 * static_cast<double>(i) / dim);
    float const c = static_cast<float>(std::cos(angle));
    float const s = static_cast<float>(std::sin(angle));
    float const volatile ac = x[a] * c, bs = x[b] * s, bc = x[b] * c, as = x[a] * s;
    float const volatile first = ac - bs, second = bc + as;
    x[a] = first;
    x[b] = second;
  }
}

//! One stored slot: key as stored (post-RoPE, rounded), value (rounded), the newest position,
//! the score (H2O/TOVA, double), and error bounds of key/value elements (DMC; 0 elsewhere).
struct Slot {
  std::int64_t position = 0;
  std::vector<float> k, v;               //!< [head_dim]
  std::vector<double> k_slack, v_slack;  //!< [head_dim] |reference - model| may reach this
  double score = 0.0;
  double score_slack = 0.0;
};

//! One token's inputs, rounded to the dtype, pre-RoPE.
struct Token {
  std::vector<float> q;  //!< [Hq, D]
  std::vector<float> k;  //!< [Hkv, D]
  std::vector<float> v;  //!< [Hkv, D]
};

//! What the model expects of one DMC head's open-group state (the reference's DmcHeadState).
struct DmcExpectation {
  int group_length = 0;
  std::vector<double> k_sum, v_sum, k_sum_slack, v_sum_slack;  //!< [D]
  double weight_sum = 0.0, weight_slack = 0.0;
  std::vector<double> ring_k, ring_v;  //!< [W, D]
  std::vector<double> ring_w;          //!< [W]
};

//! Attention result of one query (all query heads) and the probabilities it gave.
struct QueryResult {
  std::vector<double> out;        //!< [Hq, D]
  std::vector<double> lse;        //!< [Hq]
  std::vector<double> slack;      //!< [Hq] bound on |reference - model| of out (per head, any dim)
  std::vector<double> lse_slack;  //!< [Hq]
  std::vector<std::vector<double>> probability;  //!< [Hq][visible slot]
};

//! The model of one (sequence, layer).
class Model {
 public:
  Model(reference::LayerSpec const& spec, PolicyConfig const& policy)
      : spec_(spec), policy_(policy), heads_(spec.num_kv_heads) {
    group_ = spec.num_q_heads / spec.num_kv_heads;
    dim_ = spec.head_dim;
    scale_ = spec.scale > 0.0f ? static_cast<double>(spec.scale)
                               : static_cast<double>(static_cast<float>(1.0 / std::sqrt(dim_)));
    if (policy.kind == PolicyKind::kDmc) {
      decision_ =
          policy.dmc.decision_dim < 0 ? dim_ + policy.dmc.decision_dim : policy.dmc.decision_dim;
      window_ = policy.dmc.window;
      dmc_.resize(spec.num_kv_heads);
    }
  }

  reference::LayerSpec const& spec() const { return spec_; }
  PolicyConfig const& policy() const { return policy_; }
  std::int64_t tokens_seen() const { return static_cast<std::int64_t>(tokens_.size()); }
  //! The slots of KV head h, in the slot order the cache must have.
  std::vector<Slot> const& slots(int h) const { return heads_[h]; }
  std::vector<Slot>& mutable_slots(int h) { return heads_[h]; }
  int decision_dim() const { return decision_; }

  //! Rounds and records a chunk of tokens (q [T, Hq, D], k/v [T, Hkv, D], pre-RoPE).
  std::vector<Token> round_tokens(int count, float const* q, float const* k, float const* v) const {
    std::vector<Token> chunk(count);
    std::size_t const qs = static_cast<std::size_t>(spec_.num_q_heads) * dim_;
    std::size_t const ks = static_cast<std::size_t>(spec_.num_kv_heads) * dim_;
    for (int t = 0; t < count; ++t) {
      chunk[t].q.assign(q + t * qs, q + (t + 1) * qs);
      chunk[t].k.assign(k + t * ks, k + (t + 1) * ks);
      chunk[t].v.assign(v + t * ks, v + (t + 1) * ks);
      for (float& x : chunk[t].q) x = round_to_dtype(x, spec_.dtype);
      for (float& x : chunk[t].k) x = round_to_dtype(x, spec_.dtype);
      for (float& x : chunk[t].v) x = round_to_dtype(x, spec_.dtype);
    }
    return chunk;
  }

  //! The query of query head `head` of token `position`, as attention uses it.
  std::vector<float> query(std::int64_t position, int head) const {
    Token const& token = tokens_[static_cast<std::size_t>(position)];
    std::vector<float> q(token.q.begin() + static_cast<std::ptrdiff_t>(head) * dim_,
                         token.q.begin() + static_cast<std::ptrdiff_t>(head + 1) * dim_);
    if (decision_ >= 0) q[decision_] = 0.0f;
    rope(q, spec_.rope, position);
    if (decision_ >= 0) q[decision_] = 0.0f;
    for (float& x : q) x = round_to_dtype(x, spec_.dtype);
    return q;
  }

  //! The stored key of a token's pre-RoPE key (Full/H2O/TOVA).
  std::vector<float> stored_key(std::int64_t position, int kv_head) const {
    Token const& token = tokens_[static_cast<std::size_t>(position)];
    std::vector<float> key(token.k.begin() + static_cast<std::ptrdiff_t>(kv_head) * dim_,
                           token.k.begin() + static_cast<std::ptrdiff_t>(kv_head + 1) * dim_);
    rope(key, spec_.rope, position);
    for (float& x : key) x = round_to_dtype(x, spec_.dtype);
    return key;
  }

  Slot token_slot(std::int64_t position, int kv_head) const {
    Slot slot;
    slot.position = position;
    slot.k = stored_key(position, kv_head);
    Token const& token = tokens_[static_cast<std::size_t>(position)];
    slot.v.assign(token.v.begin() + static_cast<std::ptrdiff_t>(kv_head) * dim_,
                  token.v.begin() + static_cast<std::ptrdiff_t>(kv_head + 1) * dim_);
    slot.k_slack.assign(dim_, 0.0);
    slot.v_slack.assign(dim_, 0.0);
    return slot;
  }

  //! Softmax attention of query `position` (all query heads) over, per KV head, `visible`
  //! slots. Logits, softmax and outputs in double; the bound on the output error comes from
  //! the slots' key/value slack.
  QueryResult attend(std::int64_t position,
                     std::vector<std::vector<Slot const*>> const& visible) const {
    QueryResult result;
    int const hq = spec_.num_q_heads;
    result.out.assign(static_cast<std::size_t>(hq) * dim_, 0.0);
    result.lse.assign(hq, -std::numeric_limits<double>::infinity());
    result.slack.assign(hq, 0.0);
    result.lse_slack.assign(hq, 0.0);
    result.probability.resize(hq);
    for (int h = 0; h < hq; ++h) {
      std::vector<Slot const*> const& slots = visible[h / group_];
      std::vector<float> const q = query(position, h);
      std::vector<double> logit(slots.size());
      double max_logit = -std::numeric_limits<double>::infinity();
      double logit_slack = 0.0, value_slack = 0.0, value_max = 0.0;
      for (std::size_t s = 0; s < slots.size(); ++s) {
        double dot = 0.0, dot_slack = 0.0;
        for (int i = 0; i < dim_; ++i) {
          dot += static_cast<double>(q[i]) * slots[s]->k[i];
          dot_slack += std::fabs(q[i]) * slots[s]->k_slack[i];
          value_slack = std::max(value_slack, slots[s]->v_slack[i]);
          value_max = std::max(value_max, std::fabs(static_cast<double>(slots[s]->v[i])));
        }
        logit[s] = dot * scale_;
        logit_slack = std::max(logit_slack, dot_slack * scale_);
        max_logit = std::max(max_logit, logit[s]);
      }
      result.probability[h].assign(slots.size(), 0.0);
      if (slots.empty()) continue;
      double sum = 0.0;
      for (double l : logit) sum += std::exp(l - max_logit);
      double const lse = max_logit + std::log(sum);
      result.lse[h] = lse;
      for (std::size_t s = 0; s < slots.size(); ++s) {
        double const p = std::exp(logit[s] - lse);
        result.probability[h][s] = p;
        for (int i = 0; i < dim_; ++i) {
          result.out[static_cast<std::size_t>(h) * dim_ + i] += p * slots[s]->v[i];
        }
      }
      // Logits off by at most e move every probability by a factor within exp(+-2e).
      result.slack[h] = (std::exp(2.0 * logit_slack) - 1.0) * value_max + value_slack;
      result.lse_slack[h] = logit_slack;
    }
    return result;
  }

  //! Appends a chunk's tokens to the history. Returns their first position.
  std::int64_t push_tokens(std::vector<Token> chunk) {
    std::int64_t const first = tokens_seen();
    for (Token& token : chunk) tokens_.push_back(std::move(token));
    if (policy_.kind == PolicyKind::kDmc) {
      for (std::int64_t t = first; t < tokens_seen(); ++t) add_dmc_token(t);
    }
    return first;
  }

  // ---- DMC ------------------------------------------------------------------------------

  //! merge flag of token t in KV head h (alpha; the first token appends).
  bool merges(std::int64_t t, int h) const { return dmc_[h].merge[static_cast<std::size_t>(t)]; }

  //! The partial mean P_t of KV head h (the slot token t's group would have at t).
  Slot const& partial(std::int64_t t, int h) const {
    return dmc_[h].partial[static_cast<std::size_t>(t)];
  }

  //! The slots a DMC head holds now: P_e for every group end e, in order.
  void rebuild_dmc_slots() {
    std::int64_t const n = tokens_seen();
    for (int h = 0; h < spec_.num_kv_heads; ++h) {
      heads_[h].clear();
      for (std::int64_t e = 0; e < n; ++e) {
        if (e + 1 == n || !merges(e + 1, h)) heads_[h].push_back(partial(e, h));
      }
    }
  }

  //! Query at `position` sees P_j iff j == position or (j < position and token j+1 appends).
  std::vector<std::vector<Slot const*>> dmc_visible(std::int64_t position) const {
    std::vector<std::vector<Slot const*>> visible(spec_.num_kv_heads);
    for (int h = 0; h < spec_.num_kv_heads; ++h) {
      for (std::int64_t j = 0; j <= position; ++j) {
        if (j == position || !merges(j + 1, h)) visible[h].push_back(&partial(j, h));
      }
    }
    return visible;
  }

  //! The open group's state of KV head h after every token so far.
  DmcExpectation dmc_expectation(int h) const {
    DmcExpectation e;
    std::int64_t const n = tokens_seen();
    e.k_sum.assign(dim_, 0.0);
    e.v_sum.assign(dim_, 0.0);
    e.k_sum_slack.assign(dim_, 0.0);
    e.v_sum_slack.assign(dim_, 0.0);
    e.ring_k.assign(static_cast<std::size_t>(window_) * dim_, 0.0);
    e.ring_v.assign(static_cast<std::size_t>(window_) * dim_, 0.0);
    e.ring_w.assign(window_, 0.0);
    if (n == 0) return e;
    DmcHead const& head = dmc_[h];
    std::int64_t start = n - 1;
    while (start > 0 && merges(start, h)) --start;
    e.group_length = static_cast<int>(n - start);
    std::int64_t const oldest = window_ > 0 ? std::max(start, n - window_) : start;
    double magnitude_w = 0.0;
    std::vector<double> magnitude_k(dim_, 0.0), magnitude_v(dim_, 0.0);
    for (std::int64_t m = oldest; m < n; ++m) {
      double const w = head.omega[static_cast<std::size_t>(m)];
      e.weight_sum += w;
      for (int i = 0; i < dim_; ++i) {
        double const tk = term_k(m, h, i), tv = term_v(m, h, i);
        e.k_sum[i] += tk;
        e.v_sum[i] += tv;
      }
    }
    // fp32 running sums: every add (and subtract) of the group rounds once, at most to the
    // largest magnitude the window can reach.
    double const ops = 2.0 * static_cast<double>(e.group_length) + 4.0;
    for (std::int64_t m = start; m < n; ++m) {
      magnitude_w = std::max(magnitude_w, head.omega[static_cast<std::size_t>(m)]);
      for (int i = 0; i < dim_; ++i) {
        magnitude_k[i] = std::max(magnitude_k[i], std::fabs(term_k(m, h, i)));
        magnitude_v[i] = std::max(magnitude_v[i], std::fabs(term_v(m, h, i)));
      }
    }
    double const members = static_cast<double>(n - oldest) + 1.0;
    e.weight_slack = ops * kF32Unit * members * magnitude_w;
    for (int i = 0; i < dim_; ++i) {
      e.k_sum_slack[i] = ops * kF32Unit * members * magnitude_k[i];
      e.v_sum_slack[i] = ops * kF32Unit * members * magnitude_v[i];
    }
    for (std::int64_t t = std::max<std::int64_t>(0, n - window_); t < n && window_ > 0; ++t) {
      std::size_t const cell = static_cast<std::size_t>(t % window_);
      e.ring_w[cell] = head.omega[static_cast<std::size_t>(t)];
      for (int i = 0; i < dim_; ++i) {
        e.ring_k[cell * dim_ + i] = term_k(t, h, i);
        e.ring_v[cell * dim_ + i] = term_v(t, h, i);
      }
    }
    return e;
  }

  //! omega of token t in KV head h (double).
  double omega(std::int64_t t, int h) const { return dmc_[h].omega[static_cast<std::size_t>(t)]; }

 private:
  struct DmcHead {
    std::vector<char> merge;    //!< [tokens]
    std::vector<double> omega;  //!< [tokens]
    std::vector<Slot> partial;  //!< [tokens] P_t
  };

  double term_k(std::int64_t t, int h, int i) const {
    if (i == decision_) return 0.0;
    return dmc_[h].omega[static_cast<std::size_t>(t)] *
           tokens_[static_cast<std::size_t>(t)].k[static_cast<std::size_t>(h) * dim_ + i];
  }
  double term_v(std::int64_t t, int h, int i) const {
    return dmc_[h].omega[static_cast<std::size_t>(t)] *
           tokens_[static_cast<std::size_t>(t)].v[static_cast<std::size_t>(h) * dim_ + i];
  }

  //! Decision, omega and partial mean of token t in every KV head.
  void add_dmc_token(std::int64_t t) {
    Token const& token = tokens_[static_cast<std::size_t>(t)];
    DmcConfig const& config = policy_.dmc;
    for (int h = 0; h < spec_.num_kv_heads; ++h) {
      DmcHead& head = dmc_[h];
      double const k_decision = token.k[static_cast<std::size_t>(h) * dim_ + decision_];
      head.merge.push_back(t > 0 && k_decision - static_cast<double>(config.offset) > 0.0);
      double logit = 0.0;
      for (int g = 0; g < group_; ++g) {
        logit += token.q[(static_cast<std::size_t>(h) * group_ + g) * dim_ + decision_];
      }
      logit /= group_;
      head.omega.push_back(1.0 / (1.0 + std::exp(-(logit + config.offset))) + config.eps);

      // P_t: the omega-weighted mean of the window members of t's group, summed afresh.
      std::int64_t start = t;
      while (start > 0 && head.merge[static_cast<std::size_t>(start)]) --start;
      std::int64_t const oldest = window_ > 0 ? std::max(start, t - window_ + 1) : start;
      double weight = 0.0, magnitude_w = 0.0;
      std::vector<double> k_sum(dim_, 0.0), v_sum(dim_, 0.0);
      std::vector<double> magnitude_k(dim_, 0.0), magnitude_v(dim_, 0.0);
      for (std::int64_t m = oldest; m <= t; ++m) {
        weight += head.omega[static_cast<std::size_t>(m)];
        for (int i = 0; i < dim_; ++i) {
          k_sum[i] += term_k(m, h, i);
          v_sum[i] += term_v(m, h, i);
        }
      }
      for (std::int64_t m = start; m <= t; ++m) {
        magnitude_w = std::max(magnitude_w, head.omega[static_cast<std::size_t>(m)]);
        for (int i = 0; i < dim_; ++i) {
          magnitude_k[i] = std::max(magnitude_k[i], std::fabs(term_k(m, h, i)));
          magnitude_v[i] = std::max(magnitude_v[i], std::fabs(term_v(m, h, i)));
        }
      }
      double const length = static_cast<double>(t - start + 1);
      double const ops = 2.0 * length + 4.0;
      double const members = static_cast<double>(t - oldest + 1) + 1.0;
      double const weight_error = ops * kF32Unit * members * magnitude_w;

      Slot slot;
      slot.position = t;
      std::vector<float> mean(dim_);
      std::vector<double> mean_slack(dim_);
      slot.v.resize(dim_);
      slot.v_slack.resize(dim_);
      double const unit = dtype_unit(spec_.dtype);
      for (int i = 0; i < dim_; ++i) {
        double const mk = k_sum[i] / weight, mv = v_sum[i] / weight;
        mean[i] = static_cast<float>(mk);
        mean_slack[i] =
            (ops * kF32Unit * members * magnitude_k[i] + std::fabs(mk) * weight_error) / weight +
            4.0 * kF32Unit * std::fabs(mk);
        double const slack_v =
            (ops * kF32Unit * members * magnitude_v[i] + std::fabs(mv) * weight_error) / weight +
            4.0 * kF32Unit * std::fabs(mv);
        slot.v[i] = round_to_dtype(static_cast<float>(mv), spec_.dtype);
        slot.v_slack[i] = rounding_slack(mv, slack_v, unit);
      }
      mean[decision_] = 0.0f;
      mean_slack[decision_] = 0.0;
      std::vector<float> rotated = mean;
      rope(rotated, spec_.rope, t);
      rotated[decision_] = 0.0f;
      slot.k.resize(dim_);
      slot.k_slack.resize(dim_);
      for (int i = 0; i < dim_; ++i) {
        int const partner = spec_.rope.layout == RopeLayout::kNone ? i
                            : spec_.rope.layout == RopeLayout::kInterleaved
                                ? (i ^ 1)
                                : (i < dim_ / 2 ? i + dim_ / 2 : i - dim_ / 2);
        double slack = mean_slack[i] + (partner != i ? mean_slack[partner] : 0.0) +
                       4.0 * kF32Unit * (std::fabs(mean[i]) + std::fabs(mean[partner]));
        if (i == decision_) slack = 0.0;
        slot.k[i] = round_to_dtype(rotated[i], spec_.dtype);
        slot.k_slack[i] = i == decision_ ? 0.0 : rounding_slack(rotated[i], slack, unit);
      }
      head.partial.push_back(std::move(slot));
    }
  }

  //! Bound on |round(x') - round(x)| for |x' - x| <= slack: the slack, plus one step of the
  //! dtype when x' may round to a different neighbour than x.
  double rounding_slack(double x, double slack, double unit) const {
    float const low = round_to_dtype(static_cast<float>(x - slack), spec_.dtype);
    float const high = round_to_dtype(static_cast<float>(x + slack), spec_.dtype);
    double const step = low == high ? 0.0 : 2.0 * unit * std::fabs(x) + 1e-30;
    return slack + step + (spec_.dtype == DType::kF16 ? 6e-8 : 0.0);
  }

  reference::LayerSpec spec_;
  PolicyConfig policy_;
  int group_ = 1, dim_ = 0, decision_ = -1, window_ = 0;
  double scale_ = 1.0;
  std::vector<Token> tokens_;
  std::vector<std::vector<Slot>> heads_;  //!< Full/H2O/TOVA slots (DMC: rebuilt)
  std::vector<DmcHead> dmc_;
};

}  // namespace kvc::test::naive
