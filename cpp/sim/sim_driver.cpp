#include "sim_driver.hpp"

#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include "aimdo/errors.hpp"

namespace aimdo::sim {
namespace {

const char* error_name(int code) noexcept {
  switch (code) {
    case driver_code::success: return "CUDA_SUCCESS";
    case driver_code::invalid_value: return "CUDA_ERROR_INVALID_VALUE";
    case driver_code::out_of_memory: return "CUDA_ERROR_OUT_OF_MEMORY";
    case driver_code::not_initialized: return "CUDA_ERROR_NOT_INITIALIZED";
    case driver_code::deinitialized: return "CUDA_ERROR_DEINITIALIZED";
    case driver_code::no_device: return "CUDA_ERROR_NO_DEVICE";
    case driver_code::invalid_device: return "CUDA_ERROR_INVALID_DEVICE";
    case driver_code::invalid_context: return "CUDA_ERROR_INVALID_CONTEXT";
    case driver_code::already_mapped: return "CUDA_ERROR_ALREADY_MAPPED";
    case driver_code::not_mapped: return "CUDA_ERROR_NOT_MAPPED";
    case driver_code::invalid_handle: return "CUDA_ERROR_INVALID_HANDLE";
    case driver_code::not_found: return "CUDA_ERROR_NOT_FOUND";
    case driver_code::not_ready: return "CUDA_ERROR_NOT_READY";
    case driver_code::illegal_address: return "CUDA_ERROR_ILLEGAL_ADDRESS";
    case driver_code::not_permitted: return "CUDA_ERROR_NOT_PERMITTED";
    case driver_code::not_supported: return "CUDA_ERROR_NOT_SUPPORTED";
    default: return "CUDA_ERROR_UNKNOWN";
  }
}

DriverStatus failure(int code) noexcept { return DriverStatus{code, error_name(code), false}; }

bool aligned(std::size_t value, std::size_t alignment) noexcept {
  return alignment != 0 && value % alignment == 0;
}

std::string hex(DeviceAddress va) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "0x%" PRIx64, static_cast<std::uint64_t>(va));
  return buffer;
}

}  // namespace

const std::vector<std::string>& SimDriver::operation_names() {
  static const std::vector<std::string> names = {
      "cuMemGetInfo", "cuMemAddressReserve", "cuMemAddressFree", "cuMemCreate",
      "cuMemRelease", "cuMemMap",            "cuMemUnmap",       "cuMemSetAccess",
      "cuCtxSynchronize", "cuMemAllocAsync", "cuMemFreeAsync",   "cuCtxSetCurrent"};
  return names;
}

SimDriver::SimDriver(std::vector<SimDeviceSpec> devices, std::uint64_t seed, SimCosts costs)
    : seed_(seed), costs_(costs) {
  if (devices.empty() || devices.size() > 64) {
    throw InvalidArgumentError("a simulator needs between 1 and 64 devices, got " +
                               std::to_string(devices.size()));
  }
  for (std::size_t i = 0; i < devices.size(); ++i) {
    const SimDeviceSpec& spec = devices[i];
    const std::size_t g = spec.granularity_bytes;
    if (spec.total_bytes == 0) {
      throw InvalidArgumentError("simulated device " + std::to_string(i) +
                                 " needs a positive capacity");
    }
    if (g < 4096 || (g & (g - 1)) != 0) {
      throw InvalidArgumentError("simulated device " + std::to_string(i) +
                                 ": granularity must be a power of two of at least 4 KiB, got " +
                                 std::to_string(g));
    }
    DeviceState state;
    state.spec = spec;
    devices_.push_back(state);
  }
}

void SimDriver::check_device(int device) const {
  if (!valid_device(device)) {
    throw InvalidArgumentError("the simulator has no device " + std::to_string(device) + " (it has " +
                               std::to_string(devices_.size()) + ")");
  }
}

DriverStatus SimDriver::intercept(const char* operation, int device) {
  ++call_counts_[operation];
  for (auto it = rules_.begin(); it != rules_.end(); ++it) {
    if (it->operation != operation || (it->device != -1 && it->device != device)) continue;
    if (it->skip > 0) {
      --it->skip;
      continue;
    }
    DriverStatus status = failure(it->code);
    status.injected = true;
    if (--it->count == 0) rules_.erase(it);
    return status;
  }
  return DriverStatus::success();
}

void SimDriver::charge(int device, std::int64_t ns) {
  if (valid_device(device)) devices_[static_cast<std::size_t>(device)].clock_ns += ns;
}

