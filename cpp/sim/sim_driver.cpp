// Construction, the devices' memory as the simulator's powers see it, leaks, real bytes,
// fork() and held calls. The operations are in memory_operations.cpp and
// context_operations.cpp, time in engines.cpp, events in sim_events.cpp.
#include <cmath>
#include <system_error>

#include "aimdo/errors.hpp"
#include "sim_state.hpp"

namespace aimdo::sim {
namespace {

// Synthetic regions start here, two per device, one after the other.
constexpr DeviceAddress kAddressBase = DeviceAddress{1} << 44;

DeviceAddress synthetic_region(std::size_t device) {
  return kAddressBase + static_cast<DeviceAddress>(device) * 2 * kRegionBytes;
}

void check_options(const SimOptions& options) {
  if (options.free_delay_ns < 0) throw InvalidArgumentError("free_delay must not be negative");
  // Clocks only move forward: a negative cost would move one back (and break the
  // end-of-time arithmetic, which assumes amounts are not negative).
  for (const std::int64_t cost_ns : options.costs.ns) {
    if (cost_ns < 0) throw InvalidArgumentError("a simulated cost must not be negative");
  }
}

void check_specs(const std::vector<SimDeviceSpec>& devices) {
  if (devices.empty() || devices.size() > 64) {
    throw InvalidArgumentError("a simulator needs between 1 and 64 devices, got " +
                               std::to_string(devices.size()));
  }
  for (std::size_t i = 0; i < devices.size(); ++i) {
    const SimDeviceSpec& spec = devices[i];
    const std::string which = "simulated device " + std::to_string(i);
    const std::size_t g = spec.granularity_bytes;
    if (spec.total_bytes == 0) throw InvalidArgumentError(which + " needs a positive capacity");
    if (g < 4096 || (g & (g - 1)) != 0) {
      throw InvalidArgumentError(which +
                                 ": granularity must be a power of two of at least "
                                 "4 KiB, got " +
                                 std::to_string(g));
    }
    const double bandwidth = spec.host_to_device_bytes_per_s;
    if (!(bandwidth > 0) || !std::isfinite(bandwidth)) {
      throw InvalidArgumentError(which + ": host-to-device bandwidth must be positive and finite");
    }
  }
}

void check_topology(const SimTopology& topology, std::size_t devices) {
  if (topology.host_latency_ns < 0) {
    throw InvalidArgumentError("the host link's latency must not be negative");
  }
  if (!topology.host_links.empty()) {
    if (topology.host_links.size() != devices) {
      throw InvalidArgumentError("host_links names " + std::to_string(topology.host_links.size()) +
                                 " devices' links; the simulator has " + std::to_string(devices));
    }
    for (const int link : topology.host_links) {
      if (link < 0 || static_cast<std::size_t>(link) >= devices) {
        throw InvalidArgumentError("a host link is numbered from 0 to the device count - 1, got " +
                                   std::to_string(link));
      }
    }
  }
  if (topology.peers.empty()) return;
  if (topology.peers.size() != devices) {
    throw InvalidArgumentError("the peer link matrix has " + std::to_string(topology.peers.size()) +
                               " rows; the simulator has " + std::to_string(devices) + " devices");
  }
  for (std::size_t i = 0; i < devices; ++i) {
    if (topology.peers[i].size() != devices) {
      throw InvalidArgumentError("row " + std::to_string(i) + " of the peer link matrix has " +
                                 std::to_string(topology.peers[i].size()) + " entries, not " +
                                 std::to_string(devices));
    }
    for (std::size_t j = 0; j < devices; ++j) {
      const SimPeerLink& link = topology.peers[i][j];
      const std::string which =
          "the link from device " + std::to_string(i) + " to device " + std::to_string(j);
      if (!(link.bytes_per_s >= 0) || !std::isfinite(link.bytes_per_s)) {
        throw InvalidArgumentError(which + ": bandwidth must be finite and not negative");
      }
      if (link.latency_ns < 0) throw InvalidArgumentError(which + ": latency must not be negative");
      if (i == j && link.bytes_per_s > 0) {
        throw InvalidArgumentError(which + ": a device is not its own peer");
      }
    }
  }
}

}  // namespace

void check_device(int device, int total) {
  if (device < 0 || device >= total) {
    throw InvalidArgumentError("the simulator has no device " + std::to_string(device) +
                               " (it has " + std::to_string(total) + ")");
  }
}

std::array<std::int64_t, kOperationCount> SimCosts::defaults() noexcept {
  std::array<std::int64_t, kOperationCount> out{};
  for (const OperationInfo& row : kOperations) {
    out[index_of(row.operation)] = row.default_cost_ns == kNoCost ? 0 : row.default_cost_ns;
  }
  return out;
}

void SimCosts::set(const std::string& cuda_name, std::int64_t cost_ns) {
  Operation operation = Operation::memory_info;
  if (!find_operation(cuda_name, &operation) || info(operation).default_cost_ns == kNoCost) {
    throw InvalidArgumentError("no simulated cost named " + cuda_name);
  }
  if (cost_ns < 0) throw InvalidArgumentError("the cost of " + cuda_name + " must not be negative");
  ns[index_of(operation)] = cost_ns;
}

SimDriver::SimDriver(std::vector<SimDeviceSpec> devices, SimOptions options,
                     std::shared_ptr<EventLog> events)
    : options_(std::move(options)),
      devices_(std::move(devices)),
      events_(std::move(events)),
      state_(std::make_unique<State>()) {
  check_options(options_);
  check_specs(devices_);
  check_topology(options_.topology, devices_.size());
  if (!options_.topology.host_links.empty()) {
    for (std::size_t i = 0; i < devices_.size(); ++i) {
      state_->host_links.push_back(std::make_unique<HostLink>());
    }
  }
  if (options_.real_bytes) state_->host = std::make_unique<HostMemory>();
  std::vector<AddressRegions> regions;
  for (std::size_t i = 0; i < devices_.size(); ++i) {
    AddressRegions region;
    region.reservations = state_->host ? static_cast<DeviceAddress>(state_->host->reserve(
                                             kRegionBytes, HostMemory::kReservationAlignmentBytes))
                                       : synthetic_region(i);
    region.streams = synthetic_region(i) + kRegionBytes;
    regions.push_back(region);
    auto device = std::make_unique<DeviceState>();
    device->next_stream_va = region.streams;
    state_->devices.push_back(std::move(device));
  }
  state_->naming = AddressNaming(std::move(regions), kRegionBytes);
}

SimDriver::~SimDriver() = default;

const AddressNaming& SimDriver::address_naming() const noexcept {
  return state_->naming;
}

// --- the devices' memory ---------------------------------------------------------------

void SimDriver::add_external_usage(int device, std::size_t bytes) {
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  d.reap();
  const std::size_t free_bytes = d.free_of(devices_[static_cast<std::size_t>(device)].total_bytes);
  if (bytes > free_bytes) {
    throw InvalidArgumentError("device " + std::to_string(device) + " has only " +
                               std::to_string(free_bytes) + " bytes free; cannot add " +
                               std::to_string(bytes) + " bytes of external usage");
  }
  d.external_bytes += bytes;
  if (recording()) {
    note(LineText("@add_external_usage").add("dev", device).add("bytes", bytes).str());
  }
}

void SimDriver::remove_external_usage(int device, std::size_t bytes) {
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  if (bytes > d.external_bytes) {
    throw InvalidArgumentError("device " + std::to_string(device) + " has only " +
                               std::to_string(d.external_bytes) +
                               " bytes of external usage; cannot remove " + std::to_string(bytes));
  }
  d.external_bytes -= bytes;
  if (recording()) {
    note(LineText("@remove_external_usage").add("dev", device).add("bytes", bytes).str());
  }
}

std::size_t SimDriver::external_usage(int device) const {
  check_device(device, device_total());
  const DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  return d.external_bytes;
}

std::size_t SimDriver::physical_bytes(int device) const {
  check_device(device, device_total());
  const DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  return d.physical_bytes;
}

std::size_t SimDriver::used_bytes(int device) const {
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  d.reap();
  return d.used();
}

std::size_t SimDriver::pending_free_bytes(int device) const {
  check_device(device, device_total());
  DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
  std::lock_guard<std::mutex> lock(d.mutex);
  d.reap();
  return d.pending_bytes;
}

std::vector<std::string> SimDriver::leaks() const {
  std::vector<std::string> out;
  for (int device = 0; device < device_total(); ++device) {
    const DeviceState& d = *state_->devices[static_cast<std::size_t>(device)];
    const std::string prefix = "device " + std::to_string(device) + ": ";
    std::lock_guard<std::mutex> lock(d.mutex);
    for (const auto& [va, reservation] : d.reservations) {
      out.push_back(prefix + "address reservation of " + std::to_string(reservation.size_bytes) +
                    " bytes at " + hex(va));
      for (const auto& [offset, mapping] : reservation.mappings) {
        out.push_back(prefix + "mapping of " + std::to_string(mapping.size_bytes) + " bytes at " +
                      hex(va + offset) + " (physical allocation " + hex(mapping.handle) + ")");
      }
    }
    for (const auto& [handle, physical] : d.physical) {
      out.push_back(prefix + "physical allocation " + hex(handle) + " of " +
                    std::to_string(physical.size_bytes) + " bytes" +
                    (physical.released ? " (released but still mapped)" : ""));
    }
    for (const auto& [va, size] : d.streams) {
      out.push_back(prefix + "stream-ordered allocation of " + std::to_string(size) + " bytes at " +
                    hex(va));
    }
    for (const auto& [event, state] : d.events) {
      out.push_back(prefix + "event " + hex(event) +
                    (state.recorded ? " (recorded)" : " (never recorded)"));
    }
  }
  return out;
}

// --- real bytes and fork() -----------------------------------------------------------------

bool SimDriver::real_bytes() const noexcept {
  return state_->host != nullptr;
}

std::vector<std::string> SimDriver::violations() const {
  return state_->host ? state_->host->violations() : std::vector<std::string>{};
}

bool SimDriver::in_creating_process() const noexcept {
  return state_->process.current();
}

void SimDriver::require_creating_process(const std::string& operation) const {
  if (state_->process.current()) return;
  throw DriverError(operation + " in process " + std::to_string(::getpid()) +
                        " failed with CUDA_ERROR_NOT_INITIALIZED (3): this simulator belongs "
                        "to process " +
                        std::to_string(state_->process.pid()) +
                        ", and a child made by fork() cannot use it, as it cannot use the "
                        "parent's CUDA driver state",
                    -1, operation, failure(driver_code::not_initialized));
}

void SimDriver::detach_from_parent() {
  if (state_->process.current() || !state_->host) return;
  // The regions are fixed at construction: read without a lock.
  for (int device = 0; device < device_total(); ++device) {
    HostMemory::detach(static_cast<std::uintptr_t>(state_->naming.regions(device).reservations),
                       static_cast<std::size_t>(kRegionBytes));
  }
}

// --- held calls ----------------------------------------------------------------------------

std::uint64_t SimDriver::hold(const std::string& operation, int device) {
  const Operation held = operation_named(operation);
  check_device(device, device_total());
  return state_->holds.hold(held, device);
}

bool SimDriver::wait_held(std::uint64_t hold_id, std::int64_t timeout_ns) {
  return state_->holds.wait_arrived(hold_id, timeout_ns);
}

void SimDriver::release_hold(std::uint64_t hold_id) {
  state_->holds.release(hold_id);
}

}  // namespace aimdo::sim
