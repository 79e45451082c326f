// CUDA backend: the Driver interface on top of libcuda.so.1, loaded at run time.
//
// How the driver is reached:
// - No CUDA header is included. The few types and constants used are declared below with
//   the layouts of the CUDA 12/13 cuda.h; the struct layouts are checked by static_asserts.
// - libcuda.so.1 is opened with dlopen and only cuGetProcAddress is looked up by name. Every
//   other entry point comes from cuGetProcAddress for one pinned CUDA version, so each name
//   resolves to the ABI the declarations below describe (cuMemGetInfo to cuMemGetInfo_v2,
//   and so on), whatever the newest version the installed driver offers.
// - The entry points are listed once, in AIMDO_CUDA_ENTRY_POINTS, each marked required or
//   optional. A missing required one fails the load; a missing optional one makes the calls
//   that need it answer CUDA_ERROR_NOT_SUPPORTED.
//
// State: each CudaDriver owns its resolved entry points (immutable once loaded), its list of
// devices (immutable) and one slot per device for the retained primary context (atomic).
// There is no global state in this file.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "aimdo/process.hpp"
#include "cuda_api.hpp"

namespace aimdo::cuda_detail {
namespace {

// ---------------------------------------------------------------------------------------
// The backend.
//
// Thread-safety: everything but the primary-context slots is immutable after construction.
// Each slot is an atomic written at most once (null -> retained context), so make_current
// takes no lock, and threads working on different devices never wait for each other here.
class CudaDriver final : public Driver {
 public:
  // `devices` maps ordinal -> CUdevice for every device visible after cuInit.
  CudaDriver(const EntryPoints& api, std::vector<CUdevice> devices)
      : api_(api), devices_(std::move(devices)), primary_contexts_(devices_.size()) {
    for (auto& slot : primary_contexts_) slot.store(nullptr, std::memory_order_relaxed);
  }

  // Releases the primary contexts this backend retained. Once the process is exiting the
  // driver may already be torn down, and the OS reclaims the contexts anyway, so it then
  // does nothing.
  ~CudaDriver() override {
    if (process_exiting()) return;
    for (std::size_t i = 0; i < devices_.size(); ++i) {
      if (primary_contexts_[i].load(std::memory_order_acquire) != nullptr) {
        api_.cuDevicePrimaryCtxRelease(devices_[i]);
      }
    }
  }

  const char* backend_name() const noexcept override { return "cuda"; }

  DriverStatus device_count(int* count) override {
    if (count == nullptr) return code_status(driver_code::invalid_value);
    *count = static_cast<int>(devices_.size());
    return DriverStatus::success();
  }

  DriverStatus device_properties(int device, DeviceProperties* out) override {
    if (out == nullptr) return code_status(driver_code::invalid_value);
    if (!valid(device)) return code_status(driver_code::invalid_device);
    const CUdevice handle = devices_[index(device)];

    // Longer names are truncated; the last byte is forced to a terminator so that a
    // driver filling the whole buffer cannot make the copy below overrun it.
    char name[256] = {};
    if (auto s = check(api_.cuDeviceGetName(name, static_cast<int>(sizeof(name)), handle)); !s.ok())
      return s;
    name[sizeof(name) - 1] = '\0';

    std::size_t total_bytes = 0;
    if (auto s = check(api_.cuDeviceTotalMem(&total_bytes, handle)); !s.ok()) return s;

    const CUmemAllocationProp prop = device_allocation(device);
    std::size_t granularity_bytes = 0;
    if (auto s = check(api_.cuMemGetAllocationGranularity(&granularity_bytes, &prop,
                                                          CU_MEM_ALLOC_GRANULARITY_MINIMUM));
        !s.ok())
      return s;

    int integrated = 0;
    if (auto s =
            check(api_.cuDeviceGetAttribute(&integrated, CU_DEVICE_ATTRIBUTE_INTEGRATED, handle));
        !s.ok())
      return s;

    out->name = name;
    out->total_bytes = total_bytes;
    out->granularity_bytes = granularity_bytes;
    out->integrated = integrated != 0;
    return DriverStatus::success();
  }

