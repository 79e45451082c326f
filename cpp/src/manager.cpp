#include "aimdo/manager.hpp"

#include <cstdio>
#include <exception>
#include <mutex>
#include <utility>

#include "aimdo/errors.hpp"
#include "aimdo/process.hpp"
#include "driver_errors.hpp"
#include "first_failure.hpp"

namespace aimdo {
namespace {

std::string list_devices(const std::map<int, std::shared_ptr<Device>>& devices) {
  std::string out = "[";
  for (const auto& entry : devices) {
    if (out.size() > 1) out += ", ";
    out += std::to_string(entry.first);
  }
  return out + "]";
}

}  // namespace

Manager::Manager(std::shared_ptr<Driver> driver) : driver_(std::move(driver)) {
  if (!driver_) throw InvalidArgumentError("Manager needs a driver");
}

Manager::~Manager() {
  try {
    close();
  } catch (...) {
    // A destructor cannot report; the simulator's leak report shows what was lost.
  }
}

void Manager::check_open() const {
  if (closed_) throw InvalidStateError("this Manager is closed; create a new one");
}

void Manager::add_devices(const std::vector<std::pair<int, DeviceOptions>>& wanted) {
  std::unique_lock<std::shared_mutex> lock(devices_mutex_);
  check_open();
  int count = 0;
  DriverStatus status = driver_->device_count(&count);
  if (!status.ok()) detail::throw_driver_failure(status, -1, "cuDeviceGetCount", 0, "");
  // Check everything first, so that a bad entry changes nothing.
  std::vector<DeviceProperties> properties(wanted.size());
  for (std::size_t i = 0; i < wanted.size(); ++i) {
    const int device = wanted[i].first;
    if (device < 0 || device >= count) {
      throw InvalidArgumentError("device " + std::to_string(device) + " does not exist: the " +
                                 driver_->backend_name() + " backend has " + std::to_string(count) +
                                 " device(s), numbered from 0");
    }
    auto found = devices_.find(device);
    if (found != devices_.end()) {
      properties[i] = found->second->properties();
    } else {
      status = driver_->device_properties(device, &properties[i]);
      if (!status.ok()) {
        detail::throw_driver_failure(status, device, "cuDeviceGetAttribute", 0, "");
      }
    }
    Device::validate(device, properties[i], wanted[i].second);
  }
  for (std::size_t i = 0; i < wanted.size(); ++i) {
    const auto& [device, options] = wanted[i];
    auto found = devices_.find(device);
    if (found != devices_.end()) {
      found->second->set_options(options);
    } else {
      devices_.emplace(
          device, std::make_shared<Device>(driver_, device, std::move(properties[i]), options));
    }
  }
}

std::vector<int> Manager::devices() const {
  std::shared_lock<std::shared_mutex> lock(devices_mutex_);
  std::vector<int> out;
  out.reserve(devices_.size());
  for (const auto& entry : devices_) out.push_back(entry.first);
  return out;
}

std::shared_ptr<Device> Manager::device(int device) const {
  std::shared_lock<std::shared_mutex> lock(devices_mutex_);
  auto found = devices_.find(device);
  if (found == devices_.end()) {
    throw DeviceNotInitializedError(
        "device " + std::to_string(device) +
            " is not initialized in this Manager (initialized: " + list_devices(devices_) +
            "); list it when you create the Manager or call init, e.g. "
            "aimdo.init(devices=[..., " +
            std::to_string(device) + "]), or add it with Manager.add_devices([" +
            std::to_string(device) + "])",
        device);
  }
  return found->second;
}

std::shared_ptr<Vbar> Manager::create_vbar(int device, std::size_t size_bytes) {
  {
    std::shared_lock<std::shared_mutex> lock(devices_mutex_);
    check_open();
  }
  return this->device(device)->create_vbar(size_bytes);
}

std::size_t Manager::reclaim(int device, std::size_t size_bytes) {
  {
    std::shared_lock<std::shared_mutex> lock(devices_mutex_);
    check_open();
  }
  return this->device(device)->reclaim(size_bytes);
}

Manager::ExternalShard& Manager::external_shard(DeviceAddress ptr) {
  std::uint64_t h = ptr;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  return external_owners_[static_cast<std::size_t>(h % external_owners_.size())];
}

DeviceAddress Manager::external_alloc(int device, std::size_t size_bytes, StreamHandle stream) {
  {
    std::shared_lock<std::shared_mutex> lock(devices_mutex_);
    check_open();
  }
  auto owner = this->device(device);
  const DeviceAddress ptr = owner->external_alloc(size_bytes, stream);
  try {
    ExternalShard& shard = external_shard(ptr);
    std::lock_guard<std::mutex> lock(shard.mutex);
    shard.owner[ptr] = device;
  } catch (...) {
    owner->external_free(ptr, stream);
    throw;
  }
  return ptr;
}

void Manager::external_free(DeviceAddress ptr, StreamHandle stream) {
  int device = -1;
  {
    ExternalShard& shard = external_shard(ptr);
    std::lock_guard<std::mutex> lock(shard.mutex);
    auto found = shard.owner.find(ptr);
    if (found != shard.owner.end()) device = found->second;
  }
  // Only the owning device's lock is taken: a free never waits for another GPU.
  if (device < 0 || !this->device(device)->external_free(ptr, stream)) {
    char text[32];
    std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(ptr));
    throw InvalidArgumentError(std::string("external_free: ") + text +
                               " is not an allocation made by this Manager's external_alloc");
  }
  ExternalShard& shard = external_shard(ptr);
  std::lock_guard<std::mutex> lock(shard.mutex);
  shard.owner.erase(ptr);
}

void Manager::reset_floors(std::optional<int> device) {
  if (device) {
    this->device(*device)->reset_floors();
    return;
  }
  std::shared_lock<std::shared_mutex> lock(devices_mutex_);
  for (const auto& entry : devices_) entry.second->reset_floors();
}

void Manager::close() {
  std::map<int, std::shared_ptr<Device>> to_close;
  {
    // A second close retries what a failed one could not give back (Device::close).
    std::unique_lock<std::shared_mutex> lock(devices_mutex_);
    closed_ = true;
    to_close = devices_;
  }
  // Devices are closed one at a time, never holding two device locks.
  detail::FirstFailure failure;
  for (const auto& entry : to_close) failure.run([&] { entry.second->close(); });
  // Forget the pointers the devices freed; one whose free failed stays findable, so that
  // external_free (or the next close) can still give it back.
  for (auto& shard : external_owners_) {
    std::lock_guard<std::mutex> lock(shard.mutex);
    for (auto it = shard.owner.begin(); it != shard.owner.end();) {
      const auto owner = to_close.find(it->second);
      if (owner == to_close.end() || !owner->second->holds_external(it->first)) {
        it = shard.owner.erase(it);
      } else {
        ++it;
      }
    }
  }
  failure.rethrow();
}

bool Manager::closed() const {
  std::shared_lock<std::shared_mutex> lock(devices_mutex_);
  return closed_;
}

}  // namespace aimdo
