#include "replay.hpp"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "aimdo/errors.hpp"
#include "call.hpp"

namespace aimdo::adaptors {
namespace {

constexpr const char* kSuccess = "CUDA_SUCCESS";

// The logged run's raw addresses and handles, mapped to the replayed run's (see
// "translated" in replay.hpp). Relative names go through the recorder's naming instead.
class Translation {
 public:
  explicit Translation(const AddressNaming& naming) : naming_(naming) {}

  DeviceAddress address(const char* key, const std::string& text) const {
    if (AddressNaming::is_relative(text)) return naming_.parse(key, text);
    const DeviceAddress logged = parse_number<DeviceAddress>(key, text, 16);
    auto range = reservations_.upper_bound(logged);
    if (range == reservations_.begin()) return logged;
    --range;
    const DeviceAddress offset = logged - range->first;
    return offset < range->second.first ? range->second.second + offset : logged;
  }
  DeviceAddress pointer(const char* key, const std::string& text) const {
    if (AddressNaming::is_relative(text)) return naming_.parse(key, text);
    const DeviceAddress logged = parse_number<DeviceAddress>(key, text, 16);
    const auto found = pointers_.find(logged);
    return found == pointers_.end() ? logged : found->second;
  }
  PhysicalHandle handle(PhysicalHandle logged) const {
    const auto found = handles_.find(logged);
    return found == handles_.end() ? logged : found->second;
  }
  EventHandle event(EventHandle logged) const {
    const auto found = events_.find(logged);
    return found == events_.end() ? logged : found->second;
  }
  bool knows_event(EventHandle logged) const { return events_.count(logged) != 0; }
  // An event the log uses without having made it (PyTorch's, which aimdo's pump records
  // and waits on): from now on, `made` stands for it.
  void adopt_event(EventHandle logged, EventHandle made) { events_[logged] = made; }

  // After `call` answered `status`: what the logged line's raw outputs become, and what
  // its raw arguments no longer name once given back (the driver may reuse them).
  void learn(const Call& call, const DriverStatus& status, LogLine& logged) {
    if (!status.ok() || logged.answer() != kSuccess) return;
    std::uint64_t raw = 0;
    switch (call.operation) {
      case Operation::reserve_address_range:
        if (raw_value(logged.output("va"), &raw)) {
          reservations_[raw] = {call.size_bytes, call.address};
        }
        return;
      case Operation::free_address_range:
        if (raw_value(&logged.text("va"), &raw)) reservations_.erase(raw);
        return;
      case Operation::stream_alloc:
        if (raw_value(logged.output("ptr"), &raw)) pointers_[raw] = call.pointer;
        return;
      case Operation::stream_free:
        if (raw_value(&logged.text("ptr"), &raw)) pointers_.erase(raw);
        return;
      case Operation::create_physical:
        if (raw_value(logged.output("handle"), &raw)) handles_[raw] = call.handle;
        return;
      case Operation::release_physical:
        if (raw_value(&logged.text("handle"), &raw)) handles_.erase(raw);
        return;
      case Operation::event_create:
        if (raw_value(logged.output("ev"), &raw)) events_[raw] = call.event;
        return;
      case Operation::event_destroy:
        if (raw_value(&logged.text("ev"), &raw)) events_.erase(raw);
        return;
      default: return;
    }
  }

 private:
  // A value written as 0x-hex; false for none, a relative name or damaged text (which the
  // comparison reports instead).
  static bool raw_value(const std::string* text, std::uint64_t* out) {
    if (text == nullptr || AddressNaming::is_relative(*text)) return false;
    try {
      *out = parse_number<std::uint64_t>("value", *text, 16);
      return true;
    } catch (const InvalidArgumentError&) {
      return false;
    }
  }

