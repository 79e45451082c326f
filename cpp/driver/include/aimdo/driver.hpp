// The Driver interface: the seam between aimdo's core and a GPU backend.
//
// The core (Manager, Device, Vbar) talks to the GPU only through this class. Two
// backends implement it: the CUDA driver (cpp/src/cuda/, libcuda loaded at run time)
// and the simulator (cpp/sim/). Neither backend knows anything of the core's policy.
//
// Contract shared by every operation:
// - Errors come back as a DriverStatus value, never as an exception and never as a crash.
//   Codes use the CUDA driver's numbering (CUresult), so both backends speak one
//   vocabulary; `classify` turns a code into the kind the core acts on.
// - Sizes are in bytes. Addresses are device virtual addresses (CUdeviceptr).
// - "Context-dependent" operations need the target device's context to be current on
//   the calling thread (see ScopedDevice). The simulator rejects them otherwise, exactly
//   as a missing guard would misbehave on real hardware.
// - Thread-safety: every method may be called from any thread concurrently. A backend
//   must not serialise calls for different devices behind one lock held across a slow
//   operation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace aimdo {

using DeviceAddress = std::uint64_t;   // CUdeviceptr
using PhysicalHandle = std::uint64_t;  // CUmemGenericAllocationHandle
using StreamHandle = std::uintptr_t;   // CUstream; 0 is the legacy default stream
using EventHandle = std::uintptr_t;    // CUevent

// CUresult values that aimdo names. Other codes pass through untouched.
namespace driver_code {
constexpr int success = 0;
constexpr int invalid_value = 1;
constexpr int out_of_memory = 2;
constexpr int not_initialized = 3;
constexpr int deinitialized = 4;
constexpr int no_device = 100;
constexpr int invalid_device = 101;
constexpr int invalid_context = 201;
constexpr int already_mapped = 208;
constexpr int not_mapped = 211;
constexpr int invalid_handle = 400;
constexpr int not_found = 500;
constexpr int not_ready = 600;
constexpr int illegal_address = 700;
constexpr int not_permitted = 800;
constexpr int not_supported = 801;
constexpr int unknown = 999;

// The CUDA name of every code above ("CUDA_ERROR_OUT_OF_MEMORY"), "CUDA_ERROR_UNKNOWN" for
// any other: a string literal. The simulator names its answers with it; the CUDA backend
// falls back on it when the driver cannot name a code.
const char* name(int code) noexcept;
}  // namespace driver_code

// What the core does with a failure.
enum class DriverErrorKind : std::uint8_t {
  ok,             // success
  out_of_memory,  // the device could not supply memory: evict and retry
  transient,      // "not ready": retry the same call a bounded number of times
  error,          // anything else: report it
};

constexpr DriverErrorKind classify(int code) noexcept {
  if (code == driver_code::success) return DriverErrorKind::ok;
  if (code == driver_code::out_of_memory) return DriverErrorKind::out_of_memory;
  if (code == driver_code::not_ready) return DriverErrorKind::transient;
  return DriverErrorKind::error;
}

// The result of one driver call. `name` points to a string with static storage
// duration (the driver's own error name, or a literal).
struct DriverStatus {
  int code = driver_code::success;
  const char* name = "CUDA_SUCCESS";
  bool injected = false;  // the simulator made this failure on purpose

  constexpr bool ok() const noexcept { return code == driver_code::success; }
  constexpr DriverErrorKind kind() const noexcept { return classify(code); }
  static constexpr DriverStatus success() noexcept { return DriverStatus{}; }
};

struct DeviceProperties {
  std::string name;
  std::size_t total_bytes = 0;
  std::size_t granularity_bytes = 0;  // minimum physical allocation granularity
  bool integrated = false;            // shares memory with the host
};

// How one device reaches another's memory (cuDeviceCanAccessPeer and
// cuDeviceGetP2PAttribute on CUDA; the link matrix on the simulator). Bandwidth is not
// here: the driver does not report it; it is measured (or, on the simulator, configured).
struct PeerLink {
  bool access = false;       // the device can read the peer's memory directly (P2P)
  int performance_rank = 0;  // the driver's relative rank of the link; 0 where no access
  bool native_atomics = false;
};

// Opaque record of the context that was current before ScopedDevice switched it.
struct ContextToken {
  void* context = nullptr;
  int device = -1;
  bool switched = false;  // false when the wanted context was already current
};

class Driver {
 public:
  Driver() = default;
  Driver(const Driver&) = delete;
  Driver& operator=(const Driver&) = delete;
  virtual ~Driver() = default;

  // "cuda" or "sim". Never fails.
  virtual const char* backend_name() const noexcept = 0;

  // Number of devices. Initializes the backend on first use (cuInit).
  virtual DriverStatus device_count(int* count) = 0;

  // Name, total memory, allocation granularity, integrated. `device` in [0, count).
  virtual DriverStatus device_properties(int device, DeviceProperties* out) = 0;

  // Free and total memory of `device`. Context-dependent.
  virtual DriverStatus memory_info(int device, std::size_t* free_bytes,
                                   std::size_t* total_bytes) = 0;

  // Reserve `size_bytes` of virtual address space usable for `device`'s memory;
  // `size_bytes` and `alignment_bytes` are multiples of the granularity. Costs no memory.
  virtual DriverStatus reserve_address_range(int device, std::size_t size_bytes,
                                             std::size_t alignment_bytes, DeviceAddress* out) = 0;
  // Give back a range returned by reserve_address_range; nothing may be mapped in it.
  virtual DriverStatus free_address_range(DeviceAddress va, std::size_t size_bytes) = 0;

