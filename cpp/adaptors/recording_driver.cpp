#include "recording_driver.hpp"

#include <utility>

#include "aimdo/errors.hpp"
#include "call_line.hpp"

namespace aimdo::adaptors {
namespace {

constexpr const char* kRecording = "@recording";
constexpr const char* kDevice = "@device";

// A byte count of a "@device" line: decimal, below 2^63 (as every size aimdo takes).
std::size_t device_bytes(LogLine& line, const char* key) {
  const std::int64_t bytes = line.signed_decimal(key);
  if (bytes < 0) throw InvalidArgumentError(std::string(key) + "= is negative");
  return static_cast<std::size_t>(bytes);
}

// Reads a "@device" line's fields into `out`; its device ordinal.
int read_device(LogLine& line, DeviceProperties* out) {
  const int device = line.integer("dev");
  out->total_bytes = device_bytes(line, "total");
  out->granularity_bytes = device_bytes(line, "granularity");
  const int integrated = line.integer("integrated");
  if (integrated != 0 && integrated != 1) {
    throw InvalidArgumentError("integrated=" + std::to_string(integrated) + " is not 0 or 1");
  }
  out->integrated = integrated == 1;
  line.require_all_read();
  return device;
}

}  // namespace

LogHeader read_header(const std::string& log_text) {
  LogHeader header;
  for (const NumberedLine& numbered : split_log(log_text).lines) {
    const bool recording = numbered.text.rfind(kRecording, 0) == 0;
    const bool device = numbered.text.rfind(kDevice, 0) == 0;
    if (header.line_number == 0 ? !recording : !device) break;  // the header ends
    try {
      LogLine line = LogLine::parse(numbered.text);
      if (line.name() != (recording ? kRecording : kDevice)) break;
      if (recording) {
        header.backend = line.text("backend");
        line.require_all_read();
        header.line_number = numbered.number;
        header.line = numbered.text;
        continue;
      }
      DeviceProperties properties;
      if (read_device(line, &properties) != static_cast<int>(header.devices.size())) {
        throw InvalidArgumentError("a header lists its devices in order from 0");
      }
      header.devices.push_back(properties);
    } catch (const InvalidArgumentError& error) {
      throw replay_error(numbered.number, numbered.text, error.what());
    }
  }
  return header;
}

RecordingDriver::RecordingDriver(std::shared_ptr<Driver> upstream, std::shared_ptr<EventLog> log,
                                 AddressNaming naming)
    : DriverAdaptor(std::move(upstream)), log_(std::move(log)), naming_(std::move(naming)) {
  if (log_ == nullptr) throw InvalidArgumentError("a recording driver needs an event log");
}

void RecordingDriver::start() {
  std::call_once(header_written_, [this] {
    log_->append(LineText(kRecording).add("backend", upstream().backend_name()).str());
    int count = 0;
    if (!upstream().device_count(&count).ok()) return;
    for (int device = 0; device < count; ++device) {
      std::string line = device_line(device);
      if (line.empty()) return;  // devices in order from 0: stop at the first unknown
      log_->append(std::move(line));
    }
  });
  log_->set_recording(true);
}

std::string RecordingDriver::device_line(int device) {
  DeviceProperties properties;
  if (!upstream().device_properties(device, &properties).ok()) return "";
  return LineText(kDevice)
      .add("dev", device)
      .add("total", properties.total_bytes)
      .add("granularity", properties.granularity_bytes)
      .add("integrated", properties.integrated ? 1 : 0)
      .str();
}

DriverStatus RecordingDriver::intercept(Call& call) {
  const DriverStatus status = forward(call);
  if (log_->recording()) {
    if (info(call.operation).arguments.contains(Field::current)) {
      call.current = upstream().current_device();
    }
    log_->append(call_line(call, status, naming_));
  }
  return status;
}

bool RecordingDriver::replay_event(LogLine& line) {
  if (line.name() == kRecording) {
    line.text("backend");
    line.require_all_read();
    log_->append(LineText(kRecording).add("backend", upstream().backend_name()).str());
    return true;
  }
  if (line.name() != kDevice) return false;
  DeviceProperties logged;
  const int device = read_device(line, &logged);
  std::string replayed = device < 0 ? std::string() : device_line(device);
  if (replayed.empty()) {
    throw InvalidArgumentError("dev=" + std::to_string(device) +
                               " is not a device of the driver replayed on");
  }
  log_->append(std::move(replayed));
  return true;
}

}  // namespace aimdo::adaptors
