#include "log_line.hpp"

#include <cinttypes>
#include <cstdio>
#include <sstream>

namespace aimdo {

std::string hex(std::uint64_t value) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "0x%" PRIx64, value);
  return buffer;
}

std::string probability_text(double value) {
  char buffer[40];
  std::snprintf(buffer, sizeof buffer, "%.17g", value);
  return buffer;
}

std::string clipped(const std::string& text, std::size_t max_bytes) {
  if (text.size() <= max_bytes) return text;
  std::size_t cut = max_bytes;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return text.substr(0, cut) + "...";
}

LogText split_log(const std::string& text) {
  LogText out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    ++out.line_count;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t\r\v\f") == std::string::npos) continue;
    out.lines.push_back(NumberedLine{out.line_count, std::move(line)});
  }
  return out;
}

InvalidArgumentError replay_error(std::size_t number, const std::string& line,
                                  const std::string& what) {
  return InvalidArgumentError("cannot replay log line " + std::to_string(number) + " ('" +
                              clipped(line, 200) + "'): " + clipped(what, 300));
}

LineText& LineText::add(const char* key, const std::string& value) {
  text_ += ' ';
  text_ += key;
  text_ += '=';
  text_ += value;
  return *this;
}

LineText& LineText::answer(const char* name) {
  text_ += " -> ";
  text_ += name;
  return *this;
}

LogLine LogLine::parse(const std::string& text) {
  std::istringstream in(text);
  LogLine line;
  if (!(in >> line.name_)) throw InvalidArgumentError("it is empty");
  bool has_answer = false;
  std::string token;
  while (in >> token) {
    if (token == "->") {
      has_answer = true;
      break;
    }
    const std::size_t eq = token.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw InvalidArgumentError("'" + token + "' is not key=value");
    }
    if (!line.arguments_.emplace(token.substr(0, eq), token.substr(eq + 1)).second) {
      throw InvalidArgumentError(token.substr(0, eq) + "= appears twice");
    }
  }
  if (has_answer == line.is_event()) {
    throw InvalidArgumentError(has_answer ? "an event's line has no '->'" : "it lacks '-> result'");
  }
  // Outputs are read leniently: replay compares them as text, so damage shows there.
  if (has_answer) in >> line.answer_;
  while (in >> token) {
    const std::size_t eq = token.find('=');
    if (eq != std::string::npos && eq != 0) {
      line.outputs_.emplace(token.substr(0, eq), token.substr(eq + 1));
    }
  }
  return line;
}

const std::string* LogLine::output(const char* key) const {
  const auto found = outputs_.find(key);
  return found == outputs_.end() ? nullptr : &found->second;
}

const std::string& LogLine::text(const char* key) {
  const auto found = arguments_.find(key);
  if (found == arguments_.end()) throw InvalidArgumentError(std::string("it lacks ") + key + "=");
  read_.insert(key);
  return found->second;
}

std::uint64_t LogLine::unsigned_decimal(const char* key) {
  return parse_number<std::uint64_t>(key, text(key), 10);
}

std::int64_t LogLine::signed_decimal(const char* key) {
  return parse_number<std::int64_t>(key, text(key), 10);
}

int LogLine::integer(const char* key) {
  return parse_number<int>(key, text(key), 10);
}

std::uint64_t LogLine::hexadecimal(const char* key) {
  return parse_number<std::uint64_t>(key, text(key), 16);
}

double LogLine::probability(const char* key) {
  const std::string& value = text(key);
  double parsed = 0;
  const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), parsed);
  if (error == std::errc::result_out_of_range) {
    throw InvalidArgumentError(std::string(key) + "=" + value + " is out of range for a double");
  }
  if (error != std::errc() || end != value.data() + value.size()) {
    throw InvalidArgumentError(std::string(key) + "=" + value + " is not a number");
  }
  return parsed;
}

void LogLine::require_all_read() const {
  for (const auto& argument : arguments_) {
    if (read_.count(argument.first) == 0) {
      throw InvalidArgumentError(name_ + " has no argument " + argument.first + "=");
    }
  }
}

}  // namespace aimdo
