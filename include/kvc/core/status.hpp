//! @file
//! The error model of the host API: a scoped `Status` enum with a message for every value.
#pragma once

namespace kvc {

//! Result of every fallible host-side kvc call. A call that returns anything but `kSuccess`
//! leaves the caches and policy states it was given exactly as they were.
enum class Status : int {
  kSuccess = 0,
  kErrorInvalidShape,     //!< head counts, head dim or layer count are invalid or inconsistent
  kErrorInvalidArgument,  //!< a parameter is out of its documented range
  kErrorSizeMismatch,     //!< a buffer's size does not match the shape it is used with
  kErrorInvalidBudget,    //!< an eviction budget is zero or inconsistent
  kErrorNotSupported,     //!< a valid combination that has no compiled implementation
  kErrorOutOfPages,       //!< the page pool cannot hold what the step needs; nothing was written
  kErrorInvalidSequence,  //!< the sequence id is unknown or no longer active
  kErrorNoDevice,         //!< no usable CUDA device
  kErrorCuda,             //!< a CUDA runtime call failed
  kErrorInternal,         //!< a kvc invariant was violated (a bug: please report it)
};

//! A short, human-readable description of `status`.
inline char const* to_string(Status status) {
  switch (status) {
    case Status::kSuccess: return "success";
    case Status::kErrorInvalidShape: return "invalid model shape (heads, head dim or layers)";
    case Status::kErrorInvalidArgument: return "invalid argument";
    case Status::kErrorSizeMismatch: return "buffer size does not match the shape";
    case Status::kErrorInvalidBudget: return "invalid cache budget";
    case Status::kErrorNotSupported: return "combination not supported by the compiled kernels";
    case Status::kErrorOutOfPages: return "page pool exhausted: nothing was written";
    case Status::kErrorInvalidSequence: return "unknown or inactive sequence";
    case Status::kErrorNoDevice: return "no usable CUDA device";
    case Status::kErrorCuda: return "CUDA runtime error";
    case Status::kErrorInternal: return "internal error (kvc invariant violated)";
  }
  return "unknown status";
}

//! Returns from the enclosing function when `expr` yields an error status.
#define KVC_RETURN_IF_ERROR(expr)                                     \
  do {                                                                \
    ::kvc::Status kvc_status_ = (expr);                               \
    if (kvc_status_ != ::kvc::Status::kSuccess) return kvc_status_;   \
  } while (0)

}  // namespace kvc
