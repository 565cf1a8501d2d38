//! @file
//! The result of kvc's file readers and parsers (`kvc/io/*`): a `kvc::Status` code plus a
//! human-readable message that names the file or byte offset and the problem.
#pragma once

#include <string>
#include <utility>

#include "kvc/core/status.hpp"

namespace kvc::io {

//! `kvc::Status` with a message. Readers never throw and never crash on malformed input: they
//! return an error `IoStatus` and leave their output arguments unchanged.
struct IoStatus {
  Status code = Status::kSuccess;
  std::string message;  //!< empty on success

  bool ok() const { return code == Status::kSuccess; }
  explicit operator bool() const { return ok(); }

  static IoStatus success() { return IoStatus{}; }
  //! An error with `message` (code kErrorInvalidArgument unless given).
  static IoStatus error(std::string message, Status code = Status::kErrorInvalidArgument) {
    return IoStatus{code, std::move(message)};
  }

  //! The same error with `context + ": "` put in front of its message (success unchanged).
  IoStatus with_context(std::string const& context) const {
    if (ok()) return *this;
    return IoStatus{code, context + ": " + message};
  }
};

}  // namespace kvc::io

//! Returns from the enclosing function when `expr` yields an error `kvc::io::IoStatus`.
#define KVC_IO_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::kvc::io::IoStatus kvc_io_status_ = (expr);     \
    if (!kvc_io_status_.ok()) return kvc_io_status_; \
  } while (0)
