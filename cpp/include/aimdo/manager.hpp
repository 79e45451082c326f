// The Manager owns a Driver and one Device per initialized device. There is no global
// state: several Managers (several simulators) can live in one process.
//
// Thread-safety: all methods may be called from any thread. A reader-writer lock
// guards only the table of devices (taken briefly to find a Device, never across an
// operation); each Device has its own lock for everything else.
#pragma once

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "aimdo/device.hpp"
#include "aimdo/driver.hpp"
#include "aimdo/options.hpp"
#include "aimdo/vbar.hpp"

namespace aimdo {

class Manager {
 public:
  explicit Manager(std::shared_ptr<Driver> driver);
  ~Manager();
  Manager(const Manager&) = delete;
  Manager& operator=(const Manager&) = delete;

  const std::shared_ptr<Driver>& driver_ptr() const noexcept { return driver_; }

  // Initialize each listed device with its options; a device already initialized gets
  // its options replaced. All or nothing: InvalidArgumentError for an ordinal the driver
  // does not have or options a device cannot take, and then nothing changed.
  void add_devices(const std::vector<std::pair<int, DeviceOptions>>& devices);
  void add_device(int device, const DeviceOptions& options) { add_devices({{device, options}}); }
  std::vector<int> devices() const;
  // DeviceNotInitializedError (naming the initialized devices and the fix) when absent.
  std::shared_ptr<Device> device(int device) const;

  std::shared_ptr<Vbar> create_vbar(int device, std::size_t size_bytes);
  std::size_t reclaim(int device, std::size_t size_bytes);
  // design.md §3.7 (see Device::external_alloc).
  DeviceAddress external_alloc(int device, std::size_t size_bytes, StreamHandle stream);
  // Free an external allocation, found by pointer whatever thread calls: the owning
  // device is looked up, never guessed. InvalidArgumentError for an unknown pointer.
  void external_free(DeviceAddress ptr, StreamHandle stream);
  // All devices when `device` is empty.
  void reset_floors(std::optional<int> device);

  // Close every VBAR on every device and free the external allocations; other calls raise
  // InvalidStateError afterwards. Throws the first driver failure after trying everything;
  // calling it again retries what is left, and does nothing once all is given back.
  void close();
  bool closed() const;

 private:
  void check_open() const;

  // Which device each external allocation belongs to, so that a free takes only its own
  // device's lock. Sharded by address; each shard's mutex is held only for the lookup.
  struct ExternalShard {
    std::mutex mutex;
    std::unordered_map<DeviceAddress, int> owner;
  };
  ExternalShard& external_shard(DeviceAddress ptr);
  std::array<ExternalShard, 16> external_owners_;

  std::shared_ptr<Driver> driver_;
  mutable std::shared_mutex devices_mutex_;
  std::map<int, std::shared_ptr<Device>> devices_;  // guarded by devices_mutex_
  bool closed_ = false;                             // guarded by devices_mutex_
};

}  // namespace aimdo
