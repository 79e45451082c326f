// The CUDA backend of the Driver interface.
//
// The backend talks to the NVIDIA driver (libcuda.so.1) directly, through the driver API's
// virtual memory management calls. Nothing of the CUDA toolkit is needed to build it: the
// library is opened at run time, on the first call to load_cuda_driver(), never when aimdo
// is loaded or imported, so a machine without a GPU can still import aimdo and use the
// simulator.
#pragma once

#include <memory>
#include <string>

#include "aimdo/driver.hpp"

namespace aimdo {

// The outcome of load_cuda_driver().
struct CudaDriverLoad {
  // The backend, or null when the driver could not be loaded or initialized.
  std::shared_ptr<Driver> driver;
  // success, or what failed: the CUresult of the failing call, or CUDA_ERROR_NOT_FOUND (500)
  // when libcuda.so.1, cuGetProcAddress or a required entry point is missing.
  DriverStatus status;
  // One readable sentence. On failure: what failed and what to do about it. On success: the
  // driver API version and the number of devices found.
  std::string message;
};

// Opens libcuda.so.1, resolves the driver entry points aimdo uses and initializes the driver
// (cuInit). Every call does the whole sequence and returns a new, independent backend;
// the library itself is loaded only once by the dynamic loader and is never unloaded,
// because the driver may still run callbacks after aimdo is done with it.
//
// Never throws for a missing or failing driver: that is reported in the result. Devices
// are those visible when cuInit runs (CUDA_VISIBLE_DEVICES is read then); the set does not
// change afterwards.
//
// Thread-safety: may be called from several threads at once. The returned backend is
// safe to use from any thread (see Driver).
CudaDriverLoad load_cuda_driver();

}  // namespace aimdo
