//! @file
//! A small, strict JSON (RFC 8259) parser and writer, enough for trace configs and reports.
//!
//! Parser: objects, arrays, strings (escapes `\" \\ \/ \b \f \n \r \t \uXXXX` with surrogate
//! pairs, decoded to UTF-8; raw control characters, lone surrogates and invalid UTF-8 are
//! errors), numbers in the JSON grammar only (no leading `+`, leading zeros, `NaN`, hex or a
//! trailing `.`), `true`, `false`, `null`. One UTF-8 byte-order mark at the start is skipped.
//! Duplicate object keys, trailing commas, comments, trailing non-space text and nesting deeper
//! than a limit (64 by default) are errors. Numbers are doubles; one whose magnitude over- or
//! underflows a double is an error. Every error message gives the byte offset (and line:column)
//! of the problem. Object members keep their file order.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "kvc/io/io_status.hpp"

namespace kvc::io {

struct JsonMember;

//! A JSON value: null, boolean, number (double), string, array or object.
class JsonValue {
 public:
  enum class Type : int { kNull = 0, kBool, kNumber, kString, kArray, kObject };
  using Array = std::vector<JsonValue>;
  using Object = std::vector<JsonMember>;  //!< members in file order, keys unique

  JsonValue() = default;  //!< null
  static JsonValue boolean(bool value);
  static JsonValue number(double value);
  static JsonValue string(std::string value);
  static JsonValue array(Array values = {});
  static JsonValue object(Object members = {});

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  //! The payload; each accessor requires the matching type (others return a default).
  bool as_bool() const { return bool_; }
  double as_number() const { return number_; }
  std::string const& as_string() const { return string_; }
  Array const& as_array() const { return array_; }
  Object const& as_object() const;

  //! The member `key` of an object; null when this is not an object or has no such key.
  JsonValue const* find(std::string_view key) const;

  //! Builders for writing: sets (or replaces) member `key`, turning a null into an object.
  JsonValue& set(std::string key, JsonValue value);
  //! Appends to an array, turning a null into an array.
  JsonValue& push_back(JsonValue value);

 private:
  Type type_ = Type::kNull;
  bool bool_ = false;
  double number_ = 0.0;
  std::string string_;
  Array array_;
  std::vector<JsonMember> object_;
};

//! One member of a JSON object.
struct JsonMember {
  std::string key;
  JsonValue value;
};

//! Name of a JSON type, for messages (`null`, `boolean`, `number`, `string`, `array`, `object`).
inline char const* json_type_name(JsonValue::Type type) {
  switch (type) {
    case JsonValue::Type::kNull: return "null";
    case JsonValue::Type::kBool: return "boolean";
    case JsonValue::Type::kNumber: return "number";
    case JsonValue::Type::kString: return "string";
    case JsonValue::Type::kArray: return "array";
    case JsonValue::Type::kObject: return "object";
  }
  return "?";
}

inline JsonValue JsonValue::boolean(bool value) {
  JsonValue result;
  result.type_ = Type::kBool;
  result.bool_ = value;
  return result;
}
inline JsonValue JsonValue::number(double value) {
  JsonValue result;
  result.type_ = Type::kNumber;
  result.number_ = value;
  return result;
}
inline JsonValue JsonValue::string(std::string value) {
  JsonValue result;
  result.type_ = Type::kString;
  result.string_ = std::move(value);
  return result;
}
inline JsonValue JsonValue::array(Array values) {
  JsonValue result;
  result.type_ = Type::kArray;
  result.array_ = std::move(values);
  return result;
}
inline JsonValue JsonValue::object(Object members) {
  JsonValue result;
  result.type_ = Type::kObject;
  result.object_ = std::move(members);
  return result;
}
inline JsonValue::Object const& JsonValue::as_object() const {
  return object_;
}

inline JsonValue const* JsonValue::find(std::string_view key) const {
  if (type_ != Type::kObject) return nullptr;
  for (JsonMember const& member : object_) {
    if (member.key == key) return &member.value;
  }
  return nullptr;
}

inline JsonValue& JsonValue::set(std::string key, JsonValue value) {
  if (type_ == Type::kNull) type_ = Type::kObject;
  for (JsonMember& member : object_) {
    if (member.key == key) {
      member.value = std::move(value);
      return *this;
    }
  }
  object_.push_back(JsonMember{std::move(key), std::move(value)});
  return *this;
}

inline JsonValue& JsonValue::push_back(JsonValue value) {
  if (type_ == Type::kNull) type_ = Type::kArray;
  array_.push_back(std::move(value));
  return *this;
}

//! Default nesting limit of parse_json (arrays and objects together).
inline constexpr int kJsonDefaultMaxDepth = 64;

namespace detail {

class JsonParser {
 public:
  JsonParser(std::string_view text, int max_depth) : text_(text), max_depth_(max_depth) {}

