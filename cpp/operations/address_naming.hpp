// How an event log writes an address. A simulator gives each device two fixed regions of
// address space, one for reservations and one for stream-ordered allocations, so an
// address names its device. Written relative to its region ("r0+0x200000" in device 0's
// reservations, "s1+0x0" in device 1's stream-ordered ones), the same calls log the same
// text in every run, wherever the regions lie (real-bytes mode takes them from the host's
// address space). A backend without such regions (the CUDA driver) has an empty naming:
// its addresses are written as 0x-hex, and replay translates them through the
// reservations and allocations they belong to (cpp/adaptors/replay.hpp).
//
// Thread-safety: immutable after construction; read from any thread.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "aimdo/driver.hpp"

namespace aimdo {

// Where one device's two regions start. Each is `region_bytes` long.
struct AddressRegions {
  DeviceAddress reservations = 0;
  DeviceAddress streams = 0;
};

class AddressNaming {
 public:
  // No regions: every address is written as 0x-hex.
  AddressNaming() = default;
  // Device d's regions are `devices[d]`, each `region_bytes` long, none overlapping.
  AddressNaming(std::vector<AddressRegions> devices, DeviceAddress region_bytes)
      : devices_(std::move(devices)), region_bytes_(region_bytes) {}

  std::size_t device_count() const noexcept { return devices_.size(); }
  DeviceAddress region_bytes() const noexcept { return region_bytes_; }
  const AddressRegions& regions(int device) const {
    return devices_[static_cast<std::size_t>(device)];
  }

  // The device whose regions hold `va`, setting `*stream` to whether it lies in the
  // stream-ordered one; -1 when none does.
  int device_of(DeviceAddress va, bool* stream) const noexcept;
  // "r<device>+0x<offset>", "s<device>+0x<offset>", or "0x<address>" outside every region.
  std::string name(DeviceAddress va) const;
  // True for text written relative to a region (it starts with 'r' or 's').
  static bool is_relative(const std::string& text) noexcept;
  // What name() wrote: a relative name with a device this naming has and an offset inside
  // the region, or "0x<address>". InvalidArgumentError naming `key` otherwise.
  DeviceAddress parse(const char* key, const std::string& text) const;

 private:
  std::vector<AddressRegions> devices_;
  DeviceAddress region_bytes_ = 0;
};

}  // namespace aimdo
