#include "aimdo/driver.hpp"

namespace aimdo::driver_code {

const char* name(int code) noexcept {
  switch (code) {
    case success: return "CUDA_SUCCESS";
    case invalid_value: return "CUDA_ERROR_INVALID_VALUE";
    case out_of_memory: return "CUDA_ERROR_OUT_OF_MEMORY";
    case not_initialized: return "CUDA_ERROR_NOT_INITIALIZED";
    case deinitialized: return "CUDA_ERROR_DEINITIALIZED";
    case no_device: return "CUDA_ERROR_NO_DEVICE";
    case invalid_device: return "CUDA_ERROR_INVALID_DEVICE";
    case invalid_context: return "CUDA_ERROR_INVALID_CONTEXT";
    case already_mapped: return "CUDA_ERROR_ALREADY_MAPPED";
    case not_mapped: return "CUDA_ERROR_NOT_MAPPED";
    case invalid_handle: return "CUDA_ERROR_INVALID_HANDLE";
    case not_found: return "CUDA_ERROR_NOT_FOUND";
    case not_ready: return "CUDA_ERROR_NOT_READY";
    case illegal_address: return "CUDA_ERROR_ILLEGAL_ADDRESS";
    case not_permitted: return "CUDA_ERROR_NOT_PERMITTED";
    case not_supported: return "CUDA_ERROR_NOT_SUPPORTED";
    default: return "CUDA_ERROR_UNKNOWN";
  }
}

}  // namespace aimdo::driver_code