  // Create `size_bytes` (a multiple of the granularity) of physical memory on `device`.
  // OUT_OF_MEMORY when the device has no room.
  virtual DriverStatus create_physical(int device, std::size_t size_bytes, PhysicalHandle* out) = 0;
  // Release a physical allocation. It must not be mapped anywhere any more.
  virtual DriverStatus release_physical(PhysicalHandle handle) = 0;

  // Map the whole of `handle` at `va` (inside a reservation, not already mapped).
  virtual DriverStatus map(DeviceAddress va, std::size_t size_bytes, PhysicalHandle handle) = 0;
  // Unmap exactly one earlier mapping.
  virtual DriverStatus unmap(DeviceAddress va, std::size_t size_bytes) = 0;
  // Make a mapped range readable and writable from `device`. Required before use. `device`
  // is the memory's own device, or a peer whose peer_link to it has `access`.
  virtual DriverStatus set_access(DeviceAddress va, std::size_t size_bytes, int device) = 0;

  // How `device` reaches `peer`'s memory. `device` != `peer`, both in [0, count). Not
  // context-dependent; never changes while the process lives.
  virtual DriverStatus peer_link(int device, int peer, PeerLink* out) = 0;

  // Queue a copy of `size_bytes` from `src` to `dst` on `stream` of `device` (cuMemcpy-
  // DtoDAsync). Both ranges must be device memory `device` may access: its own, or a
  // peer's mapped range that set_access opened to it. Ordered on `stream` like any other
  // work; the caller keeps both ranges alive and unchanged until the copy is done.
  // Context-dependent.
  virtual DriverStatus copy_async(int device, DeviceAddress dst, DeviceAddress src,
                                  std::size_t size_bytes, StreamHandle stream) = 0;

  // Queue a copy of `size_bytes` from host memory at `src` to device memory at `dst` on
  // `stream` of `device` (cuMemcpyHtoDAsync). `dst` is memory `device` may access (its
  // own mapped range; on the simulator also memory it adopted). `src` should be pinned
  // for the copy to run asynchronously; the caller keeps it alive and unchanged until
  // the copy is done (an event recorded after it). Context-dependent.
  virtual DriverStatus copy_from_host_async(int device, DeviceAddress dst, std::uintptr_t src,
                                            std::size_t size_bytes, StreamHandle stream) = 0;

  // Events mark a point of a stream's work (cuEventCreate and friends). An event made by
  // event_create times nothing (CU_EVENT_DISABLE_TIMING), and event_synchronize on it puts
  // the host thread to sleep rather than spinning (CU_EVENT_BLOCKING_SYNC). Record, wait
  // and synchronize also take an event PyTorch made on the same device (a
  // `torch.cuda.Event`'s `cuda_event`, once recorded), which the CUDA backend cannot tell
  // apart.
  // Make an event for `device`. Context-dependent.
  virtual DriverStatus event_create(int device, EventHandle* out) = 0;
  // Destroy an event made by event_create. Work that records it may still be queued.
  virtual DriverStatus event_destroy(EventHandle event) = 0;
  // Record `event` at the end of the work queued on `stream` of `device` so far.
  // Context-dependent.
  virtual DriverStatus event_record(int device, EventHandle event, StreamHandle stream) = 0;
  // Wait on the host until the work `event` last recorded is done (at once if it was
  // never recorded).
  virtual DriverStatus event_synchronize(EventHandle event) = 0;
  // Make the work queued on `stream` of `device` from now on wait for the work `event`
  // last recorded (cuStreamWaitEvent); the host does not wait. Context-dependent.
  virtual DriverStatus stream_wait_event(int device, StreamHandle stream, EventHandle event) = 0;

  // Wait until all work queued on `device` has finished. Context-dependent.
  virtual DriverStatus synchronize(int device) = 0;

  // Stream-ordered allocation on `device` (cuMemAllocAsync). Context-dependent.
  virtual DriverStatus stream_alloc(int device, std::size_t size_bytes, StreamHandle stream,
                                    DeviceAddress* out) = 0;
  // Stream-ordered free (cuMemFreeAsync) of memory from stream_alloc on `device`.
  // Context-dependent.
  virtual DriverStatus stream_free(int device, DeviceAddress ptr, StreamHandle stream) = 0;

  // The device whose context is current on the calling thread, or -1 when none is.
  virtual int current_device() noexcept = 0;

  // Make `device`'s primary context current on the calling thread, recording what was
  // current in `previous`. Use ScopedDevice instead of calling these directly.
  virtual DriverStatus make_current(int device, ContextToken* previous) = 0;
  // Undo make_current. Never fails in a way the caller could act on.
  virtual void restore_current(const ContextToken& previous) noexcept = 0;

  // A monotonic clock in nanoseconds for `device`: the simulator's clocks are virtual,
  // the CUDA backend's is the host's steady clock. Used for the budget's poll interval.
  virtual std::int64_t now_ns(int device) noexcept = 0;
};

// Makes a device's primary context current for the lifetime of the guard and restores
// the previous one on exit. Check status() before relying on it.
class ScopedDevice {
 public:
  ScopedDevice(Driver& driver, int device) : driver_(driver) {
    status_ = driver_.make_current(device, &previous_);
  }
  ~ScopedDevice() {
    if (status_.ok()) driver_.restore_current(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

  const DriverStatus& status() const noexcept { return status_; }

 private:
  Driver& driver_;
  ContextToken previous_{};
  DriverStatus status_{};
};

}  // namespace aimdo
