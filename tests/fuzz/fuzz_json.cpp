//! @file
//! libFuzzer target over the JSON parser and writer (kvc/io/json.hpp): any byte string is parsed
//! (with the default and with a small depth limit). A document that parses must serialise, in
//! compact and pretty form, to text that parses back to the same serialisation; one that does
//! not must leave the output untouched and name a byte offset.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "kvc/io/json.hpp"

#include "fuzz_check.hpp"

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  using kvc::io::JsonValue;
  std::string_view const text(reinterpret_cast<char const*>(data), size);
  for (int depth : {kvc::io::kJsonDefaultMaxDepth, 3}) {
    JsonValue value = JsonValue::string("untouched");
    kvc::io::IoStatus const status = kvc::io::parse_json(text, value, depth);
    if (!status.ok()) {
      KVC_FUZZ_CHECK(status.message.rfind("byte ", 0) == 0);
      KVC_FUZZ_CHECK(value.is_string() && value.as_string() == "untouched");
      continue;
    }
    for (int indent : {0, 2}) {
      std::string const written = kvc::io::to_json(value, indent);
      JsonValue again;
      KVC_FUZZ_CHECK(kvc::io::parse_json(written, again, depth).ok());
      KVC_FUZZ_CHECK(kvc::io::to_json(again, indent) == written);
    }
  }
  return 0;
}