  IoStatus parse(JsonValue& out) {
    if (text_.substr(0, 3) == "\xEF\xBB\xBF") pos_ = 3;
    skip_space();
    if (pos_ >= text_.size()) return fail("empty document: expected a JSON value");
    JsonValue value;
    KVC_IO_RETURN_IF_ERROR(parse_value(value, 0));
    skip_space();
    if (pos_ != text_.size()) return fail("unexpected text after the JSON value");
    out = std::move(value);
    return IoStatus::success();
  }

 private:
  IoStatus fail(std::string const& what) const { return fail_at(pos_, what); }
  IoStatus fail_at(std::size_t offset, std::string const& what) const {
    std::size_t line = 1, column = 1;
    for (std::size_t i = 0; i < offset && i < text_.size(); ++i) {
      if (text_[i] == '\n') {
        ++line;
        column = 1;
      } else {
        ++column;
      }
    }
    return IoStatus::error("byte " + std::to_string(offset) + " (line " + std::to_string(line) +
                           ", column " + std::to_string(column) + "): " + what);
  }

  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return at_end() ? '\0' : text_[pos_]; }
  void skip_space() {
    while (!at_end() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' ||
                         text_[pos_] == '\r')) {
      ++pos_;
    }
  }
  static std::string describe(char c) {
    auto const u = static_cast<unsigned char>(c);
    if (u >= 0x21 && u < 0x7f) return std::string("'") + c + "'";
    char buffer[16];
    std::snprintf(buffer, sizeof buffer, "byte 0x%02x", u);
    return buffer;
  }

