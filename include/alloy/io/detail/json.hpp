// A small strict JSON parser and string writer, enough for safetensors headers. It reads
// untrusted bytes: every length is checked, nesting and array length are bounded, duplicate
// keys, invalid UTF-8 and trailing bytes are errors, and numbers must be integers.
#pragma once

#include <alloy/error.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace alloy::detail::json {

// A JSON integer: safetensors needs non-negative 64-bit values, but negative ones must parse
// so the caller can say "negative dimension" rather than "bad JSON".
struct Integer {
  bool negative = false;
  std::uint64_t magnitude = 0;
};

struct Member;

struct Value {
  enum class Kind : std::uint8_t { null, boolean, integer, string, array, object };
  Kind kind = Kind::null;
  std::size_t offset = 0;  // where the value starts in the document, for error messages
  bool boolean = false;
  Integer integer;
  std::string string;
  std::vector<Value> items;
  std::vector<Member> members;  // in document order

  const Value* find(std::string_view key) const;
};

struct Member {
  std::string key;
  std::size_t key_offset = 0;
  Value value;
};

inline const Value* Value::find(std::string_view key) const {
  for (const Member& m : members) {
    if (m.key == key) return &m.value;
  }
  return nullptr;
}

inline const char* kind_name(Value::Kind kind) {
  switch (kind) {
    case Value::Kind::null:
      return "null";
    case Value::Kind::boolean:
      return "a boolean";
    case Value::Kind::integer:
      return "an integer";
    case Value::Kind::string:
      return "a string";
    case Value::Kind::array:
      return "an array";
    case Value::Kind::object:
      return "an object";
  }
  return "a value";
}

// Bounds that keep a hostile document from costing more memory or stack than its size.
struct Limits {
  int max_depth = 8;                   // the root object is depth 1
  std::size_t max_array_items = 1024;  // safetensors arrays are shapes and offset pairs
};

class ParseError : public error {
 public:
  ParseError(const std::string& reason, std::size_t offset)
      : error("invalid JSON at byte " + std::to_string(offset) + ": " + reason), reason_(reason), offset_(offset) {}

  const std::string& reason() const noexcept { return reason_; }
  std::size_t offset() const noexcept { return offset_; }

 private:
  std::string reason_;
  std::size_t offset_;
};

// Length of the well-formed UTF-8 sequence starting at text[at], or 0 when there is none
// (overlong forms, surrogates and code points past U+10FFFF are not well formed).
template <class = void>
std::size_t utf8_sequence_length(std::string_view text, std::size_t at) {
  auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(at);
  if (lead < 0x80) return 1;
  std::size_t length = 0;
  unsigned char low = 0x80, high = 0xBF;  // allowed range of the second byte
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;
    if (lead == 0xED) high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;
  } else {
    return 0;
  }
  if (text.size() - at < length) return 0;
  if (byte(at + 1) < low || byte(at + 1) > high) return 0;
  for (std::size_t i = 2; i < length; ++i) {
    if (byte(at + i) < 0x80 || byte(at + i) > 0xBF) return 0;
  }
  return length;
}

template <class = void>
bool is_valid_utf8(std::string_view text) {
  for (std::size_t at = 0; at < text.size();) {
    const std::size_t length = utf8_sequence_length(text, at);
    if (length == 0) return false;
    at += length;
  }
  return true;
}

