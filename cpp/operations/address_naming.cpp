#include "address_naming.hpp"

#include "aimdo/errors.hpp"
#include "log_line.hpp"

namespace aimdo {

int AddressNaming::device_of(DeviceAddress va, bool* stream) const noexcept {
  for (std::size_t d = 0; d < devices_.size(); ++d) {
    if (va >= devices_[d].reservations && va - devices_[d].reservations < region_bytes_) {
      *stream = false;
      return static_cast<int>(d);
    }
    if (va >= devices_[d].streams && va - devices_[d].streams < region_bytes_) {
      *stream = true;
      return static_cast<int>(d);
    }
  }
  return -1;
}

std::string AddressNaming::name(DeviceAddress va) const {
  bool stream = false;
  const int device = device_of(va, &stream);
  if (device < 0) return hex(va);
  const AddressRegions& region = regions(device);
  const DeviceAddress base = stream ? region.streams : region.reservations;
  return std::string(stream ? "s" : "r") + std::to_string(device) + "+" + hex(va - base);
}

bool AddressNaming::is_relative(const std::string& text) noexcept {
  return !text.empty() && (text[0] == 'r' || text[0] == 's');
}

DeviceAddress AddressNaming::parse(const char* key, const std::string& text) const {
  if (!is_relative(text)) return parse_number<DeviceAddress>(key, text, 16);
  const std::size_t plus = text.find('+');
  if (plus == std::string::npos) {
    throw InvalidArgumentError(std::string(key) + "=" + text + " is not an address");
  }
  const int device = parse_number<int>(key, text.substr(1, plus - 1), 10);
  if (device < 0 || static_cast<std::size_t>(device) >= devices_.size()) {
    throw InvalidArgumentError(std::string(key) + "=" + text + " names device " +
                               std::to_string(device) + "; the simulator has " +
                               std::to_string(devices_.size()));
  }
  const DeviceAddress offset = parse_number<DeviceAddress>(key, text.substr(plus + 1), 16);
  if (offset >= region_bytes_) {
    throw InvalidArgumentError(std::string(key) + "=" + text +
                               " lies past the end of the device's region");
  }
  const AddressRegions& region = regions(device);
  return (text[0] == 's' ? region.streams : region.reservations) + offset;
}

}  // namespace aimdo
