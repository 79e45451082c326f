// Internal to the files that implement Device (device.cpp, eviction.cpp, pages.cpp,
// closing.cpp): the retry templates every driver call of a device goes through.
#pragma once

#include "aimdo/device.hpp"

namespace aimdo {

template <class Call>
DriverStatus Device::retrying(Call&& call) {
  DriverStatus status = call();
  for (int attempt = 0;
       status.kind() == DriverErrorKind::transient && attempt < options_.transient_retries;
       ++attempt) {
    stats_.add(&DeviceStats::transient_retries);
    status = call();
  }
  return status;
}

template <class Call>
DriverStatus Device::retrying_twice(Call&& call) {
  DriverStatus status = retrying(call);
  if (!status.ok()) status = retrying(call);
  return status;
}

}  // namespace aimdo
