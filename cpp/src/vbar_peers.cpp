// What a VBAR offers the other devices of a model offloaded to several (design.md §4.4):
// access to its pages for readers, and pins of resident pages without a fault.
#include <algorithm>
#include <string>

#include "aimdo/errors.hpp"
#include "aimdo/vbar.hpp"
#include "device_internal.hpp"
#include "driver_errors.hpp"

namespace aimdo {

void Vbar::share_with(int peer) {
  if (peer < 0 || peer == device()) {
    throw InvalidArgumentError("a VBAR on device " + std::to_string(device()) +
                               " cannot be shared with device " + std::to_string(peer));
  }
  Driver& driver = *device_->driver_ptr();
  // A reader the driver gives no access would make every later map of a page fail.
  PeerLink link;
  const DriverStatus asked = driver.peer_link(peer, device(), &link);
  if (!asked.ok()) {
    throw DriverError("peer_link(" + std::to_string(peer) + ", " + std::to_string(device()) +
                          ") failed with " + asked.name,
                      device(), "cuDeviceCanAccessPeer", asked);
  }
  if (!link.access) {
    throw InvalidArgumentError("device " + std::to_string(peer) + " cannot read device " +
                               std::to_string(device()) +
                               "'s memory (the driver gives no peer access)");
  }
  std::lock_guard<std::mutex> lock(device_->mutex());
  check_open_locked();
  if (std::find(readers_.begin(), readers_.end(), peer) != readers_.end()) return;
  for (std::size_t page = 0; page < pages_.size(); ++page) {
    if (pages_[page].handle == 0) continue;
    const DeviceAddress va = base_ + page * page_size_bytes_;
    const DriverStatus status = driver.set_access(va, page_size_bytes_, peer);
    if (!status.ok()) {
      throw DriverError("cuMemSetAccess for peer device " + std::to_string(peer) + " failed with " +
                            status.name + " (device " + std::to_string(device()) +
                            " cannot share its pages with it)",
                        device(), "cuMemSetAccess", status);
    }
  }
  readers_.push_back(peer);
}

std::vector<int> Vbar::readers() const {
  std::lock_guard<std::mutex> lock(device_->mutex());
  return readers_;
}

std::optional<Signature> Vbar::pin_resident(const Allocation& allocation) {
  check_owned(allocation);
  std::lock_guard<std::mutex> lock(device_->mutex());
  check_open_locked();
  AllocationRecord& record = allocations_[allocation.index];
  const std::size_t first = record.offset_bytes / page_size_bytes_;
  const std::size_t last = (record.offset_bytes + record.size_bytes - 1) / page_size_bytes_;
  for (std::size_t page = first; page <= last; ++page) {
    if (pages_[page].handle == 0) return std::nullopt;
  }
  Signature signature = pin_pages_locked(record, first, last);
  device_->check_invariants_locked();
  return signature;
}

}  // namespace aimdo