  const AddressNaming& naming_;
  std::map<DeviceAddress, std::pair<std::size_t, DeviceAddress>> reservations_;
  std::unordered_map<DeviceAddress, DeviceAddress> pointers_;
  std::unordered_map<PhysicalHandle, PhysicalHandle> handles_;
  std::unordered_map<EventHandle, EventHandle> events_;
};

// The host memory a replayed host-to-device copy reads: the log does not carry the host
// address or the bytes, so every such copy reads zeros from this buffer. It grows to the
// largest copy replayed and is never written; calloc leaves a large one's pages
// uncommitted until something reads them (the simulator does only with real bytes).
class HostSource {
 public:
  // The address of at least `size_bytes` (and at least one) zero bytes, valid until the
  // next call. InvalidArgumentError naming the size when the host cannot supply them.
  std::uintptr_t of(std::size_t size_bytes) {
    const std::size_t wanted = std::max<std::size_t>(size_bytes, 1);
    if (wanted > size_bytes_) {
      buffer_.reset(static_cast<unsigned char*>(std::calloc(wanted, 1)));
      size_bytes_ = buffer_ == nullptr ? 0 : wanted;
      if (buffer_ == nullptr) {
        throw InvalidArgumentError("size=" + std::to_string(size_bytes) +
                                   ": replay cannot allocate a host buffer that large");
      }
    }
    return reinterpret_cast<std::uintptr_t>(buffer_.get());
  }

 private:
  struct Free {
    void operator()(unsigned char* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<unsigned char, Free> buffer_;
  std::size_t size_bytes_ = 0;
};

class Replayer {
 public:
  explicit Replayer(ReplayStack& stack) : stack_(stack), translation_(stack.recorder->naming()) {}
  Replayer(const Replayer&) = delete;
  Replayer& operator=(const Replayer&) = delete;
  // The events made for foreign ones are destroyed, unlogged, as the replay ends.
  ~Replayer() {
    for (const EventHandle made : adopted_) stack_.context->event_destroy(made);
  }

  // Replays one line; InvalidArgumentError (without the line's number) when it cannot.
  void line(LogLine& line) {
    if (line.is_event()) {
      if (!event(line)) {
        throw InvalidArgumentError("'" + line.name() +
                                   "' is neither a driver call nor a simulator power");
      }
      line.require_all_read();
      return;
    }
    Operation operation = Operation::memory_info;
    if (!find_operation(line.name(), &operation)) {
      throw InvalidArgumentError("'" + line.name() +
                                 "' is neither a driver call nor a simulator power");
    }
    Call call = read_call(operation, line);
    if (operation == Operation::copy_from_host_async) {
      call.host_source = host_source_.of(call.size_bytes);
    }
    if (info(operation).arguments.contains(Field::current)) make_current(call.current);
    if (operation == Operation::event_record || operation == Operation::stream_wait_event) {
      adopt_foreign_event(line, &call);
    }
    const DriverStatus status = invoke(*stack_.recorder, call);
    // Checked after the call: it only ran on the replay's stack, which the throw discards.
    line.require_all_read();
    translation_.learn(call, status, line);
  }

 private:
  bool event(LogLine& line) {
    if (stack_.recorder->replay_event(line)) return true;
    for (const auto& handler : stack_.event_handlers) {
      if (handler(line)) return true;
    }
    return false;
  }

  Call read_call(Operation operation, LogLine& line) const {
    Call call;
    call.operation = operation;
    for (const Field field : info(operation).arguments) {
      const char* key = field_key(field);
      switch (field) {
        case Field::device: call.device = line.integer(key); break;
        case Field::current: call.current = line.integer(key); break;
        case Field::size: call.size_bytes = line.unsigned_decimal(key); break;
        case Field::alignment: call.alignment_bytes = line.unsigned_decimal(key); break;
        case Field::address: call.address = translation_.address(key, line.text(key)); break;
        case Field::handle: call.handle = translation_.handle(line.hexadecimal(key)); break;
        case Field::pointer: call.pointer = translation_.pointer(key, line.text(key)); break;
        case Field::source: call.source = translation_.address(key, line.text(key)); break;
        case Field::event: call.event = translation_.event(line.hexadecimal(key)); break;
        case Field::free_bytes:
        case Field::total_bytes: break;  // outputs only
      }
    }
    return call;
  }

  // Makes `device` current (-1: none) on the bottom driver, as it was when logged.
  void make_current(int device) {
    int count = 0;
    if (!stack_.context->device_count(&count).ok()) count = 0;
    if (device < -1 || device >= count) {
      throw InvalidArgumentError("cur=" + std::to_string(device) +
                                 " is not -1 or a device of this simulator");
    }
    if (device >= 0) {
      ContextToken previous;
      stack_.context->make_current(device, &previous);
      return;
    }
    ContextToken none;
    none.switched = true;  // restore "no context"
    stack_.context->restore_current(none);
  }