  IoStatus parse_value(JsonValue& out, int depth) {
    if (at_end()) return fail("unexpected end of input: expected a value");
    char const c = peek();
    switch (c) {
      case '{': return parse_object(out, depth + 1);
      case '[': return parse_array(out, depth + 1);
      case '"': {
        std::string text;
        KVC_IO_RETURN_IF_ERROR(parse_string(text));
        out = JsonValue::string(std::move(text));
        return IoStatus::success();
      }
      case 't': return parse_literal("true", JsonValue::boolean(true), out);
      case 'f': return parse_literal("false", JsonValue::boolean(false), out);
      case 'n': return parse_literal("null", JsonValue(), out);
      default: break;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number(out);
    if (c == '\'') return fail("strings must use double quotes");
    return fail("unexpected " + describe(c) + ": expected a value");
  }

  IoStatus parse_literal(std::string_view word, JsonValue value, JsonValue& out) {
    if (text_.substr(pos_, word.size()) != word)
      return fail("invalid literal (expected '" + std::string(word) + "')");
    pos_ += word.size();
    out = std::move(value);
    return IoStatus::success();
  }

  IoStatus check_depth(int depth) const {
    if (depth > max_depth_)
      return fail("nesting deeper than " + std::to_string(max_depth_) + " levels");
    return IoStatus::success();
  }

  IoStatus parse_object(JsonValue& out, int depth) {
    KVC_IO_RETURN_IF_ERROR(check_depth(depth));
    ++pos_;  // '{'
    JsonValue::Object members;
    skip_space();
    if (peek() == '}') {
      ++pos_;
      out = JsonValue::object(std::move(members));
      return IoStatus::success();
    }
    for (;;) {
      skip_space();
      if (at_end()) return fail("unexpected end of input inside an object");
      if (peek() != '"') {
        return fail(peek() == '}' ? "trailing comma before '}'"
                                  : "expected a string key, found " + describe(peek()));
      }
      std::size_t const key_offset = pos_;
      std::string key;
      KVC_IO_RETURN_IF_ERROR(parse_string(key));
      for (JsonMember const& member : members) {
        if (member.key == key) return fail_at(key_offset, "duplicate key \"" + key + "\"");
      }
      skip_space();
      if (peek() != ':') return fail("expected ':' after the key \"" + key + "\"");
      ++pos_;
      skip_space();
      JsonValue value;
      KVC_IO_RETURN_IF_ERROR(parse_value(value, depth));
      members.push_back(JsonMember{std::move(key), std::move(value)});
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        break;
      }
      if (at_end()) return fail("unexpected end of input inside an object (missing '}')");
      return fail("expected ',' or '}' in an object, found " + describe(peek()));
    }
    out = JsonValue::object(std::move(members));
    return IoStatus::success();
  }