  DriverStatus memory_info(int device, std::size_t* free_bytes, std::size_t* total_bytes) override {
    if (free_bytes == nullptr || total_bytes == nullptr)
      return code_status(driver_code::invalid_value);
    if (!valid(device)) return code_status(driver_code::invalid_device);
    return check(api_.cuMemGetInfo(free_bytes, total_bytes));
  }

  // The address space is shared by all devices (unified addressing); `device` is checked
  // for consistency with the other backends but does not reach the driver.
  DriverStatus reserve_address_range(int device, std::size_t size_bytes,
                                     std::size_t alignment_bytes, DeviceAddress* out) override {
    if (out == nullptr) return code_status(driver_code::invalid_value);
    if (!valid(device)) return code_status(driver_code::invalid_device);
    CUdeviceptr va = 0;
    const DriverStatus s = check(api_.cuMemAddressReserve(&va, size_bytes, alignment_bytes,
                                                          /*addr=*/0, /*flags=*/0));
    if (s.ok()) *out = va;
    return s;
  }

  DriverStatus free_address_range(DeviceAddress va, std::size_t size_bytes) override {
    return check(api_.cuMemAddressFree(va, size_bytes));
  }

  DriverStatus create_physical(int device, std::size_t size_bytes, PhysicalHandle* out) override {
    if (out == nullptr) return code_status(driver_code::invalid_value);
    if (!valid(device)) return code_status(driver_code::invalid_device);
    const CUmemAllocationProp prop = device_allocation(device);
    CUmemGenericAllocationHandle handle = 0;
    const DriverStatus s = check(api_.cuMemCreate(&handle, size_bytes, &prop, /*flags=*/0));
    if (s.ok()) *out = handle;
    return s;
  }

  DriverStatus release_physical(PhysicalHandle handle) override {
    return check(api_.cuMemRelease(handle));
  }

  DriverStatus map(DeviceAddress va, std::size_t size_bytes, PhysicalHandle handle) override {
    return check(api_.cuMemMap(va, size_bytes, /*offset=*/0, handle, /*flags=*/0));
  }

  DriverStatus unmap(DeviceAddress va, std::size_t size_bytes) override {
    return check(api_.cuMemUnmap(va, size_bytes));
  }

  DriverStatus set_access(DeviceAddress va, std::size_t size_bytes, int device) override {
    if (!valid(device)) return code_status(driver_code::invalid_device);
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    return check(api_.cuMemSetAccess(va, size_bytes, &access, /*count=*/1));
  }

  DriverStatus peer_link(int device, int peer, PeerLink* out) override {
    if (out == nullptr) return code_status(driver_code::invalid_value);
    if (!valid(device) || !valid(peer) || device == peer) {
      return code_status(driver_code::invalid_device);
    }
    if (api_.cuDeviceCanAccessPeer == nullptr || api_.cuDeviceGetP2PAttribute == nullptr) {
      return code_status(driver_code::not_supported);
    }
    const CUdevice from = devices_[index(device)];
    const CUdevice to = devices_[index(peer)];
    int access = 0;
    int rank = 0;
    int atomics = 0;
    if (auto s = check(api_.cuDeviceCanAccessPeer(&access, from, to)); !s.ok()) return s;
    if (access != 0) {
      if (auto s = check(api_.cuDeviceGetP2PAttribute(
              &rank, CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK, from, to));
          !s.ok()) {
        return s;
      }
      if (auto s = check(api_.cuDeviceGetP2PAttribute(
              &atomics, CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED, from, to));
          !s.ok()) {
        return s;
      }
    }
    out->access = access != 0;
    out->performance_rank = access != 0 ? rank : 0;
    out->native_atomics = access != 0 && atomics != 0;
    return DriverStatus::success();
  }

  // `device` is not passed on: the stream (or the current context, for stream 0) decides
  // which device's copy engine runs it; the addresses say where the bytes are.
  DriverStatus copy_async(int device, DeviceAddress dst, DeviceAddress src, std::size_t size_bytes,
                          StreamHandle stream) override {
    if (!valid(device)) return code_status(driver_code::invalid_device);
    if (api_.cuMemcpyDtoDAsync == nullptr) return code_status(driver_code::not_supported);
    return check(api_.cuMemcpyDtoDAsync(dst, src, size_bytes, reinterpret_cast<CUstream>(stream)));
  }

