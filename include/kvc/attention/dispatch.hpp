//! @file
//! One generic runtime-to-compile-time dispatcher. Each runtime value is matched against a
//! compile-time list of supported values; the callable receives one std::integral_constant per
//! dimension, so a single lambda reaches every instantiation and nothing is copy-pasted:
//!
//!   Status s = dispatch(
//!       [&](auto dtype, auto head_dim, auto group) {
//!         using T = StorageType<decltype(dtype)::value>;
//!         return DecodeAttention<V, T, head_dim.value, group.value>::run(params, stream);
//!       },
//!       choose(params.dtype, ValueList<DType::kF16, DType::kBF16, DType::kF32>{}),
//!       choose(head_dim, ValueList<64, 128, 256>{}), choose(group, ValueList<1, 2, 4, 8>{}));
//!
//! A value that is not in its list yields Status::kErrorNotSupported (never an exception).
#pragma once

#include <type_traits>
#include <utility>

#include "kvc/core/dtype.hpp"
#include "kvc/core/dtype_traits.hpp"
#include "kvc/core/status.hpp"

namespace kvc {

//! A compile-time list of values of one type (head dims, group sizes, DType enumerators).
template <auto... kValues>
struct ValueList {};

//! A runtime value paired with the list of values it may take.
template <class Value, class List>
struct Choice {
  Value value;
};

//! Pairs `value` with `List`; the argument type of `dispatch`.
template <class Value, auto... kValues>
Choice<Value, ValueList<kValues...>> choose(Value value, ValueList<kValues...>) {
  return {value};
}

//! True when `value` is one of `kValues`.
template <class Value, auto... kValues>
constexpr bool contains(ValueList<kValues...>, Value value) {
  return ((value == static_cast<Value>(kValues)) || ...);
}

namespace detail {

template <class Fn, class Value>
Status dispatch_one(Fn&&, Value, ValueList<>) {
  return Status::kErrorNotSupported;
}

template <class Fn, class Value, auto kFirst, auto... kRest>
Status dispatch_one(Fn&& fn, Value value, ValueList<kFirst, kRest...>) {
  if (value == static_cast<Value>(kFirst)) return fn(std::integral_constant<decltype(kFirst), kFirst>{});
  return dispatch_one(std::forward<Fn>(fn), value, ValueList<kRest...>{});
}

}  // namespace detail

//! Calls `fn()` (no dimension left).
template <class Fn>
Status dispatch(Fn&& fn) {
  return fn();
}

//! Calls `fn(c0, c1, ...)` with the integral constants equal to the runtime values of the
//! choices, in order; kErrorNotSupported when any value is outside its list.
template <class Fn, class Value, class List, class... Rest>
Status dispatch(Fn&& fn, Choice<Value, List> first, Rest... rest) {
  return detail::dispatch_one(
      [&](auto constant) {
        return dispatch([&](auto... constants) { return fn(constant, constants...); }, rest...);
      },
      first.value, List{});
}

//! The storage type of a DType: float, half or __nv_bfloat16.
template <DType kDType>
struct StorageTypeOf;

template <>
struct StorageTypeOf<DType::kF32> {
  using type = float;
};

#if KVC_HAS_CUDA_HEADERS
template <>
struct StorageTypeOf<DType::kF16> {
  using type = half;
};

template <>
struct StorageTypeOf<DType::kBF16> {
  using type = __nv_bfloat16;
};
#endif

template <DType kDType>
using StorageType = typename StorageTypeOf<kDType>::type;

}  // namespace kvc
