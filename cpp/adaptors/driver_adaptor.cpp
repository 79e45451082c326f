#include "driver_adaptor.hpp"

#include <utility>

#include "aimdo/errors.hpp"

namespace aimdo::adaptors {
namespace {

Call call_of(Operation operation) {
  Call call;
  call.operation = operation;
  return call;
}

}  // namespace

DriverAdaptor::DriverAdaptor(std::shared_ptr<Driver> upstream) : upstream_(std::move(upstream)) {
  if (upstream_ == nullptr) throw InvalidArgumentError("a driver adaptor needs a driver to wrap");
}

DriverStatus DriverAdaptor::memory_info(int device, std::size_t* free_bytes,
                                        std::size_t* total_bytes) {
  Call call = call_of(Operation::memory_info);
  call.device = device;
  const DriverStatus status = intercept(call);
  if (status.ok()) {
    *free_bytes = call.free_bytes;
    *total_bytes = call.total_bytes;
  }
  return status;
}

DriverStatus DriverAdaptor::reserve_address_range(int device, std::size_t size_bytes,
                                                  std::size_t alignment_bytes, DeviceAddress* out) {
  Call call = call_of(Operation::reserve_address_range);
  call.device = device;
  call.size_bytes = size_bytes;
  call.alignment_bytes = alignment_bytes;
  const DriverStatus status = intercept(call);
  if (status.ok()) *out = call.address;
  return status;
}

DriverStatus DriverAdaptor::free_address_range(DeviceAddress va, std::size_t size_bytes) {
  Call call = call_of(Operation::free_address_range);
  call.address = va;
  call.size_bytes = size_bytes;
  return intercept(call);
}

DriverStatus DriverAdaptor::create_physical(int device, std::size_t size_bytes,
                                            PhysicalHandle* out) {
  Call call = call_of(Operation::create_physical);
  call.device = device;
  call.size_bytes = size_bytes;
  const DriverStatus status = intercept(call);
  if (status.ok()) *out = call.handle;
  return status;
}

DriverStatus DriverAdaptor::release_physical(PhysicalHandle handle) {
  Call call = call_of(Operation::release_physical);
  call.handle = handle;
  return intercept(call);
}

DriverStatus DriverAdaptor::map(DeviceAddress va, std::size_t size_bytes, PhysicalHandle handle) {
  Call call = call_of(Operation::map);
  call.address = va;
  call.size_bytes = size_bytes;
  call.handle = handle;
  return intercept(call);
}

DriverStatus DriverAdaptor::unmap(DeviceAddress va, std::size_t size_bytes) {
  Call call = call_of(Operation::unmap);
  call.address = va;
  call.size_bytes = size_bytes;
  return intercept(call);
}

DriverStatus DriverAdaptor::set_access(DeviceAddress va, std::size_t size_bytes, int device) {
  Call call = call_of(Operation::set_access);
  call.address = va;
  call.size_bytes = size_bytes;
  call.device = device;
  return intercept(call);
}

DriverStatus DriverAdaptor::synchronize(int device) {
  Call call = call_of(Operation::synchronize);
  call.device = device;
  return intercept(call);
}

DriverStatus DriverAdaptor::stream_alloc(int device, std::size_t size_bytes, StreamHandle stream,
                                         DeviceAddress* out) {
  Call call = call_of(Operation::stream_alloc);
  call.device = device;
  call.size_bytes = size_bytes;
  call.stream = stream;
  const DriverStatus status = intercept(call);
  if (status.ok()) *out = call.pointer;
  return status;
}

DriverStatus DriverAdaptor::stream_free(int device, DeviceAddress ptr, StreamHandle stream) {
  Call call = call_of(Operation::stream_free);
  call.device = device;
  call.pointer = ptr;
  call.stream = stream;
  return intercept(call);
}

DriverStatus DriverAdaptor::make_current(int device, ContextToken* previous) {
  Call call = call_of(Operation::make_current);
  call.device = device;
  const DriverStatus status = intercept(call);
  if (status.ok()) *previous = call.previous;
  return status;
}

DriverStatus DriverAdaptor::copy_async(int device, DeviceAddress dst, DeviceAddress src,
                                       std::size_t size_bytes, StreamHandle stream) {
  Call call = call_of(Operation::copy_async);
  call.device = device;
  call.address = dst;
  call.source = src;
  call.size_bytes = size_bytes;
  call.stream = stream;
  return intercept(call);
}

DriverStatus DriverAdaptor::copy_from_host_async(int device, DeviceAddress dst, std::uintptr_t src,
                                                 std::size_t size_bytes, StreamHandle stream) {
  Call call = call_of(Operation::copy_from_host_async);
  call.device = device;
  call.address = dst;
  call.host_source = src;
  call.size_bytes = size_bytes;
  call.stream = stream;
  return intercept(call);
}

DriverStatus DriverAdaptor::event_create(int device, EventHandle* out) {
  Call call = call_of(Operation::event_create);
  call.device = device;
  const DriverStatus status = intercept(call);
  if (status.ok()) *out = call.event;
  return status;
}

DriverStatus DriverAdaptor::event_destroy(EventHandle event) {
  Call call = call_of(Operation::event_destroy);
  call.event = event;
  return intercept(call);
}

DriverStatus DriverAdaptor::event_record(int device, EventHandle event, StreamHandle stream) {
  Call call = call_of(Operation::event_record);
  call.device = device;
  call.event = event;
  call.stream = stream;
  return intercept(call);
}

DriverStatus DriverAdaptor::event_synchronize(EventHandle event) {
  Call call = call_of(Operation::event_synchronize);
  call.event = event;
  return intercept(call);
}

DriverStatus DriverAdaptor::stream_wait_event(int device, StreamHandle stream, EventHandle event) {
  Call call = call_of(Operation::stream_wait_event);
  call.device = device;
  call.stream = stream;
  call.event = event;
  return intercept(call);
}

}  // namespace aimdo::adaptors
