#include "call.hpp"

namespace aimdo {

DriverStatus invoke(Driver& driver, Call& call) {
  // No default: -Wswitch names an operation added to the enum but not here.
  switch (call.operation) {
    case Operation::memory_info:
      return driver.memory_info(call.device, &call.free_bytes, &call.total_bytes);
    case Operation::reserve_address_range:
      return driver.reserve_address_range(call.device, call.size_bytes, call.alignment_bytes,
                                          &call.address);
    case Operation::free_address_range:
      return driver.free_address_range(call.address, call.size_bytes);
    case Operation::create_physical:
      return driver.create_physical(call.device, call.size_bytes, &call.handle);
    case Operation::release_physical: return driver.release_physical(call.handle);
    case Operation::map: return driver.map(call.address, call.size_bytes, call.handle);
    case Operation::unmap: return driver.unmap(call.address, call.size_bytes);
    case Operation::set_access:
      return driver.set_access(call.address, call.size_bytes, call.device);
    case Operation::synchronize: return driver.synchronize(call.device);
    case Operation::stream_alloc:
      return driver.stream_alloc(call.device, call.size_bytes, call.stream, &call.pointer);
    case Operation::stream_free: return driver.stream_free(call.device, call.pointer, call.stream);
    case Operation::make_current: return driver.make_current(call.device, &call.previous);
    case Operation::copy_async:
      return driver.copy_async(call.device, call.address, call.source, call.size_bytes,
                               call.stream);
    case Operation::copy_from_host_async:
      return driver.copy_from_host_async(call.device, call.address, call.host_source,
                                         call.size_bytes, call.stream);
    case Operation::event_create: return driver.event_create(call.device, &call.event);
    case Operation::event_destroy: return driver.event_destroy(call.event);
    case Operation::event_record: return driver.event_record(call.device, call.event, call.stream);
    case Operation::event_synchronize: return driver.event_synchronize(call.event);
    case Operation::stream_wait_event:
      return driver.stream_wait_event(call.device, call.stream, call.event);
  }
  return DriverStatus{driver_code::invalid_value, driver_code::name(driver_code::invalid_value),
                      false};
}

}  // namespace aimdo
