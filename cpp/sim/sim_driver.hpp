// The simulator backend: a deterministic N-device implementation of aimdo::Driver.
//
// What it models (design.md §5): what a GPU and its driver have. Devices with a name,
// capacity and allocation granularity; virtual address reservations, physical
// allocations, mappings and access rights with the real driver's rules (granularity
// alignment, maps only inside a reservation, no overlapping map, no double unmap or
// release, access set before use); stream-ordered allocations; a current context per
// thread, required by the context-dependent calls; memory used by others (external
// usage); stream-ordered frees that become reusable only after a delay; a virtual clock
// per device; optionally real host memory behind mapped pages (host_memory.hpp).
// Injected failures, call counts and the event log are not the simulator's: they are
// adaptors that wrap any Driver (cpp/adaptors/), which aimdo.sim.SimBackend puts over it.
// A test that needs a call in flight holds it here (hold()), before any lock is taken.
//
// Time. Each device has a virtual clock: the moment its queued work is done. A successful
// driver operation costs time on its device's clock (SimCosts; defaults in the operations
// table, operations.hpp); a workload declares its copies (bytes / the device's
// host-to-device bandwidth) and its compute. The host clock moves to a device's clock
// when the host waits for that device (synchronize, event_synchronize) and with
// advance(). The budget's poll interval runs on the device clocks. Nothing here reads the
// wall clock, but wait_held, which bounds a test's wait for a held call.
//
// Virtual time is int64 nanoseconds from 0 and ends about 292 years in (INT64_MAX ns).
// advance, compute, copy_to_device and the async ones refuse work that would take a
// clock past the end (InvalidArgumentError naming the device, where its clock stands and
// the amount) and leave every clock as it was; a driver call's cost, which the real
// driver could not refuse, takes its clock to the end and no further. No clock wraps.
//
// A device has two engines: compute (its clock, which driver calls advance too) and
// host-to-device copies; copy_async/compute_async queue work on them with a dependency
// on an earlier completion time, so copies overlap compute as they do on a GPU with a
// copy stream. copy_to_device/compute queue serially on the clock.
//
// Links (SimTopology): each device's host link (its own, or shared with others: one copy
// crosses a shared link at a time) and a matrix of peer links (bandwidth, latency, or none).
// A peer reads a device's mapped memory once set_access opened it to that peer, and
// copy_async copies between device memory (with real bytes, the bytes themselves).
// copy_from_host_async copies host memory into a device's (with real bytes, the bytes
// themselves) on its copy engine, over its host link.
//
// Streams and events. There are no streams: every copy a driver call queues on a device
// runs on its copy engine after the work queued before it (so stream_wait_event on an
// event of the same device has nothing left to order), and the stream a call names is
// ignored. An event (event_create) belongs to the device current when it was made;
// event_record marks the moment both of its device's engines are done with the work
// queued so far; event_synchronize is the host waiting for that moment: the device's clock
// (and the host's) moves to it, as synchronize moves them past both engines. An event
// never recorded is waited for at once. Live events are listed by leaks().
//
// What it does not model: kernels and their data, the host's own time between calls
// (driver calls cost time on the device's clock, not the host's), partial unmaps,
// copies into or out of stream-ordered allocations, contention on a peer link, streams
// (above), and one device's work waiting for another device's event (stream_wait_event
// checks such an event and orders nothing).
//
// Addresses and handles. Each device owns two 1 TiB regions of address space (one for
// reservations, one for stream-ordered allocations; address_naming() describes them),
// and a physical allocation's or an event's handle carries its device in its top bits
// (an event's under a tag of its own, 0xee: sim_state.hpp), so every address and handle
// names its device without a global table.
//
// Events. Given an event log, each successful use of a power that changes what later
// calls answer (external usage, advance, compute, copies) is written to it while it
// records, as "@<power> key=value ...", under the device's lock so it lands in order with
// that device's calls; replay_event() applies such a line again (sim_events.cpp).
//
// fork(). A simulator belongs to the process that created it, as a CUDA context does: in
// any other process (a child made by fork()) every Driver operation answers
// CUDA_ERROR_NOT_INITIALIZED, as the CUDA driver answers a forked child, and no context
// is current (device_count still answers: the CUDA backend answers it from a list made
// at initialization). The answer comes before any lock is taken or any host memory is
// touched, so a child can neither deadlock on a lock another of the parent's threads held
// at the fork nor change the pages and files it shares with the parent (see
// host_memory.hpp). In real-bytes mode, detach_from_parent() then makes the child's
// inherited pointers into simulated device memory harmless. The powers below are not
// checked: they read or change only the child's copy of the simulator's bookkeeping.
//
// Errors: driver operations answer values (DriverStatus), never throw; the powers throw
// InvalidArgumentError for a bad device, operation or amount and then change nothing.
//
// Thread-safety: every method may be called from any thread. Each device's state (its
// reservations, physical allocations, mappings, clocks and counters) has its own mutex,
// held only for the bookkeeping of one call; no call takes two devices' locks, so calls
// for different devices never wait on each other. The current context of each thread is
// kept in sharded tables (lock order: a device's mutex, then a shard's). A hold blocks a
// call before it takes any lock (held_calls.hpp).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "address_naming.hpp"
#include "aimdo/driver.hpp"
#include "event_log.hpp"
#include "log_line.hpp"
#include "operations.hpp"