int SimDriver::current_device_locked() const {
  auto found = current_.find(std::this_thread::get_id());
  return found == current_.end() ? -1 : found->second;
}

SimDriver::Reservation* SimDriver::find_reservation(DeviceAddress va, std::size_t* offset) {
  auto it = reservations_.upper_bound(va);
  if (it == reservations_.begin()) return nullptr;
  --it;
  if (va - it->first >= it->second.size_bytes) return nullptr;
  *offset = static_cast<std::size_t>(va - it->first);
  return &it->second;
}

const SimDriver::Reservation* SimDriver::find_reservation(DeviceAddress va,
                                                          std::size_t* offset) const {
  return const_cast<SimDriver*>(this)->find_reservation(va, offset);
}

void SimDriver::free_physical_locked(std::map<PhysicalHandle, Physical>::iterator it) {
  devices_[static_cast<std::size_t>(it->second.device)].physical_bytes -= it->second.size_bytes;
  physical_.erase(it);
}

DriverStatus SimDriver::device_count(int* count) {
  *count = static_cast<int>(devices_.size());
  return DriverStatus::success();
}

DriverStatus SimDriver::device_properties(int device, DeviceProperties* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!valid_device(device)) return failure(driver_code::invalid_device);
  const SimDeviceSpec& spec = devices_[static_cast<std::size_t>(device)].spec;
  out->name = spec.name;
  out->total_bytes = spec.total_bytes;
  out->granularity_bytes = spec.granularity_bytes;
  out->integrated = spec.integrated;
  return DriverStatus::success();
}

DriverStatus SimDriver::memory_info(int device, std::size_t* free_bytes, std::size_t* total_bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  DriverStatus status = intercept("cuMemGetInfo", device);
  if (!status.ok()) return status;
  if (!valid_device(device)) return failure(driver_code::invalid_device);
  if (current_device_locked() != device) return failure(driver_code::invalid_context);
  const DeviceState& state = devices_[static_cast<std::size_t>(device)];
  const std::size_t used = state.physical_bytes + state.stream_bytes + state.external_bytes;
  *total_bytes = state.spec.total_bytes;
  *free_bytes = used >= state.spec.total_bytes ? 0 : state.spec.total_bytes - used;
  charge(device, costs_.memory_info_ns);
  return DriverStatus::success();
}

DriverStatus SimDriver::reserve_address_range(int device, std::size_t size_bytes,
                                              std::size_t alignment_bytes, DeviceAddress* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  DriverStatus status = intercept("cuMemAddressReserve", device);
  if (!status.ok()) return status;
  if (!valid_device(device)) return failure(driver_code::invalid_device);
  const std::size_t granularity = devices_[static_cast<std::size_t>(device)].spec.granularity_bytes;
  if (size_bytes == 0 || !aligned(size_bytes, granularity) ||
      (alignment_bytes != 0 && !aligned(alignment_bytes, granularity))) {
    return failure(driver_code::invalid_value);
  }
  const std::size_t alignment = std::max(alignment_bytes, granularity);
  const DeviceAddress va = (next_va_ + alignment - 1) / alignment * alignment;
  // Leave an unreserved gap after each range so an overrun cannot land in a neighbour.
  next_va_ = va + size_bytes + granularity;
  reservations_.emplace(va, Reservation{device, size_bytes, {}});
  *out = va;
  charge(device, costs_.reserve_ns);
  return DriverStatus::success();
}

DriverStatus SimDriver::free_address_range(DeviceAddress va, std::size_t size_bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = reservations_.find(va);
  DriverStatus status = intercept("cuMemAddressFree", it == reservations_.end() ? -1 : it->second.device);
  if (!status.ok()) return status;
  if (it == reservations_.end() || it->second.size_bytes != size_bytes) {
    return failure(driver_code::invalid_value);
  }
  if (!it->second.mappings.empty()) return failure(driver_code::invalid_value);
  const int device = it->second.device;
  reservations_.erase(it);
  charge(device, costs_.free_range_ns);
  return DriverStatus::success();
}

