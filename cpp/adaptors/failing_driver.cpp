#include "failing_driver.hpp"

#include <utility>

#include "aimdo/errors.hpp"

namespace aimdo::adaptors {
namespace {

int device_count_of(Driver& driver) {
  int count = 0;
  return driver.device_count(&count).ok() && count > 0 ? count : 0;
}

void check_code(int code) {
  if (code == driver_code::success) {
    throw InvalidArgumentError("an injected failure needs a non-zero code");
  }
}

}  // namespace

FailingDriver::FailingDriver(std::shared_ptr<Driver> upstream, std::uint64_t seed,
                             std::shared_ptr<EventLog> events)
    : DriverAdaptor(std::move(upstream)),
      events_(std::move(events)),
      device_count_(device_count_of(this->upstream())),
      counts_(static_cast<std::size_t>(device_count_) + 1),
      rules_(seed) {}

DriverStatus FailingDriver::intercept(Call& call) {
  if (!process_.current()) return forward(call);
  const int device = routes_.device_of(call);
  const bool known = device >= 0 && device < device_count_;
  const std::size_t slot = known ? static_cast<std::size_t>(device) : counts_.size() - 1;
  counts_[slot][index_of(call.operation)].fetch_add(1, std::memory_order_relaxed);
  const DriverStatus injected = rules_.match(call.operation, known ? device : -1);
  if (!injected.ok()) return injected;
  const DriverStatus status = forward(call);
  routes_.learn(call, status);
  return status;
}

void FailingDriver::check_device(int device) const {
  if (device < -1 || device >= device_count_) {
    throw InvalidArgumentError("the driver has no device " + std::to_string(device) + " (it has " +
                               std::to_string(device_count_) + ")");
  }
}

void FailingDriver::note(std::string line) const {
  if (events_ != nullptr && events_->recording()) events_->append(std::move(line));
}

void FailingDriver::fail(const std::string& operation, int device, int code, std::uint64_t skip,
                         std::uint64_t count) {
  const Operation op = operation_named(operation);
  check_code(code);
  if (count == 0) throw InvalidArgumentError("count must be positive");
  check_device(device);
  rules_.add_count(op, device, code, skip, count);
  note(LineText("@fail")
           .add("op", operation)
           .add("dev", device)
           .add("code", code)
           .add("skip", skip)
           .add("count", count)
           .str());
}

void FailingDriver::fail_rate(const std::string& operation, int device, int code,
                              double probability) {
  const Operation op = operation_named(operation);
  check_code(code);
  if (!(probability > 0 && probability <= 1)) {
    throw InvalidArgumentError("probability must be in (0, 1]");
  }
  check_device(device);
  rules_.add_rate(op, device, code, probability);
  note(LineText("@fail_rate")
           .add("op", operation)
           .add("dev", device)
           .add("code", code)
           .add("p", probability_text(probability))
           .str());
}

void FailingDriver::clear_failures() {
  rules_.clear();
  note(LineText("@clear_failures").str());
}

std::uint64_t FailingDriver::call_count(const std::string& operation, int device) const {
  const std::size_t op = index_of(operation_named(operation));
  check_device(device);
  if (device >= 0) {
    return counts_[static_cast<std::size_t>(device)][op].load(std::memory_order_relaxed);
  }
  std::uint64_t total = 0;
  for (const Counts& counts : counts_) total += counts[op].load(std::memory_order_relaxed);
  return total;
}

bool FailingDriver::replay_event(LogLine& line) {
  if (line.name() == "@fail") {
    fail(line.text("op"), line.integer("dev"), line.integer("code"), line.unsigned_decimal("skip"),
         line.unsigned_decimal("count"));
  } else if (line.name() == "@fail_rate") {
    fail_rate(line.text("op"), line.integer("dev"), line.integer("code"), line.probability("p"));
  } else if (line.name() == "@clear_failures") {
    clear_failures();
  } else {
    return false;
  }
  return true;
}

}  // namespace aimdo::adaptors
