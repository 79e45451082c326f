// A Driver that wraps another (its upstream) and adds one concern, as RMM's resource
// adaptors wrap a memory resource: RecordingDriver writes the calls it sees into an event
// log, FailingDriver counts them and fails chosen ones. An adaptor wraps any Driver: the
// CUDA backend, the simulator, or another adaptor.
//
// Every operation of the table (operations.hpp) reaches the adaptor's one hook,
// intercept(), as a Call (call.hpp); the hook decides what to do around forward(), which
// makes the call on the upstream driver. What is not an operation (backend_name, device
// count and properties, peer links, the current device, restore_current, now_ns) goes
// straight to the upstream driver: an adaptor is transparent to it.
//
// Contract, as the Driver interface's: errors come back as values; sizes in bytes,
// addresses and handles those of the upstream driver (an adaptor never changes them); an
// output is written only when the call answers success. Thread-safety: every method may
// be called from any thread; each adaptor says which lock guards its own state, and none
// holds a lock across forward().
#pragma once

#include <cstdint>
#include <memory>

#include "aimdo/driver.hpp"
#include "call.hpp"

namespace aimdo::adaptors {

class DriverAdaptor : public Driver {
 public:
  // InvalidArgumentError when `upstream` is null.
  explicit DriverAdaptor(std::shared_ptr<Driver> upstream);

  Driver& upstream() const noexcept { return *upstream_; }
  const std::shared_ptr<Driver>& upstream_ptr() const noexcept { return upstream_; }

  // aimdo::Driver: the operations become Calls through intercept().
  DriverStatus memory_info(int device, std::size_t* free_bytes, std::size_t* total_bytes) final;
  DriverStatus reserve_address_range(int device, std::size_t size_bytes,
                                     std::size_t alignment_bytes, DeviceAddress* out) final;
  DriverStatus free_address_range(DeviceAddress va, std::size_t size_bytes) final;
  DriverStatus create_physical(int device, std::size_t size_bytes, PhysicalHandle* out) final;
  DriverStatus release_physical(PhysicalHandle handle) final;
  DriverStatus map(DeviceAddress va, std::size_t size_bytes, PhysicalHandle handle) final;
  DriverStatus unmap(DeviceAddress va, std::size_t size_bytes) final;
  DriverStatus set_access(DeviceAddress va, std::size_t size_bytes, int device) final;
  DriverStatus synchronize(int device) final;
  DriverStatus stream_alloc(int device, std::size_t size_bytes, StreamHandle stream,
                            DeviceAddress* out) final;
  DriverStatus stream_free(int device, DeviceAddress ptr, StreamHandle stream) final;
  DriverStatus make_current(int device, ContextToken* previous) final;
  DriverStatus copy_async(int device, DeviceAddress dst, DeviceAddress src, std::size_t size_bytes,
                          StreamHandle stream) final;
  DriverStatus copy_from_host_async(int device, DeviceAddress dst, std::uintptr_t src,
                                    std::size_t size_bytes, StreamHandle stream) final;
  DriverStatus event_create(int device, EventHandle* out) final;
  DriverStatus event_destroy(EventHandle event) final;
  DriverStatus event_record(int device, EventHandle event, StreamHandle stream) final;
  DriverStatus event_synchronize(EventHandle event) final;
  DriverStatus stream_wait_event(int device, StreamHandle stream, EventHandle event) final;

  // aimdo::Driver: the rest, straight to the upstream driver.
  const char* backend_name() const noexcept final { return upstream_->backend_name(); }
  DriverStatus device_count(int* count) final { return upstream_->device_count(count); }
  DriverStatus device_properties(int device, DeviceProperties* out) final {
    return upstream_->device_properties(device, out);
  }
  DriverStatus peer_link(int device, int peer, PeerLink* out) final {
    return upstream_->peer_link(device, peer, out);
  }
  int current_device() noexcept final { return upstream_->current_device(); }
  void restore_current(const ContextToken& previous) noexcept final {
    upstream_->restore_current(previous);
  }
  std::int64_t now_ns(int device) noexcept final { return upstream_->now_ns(device); }

 protected:
  // The adaptor's concern, around forward(call). Must answer as a driver would.
  virtual DriverStatus intercept(Call& call) = 0;
  // Makes `call` on the upstream driver, filling its outputs.
  DriverStatus forward(Call& call) { return invoke(*upstream_, call); }

 private:
  const std::shared_ptr<Driver> upstream_;
};

}  // namespace aimdo::adaptors
