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
#include "cuda_driver.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "aimdo/process.hpp"

namespace aimdo {
namespace {

// ---------------------------------------------------------------------------------------
// The subset of cuda.h that aimdo uses. Values and layouts are facts of the driver ABI
// (CUDA 12.x and 13.x headers). C enums are int-sized on the platforms CUDA supports, hence
// the explicit `int` underlying types.

using CUresult = int;
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUdeviceptr = unsigned long long;
using CUmemGenericAllocationHandle = unsigned long long;
using cuuint64_t = std::uint64_t;

enum CUdevice_attribute : int {
  CU_DEVICE_ATTRIBUTE_INTEGRATED = 18,
};

enum CUmemAllocationType : int {
  CU_MEM_ALLOCATION_TYPE_PINNED = 0x1,
};

enum CUmemAllocationHandleType : int {
  CU_MEM_HANDLE_TYPE_NONE = 0x0,
};

enum CUmemLocationType : int {
  CU_MEM_LOCATION_TYPE_DEVICE = 0x1,
};

enum CUmemAccess_flags : int {
  CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3,
};

enum CUmemAllocationGranularity_flags : int {
  CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0,
};

enum CUdriverProcAddressQueryResult : int {
  CU_GET_PROC_ADDRESS_SUCCESS = 0,
  CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND = 1,
  CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT = 2,
};

constexpr cuuint64_t CU_GET_PROC_ADDRESS_DEFAULT = 0;

// Recent headers put `id` in a union with a 2-byte `localized` struct; the size and the
// offset of `id` are unchanged, so this shorter form is the same ABI.
struct CUmemLocation {
  CUmemLocationType type;
  int id;
};

struct CUmemAllocationFlags {
  unsigned char compressionType;
  unsigned char gpuDirectRDMACapable;
  unsigned short usage;
  unsigned char reserved[4];
};

struct CUmemAllocationProp {
  CUmemAllocationType type;
  CUmemAllocationHandleType requestedHandleTypes;
  CUmemLocation location;
  void* win32HandleMetaData;
  CUmemAllocationFlags allocFlags;
};

struct CUmemAccessDesc {
  CUmemLocation location;
  CUmemAccess_flags flags;
};

static_assert(sizeof(CUmemLocation) == 8, "CUmemLocation is { int type; int id; }");
static_assert(sizeof(CUmemAllocationFlags) == 8, "allocFlags is 8 bytes");
static_assert(sizeof(CUmemAccessDesc) == 12, "CUmemAccessDesc is { CUmemLocation; int }");
static_assert(offsetof(CUmemAccessDesc, flags) == 8, "CUmemAccessDesc layout");
static_assert(offsetof(CUmemAllocationProp, location) == 8, "CUmemAllocationProp layout");
static_assert(offsetof(CUmemAllocationProp, win32HandleMetaData) == 16,
              "CUmemAllocationProp layout");
static_assert(offsetof(CUmemAllocationProp, allocFlags) == 16 + sizeof(void*),
              "CUmemAllocationProp layout");
static_assert(sizeof(CUmemAllocationProp) == 24 + sizeof(void*), "CUmemAllocationProp size");
static_assert(sizeof(CUdeviceptr) == sizeof(DeviceAddress), "DeviceAddress holds a CUdeviceptr");
static_assert(sizeof(CUmemGenericAllocationHandle) == sizeof(PhysicalHandle),
              "PhysicalHandle holds a CUmemGenericAllocationHandle");
static_assert(sizeof(CUstream) == sizeof(StreamHandle), "StreamHandle holds a CUstream");

// cuGetProcAddress_v2 (CUDA 12.0+ drivers) and the original cuGetProcAddress (11.3+).
using GetProcAddressV2 = CUresult(const char* symbol, void** function, int cuda_version,
                                  cuuint64_t flags, CUdriverProcAddressQueryResult* status);
using GetProcAddressV1 = CUresult(const char* symbol, void** function, int cuda_version,
                                  cuuint64_t flags);

// The ABI version every entry point is resolved at: the signatures below are those of
// CUDA 12.0. A driver older than 12.0 is asked for its own version instead; for every entry
// point listed here that gives the same ABI, because none changed between 11.3 (the first
// driver with cuGetProcAddress) and 12.0.
constexpr int kEntryPointVersion = 12000;
// Any driver that has cuGetProcAddress at all is at least this version.
constexpr int kOldestProcAddressVersion = 11030;

// ---------------------------------------------------------------------------------------
// The entry-point table: name, required or optional, signature at kEntryPointVersion.
// cuGetErrorName comes first so that later failures can be named by the driver itself.
#define AIMDO_CUDA_ENTRY_POINTS(X)                                                        \
  X(cuGetErrorName, required, CUresult(CUresult, const char**))                           \
  X(cuDriverGetVersion, required, CUresult(int*))                                         \
  X(cuInit, required, CUresult(unsigned int))                                             \
  X(cuDeviceGetCount, required, CUresult(int*))                                           \
  X(cuDeviceGet, required, CUresult(CUdevice*, int))                                      \
  X(cuDeviceGetName, required, CUresult(char*, int, CUdevice))                            \
  X(cuDeviceTotalMem, required, CUresult(std::size_t*, CUdevice))                         \
  X(cuDeviceGetAttribute, required, CUresult(int*, CUdevice_attribute, CUdevice))         \
  X(cuDevicePrimaryCtxRetain, required, CUresult(CUcontext*, CUdevice))                   \
  X(cuDevicePrimaryCtxRelease, required, CUresult(CUdevice))                              \
  X(cuCtxGetCurrent, required, CUresult(CUcontext*))                                      \
  X(cuCtxSetCurrent, required, CUresult(CUcontext))                                       \
  X(cuCtxGetDevice, required, CUresult(CUdevice*))                                        \
  X(cuCtxSynchronize, required, CUresult())                                               \
  X(cuMemGetInfo, required, CUresult(std::size_t*, std::size_t*))                         \
  X(cuMemAddressReserve, required,                                                        \
    CUresult(CUdeviceptr*, std::size_t, std::size_t, CUdeviceptr, unsigned long long))    \
  X(cuMemAddressFree, required, CUresult(CUdeviceptr, std::size_t))                       \
  X(cuMemCreate, required,                                                                \
    CUresult(CUmemGenericAllocationHandle*, std::size_t, const CUmemAllocationProp*,      \
             unsigned long long))                                                         \
  X(cuMemRelease, required, CUresult(CUmemGenericAllocationHandle))                       \
  X(cuMemMap, required,                                                                   \
    CUresult(CUdeviceptr, std::size_t, std::size_t, CUmemGenericAllocationHandle,         \
             unsigned long long))                                                         \
  X(cuMemUnmap, required, CUresult(CUdeviceptr, std::size_t))                             \
  X(cuMemSetAccess, required,                                                             \
    CUresult(CUdeviceptr, std::size_t, const CUmemAccessDesc*, std::size_t))              \
  X(cuMemGetAllocationGranularity, required,                                              \
    CUresult(std::size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags)) \
  X(cuMemAllocAsync, optional, CUresult(CUdeviceptr*, std::size_t, CUstream))             \
  X(cuMemFreeAsync, optional, CUresult(CUdeviceptr, CUstream))

enum class Need : std::uint8_t { required, optional };

// The resolved entry points. Filled once by the loader, then held const by CudaDriver.
// An optional entry point the driver lacks stays null.
struct EntryPoints {
#define AIMDO_DECLARE_ENTRY_POINT(name, need, signature) \
  std::add_pointer_t<signature> name = nullptr;
  AIMDO_CUDA_ENTRY_POINTS(AIMDO_DECLARE_ENTRY_POINT)
#undef AIMDO_DECLARE_ENTRY_POINT
};

// The driver's name for `code` (static storage inside libcuda), or a fallback literal when
// the driver does not know the code or cuGetErrorName is not resolved yet.
DriverStatus status_from(const EntryPoints& api, CUresult code) noexcept {
  if (code == driver_code::success) return DriverStatus::success();
  const char* name = nullptr;
  if (api.cuGetErrorName == nullptr || api.cuGetErrorName(code, &name) != 0 || name == nullptr) {
    name = driver_code::name(code);
  }
  return DriverStatus{code, name, false};
}

std::string version_text(int cuda_version) {
  return std::to_string(cuda_version / 1000) + "." + std::to_string((cuda_version % 1000) / 10);
}

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

// ---------------------------------------------------------------------------------------
// Loading.

constexpr const char* kLibraryName = "libcuda.so.1";
constexpr const char* kSimHint = " Use backend='sim' to run without a GPU.";

// Looks entry points up through whichever cuGetProcAddress the driver exports.
class ProcAddressResolver {
 public:
  ProcAddressResolver(GetProcAddressV2* v2, GetProcAddressV1* v1) : v2_(v2), v1_(v1) {}

