// The operations on address space and physical memory, with the real driver's rules:
// reserve and free ranges, create and release physical allocations, map, unmap and set
// access. Each answers as the CUDA driver would (or stricter, where the comment says).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <new>

#include "aimdo/errors.hpp"
#include "sim_state.hpp"

namespace aimdo::sim {
namespace {

int device_of_handle(PhysicalHandle handle, std::size_t device_count) {
  const std::uint64_t encoded = handle >> kHandleDeviceShift;
  if (encoded == 0 || encoded > device_count) return -1;
  return static_cast<int>(encoded - 1);
}

// The reservation holding `va` and the offset of `va` in it, or null.
Reservation* find_reservation(DeviceState& d, DeviceAddress va, std::size_t* offset) {
  auto it = d.reservations.upper_bound(va);
  if (it == d.reservations.begin()) return nullptr;
  --it;
  if (va - it->first >= it->second.size_bytes) return nullptr;
  *offset = static_cast<std::size_t>(va - it->first);
  return &it->second;
}

// Every byte of [offset, offset + size) is mapped (with access set for the devices of
// `need_access`, a mask of access bits; 0: none asked).
bool covered(Reservation& r, std::size_t offset, std::size_t size_bytes, std::uint64_t need_access,
             std::vector<Mapping*>* out) {
  if (size_bytes == 0 || size_bytes > r.size_bytes - offset) return false;
  auto mapping = r.mappings.upper_bound(offset);
  if (mapping == r.mappings.begin()) return false;
  --mapping;
  std::size_t cursor = offset;
  while (cursor < offset + size_bytes) {
    if (mapping == r.mappings.end() || mapping->first > cursor ||
        mapping->first + mapping->second.size_bytes <= cursor ||
        (mapping->second.access & need_access) != need_access) {
      return false;
    }
    if (out != nullptr) out->push_back(&mapping->second);
    cursor = mapping->first + mapping->second.size_bytes;
    ++mapping;
  }
  return true;
}

// Whether [offset, offset + size) of `r` is free of mappings on either side (the real
// driver answers CUDA_ERROR_INVALID_VALUE to an overlapping map too).
bool overlaps_a_mapping(const Reservation& r, std::size_t offset, std::size_t size_bytes) {
  auto next = r.mappings.lower_bound(offset);
  if (next != r.mappings.end() && next->first < offset + size_bytes) return true;
  return next != r.mappings.begin() &&
         std::prev(next)->first + std::prev(next)->second.size_bytes > offset;
}

// Whether [va, va + size) lies inside one range adopted by the device (SimDriver::adopt).
bool adopted_covers(const DeviceState& d, DeviceAddress va, std::size_t size_bytes) {
  auto it = d.adopted.upper_bound(static_cast<std::uintptr_t>(va));
  if (it == d.adopted.begin()) return false;
  --it;
  const std::uintptr_t offset = static_cast<std::uintptr_t>(va) - it->first;
  return offset < it->second && size_bytes <= it->second - offset;
}

// Whether a copy on `device` may write [dst, dst + size): the device's own memory, mapped
// with access for it, or host memory it adopted (`d` is the device's state, locked).
bool writable(const AddressNaming& naming, DeviceState& d, int device, DeviceAddress dst,
              std::size_t size_bytes) {
  bool stream = false;
  std::size_t offset = 0;
  Reservation* reservation = find_reservation(d, dst, &offset);
  const bool mapped = naming.device_of(dst, &stream) == device && !stream &&
                      reservation != nullptr &&
                      covered(*reservation, offset, size_bytes, access_bit(device), nullptr);
  return mapped || adopted_covers(d, dst, size_bytes);
}

// Whether [ptr, ptr + bytes) meets any device's regions (`bytes` > 0, no overflow).
bool meets_a_region(const AddressNaming& naming, std::uintptr_t ptr, std::size_t bytes) {
  for (std::size_t i = 0; i < naming.device_count(); ++i) {
    const AddressRegions& regions = naming.regions(static_cast<int>(i));
    for (const DeviceAddress start : {regions.reservations, regions.streams}) {
      if (ptr < start + kRegionBytes && start < ptr + bytes) return true;
    }
  }
  return false;
}

}  // namespace

void SimDriver::adopt(int device, std::uintptr_t ptr, std::size_t bytes) {
  check_device(device, device_total());
  if (ptr == 0 || bytes == 0 || bytes > UINTPTR_MAX - ptr) {
    throw InvalidArgumentError("adopt needs a non-empty range of host memory");
  }
  if (meets_a_region(state_->naming, ptr, bytes)) {
    throw InvalidArgumentError("adopt takes host memory, not the simulator's own regions");
  }
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  auto next = d.adopted.lower_bound(ptr);
  const bool overlaps =
      (next != d.adopted.end() && next->first < ptr + bytes) ||
      (next != d.adopted.begin() && std::prev(next)->first + std::prev(next)->second > ptr);
  if (overlaps) throw InvalidArgumentError("that host memory is adopted already");
  d.adopted[ptr] = bytes;
}

void SimDriver::disown(int device, std::uintptr_t ptr) {
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  if (d.adopted.erase(ptr) == 0) {
    throw InvalidArgumentError("device " + std::to_string(device) +
                               " adopted no host memory starting there");
  }
}

DriverStatus SimDriver::reserve_address_range(int device, std::size_t size_bytes,
                                              std::size_t alignment_bytes, DeviceAddress* out) {
  return run(Operation::reserve_address_range, device, driver_code::invalid_device,
             [&](DeviceState& d, std::int64_t cost_ns) {
               const std::size_t granularity =
                   devices_[static_cast<std::size_t>(device)].granularity_bytes;
               if (size_bytes == 0 || size_bytes > kRegionBytes / 2 ||
                   !aligned(size_bytes, granularity) ||
                   (alignment_bytes != 0 && !aligned(alignment_bytes, granularity))) {
                 return failure(driver_code::invalid_value);
               }
               const DeviceAddress alignment = std::max(alignment_bytes, granularity);
               // First fit in the device's region, leaving one unreserved granule after each range
               // so that an overrun never lands in a neighbour.
               const DeviceAddress region = state_->naming.regions(device).reservations;
               DeviceAddress candidate = region;
               for (const auto& [start, reservation] : d.reservations) {
                 candidate = (candidate + alignment - 1) / alignment * alignment;
                 if (candidate + size_bytes + granularity <= start) break;
                 candidate = start + reservation.size_bytes + granularity;
               }
               candidate = (candidate + alignment - 1) / alignment * alignment;
               if (candidate + size_bytes > region + kRegionBytes)
                 return failure(driver_code::out_of_memory);
               d.reservations.emplace(candidate, Reservation{size_bytes, {}});
               *out = candidate;
               d.clock_ns += cost_ns;
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::free_address_range(DeviceAddress va, std::size_t size_bytes) {
  bool stream = false;
  const int device = state_->naming.device_of(va, &stream);
  return run(Operation::free_address_range, stream ? -1 : device, driver_code::invalid_value,
             [&](DeviceState& d, std::int64_t cost_ns) {
               auto it = d.reservations.find(va);
               if (it == d.reservations.end() || it->second.size_bytes != size_bytes ||
                   !it->second.mappings.empty()) {
                 return failure(driver_code::invalid_value);
               }
               // In real-bytes mode the range stays in the device's host reservation as it is: its
               // once-mapped pages read the trap pattern, so a Python view kept past the VBAR's
               // close reads garbage instead of crashing, and a later map there reports its writes.
               d.reservations.erase(it);
               d.clock_ns += cost_ns;
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::create_physical(int device, std::size_t size_bytes, PhysicalHandle* out) {
  return run(Operation::create_physical, device, driver_code::invalid_device,
             [&](DeviceState& d, std::int64_t cost_ns) {
               const SimDeviceSpec& spec = devices_[static_cast<std::size_t>(device)];
               if (size_bytes == 0 || !aligned(size_bytes, spec.granularity_bytes)) {
                 return failure(driver_code::invalid_value);
               }
               if (size_bytes > d.free_of(spec.total_bytes))
                 return failure(driver_code::out_of_memory);
               std::uint64_t host_id = 0;
               if (state_->host) {
                 try {
                   host_id = state_->host->create(size_bytes);
                 } catch (const std::exception&) {
                   return failure(driver_code::out_of_memory);  // the host could not back it
                 }
               }
               d.physical_bytes += size_bytes;
               const PhysicalHandle handle =
                   (static_cast<PhysicalHandle>(device + 1) << kHandleDeviceShift) |
                   d.next_handle++;
               d.physical.emplace(handle, Physical{size_bytes, host_id, 0, false});
               *out = handle;
               d.clock_ns += cost_ns;
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::release_physical(PhysicalHandle handle) {
  const int device = device_of_handle(handle, devices_.size());
  return run(Operation::release_physical, device, driver_code::invalid_handle,
             [&](DeviceState& d, std::int64_t cost_ns) {
               auto it = d.physical.find(handle);
               if (it == d.physical.end() || it->second.released)
                 return failure(driver_code::invalid_handle);
               d.clock_ns += cost_ns;
               // As on the real driver, memory released while mapped lives until its last unmap
               // (so does a closed memfd that is still mapped).
               if (state_->host) state_->host->release(it->second.host_id);
               if (it->second.map_count > 0) {
                 it->second.released = true;
               } else {
                 d.physical_bytes -= it->second.size_bytes;
                 d.physical.erase(it);
               }
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::map(DeviceAddress va, std::size_t size_bytes, PhysicalHandle handle) {
  const int device = device_of_handle(handle, devices_.size());
  return run(Operation::map, device, driver_code::invalid_handle,
             [&](DeviceState& d, std::int64_t cost_ns) {
               auto physical = d.physical.find(handle);
               if (physical == d.physical.end() || physical->second.released) {
                 return failure(driver_code::invalid_handle);
               }
               // Stricter than the driver: memory of one device is only mapped in a range reserved
               // for that device (aimdo never does otherwise).
               bool stream = false;
               if (state_->naming.device_of(va, &stream) != device || stream) {
                 return failure(driver_code::invalid_value);
               }
               const std::size_t granularity =
                   devices_[static_cast<std::size_t>(device)].granularity_bytes;
               std::size_t offset = 0;
               Reservation* reservation = find_reservation(d, va, &offset);
               if (reservation == nullptr || size_bytes == 0 || !aligned(offset, granularity) ||
                   !aligned(static_cast<std::size_t>(va), granularity) ||
                   size_bytes != physical->second.size_bytes ||
                   size_bytes > reservation->size_bytes - offset ||
                   overlaps_a_mapping(*reservation, offset, size_bytes)) {
                 return failure(driver_code::invalid_value);
               }
               if (state_->host) {
                 try {
                   state_->host->map(static_cast<std::uintptr_t>(va), size_bytes,
                                     physical->second.host_id);
                 } catch (const std::exception&) {
                   return failure(driver_code::out_of_memory);
                 }
               }
               reservation->mappings.emplace(offset, Mapping{size_bytes, handle, false});
               ++physical->second.map_count;
               d.clock_ns += cost_ns;
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::unmap(DeviceAddress va, std::size_t size_bytes) {
  bool stream = false;
  const int device = state_->naming.device_of(va, &stream);
  return run(Operation::unmap, stream ? -1 : device, driver_code::invalid_value,
             [&](DeviceState& d, std::int64_t cost_ns) {
               std::size_t offset = 0;
               Reservation* reservation = find_reservation(d, va, &offset);
               if (reservation == nullptr) return failure(driver_code::invalid_value);
               auto mapping = reservation->mappings.find(offset);
               // Stricter than the driver, which accepts a second unmap: that is always a bug here.
               if (mapping == reservation->mappings.end()) return failure(driver_code::not_mapped);
               if (mapping->second.size_bytes != size_bytes)
                 return failure(driver_code::invalid_value);
               if (state_->host) {
                 try {
                   state_->host->unmap(static_cast<std::uintptr_t>(va), size_bytes);
                 } catch (const std::exception&) {
                   return failure(driver_code::unknown);
                 }
               }
               auto physical = d.physical.find(mapping->second.handle);
               reservation->mappings.erase(mapping);
               d.clock_ns += cost_ns;
               if (physical != d.physical.end() && --physical->second.map_count == 0 &&
                   physical->second.released) {
                 d.physical_bytes -= physical->second.size_bytes;
                 d.physical.erase(physical);
               }
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::set_access(DeviceAddress va, std::size_t size_bytes, int device) {
  bool stream = false;
  const int owner = state_->naming.device_of(va, &stream);
  if (owner >= 0 && device != owner && !stream) {
    // Opening a device's memory to a peer: the owner's bookkeeping changes, under its lock.
    if (!state_->process.current()) return failure(driver_code::not_initialized);
    if (device < 0 || device >= device_total()) return failure(driver_code::invalid_device);
    if (!(peer(device, owner).bytes_per_s > 0)) return failure(driver_code::invalid_device);
  }
  return run(
      Operation::set_access, owner >= 0 && !stream ? owner : device, driver_code::invalid_device,
      [&](DeviceState& d, std::int64_t cost_ns) {
        if (owner < 0 || stream) return failure(driver_code::invalid_value);
        std::size_t offset = 0;
        Reservation* reservation = find_reservation(d, va, &offset);
        std::vector<Mapping*> mappings;
        // A peer is opened only what its owner has opened to itself (host memory is
        // behind it then, in real-bytes mode).
        const std::uint64_t need = device == owner ? 0 : access_bit(owner);
        if (reservation == nullptr || !covered(*reservation, offset, size_bytes, need, &mappings)) {
          return failure(driver_code::invalid_value);
        }
        if (state_->host && device == owner) {
          try {
            state_->host->set_access(static_cast<std::uintptr_t>(va), size_bytes);
          } catch (const std::exception&) {
            return failure(driver_code::out_of_memory);
          }
        }
        for (Mapping* m : mappings) m->access |= access_bit(device);
        d.clock_ns += cost_ns;
        return DriverStatus::success();
      });
}

bool SimDriver::is_accessible(DeviceAddress va, std::size_t size_bytes, int from) const {
  bool stream = false;
  const int device = state_->naming.device_of(va, &stream);
  if (device < 0 || stream) return false;
  if (from == -1) from = device;
  if (from < 0 || from >= device_total()) return false;
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  std::size_t offset = 0;
  Reservation* reservation = find_reservation(d, va, &offset);
  return reservation != nullptr &&
         covered(*reservation, offset, size_bytes, access_bit(from), nullptr);
}

SimPeerLink SimDriver::peer(int device, int owner) const noexcept {
  const auto& peers = options_.topology.peers;
  if (device == owner || peers.empty()) return {};
  return peers[static_cast<std::size_t>(device)][static_cast<std::size_t>(owner)];
}

DriverStatus SimDriver::peer_link(int device, int other, PeerLink* out) {
  if (!state_->process.current()) return failure(driver_code::not_initialized);
  if (device < 0 || device >= device_total() || other < 0 || other >= device_total()) {
    return failure(driver_code::invalid_device);
  }
  if (device == other) return failure(driver_code::invalid_device);
  const SimPeerLink link = peer(device, other);
  out->access = link.bytes_per_s > 0;
  out->performance_rank = out->access ? link.performance_rank : 0;
  out->native_atomics = out->access;
  return DriverStatus::success();
}

DriverStatus SimDriver::copy_async(int device, DeviceAddress dst, DeviceAddress src,
                                   std::size_t size_bytes, StreamHandle) {
  bool stream = false;
  const int owner = state_->naming.device_of(src, &stream);
  if (!state_->process.current()) return failure(driver_code::not_initialized);
  if (device < 0 || device >= device_total()) return failure(driver_code::invalid_device);
  if (size_bytes == 0 || owner < 0 || stream) return failure(driver_code::invalid_value);
  // The source, under its own device's lock only (never two devices' locks at once):
  // mapped and open to `device` (and so to its owner: host memory is behind it). With real
  // bytes they are read here, so a source unmapped after the call is never read.
  std::vector<unsigned char> bytes;
  {
    DeviceState& o = *state_->devices[static_cast<std::size_t>(owner)];
    std::lock_guard<std::mutex> lock(o.mutex);
    std::size_t offset = 0;
    Reservation* reservation = find_reservation(o, src, &offset);
    const std::uint64_t need = access_bit(device) | access_bit(owner);
    if (reservation == nullptr || !covered(*reservation, offset, size_bytes, need, nullptr)) {
      return failure(driver_code::invalid_value);
    }
    if (state_->host) {
      try {
        const auto* from = reinterpret_cast<const unsigned char*>(static_cast<std::uintptr_t>(src));
        bytes.assign(from, from + size_bytes);
      } catch (const std::bad_alloc&) {
        return failure(driver_code::out_of_memory);
      }
    }
  }
  const SimPeerLink link = peer(device, owner);
  return run(Operation::copy_async, device, driver_code::invalid_device,
             [&](DeviceState& d, std::int64_t cost_ns) {
               if (current_device() != device) return failure(driver_code::invalid_context);
               if (!writable(state_->naming, d, device, dst, size_bytes)) {
                 return failure(driver_code::invalid_value);
               }
               if (state_->host) {
                 std::memcpy(reinterpret_cast<void*>(static_cast<std::uintptr_t>(dst)),
                             bytes.data(), size_bytes);
               }
               // On the copy engine, after the work queued so far: over the peer link, or
               // (a copy within the device) at no more than its launch cost.
               std::int64_t transfer_ns = 0;
               if (owner != device) {
                 const double ns = static_cast<double>(size_bytes) / link.bytes_per_s * 1e9;
                 transfer_ns = ns < 9.2e18 ? saturating_sum_ns(link.latency_ns, std::llround(ns))
                                           : kEndOfTimeNs;
               }
               d.clock_ns += cost_ns;
               d.copy_engine_ns = std::max<std::int64_t>(d.copy_engine_ns, d.clock_ns);
               d.copy_engine_ns += transfer_ns;
               return DriverStatus::success();
             });
}

DriverStatus SimDriver::copy_from_host_async(int device, DeviceAddress dst, std::uintptr_t src,
                                             std::size_t size_bytes, StreamHandle) {
  return run(Operation::copy_from_host_async, device, driver_code::invalid_device,
             [&](DeviceState& d, std::int64_t cost_ns) {
               if (size_bytes == 0) return failure(driver_code::invalid_value);
               if (current_device() != device) return failure(driver_code::invalid_context);
               if (!writable(state_->naming, d, device, dst, size_bytes)) {
                 return failure(driver_code::invalid_value);
               }
               if (src == 0 || size_bytes > UINTPTR_MAX - src ||
                   meets_a_region(state_->naming, src, size_bytes)) {
                 return failure(driver_code::invalid_value);
               }
               // With real bytes the source is read now, under the device's lock: a caller
               // that changes it before the copy is done, wrong on a GPU, goes unnoticed
               // here. memmove: an adopted destination may overlap it.
               if (state_->host) {
                 std::memmove(reinterpret_cast<void*>(static_cast<std::uintptr_t>(dst)),
                              reinterpret_cast<const void*>(src), size_bytes);
               }
               d.clock_ns += cost_ns;
               queue_host_copy(device, d, size_bytes);
               return DriverStatus::success();
             });
}

}  // namespace aimdo::sim