namespace aimdo::sim {

struct SimDeviceSpec {
  std::string name = "aimdo simulated GPU";
  std::size_t total_bytes = 0;
  std::size_t granularity_bytes = std::size_t{2} << 20;
  bool integrated = false;
  // Host-to-device copy bandwidth for copy_to_device (docs/measurements.md: about
  // 50 GB/s per GPU with both copying at once from pinned memory).
  double host_to_device_bytes_per_s = 50e9;
};

// Virtual time each operation costs on its device's clock when it succeeds, in
// nanoseconds, by operation: the operations table's defaults unless set. None may be
// negative (InvalidArgumentError at construction).
struct SimCosts {
  std::array<std::int64_t, kOperationCount> ns = defaults();

  std::int64_t of(Operation operation) const noexcept { return ns[index_of(operation)]; }
  // Sets the cost of the operation whose CUDA function is `cuda_name`. InvalidArgumentError
  // for a name that is not an operation with a cost, or a negative cost.
  void set(const std::string& cuda_name, std::int64_t cost_ns);
  // Each operation's default_cost_ns; 0 for those without a cost.
  static std::array<std::int64_t, kOperationCount> defaults() noexcept;
};

// How one device reads another's memory, one way: bandwidth in bytes per second (0: no
// link, P2P off, as between consumer cards whose driver refuses it), a fixed latency per
// copy, and the rank the driver reports (PeerLink::performance_rank).
struct SimPeerLink {
  double bytes_per_s = 0;
  std::int64_t latency_ns = 0;
  int performance_rank = 0;
};

// The links between the host and the devices and among the devices (design.md §5).
struct SimTopology {
  // peers[i][j]: how device i reads device j's memory. Empty: no device reaches another.
  std::vector<std::vector<SimPeerLink>> peers;
  // host_links[i]: the host link device i's host-to-device copies take. Devices naming
  // the same link share it: one copy crosses it at a time (two cards behind one x16 slot
  // or a PCIe switch). Empty: each device has its own (as two H200s of one host do).
  std::vector<int> host_links;
  // Latency of each host-to-device copy, on top of bytes / the device's bandwidth.
  std::int64_t host_latency_ns = 0;
};

struct SimOptions {
  SimCosts costs;
  SimTopology topology;
  // Stream-ordered frees become reusable (and show in free memory) this long after the
  // free on the device's clock.
  std::int64_t free_delay_ns = 0;
  // Back mapped pages with host memory really mapped at the reserved addresses (see
  // host_memory.hpp): data written through a mapping reads back while it stays mapped,
  // new pages hold a poison pattern, and an unmapped range reads a trap pattern instead
  // of the data (writes there are reported by violations()). Linux only.
  bool real_bytes = false;
};

struct HostLink;     // sim_state.hpp
struct DeviceState;  // sim_state.hpp

class SimDriver final : public Driver {
 public:
  // InvalidArgumentError for no devices, more than 64, a zero capacity, a granularity
  // that is not a power of two of at least 4 KiB, a bandwidth that is not positive and
  // finite, a negative cost or free delay, a topology whose matrix or host links do not
  // match the devices, a peer link with a negative or non-finite bandwidth or a negative
  // latency, or a link from a device to itself. `events` may be null: powers are not logged.
  explicit SimDriver(std::vector<SimDeviceSpec> devices, SimOptions options = {},
                     std::shared_ptr<EventLog> events = nullptr);
  ~SimDriver() override;