  // The entry point `name` at `cuda_version`, or null. `*error` is the CUresult of the
  // lookup itself (success with a null result means the driver has no such entry point).
  void* find(const char* name, int cuda_version, CUresult* error) const noexcept {
    void* function = nullptr;
    if (v2_ != nullptr) {
      CUdriverProcAddressQueryResult found = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
      *error = v2_(name, &function, cuda_version, CU_GET_PROC_ADDRESS_DEFAULT, &found);
      if (*error != 0 || found != CU_GET_PROC_ADDRESS_SUCCESS) function = nullptr;
    } else {
      // The original cuGetProcAddress reports a missing entry point as CUDA_ERROR_NOT_FOUND.
      *error = v1_(name, &function, cuda_version, CU_GET_PROC_ADDRESS_DEFAULT);
      if (*error == driver_code::not_found) *error = driver_code::success;
      if (*error != 0) function = nullptr;
    }
    return function;
  }

 private:
  GetProcAddressV2* v2_;
  GetProcAddressV1* v1_;
};

CudaDriverLoad load_failure(DriverStatus status, std::string message) {
  CudaDriverLoad result;
  result.status = status;
  result.message = std::move(message) + kSimHint;
  return result;
}

DriverStatus not_found_status() noexcept {
  return DriverStatus{driver_code::not_found, driver_code::name(driver_code::not_found), false};
}

}  // namespace

CudaDriverLoad load_cuda_driver() {
  // --- The library. ---
  dlerror();
  void* library = dlopen(kLibraryName, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* reason = dlerror();
    return load_failure(not_found_status(), std::string(kLibraryName) + " could not be loaded (" +
                                                (reason != nullptr ? reason : "no reason given") +
                                                "): is an NVIDIA driver installed?");
  }
  // The handle is deliberately never closed: the driver may still call back into its own
  // code (and ours) until the process ends, and a second dlopen only bumps a count.

  // --- cuGetProcAddress. ---
  auto* get_proc_v2 = reinterpret_cast<GetProcAddressV2*>(dlsym(library, "cuGetProcAddress_v2"));
  auto* get_proc_v1 = get_proc_v2 != nullptr
                          ? nullptr
                          : reinterpret_cast<GetProcAddressV1*>(dlsym(library, "cuGetProcAddress"));
  if (get_proc_v2 == nullptr && get_proc_v1 == nullptr) {
    return load_failure(not_found_status(),
                        std::string(kLibraryName) +
                            " has no cuGetProcAddress: the NVIDIA driver is older than CUDA "
                            "11.3; update it (CUDA 12 or newer recommended).");
  }
  const ProcAddressResolver resolver(get_proc_v2, get_proc_v1);

  // --- The version to resolve at. ---
  EntryPoints api;
  CUresult error = driver_code::success;
  api.cuDriverGetVersion = reinterpret_cast<decltype(api.cuDriverGetVersion)>(
      resolver.find("cuDriverGetVersion", kOldestProcAddressVersion, &error));
  int driver_version = 0;
  if (api.cuDriverGetVersion == nullptr) {
    const DriverStatus s = error != 0 ? status_from(api, error) : not_found_status();
    return load_failure(s, std::string("cuGetProcAddress could not find cuDriverGetVersion in ") +
                               kLibraryName + " (" + s.name +
                               "): the NVIDIA driver installation looks broken.");
  }
  if (const CUresult r = api.cuDriverGetVersion(&driver_version); r != 0) {
    const DriverStatus s = status_from(api, r);
    return load_failure(s, std::string("cuDriverGetVersion failed with ") + s.name + " (" +
                               std::to_string(r) +
                               "): the NVIDIA driver installation looks broken.");
  }
  const int resolve_version = std::min(driver_version, kEntryPointVersion);

  // --- Every entry point in the table. ---
  const char* missing = nullptr;
  CUresult missing_error = driver_code::success;
#define AIMDO_RESOLVE_ENTRY_POINT(name, need, signature)        \
  if (missing == nullptr) {                                     \
    CUresult lookup_error = driver_code::success;               \
    api.name = reinterpret_cast<std::add_pointer_t<signature>>( \
        resolver.find(#name, resolve_version, &lookup_error));  \
    if (api.name == nullptr && Need::need == Need::required) {  \
      missing = #name;                                          \
      missing_error = lookup_error;                             \
    }                                                           \
  }
  AIMDO_CUDA_ENTRY_POINTS(AIMDO_RESOLVE_ENTRY_POINT)
#undef AIMDO_RESOLVE_ENTRY_POINT
  if (missing != nullptr) {
    const DriverStatus s =
        missing_error != 0 ? status_from(api, missing_error) : not_found_status();
    return load_failure(s, std::string(kLibraryName) + " (CUDA " + version_text(driver_version) +
                               ") does not provide " + missing + " at CUDA " +
                               version_text(resolve_version) + " (" + s.name +
                               "), which aimdo requires: update the NVIDIA driver (CUDA 12 "
                               "or newer recommended).");
  }

  // --- Initialization and the visible devices. ---
  if (const CUresult r = api.cuInit(0); r != 0) {
    const DriverStatus s = status_from(api, r);
    std::string message =
        std::string("cuInit failed with ") + s.name + " (" + std::to_string(r) + ")";
    if (r == driver_code::no_device) {
      message +=
          ": no NVIDIA GPU is visible to this process (check nvidia-smi and "
          "CUDA_VISIBLE_DEVICES).";
    } else {
      message += ": the NVIDIA driver (CUDA " + version_text(driver_version) +
                 ") could not be initialized; check nvidia-smi.";
    }
    return load_failure(s, std::move(message));
  }
  int count = 0;
  if (const CUresult r = api.cuDeviceGetCount(&count); r != 0) {
    const DriverStatus s = status_from(api, r);
    return load_failure(s, std::string("cuDeviceGetCount failed with ") + s.name + " (" +
                               std::to_string(r) + ") after cuInit succeeded.");
  }
  std::vector<CUdevice> devices(static_cast<std::size_t>(std::max(count, 0)));
  for (int ordinal = 0; ordinal < count; ++ordinal) {
    if (const CUresult r = api.cuDeviceGet(&devices[static_cast<std::size_t>(ordinal)], ordinal);
        r != 0) {
      const DriverStatus s = status_from(api, r);
      return load_failure(s, "cuDeviceGet(" + std::to_string(ordinal) + ") failed with " + s.name +
                                 " (" + std::to_string(r) + ").");
    }
  }

  CudaDriverLoad result;
  result.driver = std::make_shared<CudaDriver>(api, std::move(devices));
  result.message = std::string(kLibraryName) + " loaded: CUDA " + version_text(driver_version) +
                   " driver, entry points at CUDA " + version_text(resolve_version) + ", " +
                   std::to_string(count) + (count == 1 ? " device." : " devices.");
  return result;
}

}  // namespace aimdo