DriverStatus SimDriver::create_physical(int device, std::size_t size_bytes, PhysicalHandle* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  DriverStatus status = intercept("cuMemCreate", device);
  if (!status.ok()) return status;
  if (!valid_device(device)) return failure(driver_code::invalid_device);
  DeviceState& state = devices_[static_cast<std::size_t>(device)];
  if (size_bytes == 0 || !aligned(size_bytes, state.spec.granularity_bytes)) {
    return failure(driver_code::invalid_value);
  }
  const std::size_t used = state.physical_bytes + state.stream_bytes + state.external_bytes;
  if (used > state.spec.total_bytes || size_bytes > state.spec.total_bytes - used) {
    return failure(driver_code::out_of_memory);
  }
  state.physical_bytes += size_bytes;
  const PhysicalHandle handle = next_handle_++;
  physical_.emplace(handle, Physical{device, size_bytes, 0, false});
  *out = handle;
  charge(device, costs_.create_physical_ns);
  return DriverStatus::success();
}

DriverStatus SimDriver::release_physical(PhysicalHandle handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = physical_.find(handle);
  const int device = it == physical_.end() ? -1 : it->second.device;
  DriverStatus status = intercept("cuMemRelease", device);
  if (!status.ok()) return status;
  if (it == physical_.end() || it->second.released) return failure(driver_code::invalid_handle);
  charge(device, costs_.release_physical_ns);
  // As on the real driver, memory released while mapped lives until its last unmap.
  if (it->second.map_count > 0) {
    it->second.released = true;
  } else {
    free_physical_locked(it);
  }
  return DriverStatus::success();
}

DriverStatus SimDriver::map(DeviceAddress va, std::size_t size_bytes, PhysicalHandle handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::size_t offset = 0;
  Reservation* reservation = find_reservation(va, &offset);
  auto physical = physical_.find(handle);
  DriverStatus status =
      intercept("cuMemMap", physical == physical_.end() ? -1 : physical->second.device);
  if (!status.ok()) return status;
  if (physical == physical_.end() || physical->second.released) {
    return failure(driver_code::invalid_handle);
  }
  const std::size_t granularity =
      devices_[static_cast<std::size_t>(physical->second.device)].spec.granularity_bytes;
  if (reservation == nullptr || size_bytes == 0 || !aligned(offset, granularity) ||
      !aligned(static_cast<std::size_t>(va), granularity) ||
      size_bytes != physical->second.size_bytes ||
      size_bytes > reservation->size_bytes - offset) {
    return failure(driver_code::invalid_value);
  }
  // No overlap with an existing mapping on either side.
  auto next = reservation->mappings.lower_bound(offset);
  if (next != reservation->mappings.end() && next->first < offset + size_bytes) {
    return failure(driver_code::invalid_value);  // what the real driver answers
  }
  if (next != reservation->mappings.begin()) {
    auto previous = std::prev(next);
    if (previous->first + previous->second.size_bytes > offset) {
      return failure(driver_code::invalid_value);  // what the real driver answers
    }
  }
  reservation->mappings.emplace(offset, Mapping{size_bytes, handle, false});
  ++physical->second.map_count;
  charge(physical->second.device, costs_.map_ns);
  return DriverStatus::success();
}

DriverStatus SimDriver::unmap(DeviceAddress va, std::size_t size_bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::size_t offset = 0;
  Reservation* reservation = find_reservation(va, &offset);
  DriverStatus status = intercept("cuMemUnmap", reservation ? reservation->device : -1);
  if (!status.ok()) return status;
  if (reservation == nullptr) return failure(driver_code::invalid_value);
  auto mapping = reservation->mappings.find(offset);
  if (mapping == reservation->mappings.end()) return failure(driver_code::not_mapped);
  if (mapping->second.size_bytes != size_bytes) return failure(driver_code::invalid_value);
  auto physical = physical_.find(mapping->second.handle);
  reservation->mappings.erase(mapping);
  if (physical != physical_.end()) {
    charge(physical->second.device, costs_.unmap_ns);
    if (--physical->second.map_count == 0 && physical->second.released) {
      free_physical_locked(physical);
    }
  }
  return DriverStatus::success();
}

DriverStatus SimDriver::set_access(DeviceAddress va, std::size_t size_bytes, int device) {
  std::lock_guard<std::mutex> lock(mutex_);
  DriverStatus status = intercept("cuMemSetAccess", device);
  if (!status.ok()) return status;
  if (!valid_device(device)) return failure(driver_code::invalid_device);
  std::size_t offset = 0;
  Reservation* reservation = find_reservation(va, &offset);
  if (reservation == nullptr || size_bytes == 0 || size_bytes > reservation->size_bytes - offset) {
    return failure(driver_code::invalid_value);
  }
  // Every byte of the range must be mapped.
  std::size_t cursor = offset;
  auto mapping = reservation->mappings.upper_bound(offset);
  if (mapping == reservation->mappings.begin()) return failure(driver_code::invalid_value);
  --mapping;
  std::vector<Mapping*> covered;
  while (cursor < offset + size_bytes) {
    if (mapping == reservation->mappings.end() || mapping->first > cursor ||
        mapping->first + mapping->second.size_bytes <= cursor) {
      return failure(driver_code::invalid_value);
    }
    covered.push_back(&mapping->second);
    cursor = mapping->first + mapping->second.size_bytes;
    ++mapping;
  }
  for (Mapping* m : covered) m->access = true;
  charge(device, costs_.set_access_ns);
  return DriverStatus::success();
}