  // As copy_async: the stream (or the current context) decides the copy engine.
  DriverStatus copy_from_host_async(int device, DeviceAddress dst, std::uintptr_t src,
                                    std::size_t size_bytes, StreamHandle stream) override {
    if (!valid(device)) return code_status(driver_code::invalid_device);
    if (api_.cuMemcpyHtoDAsync == nullptr) return code_status(driver_code::not_supported);
    return check(api_.cuMemcpyHtoDAsync(dst, reinterpret_cast<const void*>(src), size_bytes,
                                        reinterpret_cast<CUstream>(stream)));
  }

  // The event belongs to the current context, which the caller made `device`'s. A host
  // thread waiting on it sleeps (CU_EVENT_BLOCKING_SYNC) rather than spinning, as a
  // primary context otherwise does while it has fewer users than there are CPUs: the
  // thread that waits on these (the file pump's queuer) shares the CPUs with the readers
  // that copy from the page cache, and a ring buffer's copy takes hundreds of
  // microseconds, against a wake-up of tens.
  DriverStatus event_create(int device, EventHandle* out) override {
    if (out == nullptr) return code_status(driver_code::invalid_value);
    if (!valid(device)) return code_status(driver_code::invalid_device);
    if (api_.cuEventCreate == nullptr) return code_status(driver_code::not_supported);
    CUevent event = nullptr;
    const DriverStatus s =
        check(api_.cuEventCreate(&event, CU_EVENT_DISABLE_TIMING | CU_EVENT_BLOCKING_SYNC));
    if (s.ok()) *out = reinterpret_cast<EventHandle>(event);
    return s;
  }

  DriverStatus event_destroy(EventHandle event) override {
    if (api_.cuEventDestroy == nullptr) return code_status(driver_code::not_supported);
    return check(api_.cuEventDestroy(reinterpret_cast<CUevent>(event)));
  }

  DriverStatus event_record(int device, EventHandle event, StreamHandle stream) override {
    if (!valid(device)) return code_status(driver_code::invalid_device);
    if (api_.cuEventRecord == nullptr) return code_status(driver_code::not_supported);
    return check(
        api_.cuEventRecord(reinterpret_cast<CUevent>(event), reinterpret_cast<CUstream>(stream)));
  }

  DriverStatus event_synchronize(EventHandle event) override {
    if (api_.cuEventSynchronize == nullptr) return code_status(driver_code::not_supported);
    return check(api_.cuEventSynchronize(reinterpret_cast<CUevent>(event)));
  }

  DriverStatus stream_wait_event(int device, StreamHandle stream, EventHandle event) override {
    if (!valid(device)) return code_status(driver_code::invalid_device);
    if (api_.cuStreamWaitEvent == nullptr) return code_status(driver_code::not_supported);
    return check(api_.cuStreamWaitEvent(reinterpret_cast<CUstream>(stream),
                                        reinterpret_cast<CUevent>(event), /*flags=*/0));
  }

  DriverStatus synchronize(int device) override {
    if (!valid(device)) return code_status(driver_code::invalid_device);
    return check(api_.cuCtxSynchronize());
  }

  // `device` is not passed on: the stream, or the current context for stream 0, decides
  // where the memory comes from. Stream 0 is the legacy default stream, because the entry
  // points are resolved with CU_GET_PROC_ADDRESS_DEFAULT, which picks the legacy variants.
  DriverStatus stream_alloc(int device, std::size_t size_bytes, StreamHandle stream,
                            DeviceAddress* out) override {
    if (out == nullptr) return code_status(driver_code::invalid_value);
    if (!valid(device)) return code_status(driver_code::invalid_device);
    if (api_.cuMemAllocAsync == nullptr) return code_status(driver_code::not_supported);
    CUdeviceptr ptr = 0;
    const DriverStatus s =
        check(api_.cuMemAllocAsync(&ptr, size_bytes, reinterpret_cast<CUstream>(stream)));
    if (s.ok()) *out = ptr;
    return s;
  }