  // A record or wait of an event the log never made (a logged run's PyTorch events): the
  // replay makes one on the call's device, unlogged below the recorder, so that the call
  // answers as it did. An event that failed or that the driver may not make stays raw.
  void adopt_foreign_event(LogLine& line, Call* call) {
    const EventHandle logged = line.hexadecimal(field_key(Field::event));
    if (logged == 0 || translation_.knows_event(logged) || line.answer() != kSuccess) return;
    EventHandle made = 0;
    if (!stack_.context->event_create(call->device, &made).ok()) return;
    adopted_.push_back(made);
    translation_.adopt_event(logged, made);
    call->event = made;
  }

  ReplayStack& stack_;
  Translation translation_;
  HostSource host_source_;
  std::vector<EventHandle> adopted_;
};

// `line`'s name, answer and environment outputs, read leniently from text replay wrote or
// compared (a line that does not parse reads as its whole text for a name).
struct Answer {
  std::string name;
  std::string answer;
  std::string environment;  // " free=... total=..." as logged, or empty
};

Answer answer_of(const std::string& text) {
  Answer out;
  try {
    const LogLine line = LogLine::parse(text);
    out.name = line.name();
    out.answer = line.answer();
    Operation operation = Operation::memory_info;
    if (line.is_event() || !find_operation(line.name(), &operation)) return out;
    for (const Field field : info(operation).outputs) {
      const std::string* value = line.output(field_key(field));
      if (is_environment(field) && value != nullptr) {
        out.environment += " " + std::string(field_key(field)) + "=" + *value;
      }
    }
  } catch (const InvalidArgumentError&) {
    out.name = text;
  }
  return out;
}

// Adds to `report` what differs between the logged line `want` and the replayed `got`.
void compare(const std::string& want, const std::string& got, std::size_t number, bool exact,
             ReplayReport* report) {
  const std::string where = "line " + std::to_string(number) + ": ";
  const std::string difference = where + "logged '" + want + "', replayed '" + got + "'";
  if (exact) {
    if (want != got) report->differences.push_back(difference);
    return;
  }
  const Answer logged = answer_of(want);
  const Answer replayed = answer_of(got);
  if (logged.name != replayed.name || logged.answer != replayed.answer) {
    report->differences.push_back(difference);
  } else if (logged.environment != replayed.environment) {
    report->notes.push_back(where + logged.name + logged.environment + " when recorded," +
                            replayed.environment + " replayed");
  }
}

}  // namespace

ReplayReport replay(const std::string& log_text, ReplayStack& stack) {
  const LogText log = split_log(log_text);
  const LogHeader header = read_header(log_text);
  const bool exact = header.backend.empty() || header.backend == stack.recorder->backend_name();
  EventLog& fresh = *stack.recorder->log();
  fresh.set_recording(true);
  const std::size_t first = fresh.lines().size();
  Replayer replayer(stack);
  for (const NumberedLine& numbered : log.lines) {
    try {
      LogLine line = LogLine::parse(numbered.text);
      replayer.line(line);
    } catch (const InvalidArgumentError& error) {
      throw replay_error(numbered.number, numbered.text, error.what());
    }
  }
  const std::vector<std::string> all = fresh.lines();
  const std::vector<std::string> replayed(all.begin() + static_cast<std::ptrdiff_t>(first),
                                          all.end());
  ReplayReport report;
  const std::size_t n = std::max(log.lines.size(), replayed.size());
  for (std::size_t i = 0; i < n; ++i) {
    const bool logged = i < log.lines.size();
    const std::string want = logged ? log.lines[i].text : "(nothing)";
    const std::string got = i < replayed.size() ? replayed[i] : "(nothing)";
    // Lines are replayed one for one, so a line of its own past the log's end would be a
    // bug of replay's; it is still reported, numbered after the log's last line.
    const std::size_t number =
        logged ? log.lines[i].number : log.line_count + 1 + (i - log.lines.size());
    compare(want, got, number, exact, &report);
  }
  return report;
}

}  // namespace aimdo::adaptors