DriverStatus SimDriver::synchronize(int device) {
  std::lock_guard<std::mutex> lock(mutex_);
  DriverStatus status = intercept("cuCtxSynchronize", device);
  if (!status.ok()) return status;
  if (!valid_device(device)) return failure(driver_code::invalid_device);
  if (current_device_locked() != device) return failure(driver_code::invalid_context);
  charge(device, costs_.synchronize_ns);
  return DriverStatus::success();
}

DriverStatus SimDriver::stream_alloc(int device, std::size_t size_bytes, StreamHandle,
                                     DeviceAddress* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  DriverStatus status = intercept("cuMemAllocAsync", device);
  if (!status.ok()) return status;
  if (!valid_device(device)) return failure(driver_code::invalid_device);
  if (current_device_locked() != device) return failure(driver_code::invalid_context);
  if (size_bytes == 0) return failure(driver_code::invalid_value);
  DeviceState& state = devices_[static_cast<std::size_t>(device)];
  const std::size_t used = state.physical_bytes + state.stream_bytes + state.external_bytes;
  if (used > state.spec.total_bytes || size_bytes > state.spec.total_bytes - used) {
    return failure(driver_code::out_of_memory);
  }
  state.stream_bytes += size_bytes;
  const DeviceAddress va = next_stream_va_;
  next_stream_va_ += (size_bytes + 511) / 512 * 512 + 512;
  stream_allocations_.emplace(va, StreamAllocation{device, size_bytes});
  *out = va;
  charge(device, costs_.stream_alloc_ns);
  return DriverStatus::success();
}

DriverStatus SimDriver::stream_free(int device, DeviceAddress ptr, StreamHandle) {
  std::lock_guard<std::mutex> lock(mutex_);
  DriverStatus status = intercept("cuMemFreeAsync", device);
  if (!status.ok()) return status;
  if (!valid_device(device)) return failure(driver_code::invalid_device);
  if (current_device_locked() != device) return failure(driver_code::invalid_context);
  auto it = stream_allocations_.find(ptr);
  if (it == stream_allocations_.end() || it->second.device != device) {
    return failure(driver_code::invalid_value);
  }
  devices_[static_cast<std::size_t>(device)].stream_bytes -= it->second.size_bytes;
  stream_allocations_.erase(it);
  charge(device, costs_.stream_free_ns);
  return DriverStatus::success();
}

int SimDriver::current_device() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  return current_device_locked();
}

DriverStatus SimDriver::make_current(int device, ContextToken* previous) {
  std::lock_guard<std::mutex> lock(mutex_);
  DriverStatus status = intercept("cuCtxSetCurrent", device);
  if (!status.ok()) return status;
  if (!valid_device(device)) return failure(driver_code::invalid_device);
  const int current = current_device_locked();
  previous->device = current;
  previous->context = nullptr;
  previous->switched = current != device;
  if (previous->switched) current_[std::this_thread::get_id()] = device;
  return DriverStatus::success();
}

void SimDriver::restore_current(const ContextToken& previous) noexcept {
  if (!previous.switched) return;
  std::lock_guard<std::mutex> lock(mutex_);
  if (previous.device < 0) {
    current_.erase(std::this_thread::get_id());
  } else {
    current_[std::this_thread::get_id()] = previous.device;
  }
}

std::int64_t SimDriver::now_ns(int device) noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  return valid_device(device) ? devices_[static_cast<std::size_t>(device)].clock_ns : 0;
}

void SimDriver::add_external_usage(int device, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_device(device);
  DeviceState& state = devices_[static_cast<std::size_t>(device)];
  const std::size_t used = state.physical_bytes + state.stream_bytes + state.external_bytes;
  const std::size_t free_bytes = used >= state.spec.total_bytes ? 0 : state.spec.total_bytes - used;
  if (bytes > free_bytes) {
    throw InvalidArgumentError("device " + std::to_string(device) + " has only " +
                               std::to_string(free_bytes) + " bytes free; cannot add " +
                               std::to_string(bytes) + " bytes of external usage");
  }
  state.external_bytes += bytes;
}

