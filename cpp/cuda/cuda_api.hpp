// Internal to the CUDA backend: the subset of cuda.h it declares itself, the table of the
// driver entry points it resolves, and what the loader hands the backend. See
// cuda_driver.cpp for how the driver is reached.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "aimdo/driver.hpp"

namespace aimdo::cuda_detail {

// ---------------------------------------------------------------------------------------
// The subset of cuda.h that aimdo uses. Values and layouts are facts of the driver ABI
// (CUDA 12.x and 13.x headers). C enums are int-sized on the platforms CUDA supports, hence
// the explicit `int` underlying types.

using CUresult = int;
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;
using CUdeviceptr = unsigned long long;
using CUmemGenericAllocationHandle = unsigned long long;
using cuuint64_t = std::uint64_t;

enum CUdevice_attribute : int {
  CU_DEVICE_ATTRIBUTE_INTEGRATED = 18,
};

enum CUdevice_P2PAttribute : int {
  CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK = 0x01,
  CU_DEVICE_P2P_ATTRIBUTE_ACCESS_SUPPORTED = 0x02,
  CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED = 0x03,
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

// cuEventCreate's flags (CUevent_flags).
constexpr unsigned int CU_EVENT_BLOCKING_SYNC = 0x1;
constexpr unsigned int CU_EVENT_DISABLE_TIMING = 0x2;

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
static_assert(sizeof(CUevent) == sizeof(EventHandle), "EventHandle holds a CUevent");

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
// Each is asked for by its base name: cuGetProcAddress answers the variant of that
// version (cuMemcpyHtoDAsync_v2, cuEventDestroy_v2), and with CU_GET_PROC_ADDRESS_DEFAULT
// the legacy-default-stream one, never a per-thread (_ptsz) one.
#define AIMDO_CUDA_ENTRY_POINTS(X)                                                                \
  X(cuGetErrorName, required, CUresult(CUresult, const char**))                                   \
  X(cuDriverGetVersion, required, CUresult(int*))                                                 \
  X(cuInit, required, CUresult(unsigned int))                                                     \
  X(cuDeviceGetCount, required, CUresult(int*))                                                   \
  X(cuDeviceGet, required, CUresult(CUdevice*, int))                                              \
  X(cuDeviceGetName, required, CUresult(char*, int, CUdevice))                                    \
  X(cuDeviceTotalMem, required, CUresult(std::size_t*, CUdevice))                                 \
  X(cuDeviceGetAttribute, required, CUresult(int*, CUdevice_attribute, CUdevice))                 \
  X(cuDevicePrimaryCtxRetain, required, CUresult(CUcontext*, CUdevice))                           \
  X(cuDevicePrimaryCtxRelease, required, CUresult(CUdevice))                                      \
  X(cuCtxGetCurrent, required, CUresult(CUcontext*))                                              \
  X(cuCtxSetCurrent, required, CUresult(CUcontext))                                               \
  X(cuCtxGetDevice, required, CUresult(CUdevice*))                                                \
  X(cuCtxSynchronize, required, CUresult())                                                       \
  X(cuMemGetInfo, required, CUresult(std::size_t*, std::size_t*))                                 \
  X(cuMemAddressReserve, required,                                                                \
    CUresult(CUdeviceptr*, std::size_t, std::size_t, CUdeviceptr, unsigned long long))            \
  X(cuMemAddressFree, required, CUresult(CUdeviceptr, std::size_t))                               \
  X(cuMemCreate, required,                                                                        \
    CUresult(CUmemGenericAllocationHandle*, std::size_t, const CUmemAllocationProp*,              \
             unsigned long long))                                                                 \
  X(cuMemRelease, required, CUresult(CUmemGenericAllocationHandle))                               \
  X(cuMemMap, required,                                                                           \
    CUresult(CUdeviceptr, std::size_t, std::size_t, CUmemGenericAllocationHandle,                 \
             unsigned long long))                                                                 \
  X(cuMemUnmap, required, CUresult(CUdeviceptr, std::size_t))                                     \
  X(cuMemSetAccess, required,                                                                     \
    CUresult(CUdeviceptr, std::size_t, const CUmemAccessDesc*, std::size_t))                      \
  X(cuMemGetAllocationGranularity, required,                                                      \
    CUresult(std::size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags))         \
  X(cuMemAllocAsync, optional, CUresult(CUdeviceptr*, std::size_t, CUstream))                     \
  X(cuMemFreeAsync, optional, CUresult(CUdeviceptr, CUstream))                                    \
  X(cuDeviceCanAccessPeer, optional, CUresult(int*, CUdevice, CUdevice))                          \
  X(cuDeviceGetP2PAttribute, optional, CUresult(int*, CUdevice_P2PAttribute, CUdevice, CUdevice)) \
  X(cuMemcpyDtoDAsync, optional, CUresult(CUdeviceptr, CUdeviceptr, std::size_t, CUstream))       \
  X(cuMemcpyHtoDAsync, optional, CUresult(CUdeviceptr, const void*, std::size_t, CUstream))       \
  X(cuEventCreate, optional, CUresult(CUevent*, unsigned int))                                    \
  X(cuEventDestroy, optional, CUresult(CUevent))                                                  \
  X(cuEventRecord, optional, CUresult(CUevent, CUstream))                                         \
  X(cuEventSynchronize, optional, CUresult(CUevent))                                              \
  X(cuStreamWaitEvent, optional, CUresult(CUstream, CUevent, unsigned int))

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
inline DriverStatus status_from(const EntryPoints& api, CUresult code) noexcept {
  if (code == driver_code::success) return DriverStatus::success();
  const char* name = nullptr;
  if (api.cuGetErrorName == nullptr || api.cuGetErrorName(code, &name) != 0 || name == nullptr) {
    name = driver_code::name(code);
  }
  return DriverStatus{code, name, false};
}

inline std::string version_text(int cuda_version) {
  return std::to_string(cuda_version / 1000) + "." + std::to_string((cuda_version % 1000) / 10);
}

// The backend over resolved entry points; `devices` maps ordinal -> CUdevice for every
// device visible after cuInit (cuda_driver.cpp).
std::shared_ptr<Driver> make_cuda_driver(const EntryPoints& api, std::vector<CUdevice> devices);

}  // namespace aimdo::cuda_detail
