// Strict JSON parser and writer: valid documents, invalid ones (with byte offsets in the
// messages), escapes, numbers, the depth limit, and writer -> parser round trips.
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "kvc/io/json.hpp"

#include "test_support.hpp"

using namespace kvc;
using namespace kvc::io;

namespace {

JsonValue parse_ok(std::string const& text) {
  JsonValue value;
  IoStatus const status = parse_json(text, value);
  INFO("text: " << text << " message: " << status.message);
  REQUIRE(status.ok());
  return value;
}

//! Asserts a parse error whose message contains `needle` (and a byte offset).
void require_invalid(std::string const& text, std::string const& needle,
                     int max_depth = kJsonDefaultMaxDepth) {
  JsonValue value = JsonValue::string("untouched");
  IoStatus const status = parse_json(text, value, max_depth);
  INFO("text: " << text << " message: " << status.message);
  REQUIRE_FALSE(status.ok());
  CHECK(status.message.find(needle) != std::string::npos);
  CHECK(status.message.find("byte ") == 0);
  CHECK(value.as_string() == "untouched");
}

}  // namespace

TEST_SUITE("host") {
  TEST_CASE("json: valid documents") {
    JsonValue const config = parse_ok(R"({
    "policy": "dmc", "q_heads": 32, "rope_theta": 5e5, "protect_new": false,
    "nested": {"list": [1, -2.5, 0, 1E-3, true, null, "x", [], {}]}, "empty": ""
  })");
    REQUIRE(config.is_object());
    CHECK(config.as_object().size() == 6);
    CHECK(config.as_object()[0].key == "policy");  // file order kept
    CHECK(config.find("policy")->as_string() == "dmc");
    CHECK(config.find("q_heads")->as_number() == 32.0);
    CHECK(config.find("rope_theta")->as_number() == 500000.0);
    CHECK(config.find("protect_new")->is_bool());
    CHECK_FALSE(config.find("protect_new")->as_bool());
    CHECK(config.find("missing") == nullptr);
    JsonValue::Array const& list = config.find("nested")->find("list")->as_array();
    REQUIRE(list.size() == 9);
    CHECK(list[1].as_number() == -2.5);
    CHECK(list[3].as_number() == 0.001);
    CHECK(list[4].as_bool());
    CHECK(list[5].is_null());
    CHECK(list[7].is_array());
    CHECK(list[8].is_object());
    CHECK(config.find("empty")->as_string().empty());

    CHECK(parse_ok("  7 ").as_number() == 7.0);
    CHECK(parse_ok("-0").as_number() == 0.0);
    CHECK(parse_ok("1.5e+2").as_number() == 150.0);
    CHECK(parse_ok("\xEF\xBB\xBF{}").is_object());  // a UTF-8 BOM is skipped
    CHECK(parse_ok("null").is_null());
  }

  TEST_CASE("json: string escapes") {
    CHECK(parse_ok(R"("a\"b\\c\/d\b\f\n\r\t")").as_string() == "a\"b\\c/d\b\f\n\r\t");
    CHECK(parse_ok(R"("\u0041\u00e9\u20AC")").as_string() == "A\xC3\xA9\xE2\x82\xAC");
    CHECK(parse_ok(R"("\ud83d\ude00")").as_string() == "\xF0\x9F\x98\x80");  // surrogate pair
    CHECK(parse_ok("\"caf\xC3\xA9\"").as_string() == "caf\xC3\xA9");         // raw UTF-8

    require_invalid(R"("\x41")", "invalid escape");
    require_invalid(R"("\u00G1")", "hex digit");
    require_invalid(R"("\u12")", "");
    require_invalid(R"("\ud83d")", "surrogate");
    require_invalid(R"("\ud83d\u0041")", "surrogate");
    require_invalid(R"("\ude00")", "lone low surrogate");
    require_invalid("\"a\nb\"", "control character");
    require_invalid("\"abc", "unterminated string");
    require_invalid("\"abc\\", "unterminated escape");
    require_invalid("\"\xC3\"", "UTF-8");          // truncated sequence
    require_invalid("\"\xC0\xAF\"", "UTF-8");      // overlong
    require_invalid("\"\xED\xA0\x80\"", "UTF-8");  // encoded surrogate
    require_invalid("\"\xFF\"", "UTF-8");
    require_invalid("'single'", "double quotes");
  }

  TEST_CASE("json: numbers") {
    require_invalid("01", "leading zeros");
    require_invalid("-", "digit");
    require_invalid("+1", "expected a value");
    require_invalid("1.", "decimal point");
    require_invalid(".5", "expected a value");
    require_invalid("1e", "exponent");
    require_invalid("1e+", "exponent");
    require_invalid("0x10", "unexpected text");
    require_invalid("NaN", "expected a value");
    require_invalid("Infinity", "expected a value");
    require_invalid("1e999", "out of the range");
    require_invalid("[1, -1e400]", "out of the range");
    CHECK(parse_ok("123456789012").as_number() == 123456789012.0);
  }

  TEST_CASE("json: structural errors carry byte offsets") {
    require_invalid("", "empty document");
    require_invalid("   ", "empty document");
    require_invalid("{} x", "unexpected text");
    require_invalid("[1, 2] ]", "unexpected text");
    require_invalid("{\"a\": 1,}", "trailing comma");
    require_invalid("[1, 2,]", "trailing comma");
    require_invalid("{\"a\" 1}", "expected ':'");
    require_invalid("{a: 1}", "string key");
    require_invalid("{\"a\": 1 \"b\": 2}", "expected ',' or '}'");
    require_invalid("[1 2]", "expected ',' or ']'");
    require_invalid("{\"a\": 1", "missing '}'");
    require_invalid("[1", "missing ']'");
    require_invalid("{\"a\": 1, \"a\": 2}", "duplicate key");
    require_invalid("tru", "invalid literal");
    require_invalid("nul", "invalid literal");
    require_invalid("[true, fals]", "invalid literal");
    require_invalid("// comment\n{}", "expected a value");
    require_invalid("{\"a\": }", "expected a value");

    JsonValue value;
    IoStatus const status = parse_json("{\n  \"a\": 1,\n  \"b\" 2\n}", value);
    REQUIRE_FALSE(status.ok());
    CHECK(status.message.find("byte 18 (line 3, column 7)") == 0);
  }

  TEST_CASE("json: depth limit") {
    std::string deep_ok, deep_bad;
    for (int i = 0; i < 64; ++i) deep_ok += i % 2 ? "{\"k\":" : "[";
    deep_ok += "0";
    for (int i = 63; i >= 0; --i) deep_ok += i % 2 ? "}" : "]";
    CHECK(parse_ok(deep_ok).is_array());
    deep_bad = "[" + deep_ok + "]";
    require_invalid(deep_bad, "nesting deeper than 64");
    require_invalid(std::string(100000, '['), "nesting deeper");  // no stack overflow
    require_invalid("[[[]]]", "nesting deeper than 2", 2);
  }

  TEST_CASE("json: writer output parses back to the same values") {
    std::mt19937_64 rng(test::test_seed());
    INFO("seed " << test::test_seed());
    std::vector<float> numbers = test::random_normal(rng, 16, DType::kF32, 1000.0f);
    JsonValue report;
    report.set("name",
               JsonValue::string("quote\" backslash\\ newline\n tab\t ctrl\x01 utf8 \xC3\xA9"));
    JsonValue list;
    for (float number : numbers) list.push_back(JsonValue::number(number));
    report.set("numbers", list);
    report.set("tiny", JsonValue::number(5e-324));
    report.set("flag", JsonValue::boolean(true));
    report.set("nothing", JsonValue());
    report.set("nan", JsonValue::number(std::nan("")));
    JsonValue nested;
    nested.push_back(JsonValue::object()).push_back(JsonValue::array());
    report.set("nested", nested);
    report.set("flag", JsonValue::boolean(false));  // replaces
    for (int indent : {0, 2}) {
      std::string const text = to_json(report, indent);
      INFO(text);
      JsonValue back = parse_ok(text);
      CHECK(back.as_object().size() == 7);
      CHECK(back.find("name")->as_string() == report.find("name")->as_string());
      JsonValue::Array const& values = back.find("numbers")->as_array();
      REQUIRE(values.size() == numbers.size());
      for (std::size_t i = 0; i < numbers.size(); ++i)
        CHECK(values[i].as_number() == static_cast<double>(numbers[i]));
      CHECK(back.find("tiny")->as_number() == 5e-324);
      CHECK_FALSE(back.find("flag")->as_bool());
      CHECK(back.find("nothing")->is_null());
      CHECK(back.find("nan")->is_null());
      CHECK(back.find("nested")->as_array().size() == 2);
    }
  }
}