void SimDriver::remove_external_usage(int device, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_device(device);
  DeviceState& state = devices_[static_cast<std::size_t>(device)];
  if (bytes > state.external_bytes) {
    throw InvalidArgumentError("device " + std::to_string(device) + " has only " +
                               std::to_string(state.external_bytes) +
                               " bytes of external usage; cannot remove " + std::to_string(bytes));
  }
  state.external_bytes -= bytes;
}

std::size_t SimDriver::external_usage(int device) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_device(device);
  return devices_[static_cast<std::size_t>(device)].external_bytes;
}

std::size_t SimDriver::physical_bytes(int device) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_device(device);
  return devices_[static_cast<std::size_t>(device)].physical_bytes;
}

std::size_t SimDriver::used_bytes(int device) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_device(device);
  const DeviceState& state = devices_[static_cast<std::size_t>(device)];
  return state.physical_bytes + state.stream_bytes + state.external_bytes;
}

bool SimDriver::is_accessible(DeviceAddress va, std::size_t size_bytes) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::size_t offset = 0;
  const Reservation* reservation = find_reservation(va, &offset);
  if (reservation == nullptr || size_bytes == 0 || size_bytes > reservation->size_bytes - offset) {
    return false;
  }
  std::size_t cursor = offset;
  auto mapping = reservation->mappings.upper_bound(offset);
  if (mapping == reservation->mappings.begin()) return false;
  --mapping;
  while (cursor < offset + size_bytes) {
    if (mapping == reservation->mappings.end() || mapping->first > cursor ||
        mapping->first + mapping->second.size_bytes <= cursor || !mapping->second.access) {
      return false;
    }
    cursor = mapping->first + mapping->second.size_bytes;
    ++mapping;
  }
  return true;
}

void SimDriver::fail(const std::string& operation, int device, int code, std::uint64_t skip,
                     std::uint64_t count) {
  const auto& names = operation_names();
  if (std::find(names.begin(), names.end(), operation) == names.end()) {
    std::string known;
    for (const auto& name : names) known += (known.empty() ? "" : ", ") + name;
    throw InvalidArgumentError("unknown driver operation '" + operation + "'; known: " + known);
  }
  if (code == driver_code::success) throw InvalidArgumentError("an injected failure needs a non-zero code");
  if (count == 0) throw InvalidArgumentError("count must be positive");
  std::lock_guard<std::mutex> lock(mutex_);
  if (device != -1) check_device(device);
  rules_.push_back(FailureRule{operation, device, code, skip, count});
}

void SimDriver::clear_failures() {
  std::lock_guard<std::mutex> lock(mutex_);
  rules_.clear();
}

std::uint64_t SimDriver::call_count(const std::string& operation) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = call_counts_.find(operation);
  return found == call_counts_.end() ? 0 : found->second;
}

void SimDriver::advance(int device, std::int64_t ns) {
  if (ns < 0) throw InvalidArgumentError("time only moves forward");
  std::lock_guard<std::mutex> lock(mutex_);
  if (device == -1) {
    for (auto& state : devices_) state.clock_ns += ns;
    return;
  }
  check_device(device);
  devices_[static_cast<std::size_t>(device)].clock_ns += ns;
}

std::vector<std::string> SimDriver::leaks() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::string> out;
  for (const auto& [va, reservation] : reservations_) {
    out.push_back("device " + std::to_string(reservation.device) + ": address reservation of " +
                  std::to_string(reservation.size_bytes) + " bytes at " + hex(va));
    for (const auto& [offset, mapping] : reservation.mappings) {
      out.push_back("device " + std::to_string(reservation.device) + ": mapping of " +
                    std::to_string(mapping.size_bytes) + " bytes at " + hex(va + offset) +
                    " (physical allocation #" + std::to_string(mapping.handle) + ")");
    }
  }
  for (const auto& [handle, physical] : physical_) {
    out.push_back("device " + std::to_string(physical.device) + ": physical allocation #" +
                  std::to_string(handle) + " of " + std::to_string(physical.size_bytes) +
                  " bytes" + (physical.released ? " (released but still mapped)" : ""));
  }
  for (const auto& [va, allocation] : stream_allocations_) {
    out.push_back("device " + std::to_string(allocation.device) + ": stream-ordered allocation of " +
                  std::to_string(allocation.size_bytes) + " bytes at " + hex(va));
  }
  return out;
}

}  // namespace aimdo::sim
