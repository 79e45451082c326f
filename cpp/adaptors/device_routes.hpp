// Which device a driver call is for, told from the Driver interface alone: the device
// the call names; else (release_physical, map) the device of the physical allocation it
// names; else (event_destroy, event_synchronize) the device of the event it names; else
// (free_address_range, unmap) the device of the reservation it falls in. Allocations,
// events and reservations are learnt from the calls that made them (create_physical,
// event_create, reserve_address_range) and forgotten with the calls that gave them back,
// so what was made before an adaptor was put in place (an event PyTorch made, say), or
// was already given back, has no device (-1).
//
// Thread-safety: every method may be called from any thread. One mutex guards the
// tables, held for one lookup or update; calls that name their device take no lock.
#pragma once

#include <cstddef>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "aimdo/driver.hpp"
#include "call.hpp"

namespace aimdo::adaptors {

class DeviceRoutes {
 public:
  // The device `call` is for, or -1 when it cannot be told.
  int device_of(const Call& call) const;
  // Learns from (or forgets with) a call that answered `status`.
  void learn(const Call& call, const DriverStatus& status);

 private:
  mutable std::mutex mutex_;                                           // guards the tables
  std::map<DeviceAddress, std::pair<std::size_t, int>> reservations_;  // base: size, device
  std::unordered_map<PhysicalHandle, int> handles_;
  std::unordered_map<EventHandle, int> events_;
};

}  // namespace aimdo::adaptors