  IoStatus parse_array(JsonValue& out, int depth) {
    KVC_IO_RETURN_IF_ERROR(check_depth(depth));
    ++pos_;  // '['
    JsonValue::Array values;
    skip_space();
    if (peek() == ']') {
      ++pos_;
      out = JsonValue::array(std::move(values));
      return IoStatus::success();
    }
    for (;;) {
      skip_space();
      if (peek() == ']') return fail("trailing comma before ']'");
      JsonValue value;
      KVC_IO_RETURN_IF_ERROR(parse_value(value, depth));
      values.push_back(std::move(value));
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        break;
      }
      if (at_end()) return fail("unexpected end of input inside an array (missing ']')");
      return fail("expected ',' or ']' in an array, found " + describe(peek()));
    }
    out = JsonValue::array(std::move(values));
    return IoStatus::success();
  }

  IoStatus parse_number(JsonValue& out) {
    std::size_t const start = pos_;
    auto digit = [this] { return !at_end() && text_[pos_] >= '0' && text_[pos_] <= '9'; };
    if (peek() == '-') ++pos_;
    if (!digit()) return fail("expected a digit in a number");
    if (peek() == '0') {
      ++pos_;
      if (digit()) return fail_at(start, "numbers may not have leading zeros");
    } else {
      while (digit()) ++pos_;
    }
    if (peek() == '.') {
      ++pos_;
      if (!digit()) return fail("expected a digit after the decimal point");
      while (digit()) ++pos_;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!digit()) return fail("expected a digit in the exponent");
      while (digit()) ++pos_;
    }
    double value = 0.0;
    char const* first = text_.data() + start;
    char const* last = text_.data() + pos_;
    auto const result = std::from_chars(first, last, value);
    if (result.ec == std::errc::result_out_of_range) {
      return fail_at(start,
                     "number " + std::string(first, last) + " is out of the range of a double");
    }
    if (result.ec != std::errc() || result.ptr != last) return fail_at(start, "malformed number");
    out = JsonValue::number(value);
    return IoStatus::success();
  }

  IoStatus parse_hex4(std::uint32_t& out) {
    if (text_.size() - pos_ < 4) return fail("truncated \\u escape");
    std::uint32_t value = 0;
    for (int i = 0; i < 4; ++i) {
      char const c = text_[pos_ + i];
      int nibble;
      if (c >= '0' && c <= '9') {
        nibble = c - '0';
      } else if (c >= 'a' && c <= 'f') {
        nibble = c - 'a' + 10;
      } else if (c >= 'A' && c <= 'F') {
        nibble = c - 'A' + 10;
      } else {
        return fail_at(pos_ + i, "invalid hex digit in a \\u escape");
      }
      value = value << 4 | static_cast<std::uint32_t>(nibble);
    }
    pos_ += 4;
    out = value;
    return IoStatus::success();
  }

  static void append_utf8(std::uint32_t code_point, std::string& out) {
    if (code_point < 0x80) {
      out.push_back(static_cast<char>(code_point));
    } else if (code_point < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (code_point >> 6)));
      out.push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
    } else if (code_point < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (code_point >> 12)));
      out.push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (code_point >> 18)));
      out.push_back(static_cast<char>(0x80 | ((code_point >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
    }
  }

  //! Length of the valid UTF-8 sequence at pos_ (2..4), or 0 if invalid.
  std::size_t utf8_sequence_length() const {
    auto byte = [this](std::size_t i) { return static_cast<unsigned char>(text_[pos_ + i]); };
    unsigned char const lead = byte(0);
    std::size_t length;
    std::uint32_t minimum;
    std::uint32_t code_point;
    if (lead >= 0xC2 && lead <= 0xDF) {
      length = 2;
      minimum = 0x80;
      code_point = lead & 0x1Fu;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      length = 3;
      minimum = 0x800;
      code_point = lead & 0x0Fu;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      length = 4;
      minimum = 0x10000;
      code_point = lead & 0x07u;
    } else {
      return 0;
    }
    if (text_.size() - pos_ < length) return 0;
    for (std::size_t i = 1; i < length; ++i) {
      if ((byte(i) & 0xC0u) != 0x80u) return 0;
      code_point = code_point << 6 | (byte(i) & 0x3Fu);
    }
    if (code_point < minimum || code_point > 0x10FFFF ||
        (code_point >= 0xD800 && code_point <= 0xDFFF))
      return 0;
    return length;
  }

  IoStatus parse_string(std::string& out) {
    ++pos_;  // opening quote
    std::string text;
    for (;;) {
      if (at_end()) return fail("unterminated string");
      char const c = text_[pos_];
      auto const u = static_cast<unsigned char>(c);
      if (c == '"') {
        ++pos_;
        break;
      }
      if (u < 0x20)
        return fail("raw control character (" + describe(c) + ") in a string: escape it");
      if (u >= 0x80) {
        std::size_t const length = utf8_sequence_length();
        if (length == 0) return fail("invalid UTF-8 in a string");
        text.append(text_.substr(pos_, length));
        pos_ += length;
        continue;
      }
      if (c != '\\') {
        text.push_back(c);
        ++pos_;
        continue;
      }
      std::size_t const escape_offset = pos_;
      ++pos_;
      if (at_end()) return fail("unterminated escape sequence");
      char const e = text_[pos_++];
      switch (e) {
        case '"': text.push_back('"'); break;
        case '\\': text.push_back('\\'); break;
        case '/': text.push_back('/'); break;
        case 'b': text.push_back('\b'); break;
        case 'f': text.push_back('\f'); break;
        case 'n': text.push_back('\n'); break;
        case 'r': text.push_back('\r'); break;
        case 't': text.push_back('\t'); break;
        case 'u': {
          std::uint32_t code_point = 0;
          KVC_IO_RETURN_IF_ERROR(parse_hex4(code_point));
          if (code_point >= 0xDC00 && code_point <= 0xDFFF) {
            return fail_at(escape_offset, "lone low surrogate in a \\u escape");
          }
          if (code_point >= 0xD800 && code_point <= 0xDBFF) {
            if (text_.substr(pos_, 2) != "\\u") {
              return fail_at(escape_offset, "high surrogate not followed by a low surrogate");
            }
            pos_ += 2;
            std::uint32_t low = 0;
            KVC_IO_RETURN_IF_ERROR(parse_hex4(low));
            if (low < 0xDC00 || low > 0xDFFF) {
              return fail_at(escape_offset, "high surrogate not followed by a low surrogate");
            }
            code_point = 0x10000 + ((code_point - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(code_point, text);
          break;
        }
        default:
          return fail_at(escape_offset, "invalid escape sequence '\\" + std::string(1, e) + "'");
      }
    }
    out = std::move(text);
    return IoStatus::success();
  }

  std::string_view text_;
  std::size_t pos_ = 0;
  int max_depth_;
};

inline void write_json_string(std::string const& text, std::string& out) {
  out.push_back('"');
  for (char c : text) {
    auto const u = static_cast<unsigned char>(c);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (u < 0x20) {
          char buffer[8];
          std::snprintf(buffer, sizeof buffer, "\\u%04x", u);
          out += buffer;
        } else {
          out.push_back(c);
        }
    }
  }
  out.push_back('"');
}

inline void write_json_number(double value, std::string& out) {
  if (!std::isfinite(value)) {
    out += "null";  // JSON has no NaN or infinity
    return;
  }
  char buffer[64];
  std::to_chars_result const result = std::to_chars(buffer, buffer + sizeof buffer, value);
  out.append(buffer, result.ptr);
}

inline bool json_is_scalar(JsonValue const& value) {
  return !value.is_array() && !value.is_object();
}

inline void write_json(JsonValue const& value, int indent, int level, std::string& out) {
  auto newline = [&](int at) {
    if (indent <= 0) return;
    out.push_back('\n');
    out.append(static_cast<std::size_t>(indent) * at, ' ');
  };
  switch (value.type()) {
    case JsonValue::Type::kNull: out += "null"; return;
    case JsonValue::Type::kBool: out += value.as_bool() ? "true" : "false"; return;
    case JsonValue::Type::kNumber: write_json_number(value.as_number(), out); return;
    case JsonValue::Type::kString: write_json_string(value.as_string(), out); return;
    case JsonValue::Type::kArray: {
      JsonValue::Array const& values = value.as_array();
      bool flat = true;  // arrays of scalars stay on one line
      for (JsonValue const& element : values) flat = flat && json_is_scalar(element);
      out.push_back('[');
      for (std::size_t i = 0; i < values.size(); ++i) {
        if (i > 0) out += flat && indent > 0 ? ", " : ",";
        if (!flat) newline(level + 1);
        write_json(values[i], indent, level + 1, out);
      }
      if (!flat && !values.empty()) newline(level);
      out.push_back(']');
      return;
    }
    case JsonValue::Type::kObject: {
      JsonValue::Object const& members = value.as_object();
      out.push_back('{');
      for (std::size_t i = 0; i < members.size(); ++i) {
        if (i > 0) out.push_back(',');
        newline(level + 1);
        write_json_string(members[i].key, out);
        out += indent > 0 ? ": " : ":";
        write_json(members[i].value, indent, level + 1, out);
      }
      if (!members.empty()) newline(level);
      out.push_back('}');
      return;
    }
  }
}

}  // namespace detail

//! Parses the JSON document `text` into `out` (set only on success). Arrays and objects nested
//! deeper than `max_depth` are an error.
inline IoStatus parse_json(std::string_view text, JsonValue& out,
                           int max_depth = kJsonDefaultMaxDepth) {
  return detail::JsonParser(text, max_depth).parse(out);
}

//! Serialises `value`; `indent` > 0 pretty-prints (arrays of scalars stay on one line), 0 gives
//! the compact form. Numbers use the shortest text that reads back to the same double;
//! non-finite numbers are written as null.
inline std::string to_json(JsonValue const& value, int indent = 2) {
  std::string out;
  detail::write_json(value, indent, 0, out);
  return out;
}

}  // namespace kvc::io
