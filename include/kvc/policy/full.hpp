//! @file
//! Full cache: every token is appended; nothing is merged or evicted.
#pragma once

namespace kvc {

//! The full cache has no parameters. Under GQA the KV of one KV head serves its G query heads.
struct FullConfig {};

}  // namespace kvc