  // aimdo::Driver
  const char* backend_name() const noexcept override { return "sim"; }
  DriverStatus device_count(int* count) override;
  DriverStatus device_properties(int device, DeviceProperties* out) override;
  DriverStatus memory_info(int device, std::size_t* free_bytes, std::size_t* total_bytes) override;
  DriverStatus reserve_address_range(int device, std::size_t size_bytes,
                                     std::size_t alignment_bytes, DeviceAddress* out) override;
  DriverStatus free_address_range(DeviceAddress va, std::size_t size_bytes) override;
  DriverStatus create_physical(int device, std::size_t size_bytes, PhysicalHandle* out) override;
  DriverStatus release_physical(PhysicalHandle handle) override;
  DriverStatus map(DeviceAddress va, std::size_t size_bytes, PhysicalHandle handle) override;
  DriverStatus unmap(DeviceAddress va, std::size_t size_bytes) override;
  DriverStatus set_access(DeviceAddress va, std::size_t size_bytes, int device) override;
  DriverStatus peer_link(int device, int peer, PeerLink* out) override;
  DriverStatus copy_async(int device, DeviceAddress dst, DeviceAddress src, std::size_t size_bytes,
                          StreamHandle stream) override;
  // Stricter than the driver: `src` may not lie in the simulator's own address regions
  // (a device address passed as a host one), CUDA_ERROR_INVALID_VALUE.
  DriverStatus copy_from_host_async(int device, DeviceAddress dst, std::uintptr_t src,
                                    std::size_t size_bytes, StreamHandle stream) override;
  // Events (see "Streams and events"). A handle that names no live event of the
  // simulator answers CUDA_ERROR_INVALID_HANDLE; so does, to event_record, an event of
  // another device than the one named. event_create answers CUDA_ERROR_OUT_OF_MEMORY once
  // a device has made 2^48 - 1 events.
  DriverStatus event_create(int device, EventHandle* out) override;
  DriverStatus event_destroy(EventHandle event) override;
  DriverStatus event_record(int device, EventHandle event, StreamHandle stream) override;
  DriverStatus event_synchronize(EventHandle event) override;
  DriverStatus stream_wait_event(int device, StreamHandle stream, EventHandle event) override;
  DriverStatus synchronize(int device) override;
  DriverStatus stream_alloc(int device, std::size_t size_bytes, StreamHandle stream,
                            DeviceAddress* out) override;
  DriverStatus stream_free(int device, DeviceAddress ptr, StreamHandle stream) override;
  int current_device() noexcept override;
  DriverStatus make_current(int device, ContextToken* previous) override;
  void restore_current(const ContextToken& previous) noexcept override;
  std::int64_t now_ns(int device) noexcept override;

  // --- the devices and their memory -------------------------------------------------
  int device_total() const noexcept { return static_cast<int>(devices_.size()); }
  // Where each device's regions lie (see "Addresses and handles").
  const AddressNaming& address_naming() const noexcept;
  // Memory taken or given back by someone else (another process, PyTorch). Adding more
  // than is free, or removing more than was added, is refused.
  void add_external_usage(int device, std::size_t bytes);
  void remove_external_usage(int device, std::size_t bytes);
  std::size_t external_usage(int device) const;
  // Bytes of physical allocations alive on the device (mapped or not).
  std::size_t physical_bytes(int device) const;
  // Everything the device counts as used: physical + stream-ordered + external.
  std::size_t used_bytes(int device) const;
  // Stream-ordered frees not reusable yet on `device`.
  std::size_t pending_free_bytes(int device) const;
  // True when every byte of [va, va + size) is mapped with access set for its own device
  // (`from` -1) or for device `from`.
  bool is_accessible(DeviceAddress va, std::size_t size_bytes, int from = -1) const;
  // One readable line per live reservation, physical allocation, mapping, stream-ordered
  // allocation and event; empty when nothing leaks.
  std::vector<std::string> leaks() const;

  // Host memory [ptr, ptr + bytes) taken as `device`'s memory, a destination copy_async may
  // write (in real-bytes mode): what a PyTorch CUDA tensor is on a real GPU, a CPU tensor
  // is on the simulator. The caller keeps it alive until disown(). InvalidArgumentError
  // for a bad device, a null or empty range, one overlapping an adopted range or any of
  // the simulator's own regions.
  void adopt(int device, std::uintptr_t ptr, std::size_t bytes);
  // Gives back an adopted range (by its start). InvalidArgumentError when not adopted.
  void disown(int device, std::uintptr_t ptr);

  // --- real bytes ---------------------------------------------------------------------
  // Whether mapped pages are backed by host memory at their addresses (SimOptions).
  bool real_bytes() const noexcept;
  // Writes seen through pointers to memory after it was unmapped (real-bytes mode).
  std::vector<std::string> violations() const;

