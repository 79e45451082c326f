// One line of an event log, as text, and the forms of the values in it. Two kinds:
//   a driver call: "<CUDA name> key=value ... -> <answer's name> key=value ..."
//                  (arguments before "->", outputs after the answer: operations.hpp)
//   an event:      "@<name> key=value ..."   (the use of a power, or a header line)
// Tokens are separated by single spaces; values hold no spaces. Each number is written
// in one form and read back only in that form: decimal (sizes, counts, devices, codes,
// times), 0x-hex (handles, raw addresses), %.17g (probabilities). Reading is strict for
// arguments (a missing, extra, repeated or unreadable one is an InvalidArgumentError
// naming it) and lenient for outputs, which replay compares as text.
//
// Thread-safety: values owned by one thread; the free functions are reentrant.
#pragma once

#include <charconv>
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

#include "aimdo/errors.hpp"

namespace aimdo {

// "0x1f": how handles and raw addresses are written.
std::string hex(std::uint64_t value);
// A probability as "%.17g": read back, the same double.
std::string probability_text(double value);
// `text` cut to at most `max_bytes` between two UTF-8 characters, "..." marking a cut: how
// error messages quote log text (Python decodes them).
std::string clipped(const std::string& text, std::size_t max_bytes);
// The error replay raises for line `number` (1-based) of a log, whose text is `line`:
// "cannot replay log line N ('<line>'): <what>", both quoted clipped.
InvalidArgumentError replay_error(std::size_t number, const std::string& line,
                                  const std::string& what);

// The lines of a log that are not blank (whitespace only), each with its 1-based number
// in the text; a '\r' ending a line (a log saved with CRLF) is dropped. `line_count` is
// the number of the last line, blank or not.
struct NumberedLine {
  std::size_t number;
  std::string text;
};
struct LogText {
  std::vector<NumberedLine> lines;
  std::size_t line_count = 0;
};
LogText split_log(const std::string& text);

// `text` as a `Number` written in base 10 or 16 (then with a "0x" prefix): the whole
// text, in range, no sign on an unsigned type, no spaces, no octal. InvalidArgumentError
// naming `key` otherwise.
template <class Number>
Number parse_number(const char* key, const std::string& text, int base) {
  static_assert(std::is_integral_v<Number>, "integers only");
  const char* first = text.data();
  const char* last = text.data() + text.size();
  if (base == 16) {
    if (text.size() < 3 || text[0] != '0' || text[1] != 'x') {
      throw InvalidArgumentError(std::string(key) + "=" + text + " is not a 0x-hex number");
    }
    first += 2;
  }
  Number value{};
  const auto [end, error] = std::from_chars(first, last, value, base);
  if (error == std::errc::result_out_of_range) {
    throw InvalidArgumentError(std::string(key) + "=" + text + " is out of range for its type");
  }
  if (error != std::errc() || end != last) {
    throw InvalidArgumentError(std::string(key) + "=" + text + " is not a number");
  }
  return value;
}

// Builds a line: LineText("cuMemMap").add("va", name).add("size", n).answer(status.name).
class LineText {
 public:
  explicit LineText(std::string name) : text_(std::move(name)) {}
  LineText& add(const char* key, const std::string& value);
  template <class Integer, class = std::enable_if_t<std::is_integral_v<Integer>>>
  LineText& add(const char* key, Integer value) {
    return add(key, std::to_string(value));
  }
  // " -> <name>": what follows are outputs.
  LineText& answer(const char* name);
  const std::string& str() const noexcept { return text_; }

 private:
  std::string text_;
};

class LogLine {
 public:
  // InvalidArgumentError when `text` is neither kind of line: no name, a token before
  // "->" that is not key=value with a key, a key twice, a call without "->", an event
  // with one.
  static LogLine parse(const std::string& text);

  const std::string& name() const noexcept { return name_; }
  bool is_event() const noexcept { return !name_.empty() && name_[0] == '@'; }
  // The answer's name after "->"; empty for an event.
  const std::string& answer() const noexcept { return answer_; }
  // An output's text, or null when the line has none under `key`.
  const std::string* output(const char* key) const;

  // Argument `key`'s text, marked as read. InvalidArgumentError "it lacks key=".
  const std::string& text(const char* key);
  std::uint64_t unsigned_decimal(const char* key);
  std::int64_t signed_decimal(const char* key);
  int integer(const char* key);
  std::uint64_t hexadecimal(const char* key);
  double probability(const char* key);
  // InvalidArgumentError naming an argument nothing read ("<name> has no argument k=").
  void require_all_read() const;

 private:
  std::string name_;
  std::map<std::string, std::string> arguments_;
  std::string answer_;
  std::map<std::string, std::string> outputs_;
  std::set<std::string> read_;
};

}  // namespace aimdo