// Appends `text` as a quoted JSON string. `text` must be valid UTF-8; non-ASCII passes through.
template <class = void>
void append_string(std::string& out, std::string_view text) {
  static constexpr char hex[] = "0123456789abcdef";
  out += '"';
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (u < 0x20) {
          out += "\\u00";
          out += hex[u >> 4];
          out += hex[u & 0xF];
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

// `text` escaped for an error message and cut at a character boundary: a hostile name can
// be megabytes long or hold control characters.
template <class = void>
std::string printable(std::string_view text, std::size_t max_bytes = 120) {
  std::size_t cut = std::min(text.size(), max_bytes);
  while (cut > 0 && cut < text.size() && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  std::string out;
  append_string(out, text.substr(0, cut));
  out = out.substr(1, out.size() - 2);
  if (cut < text.size()) out += "...";
  return out;
}

template <class Unused = void>
class Parser {
 public:
  Parser(std::string_view text, Limits limits) : text_(text), limits_(limits) {}

  Value parse_document() {
    Value root = parse_value(1);
    expect_end();
    return root;
  }

  // The root must be an object; its members are handed over one at a time and not kept, so a
  // header with many tensors never exists as one tree.
  void parse_root_members(const std::function<void(Member&&)>& on_member) {
    skip_whitespace();
    if (at_end() || peek() != '{') fail("expected an object", pos_);
    parse_members(1, on_member);
    expect_end();
  }

 private:
  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return text_[pos_]; }

  [[noreturn]] void fail(const std::string& reason, std::size_t at) const { throw ParseError(reason, at); }

  void skip_whitespace() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
  }

  void expect_end() {
    skip_whitespace();
    if (!at_end()) fail("trailing bytes after the document", pos_);
  }

  Value parse_value(int depth) {
    skip_whitespace();
    if (at_end()) fail("unexpected end of the document", pos_);
    Value v;
    v.offset = pos_;
    const char c = peek();
    if (c == '{' || c == '[') {
      if (depth > limits_.max_depth) {
        fail("nesting deeper than " + std::to_string(limits_.max_depth) + " levels", pos_);
      }
      if (c == '{') {
        v.kind = Value::Kind::object;
        parse_members(depth, [&](Member&& m) { v.members.push_back(std::move(m)); });
      } else {
        v.kind = Value::Kind::array;
        parse_items(depth, v.items);
      }
    } else if (c == '"') {
      v.kind = Value::Kind::string;
      v.string = parse_string();
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      v.kind = Value::Kind::integer;
      v.integer = parse_integer();
    } else if (consume_literal("true")) {
      v.kind = Value::Kind::boolean;
      v.boolean = true;
    } else if (consume_literal("false")) {
      v.kind = Value::Kind::boolean;
    } else if (consume_literal("null")) {
      v.kind = Value::Kind::null;
    } else {
      fail("unexpected character", pos_);
    }
    return v;
  }

  bool consume_literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  template <class OnMember>
  void parse_members(int depth, OnMember&& on_member) {
    ++pos_;  // '{'
    std::set<std::string> seen;
    skip_whitespace();
    if (!at_end() && peek() == '}') {
      ++pos_;
      return;
    }
    for (;;) {
      skip_whitespace();
      if (at_end() || peek() != '"') fail("expected a string key", pos_);
      Member m;
      m.key_offset = pos_;
      m.key = parse_string();
      if (!seen.insert(m.key).second) fail("duplicate key '" + printable(m.key) + "'", m.key_offset);
      skip_whitespace();
      if (at_end() || peek() != ':') fail("expected ':' after a key", pos_);
      ++pos_;
      m.value = parse_value(depth + 1);
      on_member(std::move(m));
      skip_whitespace();
      if (at_end()) fail("unterminated object", pos_);
      if (peek() == '}') {
        ++pos_;
        return;
      }
      if (peek() != ',') fail("expected ',' or '}' in an object", pos_);
      ++pos_;
    }
  }

  void parse_items(int depth, std::vector<Value>& items) {
    ++pos_;  // '['
    skip_whitespace();
    if (!at_end() && peek() == ']') {
      ++pos_;
      return;
    }
    for (;;) {
      if (items.size() == limits_.max_array_items) {
        fail("array longer than " + std::to_string(limits_.max_array_items) + " items", pos_);
      }
      items.push_back(parse_value(depth + 1));
      skip_whitespace();
      if (at_end()) fail("unterminated array", pos_);
      if (peek() == ']') {
        ++pos_;
        return;
      }
      if (peek() != ',') fail("expected ',' or ']' in an array", pos_);
      ++pos_;
    }
  }

  Integer parse_integer() {
    Integer result;
    const std::size_t start = pos_;
    if (peek() == '-') {
      result.negative = true;
      ++pos_;
    }
    if (at_end() || peek() < '0' || peek() > '9') fail("expected a digit", pos_);
    if (peek() == '0' && pos_ + 1 < text_.size() && text_[pos_ + 1] >= '0' && text_[pos_ + 1] <= '9') {
      fail("leading zero in a number", pos_);
    }
    constexpr std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
    while (!at_end() && peek() >= '0' && peek() <= '9') {
      const auto digit = static_cast<std::uint64_t>(peek() - '0');
      if (result.magnitude > (max - digit) / 10) fail("integer does not fit in 64 bits", start);
      result.magnitude = result.magnitude * 10 + digit;
      ++pos_;
    }
    if (!at_end() && (peek() == '.' || peek() == 'e' || peek() == 'E')) {
      fail("only integers are supported, not fractions or exponents", start);
    }
    if (result.magnitude == 0) result.negative = false;
    return result;
  }

  unsigned parse_hex4() {
    if (text_.size() - pos_ < 4) fail("truncated \\u escape", pos_);
    unsigned value = 0;
    for (std::size_t i = 0; i < 4; ++i) {
      const char c = text_[pos_ + i];
      unsigned digit = 0;
      if (c >= '0' && c <= '9') {
        digit = static_cast<unsigned>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        digit = static_cast<unsigned>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        digit = static_cast<unsigned>(c - 'A' + 10);
      } else {
        fail("bad hex digit in a \\u escape", pos_ + i);
      }
      value = value * 16 + digit;
    }
    pos_ += 4;
    return value;
  }

  static void append_utf8(std::string& out, unsigned code_point) {
    if (code_point < 0x80) {
      out += static_cast<char>(code_point);
    } else if (code_point < 0x800) {
      out += static_cast<char>(0xC0 | (code_point >> 6));
      out += static_cast<char>(0x80 | (code_point & 0x3F));
    } else if (code_point < 0x10000) {
      out += static_cast<char>(0xE0 | (code_point >> 12));
      out += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code_point & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code_point >> 18));
      out += static_cast<char>(0x80 | ((code_point >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code_point >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code_point & 0x3F));
    }
  }

  // A \u escape; a UTF-16 surrogate pair spans two of them.
  unsigned parse_unicode_escape(std::size_t escape_start) {
    const unsigned unit = parse_hex4();
    if (unit >= 0xDC00 && unit <= 0xDFFF) fail("unpaired low surrogate in a \\u escape", escape_start);
    if (unit < 0xD800 || unit > 0xDBFF) return unit;
    if (text_.substr(pos_, 2) != "\\u") fail("unpaired high surrogate in a \\u escape", escape_start);
    pos_ += 2;
    const unsigned low = parse_hex4();
    if (low < 0xDC00 || low > 0xDFFF) fail("unpaired high surrogate in a \\u escape", escape_start);
    return 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
  }

  std::string parse_string() {
    const std::size_t start = pos_;
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string", start);
      const auto c = static_cast<unsigned char>(peek());
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c == '\\') {
        const std::size_t escape_start = pos_;
        ++pos_;
        if (at_end()) fail("unterminated string", start);
        const char e = peek();
        ++pos_;
        switch (e) {
          case '"':
          case '\\':
          case '/':
            out += e;
            break;
          case 'b':
            out += '\b';
            break;
          case 'f':
            out += '\f';
            break;
          case 'n':
            out += '\n';
            break;
          case 'r':
            out += '\r';
            break;
          case 't':
            out += '\t';
            break;
          case 'u':
            append_utf8(out, parse_unicode_escape(escape_start));
            break;
          default:
            fail("unknown escape in a string", escape_start);
        }
      } else if (c < 0x20) {
        fail("unescaped control character in a string", pos_);
      } else {
        const std::size_t length = utf8_sequence_length(text_, pos_);
        if (length == 0) fail("invalid UTF-8 in a string", pos_);
        out.append(text_.substr(pos_, length));
        pos_ += length;
      }
    }
  }

  std::string_view text_;
  Limits limits_;
  std::size_t pos_ = 0;
};

// Parses a whole document into a tree.
template <class = void>
Value parse(std::string_view text, Limits limits = {}) {
  return Parser<>(text, limits).parse_document();
}

// Parses a document whose root is an object, handing over its members one by one.
template <class = void>
void parse_root_members(std::string_view text, const std::function<void(Member&&)>& on_member, Limits limits = {}) {
  Parser<>(text, limits).parse_root_members(on_member);
}

}  // namespace alloy::detail::json
