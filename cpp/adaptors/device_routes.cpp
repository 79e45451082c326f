#include "device_routes.hpp"

namespace aimdo::adaptors {

int DeviceRoutes::device_of(const Call& call) const {
  const FieldList& arguments = info(call.operation).arguments;
  if (arguments.contains(Field::device)) return call.device;
  std::lock_guard<std::mutex> lock(mutex_);
  if (arguments.contains(Field::handle)) {
    const auto found = handles_.find(call.handle);
    return found == handles_.end() ? -1 : found->second;
  }
  if (arguments.contains(Field::event)) {
    const auto found = events_.find(call.event);
    return found == events_.end() ? -1 : found->second;
  }
  if (arguments.contains(Field::address)) {
    auto range = reservations_.upper_bound(call.address);
    if (range == reservations_.begin()) return -1;
    --range;
    return call.address - range->first < range->second.first ? range->second.second : -1;
  }
  return -1;
}

void DeviceRoutes::learn(const Call& call, const DriverStatus& status) {
  if (!status.ok()) return;
  switch (call.operation) {
    case Operation::reserve_address_range: {
      std::lock_guard<std::mutex> lock(mutex_);
      reservations_[call.address] = {call.size_bytes, call.device};
      return;
    }
    case Operation::free_address_range: {
      std::lock_guard<std::mutex> lock(mutex_);
      reservations_.erase(call.address);
      return;
    }
    case Operation::create_physical: {
      std::lock_guard<std::mutex> lock(mutex_);
      handles_[call.handle] = call.device;
      return;
    }
    case Operation::release_physical: {
      std::lock_guard<std::mutex> lock(mutex_);
      handles_.erase(call.handle);
      return;
    }
    case Operation::event_create: {
      std::lock_guard<std::mutex> lock(mutex_);
      events_[call.event] = call.device;
      return;
    }
    case Operation::event_destroy: {
      std::lock_guard<std::mutex> lock(mutex_);
      events_.erase(call.event);
      return;
    }
    default: return;
  }
}

}  // namespace aimdo::adaptors
