// The operations that need or change the calling thread's current context (free memory,
// synchronize, stream-ordered allocation, make_current), events (see "Streams and events"
// in sim_driver.hpp), the device queries, and the table of current contexts.
#include <functional>

#include "aimdo/errors.hpp"
#include "sim_state.hpp"

namespace aimdo::sim {

ContextTable::Shard& ContextTable::shard() {
  // libstdc++ hashes a thread id to its pthread_t, an aligned address: mix the bits, or
  // every thread would land in the same shard.
  std::uint64_t h = std::hash<std::thread::id>{}(std::this_thread::get_id());
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return shards_[static_cast<std::size_t>(h % shards_.size())];
}

int ContextTable::current() {
  Shard& s = shard();
  std::lock_guard<std::mutex> lock(s.mutex);
  const auto found = s.current.find(std::this_thread::get_id());
  return found == s.current.end() ? -1 : found->second;
}

void ContextTable::set(int device) {
  Shard& s = shard();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (device < 0) {
    s.current.erase(std::this_thread::get_id());
  } else {
    s.current[std::this_thread::get_id()] = device;
  }
}

DriverStatus SimDriver::device_count(int* count) {
  // Answered in a forked child too, as the CUDA backend answers it from the devices it
  // found at initialization without calling the driver.
  *count = device_total();
  return DriverStatus::success();
}

DriverStatus SimDriver::device_properties(int device, DeviceProperties* out) {
  // Not an operation of the table, but the CUDA backend asks the driver for these, which
  // refuses a forked child.
  if (!state_->process.current()) return failure(driver_code::not_initialized);
  if (device < 0 || device >= device_total()) return failure(driver_code::invalid_device);
  const SimDeviceSpec& spec = devices_[static_cast<std::size_t>(device)];
  out->name = spec.name;
  out->total_bytes = spec.total_bytes;
  out->granularity_bytes = spec.granularity_bytes;
  out->integrated = spec.integrated;
  return DriverStatus::success();
}

DriverStatus SimDriver::memory_info(int device, std::size_t* free_bytes, std::size_t* total_bytes) {
  return run(Operation::memory_info, device, driver_code::invalid_device,
             [&](DeviceState& d, std::int64_t cost_ns) {
               if (current_device() != device) return failure(driver_code::invalid_context);
               const std::size_t total = devices_[static_cast<std::size_t>(device)].total_bytes;
               *total_bytes = total;
               *free_bytes = d.free_of(total);
               d.clock_ns += cost_ns;
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::synchronize(int device) {
  return run(Operation::synchronize, device, driver_code::invalid_device,
             [&](DeviceState& d, std::int64_t cost_ns) {
               if (current_device() != device) return failure(driver_code::invalid_context);
               // The host waits for both engines; the device's clock moves past both.
               d.clock_ns = std::max(d.clock_ns, d.copy_engine_ns) + cost_ns;
               host_waits_until(d.clock_ns);
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::stream_alloc(int device, std::size_t size_bytes, StreamHandle,
                                     DeviceAddress* out) {
  return run(Operation::stream_alloc, device, driver_code::invalid_device,
             [&](DeviceState& d, std::int64_t cost_ns) {
               if (current_device() != device) return failure(driver_code::invalid_context);
               const std::size_t total = devices_[static_cast<std::size_t>(device)].total_bytes;
               if (size_bytes == 0 || size_bytes > kRegionBytes / 4) {
                 return failure(driver_code::invalid_value);
               }
               if (size_bytes > d.free_of(total)) return failure(driver_code::out_of_memory);
               const DeviceAddress region = state_->naming.regions(device).streams;
               const DeviceAddress padded = (size_bytes + 511) / 512 * 512 + 512;
               if (d.next_stream_va + padded > region + kRegionBytes)
                 d.next_stream_va = region;  // wrap
               while (d.streams.count(d.next_stream_va) != 0) d.next_stream_va += 512;
               const DeviceAddress va = d.next_stream_va;
               d.next_stream_va += padded;
               d.stream_bytes += size_bytes;
               d.streams.emplace(va, size_bytes);
               *out = va;
               d.clock_ns += cost_ns;
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::stream_free(int device, DeviceAddress ptr, StreamHandle) {
  return run(Operation::stream_free, device, driver_code::invalid_device,
             [&](DeviceState& d, std::int64_t cost_ns) {
               if (current_device() != device) return failure(driver_code::invalid_context);
               auto it = d.streams.find(ptr);
               if (it == d.streams.end()) return failure(driver_code::invalid_value);
               d.stream_bytes -= it->second;
               d.clock_ns += cost_ns;
               if (options_.free_delay_ns > 0) {
                 // Reusable only once the device's clock has passed the delay.
                 d.pending_frees.emplace_back(d.clock_ns + options_.free_delay_ns, it->second);
                 d.pending_bytes += it->second;
               }
               d.streams.erase(it);
               return DriverStatus::success();
             });
}

// --- events ----------------------------------------------------------------------------------

DriverStatus SimDriver::event_create(int device, EventHandle* out) {
  return run(Operation::event_create, device, driver_code::invalid_device,
             [&](DeviceState& d, std::int64_t cost_ns) {
               if (current_device() != device) return failure(driver_code::invalid_context);
               // The count must stay below the device bits of the handle.
               if (d.next_event >= (std::uint64_t{1} << kHandleDeviceShift)) {
                 return failure(driver_code::out_of_memory);
               }
               const EventHandle event = event_handle(device, d.next_event++);
               d.events.emplace(event, SimEvent{});
               *out = event;
               d.clock_ns += cost_ns;
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::event_destroy(EventHandle event) {
  const int device = device_of_event(event, devices_.size());
  return run(Operation::event_destroy, device, driver_code::invalid_handle,
             [&](DeviceState& d, std::int64_t cost_ns) {
               if (d.events.erase(event) == 0) return failure(driver_code::invalid_handle);
               d.clock_ns += cost_ns;
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::event_record(int device, EventHandle event, StreamHandle) {
  return run(Operation::event_record, device, driver_code::invalid_device,
             [&](DeviceState& d, std::int64_t cost_ns) {
               if (current_device() != device) return failure(driver_code::invalid_context);
               const auto found = d.events.find(event);
               if (found == d.events.end()) return failure(driver_code::invalid_handle);
               d.clock_ns += cost_ns;
               found->second.recorded = true;
               found->second.done_ns = std::max<std::int64_t>(d.clock_ns, d.copy_engine_ns);
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::event_synchronize(EventHandle event) {
  const int device = device_of_event(event, devices_.size());
  return run(Operation::event_synchronize, device, driver_code::invalid_handle,
             [&](DeviceState& d, std::int64_t cost_ns) {
               const auto found = d.events.find(event);
               if (found == d.events.end()) return failure(driver_code::invalid_handle);
               if (!found->second.recorded) {
                 d.clock_ns += cost_ns;  // nothing to wait for: the host goes on at once
                 return DriverStatus::success();
               }
               // The host waits for the recorded moment; the device's clock moves past it.
               d.clock_ns = std::max<std::int64_t>(d.clock_ns, found->second.done_ns) + cost_ns;
               host_waits_until(d.clock_ns);
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::stream_wait_event(int device, StreamHandle, EventHandle event) {
  const int owner = device_of_event(event, devices_.size());
  if (owner >= 0 && owner != device) {
    // Another device's event, looked up under its own device's lock only (never two
    // devices' locks at once), as copy_async reads its source.
    if (!state_->process.current()) return failure(driver_code::not_initialized);
    if (device < 0 || device >= device_total()) return failure(driver_code::invalid_device);
    const DeviceState& o = *state_->devices[static_cast<std::size_t>(owner)];
    std::lock_guard<std::mutex> lock(o.mutex);
    if (o.events.count(event) == 0) return failure(driver_code::invalid_handle);
  }
  return run(Operation::stream_wait_event, device, driver_code::invalid_device,
             [&](DeviceState& d, std::int64_t cost_ns) {
               if (current_device() != device) return failure(driver_code::invalid_context);
               if (owner < 0 || (owner == device && d.events.count(event) == 0)) {
                 return failure(driver_code::invalid_handle);
               }
               // Nothing to order: the device's later copies already start after all the
               // work queued so far, and another device's work is not waited for.
               d.clock_ns += cost_ns;
               return DriverStatus::success();
             });
}

int SimDriver::current_device() noexcept {
  if (!state_->process.current()) return -1;  // a forked child has no context
  return state_->contexts.current();
}

DriverStatus SimDriver::make_current(int device, ContextToken* previous) {
  return run(Operation::make_current, device, driver_code::invalid_device,
             [&](DeviceState&, std::int64_t) {
               const int current = state_->contexts.current();
               previous->device = current;
               previous->context = nullptr;
               previous->switched = current != device;
               if (previous->switched) state_->contexts.set(device);
               return DriverStatus::success();
             });
}

void SimDriver::restore_current(const ContextToken& previous) noexcept {
  if (previous.switched) state_->contexts.set(previous.device);
}

std::int64_t SimDriver::now_ns(int device) noexcept {
  if (device < 0 || device >= device_total()) return 0;
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  return d.clock_ns;
}

}  // namespace aimdo::sim
