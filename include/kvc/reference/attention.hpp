//! @file
//! Reference attention: decode (one query per sequence), causal prefill and any masked variant,
//! with GQA (query head h reads KV head h / G), the log-sum-exp per query head and, on request,
//! the softmax probability of every visible slot. Dot products and sums are in double.
#pragma once

#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "kvc/reference/types.hpp"

namespace kvc::reference {

//! May query `query` see slot `slot` of KV head `kv_head`? An empty function means "all".
using Visibility = std::function<bool(int query, int kv_head, int slot)>;

//! Probabilities per (query, query head): rows[query * num_q_heads + head][slot]; slots that the
//! query may not see hold 0.
struct AttentionProbabilities {
  std::vector<std::vector<float>> rows;
};

//! Attention of `num_queries` queries over the slots in `heads` (one HeadCache per KV head).
//! q: [num_queries, num_q_heads, head_dim], already RoPE'd. A query that sees no slot (or only
//! slots with -inf logits) gets a zero output and an LSE of -infinity; a NaN logit makes the
//! query head's output, LSE and probabilities NaN.
inline Status attention(LayerSpec const& spec, int num_queries, ConstSpan q,
                        std::vector<HeadCache> const& heads, Visibility const& visible,
                        AttentionOutput& output, AttentionProbabilities* probabilities = nullptr) {
  KVC_RETURN_IF_ERROR(spec.validate());
  int const d = spec.head_dim;
  int const hq = spec.num_q_heads;
  if (num_queries < 0 || static_cast<int>(heads.size()) != spec.num_kv_heads) {
    return Status::kErrorSizeMismatch;
  }
  if (q.size != static_cast<std::size_t>(num_queries) * hq * d) return Status::kErrorSizeMismatch;
  for (HeadCache const& head : heads) {
    std::size_t const expected = static_cast<std::size_t>(head.size()) * d;
    if (head.k.size() != expected || head.v.size() != expected) return Status::kErrorSizeMismatch;
  }

  double const scale = spec.softmax_scale();
  AttentionOutput result;
  result.out.assign(static_cast<std::size_t>(num_queries) * hq * d, 0.0f);
  result.lse.assign(static_cast<std::size_t>(num_queries) * hq, -std::numeric_limits<float>::infinity());
  AttentionProbabilities probs;
  if (probabilities != nullptr) probs.rows.resize(static_cast<std::size_t>(num_queries) * hq);

  std::vector<double> logits;
  std::vector<double> accumulator(d);
  for (int t = 0; t < num_queries; ++t) {
    for (int h = 0; h < hq; ++h) {
      int const kv_head = h / spec.group_size();
      HeadCache const& head = heads[kv_head];
      float const* query = q.data + (static_cast<std::size_t>(t) * hq + h) * d;
      std::size_t const row = static_cast<std::size_t>(t) * hq + h;

      logits.assign(head.size(), -std::numeric_limits<double>::infinity());
      double max_logit = -std::numeric_limits<double>::infinity();
      bool nan_logit = false;
      for (int s = 0; s < head.size(); ++s) {
        if (visible && !visible(t, kv_head, s)) continue;
        double dot = 0.0;
        float const* key = head.k.data() + static_cast<std::size_t>(s) * d;
        for (int i = 0; i < d; ++i) dot += static_cast<double>(query[i]) * key[i];
        logits[s] = dot * scale;
        if (logits[s] > max_logit) max_logit = logits[s];
        if (logits[s] != logits[s]) nan_logit = true;
      }
      if (probabilities != nullptr) probs.rows[row].assign(head.size(), 0.0f);
      // Nothing visible (or only -inf logits): zero output, LSE -inf. A NaN logit (NaN in q or
      // in a visible key) is not "nothing visible": it propagates to the output, LSE and
      // probabilities of this query head.
      if (max_logit == -std::numeric_limits<double>::infinity() && !nan_logit) continue;

      double denominator = 0.0;
      for (double logit : logits) denominator += std::exp(logit - max_logit);
      double const lse = max_logit + std::log(denominator);
      std::fill(accumulator.begin(), accumulator.end(), 0.0);
      for (int s = 0; s < head.size(); ++s) {
        if (logits[s] == -std::numeric_limits<double>::infinity()) continue;
        double const p = std::exp(logits[s] - lse);
        float const* value = head.v.data() + static_cast<std::size_t>(s) * d;
        for (int i = 0; i < d; ++i) accumulator[i] += p * value[i];
        if (probabilities != nullptr) probs.rows[row][s] = static_cast<float>(p);
      }
      float* out = result.out.data() + row * d;
      for (int i = 0; i < d; ++i) out[i] = static_cast<float>(accumulator[i]);
      result.lse[row] = static_cast<float>(lse);
    }
  }
  output = std::move(result);
  if (probabilities != nullptr) *probabilities = std::move(probs);
  return Status::kSuccess;
}

//! Decode attention: one query per head over every slot. q: [num_q_heads, head_dim], RoPE'd.
inline Status decode_attention(LayerSpec const& spec, ConstSpan q, std::vector<HeadCache> const& heads,
                               AttentionOutput& output,
                               AttentionProbabilities* probabilities = nullptr) {
  return attention(spec, 1, q, heads, Visibility{}, output, probabilities);
}

//! Visibility of a chunk of queries appended after `num_cached` slots: every cached slot, and
//! the chunk's own slots causally (slot num_cached + j is visible to query i iff j <= i).
inline Visibility causal_after(int num_cached) {
  return [num_cached](int query, int, int slot) { return slot < num_cached || slot - num_cached <= query; };
}

//! Causal prefill attention with no cache: q [T, Hq, D] RoPE'd; k, v [T, Hkv, D] RoPE'd keys
//! (token i at slot i). The building block for tests and for policies' prefill.
inline Status causal_attention(LayerSpec const& spec, int num_tokens, ConstSpan q, ConstSpan k, ConstSpan v,
                               AttentionOutput& output,
                               AttentionProbabilities* probabilities = nullptr) {
  KVC_RETURN_IF_ERROR(spec.validate());
  std::size_t const kv_size = static_cast<std::size_t>(num_tokens) * spec.num_kv_heads * spec.head_dim;
  if (num_tokens < 0 || k.size != kv_size || v.size != kv_size) return Status::kErrorSizeMismatch;
  std::vector<HeadCache> heads(spec.num_kv_heads);
  for (int h = 0; h < spec.num_kv_heads; ++h) {
    for (int t = 0; t < num_tokens; ++t) {
      std::size_t const offset = (static_cast<std::size_t>(t) * spec.num_kv_heads + h) * spec.head_dim;
      heads[h].k.insert(heads[h].k.end(), k.data + offset, k.data + offset + spec.head_dim);
      heads[h].v.insert(heads[h].v.end(), v.data + offset, v.data + offset + spec.head_dim);
      heads[h].position.push_back(t);
    }
  }
  return attention(spec, num_tokens, q, heads, causal_after(0), output, probabilities);
}

}  // namespace kvc::reference
