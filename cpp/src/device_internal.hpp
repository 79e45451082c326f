// Internal to the files that implement Device (device.cpp, eviction.cpp, pages.cpp,
// closing.cpp): the retry templates every driver call of a device goes through.
#pragma once

#include "aimdo/device.hpp"

namespace aimdo {

template <class Call>
DriverStatus Device::retrying(Call&& call) {
  // Timed on the driver's clock: the host's on CUDA, the device's virtual one on the
  // simulator (docs/design.md §6.2b).
  const std::int64_t began = driver_->now_ns(ordinal_);
  DriverStatus status = call();
  std::uint64_t calls = 1;
  for (int attempt = 0;
       status.kind() == DriverErrorKind::transient && attempt < options_.transient_retries;
       ++attempt) {
    stats_.add(&DeviceStats::transient_retries);
    status = call();
    ++calls;
  }
  const std::int64_t spent = driver_->now_ns(ordinal_) - began;
  stats_.add(&DeviceStats::driver_calls, calls);
  if (spent > 0) stats_.add(&DeviceStats::driver_ns, static_cast<std::uint64_t>(spent));
  return status;
}

template <class Call>
DriverStatus Device::retrying_twice(Call&& call) {
  DriverStatus status = retrying(call);
  if (!status.ok()) status = retrying(call);
  return status;
}

}  // namespace aimdo