  DriverStatus stream_free(int device, DeviceAddress ptr, StreamHandle stream) override {
    if (!valid(device)) return code_status(driver_code::invalid_device);
    if (api_.cuMemFreeAsync == nullptr) return code_status(driver_code::not_supported);
    return check(api_.cuMemFreeAsync(ptr, reinterpret_cast<CUstream>(stream)));
  }

  int current_device() noexcept override {
    CUcontext current = nullptr;
    if (api_.cuCtxGetCurrent(&current) != 0 || current == nullptr) return -1;
    return device_of_current_context();
  }

  DriverStatus make_current(int device, ContextToken* previous) override {
    if (previous == nullptr) return code_status(driver_code::invalid_value);
    if (!valid(device)) return code_status(driver_code::invalid_device);

    CUcontext primary = nullptr;
    if (auto s = primary_context(device, &primary); !s.ok()) return s;

    CUcontext current = nullptr;
    if (auto s = check(api_.cuCtxGetCurrent(&current)); !s.ok()) return s;

    previous->context = current;
    previous->switched = false;
    if (current == primary) {
      previous->device = device;
      return DriverStatus::success();
    }
    // Read while `current` is still current: cuCtxGetDevice only answers for that context.
    previous->device = current == nullptr ? -1 : device_of_current_context();
    if (auto s = check(api_.cuCtxSetCurrent(primary)); !s.ok()) return s;
    previous->switched = true;
    return DriverStatus::success();
  }

  // A null previous context is restored too: it leaves no context current, as before.
  void restore_current(const ContextToken& previous) noexcept override {
    if (!previous.switched) return;
    api_.cuCtxSetCurrent(static_cast<CUcontext>(previous.context));
  }

  std::int64_t now_ns(int /*device*/) noexcept override {
    const auto since_epoch = std::chrono::steady_clock::now().time_since_epoch();
    return std::chrono::duration_cast<std::chrono::nanoseconds>(since_epoch).count();
  }

 private:
  bool valid(int device) const noexcept {
    return device >= 0 && static_cast<std::size_t>(device) < devices_.size();
  }
  static std::size_t index(int device) noexcept { return static_cast<std::size_t>(device); }

  DriverStatus check(CUresult code) const noexcept { return status_from(api_, code); }
  DriverStatus code_status(int code) const noexcept { return status_from(api_, code); }

  // Pinned device memory of `device`, not exportable: what cuMemCreate makes and what the
  // granularity is asked for. CUmemLocation::id is the device ordinal.
  static CUmemAllocationProp device_allocation(int device) noexcept {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    return prop;
  }

  // Ordinal of the device of the calling thread's current context, or -1.
  int device_of_current_context() const noexcept {
    CUdevice handle = 0;
    if (api_.cuCtxGetDevice(&handle) != 0) return -1;
    const auto found = std::find(devices_.begin(), devices_.end(), handle);
    return found == devices_.end() ? -1 : static_cast<int>(found - devices_.begin());
  }

  // The primary context of `device`, retained on first use and kept until destruction.
  // Racing first uses each retain; the loser hands its extra reference back (the driver
  // counts retains), so the backend always holds exactly one.
  DriverStatus primary_context(int device, CUcontext* out) noexcept {
    std::atomic<CUcontext>& slot = primary_contexts_[index(device)];
    CUcontext known = slot.load(std::memory_order_acquire);
    if (known != nullptr) {
      *out = known;
      return DriverStatus::success();
    }
    const CUdevice handle = devices_[index(device)];
    CUcontext retained = nullptr;
    if (auto s = check(api_.cuDevicePrimaryCtxRetain(&retained, handle)); !s.ok()) return s;
    CUcontext expected = nullptr;
    if (!slot.compare_exchange_strong(expected, retained, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
      api_.cuDevicePrimaryCtxRelease(handle);
      retained = expected;
    }
    *out = retained;
    return DriverStatus::success();
  }

  const EntryPoints api_;
  const std::vector<CUdevice> devices_;
  std::vector<std::atomic<CUcontext>> primary_contexts_;  // one per ordinal; null until retained
};

}  // namespace

std::shared_ptr<Driver> make_cuda_driver(const EntryPoints& api, std::vector<CUdevice> devices) {
  return std::make_shared<CudaDriver>(api, std::move(devices));
}

}  // namespace aimdo::cuda_detail