  // --- fork() ---------------------------------------------------------------------------
  // True in the process that constructed the simulator (see "fork()" above).
  bool in_creating_process() const noexcept;
  // Throws DriverError (CUDA_ERROR_NOT_INITIALIZED, device -1, naming `operation`) in any
  // other process: for code that reaches simulated device memory without a Driver
  // operation (a host view of a mapping), which must be refused in a forked child too.
  void require_creating_process(const std::string& operation) const;
  // In a forked child, real-bytes mode: replaces the child's copy of every device's host
  // region with private zero-filled memory (HostMemory::detach), so that views and
  // pointers the child inherited read zeros and write only its own pages, never the
  // parent's. Call it in the child right after fork() (aimdo.sim does, through
  // os.register_at_fork); until then such pointers still reach the parent's pages. Does
  // nothing in the creating process or without real bytes. Takes no lock.
  // std::system_error if a region could not be replaced.
  void detach_from_parent();

  // --- time (see "Time" above) ----------------------------------------------------------
  // Move a device's clock (or every clock and the host's, device -1) forward. Refused
  // when `ns` would take any of them past the end of virtual time: then none moves.
  void advance(int device, std::int64_t ns);
  // Declare work queued on a device: a host-to-device copy of `bytes` (costs bytes /
  // bandwidth) or `ns` of compute. Both move the device's clock; refused when the work
  // would end past the end of virtual time.
  void copy_to_device(int device, std::size_t bytes);
  void compute(int device, std::int64_t ns);
  // The same on the device's two engines, which overlap: a copy runs on the copy engine
  // after the copies queued before it and not before `after_ns` (an event it waits
  // for); compute runs on the compute engine (the device's clock) likewise. Each returns
  // the moment the work is done, to pass as another's `after_ns`. synchronize waits for
  // both engines.
  std::int64_t copy_async(int device, std::size_t bytes, std::int64_t after_ns);
  // A copy of `bytes` from `peer`'s memory to `device`'s, on `device`'s copy engine over
  // the peer link (bytes / its bandwidth + its latency). InvalidArgumentError where there
  // is no link.
  std::int64_t peer_copy_async(int device, int peer, std::size_t bytes, std::int64_t after_ns);
  // The topology the simulator was made with.
  const SimTopology& topology() const noexcept { return options_.topology; }
  std::int64_t compute_async(int device, std::int64_t ns, std::int64_t after_ns);
  std::int64_t copy_engine_now_ns(int device) const;
  std::int64_t host_now_ns() const noexcept;

  // --- held calls (held_calls.hpp) -------------------------------------------------------
  // Hold the next call of `operation` (a CUDA name) on `device` open: it blocks, before
  // taking any of the simulator's locks, until release_hold(). Returns the hold's id.
  std::uint64_t hold(const std::string& operation, int device);
  // Wait until the held call has arrived; false after `timeout_ns` of real time.
  // InvalidArgumentError for a negative timeout.
  bool wait_held(std::uint64_t hold_id, std::int64_t timeout_ns);
  // Let the held call (or a future one) go on. Unknown ids are ignored.
  void release_hold(std::uint64_t hold_id);

  // --- events ---------------------------------------------------------------------------
  // Applies an event line this simulator writes (see "Events"); false for any other name.
  // InvalidArgumentError for a line that does not read or a power that refuses it.
  bool replay_event(LogLine& line);

 private:
  struct State;  // everything mutable; see sim_state.hpp

  // The start of every operation (sim_state.hpp).
  template <class Body>
  DriverStatus run(Operation operation, int device, int unknown_device_code, Body&& body);
  bool recording() const noexcept;
  // How `device` reads `owner`'s memory (no link: zero bandwidth), from the topology.
  SimPeerLink peer(int device, int owner) const noexcept;
  // Nanoseconds a host-to-device copy of `bytes` takes on `device` (InvalidArgumentError
  // past the end of time), and the shared host link it crosses (null: its own).
  std::int64_t host_copy_ns(int device, std::size_t bytes) const;
  HostLink* host_link(int device) const noexcept;
  // Queues a driver call's host-to-device copy of `bytes` on `device`'s copy engine, after
  // the work queued before it on either engine and on a shared host link. The caller holds
  // the device's lock (`d`). A driver call cannot refuse: past the end of virtual time
  // the engine stops there.
  void queue_host_copy(int device, DeviceState& d, std::size_t bytes) noexcept;
  // Moves the host's clock to `ns`, if it is behind: the host waited until then.
  void host_waits_until(std::int64_t ns) noexcept;
  void note(std::string line) const;  // appends an event line (see "Events")

  const SimOptions options_;
  const std::vector<SimDeviceSpec> devices_;
  const std::shared_ptr<EventLog> events_;
  std::unique_ptr<State> state_;
};

}  // namespace aimdo::sim
