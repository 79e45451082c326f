// Loading the CUDA backend: libcuda.so.1 through dlopen, then every entry point of the
// table in cuda_api.hpp through cuGetProcAddress at one pinned CUDA version, then cuInit
// and the visible devices. Each step that fails says what to do about it.
#include <dlfcn.h>

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cuda_api.hpp"
#include "cuda_driver.hpp"

namespace aimdo {
namespace {

using namespace cuda_detail;

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

// The step that fails fills `failure` and returns false.
bool open_library(void** library, CudaDriverLoad* failure) {
  dlerror();
  *library = dlopen(kLibraryName, RTLD_NOW | RTLD_LOCAL);
  if (*library != nullptr) return true;
  const char* reason = dlerror();
  *failure = load_failure(not_found_status(), std::string(kLibraryName) + " could not be loaded (" +
                                                  (reason != nullptr ? reason : "no reason given") +
                                                  "): is an NVIDIA driver installed?");
  return false;
}

bool find_resolver(void* library, std::optional<ProcAddressResolver>* resolver,
                   CudaDriverLoad* failure) {
  auto* get_proc_v2 = reinterpret_cast<GetProcAddressV2*>(dlsym(library, "cuGetProcAddress_v2"));
  auto* get_proc_v1 = get_proc_v2 != nullptr
                          ? nullptr
                          : reinterpret_cast<GetProcAddressV1*>(dlsym(library, "cuGetProcAddress"));
  if (get_proc_v2 == nullptr && get_proc_v1 == nullptr) {
    *failure = load_failure(not_found_status(),
                            std::string(kLibraryName) +
                                " has no cuGetProcAddress: the NVIDIA driver is older than CUDA "
                                "11.3; update it (CUDA 12 or newer recommended).");
    return false;
  }
  resolver->emplace(get_proc_v2, get_proc_v1);
  return true;
}

// The driver's version, found at the oldest version cuGetProcAddress knows.
bool driver_version_of(const ProcAddressResolver& resolver, EntryPoints& api, int* version,
                       CudaDriverLoad* failure) {
  CUresult error = driver_code::success;
  api.cuDriverGetVersion = reinterpret_cast<decltype(api.cuDriverGetVersion)>(
      resolver.find("cuDriverGetVersion", kOldestProcAddressVersion, &error));
  if (api.cuDriverGetVersion == nullptr) {
    const DriverStatus s = error != 0 ? status_from(api, error) : not_found_status();
    *failure = load_failure(
        s, std::string("cuGetProcAddress could not find cuDriverGetVersion in ") + kLibraryName +
               " (" + s.name + "): the NVIDIA driver installation looks broken.");
    return false;
  }
  if (const CUresult r = api.cuDriverGetVersion(version); r != 0) {
    const DriverStatus s = status_from(api, r);
    *failure =
        load_failure(s, std::string("cuDriverGetVersion failed with ") + s.name + " (" +
                            std::to_string(r) + "): the NVIDIA driver installation looks broken.");
    return false;
  }
  return true;
}

// Every entry point of the table at `resolve_version`.
bool resolve_table(const ProcAddressResolver& resolver, int driver_version, int resolve_version,
                   EntryPoints& api, CudaDriverLoad* failure) {
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
  if (missing == nullptr) return true;
  const DriverStatus s = missing_error != 0 ? status_from(api, missing_error) : not_found_status();
  *failure = load_failure(s, std::string(kLibraryName) + " (CUDA " + version_text(driver_version) +
                                 ") does not provide " + missing + " at CUDA " +
                                 version_text(resolve_version) + " (" + s.name +
                                 "), which aimdo requires: update the NVIDIA driver (CUDA 12 "
                                 "or newer recommended).");
  return false;
}

// cuInit, then the CUdevice of every visible ordinal.
bool initialize_devices(const EntryPoints& api, int driver_version, std::vector<CUdevice>* devices,
                        CudaDriverLoad* failure) {
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
    *failure = load_failure(s, std::move(message));
    return false;
  }
  int count = 0;
  if (const CUresult r = api.cuDeviceGetCount(&count); r != 0) {
    const DriverStatus s = status_from(api, r);
    *failure = load_failure(s, std::string("cuDeviceGetCount failed with ") + s.name + " (" +
                                   std::to_string(r) + ") after cuInit succeeded.");
    return false;
  }
  devices->assign(static_cast<std::size_t>(std::max(count, 0)), CUdevice{});
  for (int ordinal = 0; ordinal < count; ++ordinal) {
    if (const CUresult r = api.cuDeviceGet(&(*devices)[static_cast<std::size_t>(ordinal)], ordinal);
        r != 0) {
      const DriverStatus s = status_from(api, r);
      *failure = load_failure(s, "cuDeviceGet(" + std::to_string(ordinal) + ") failed with " +
                                     s.name + " (" + std::to_string(r) + ").");
      return false;
    }
  }
  return true;
}

}  // namespace

CudaDriverLoad load_cuda_driver() {
  CudaDriverLoad failure;
  // The library handle is deliberately never closed: the driver may still call back into
  // its own code (and ours) until the process ends, and a second dlopen only bumps a count.
  void* library = nullptr;
  std::optional<ProcAddressResolver> resolver;
  EntryPoints api;
  int driver_version = 0;
  if (!open_library(&library, &failure) || !find_resolver(library, &resolver, &failure) ||
      !driver_version_of(*resolver, api, &driver_version, &failure)) {
    return failure;
  }
  const int resolve_version = std::min(driver_version, kEntryPointVersion);
  std::vector<CUdevice> devices;
  if (!resolve_table(*resolver, driver_version, resolve_version, api, &failure) ||
      !initialize_devices(api, driver_version, &devices, &failure)) {
    return failure;
  }
  const std::size_t count = devices.size();
  CudaDriverLoad result;
  result.driver = make_cuda_driver(api, std::move(devices));
  result.message = std::string(kLibraryName) + " loaded: CUDA " + version_text(driver_version) +
                   " driver, entry points at CUDA " + version_text(resolve_version) + ", " +
                   std::to_string(count) + (count == 1 ? " device." : " devices.");
  return result;
}

}  // namespace aimdo
