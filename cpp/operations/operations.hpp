// The Driver's operations as data: the one list of them. The simulator (costs, holds),
// the adaptors (fault injection, call counts, the event log), replay and the Python
// bindings (names, default costs) all read this table; nothing else names an operation.
// Adding an operation to the Driver interface means one row here, one case in invoke()
// (call.cpp, which the compiler checks for exhaustiveness) and the backends' methods.
//
// Per operation:
// - `method`: the aimdo::Driver method ("create_physical").
// - `cuda_name`: the CUDA driver function the CUDA backend calls for it ("cuMemCreate").
//   Fault injection, call counts, holds and the event log name operations by it.
// - `default_cost_ns`: the virtual time the simulator charges a successful call by
//   default, in nanoseconds (measured on 2 x H100 80GB with 32 MiB pages,
//   docs/measurements.md; the H200 figures there agree), or
//   kNoCost for an operation that costs nothing and whose cost cannot be set. The rows
//   from cuMemcpyHtoDAsync on are not measured: they are launch costs of the order the
//   measured asynchronous calls show (cuMemAllocAsync, cuMemcpyDtoDAsync), and a copy's
//   transfer is charged apart from its launch (the simulator's copy engine).
// - `arguments`, `outputs`: the fields its event-log line carries before "->" and after
//   the answer's name, in the order they are written (log_line.hpp says how each reads).
//
// Thread-safety: immutable, read from any thread.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace aimdo {

enum class Operation : std::uint8_t {
  memory_info,
  reserve_address_range,
  free_address_range,
  create_physical,
  release_physical,
  map,
  unmap,
  set_access,
  synchronize,
  stream_alloc,
  stream_free,
  make_current,
  copy_async,
  copy_from_host_async,
  event_create,
  event_destroy,
  event_record,
  event_synchronize,
  stream_wait_event,
};
inline constexpr std::size_t kOperationCount = 19;

constexpr std::size_t index_of(Operation operation) noexcept {
  return static_cast<std::size_t>(operation);
}

// A field of a driver call's log line. Each is written in exactly one form.
enum class Field : std::uint8_t {
  device,       // "dev": the device the call names, decimal
  current,      // "cur": the device current on the calling thread (-1: none), decimal;
                //        carried by the calls that need a current context
  size,         // "size": bytes, decimal
  alignment,    // "align": bytes, decimal
  address,      // "va": an address in a reservation (address_naming.hpp)
  handle,       // "handle": a physical allocation's handle, 0x-hex
  pointer,      // "ptr": a stream-ordered allocation's address (address_naming.hpp)
  source,       // "src": the address a copy reads (address_naming.hpp)
  event,        // "ev": an event's handle, 0x-hex
  free_bytes,   // "free": bytes free on the device, decimal (an output, environment)
  total_bytes,  // "total": the device's bytes, decimal (an output, environment)
};

// The key a field is written under ("dev"). A string literal.
const char* field_key(Field field) noexcept;

// A value the device reports about itself (free and total memory): another machine
// answers otherwise, so replay across backends lists it as a note, not a difference.
constexpr bool is_environment(Field field) noexcept {
  return field == Field::free_bytes || field == Field::total_bytes;
}

// The fields of one line: at most five (checked when the table is compiled).
class FieldList {
 public:
  constexpr FieldList() = default;
  constexpr FieldList(std::initializer_list<Field> fields) {
    for (const Field field : fields) fields_[count_++] = field;
  }
  constexpr const Field* begin() const noexcept { return fields_.data(); }
  constexpr const Field* end() const noexcept { return fields_.data() + count_; }
  constexpr bool contains(Field wanted) const noexcept {
    for (const Field field : *this) {
      if (field == wanted) return true;
    }
    return false;
  }

 private:
  std::array<Field, 5> fields_{};
  std::size_t count_ = 0;
};

inline constexpr std::int64_t kNoCost = -1;

struct OperationInfo {
  Operation operation;
  const char* method;
  const char* cuda_name;
  std::int64_t default_cost_ns;
  FieldList arguments;
  FieldList outputs;
};

// clang-format off
inline constexpr std::array<OperationInfo, kOperationCount> kOperations = {{
  {Operation::memory_info, "memory_info", "cuMemGetInfo", 8'000,
   {Field::device, Field::current}, {Field::free_bytes, Field::total_bytes}},
  {Operation::reserve_address_range, "reserve_address_range", "cuMemAddressReserve", 5'000,
   {Field::device, Field::size, Field::alignment}, {Field::address}},
  {Operation::free_address_range, "free_address_range", "cuMemAddressFree", 5'000,
   {Field::address, Field::size}, {}},
  {Operation::create_physical, "create_physical", "cuMemCreate", 20'000,
   {Field::device, Field::size}, {Field::handle}},
  {Operation::release_physical, "release_physical", "cuMemRelease", 44'000,
   {Field::handle}, {}},
  {Operation::map, "map", "cuMemMap", 4'000,
   {Field::address, Field::size, Field::handle}, {}},
  {Operation::unmap, "unmap", "cuMemUnmap", 27'000,
   {Field::address, Field::size}, {}},
  {Operation::set_access, "set_access", "cuMemSetAccess", 50'000,
   {Field::address, Field::size, Field::device}, {}},
  {Operation::synchronize, "synchronize", "cuCtxSynchronize", 4'000,
   {Field::device, Field::current}, {}},
  {Operation::stream_alloc, "stream_alloc", "cuMemAllocAsync", 2'000,
   {Field::device, Field::current, Field::size}, {Field::pointer}},
  {Operation::stream_free, "stream_free", "cuMemFreeAsync", 2'000,
   {Field::device, Field::current, Field::pointer}, {}},
  {Operation::make_current, "make_current", "cuCtxSetCurrent", kNoCost,
   {Field::device}, {}},
  {Operation::copy_async, "copy_async", "cuMemcpyDtoDAsync", 2'000,
   {Field::device, Field::current, Field::address, Field::source, Field::size}, {}},
  // The host address a copy reads is not logged (as no stream is): replay copies from a
  // buffer of its own.
  {Operation::copy_from_host_async, "copy_from_host_async", "cuMemcpyHtoDAsync", 2'000,
   {Field::device, Field::current, Field::address, Field::size}, {}},
  {Operation::event_create, "event_create", "cuEventCreate", 1'000,
   {Field::device, Field::current}, {Field::event}},
  {Operation::event_destroy, "event_destroy", "cuEventDestroy", 1'000,
   {Field::event}, {}},
  {Operation::event_record, "event_record", "cuEventRecord", 1'000,
   {Field::device, Field::current, Field::event}, {}},
  {Operation::event_synchronize, "event_synchronize", "cuEventSynchronize", 1'000,
   {Field::event}, {}},
  {Operation::stream_wait_event, "stream_wait_event", "cuStreamWaitEvent", 1'000,
   {Field::device, Field::current, Field::event}, {}},
}};
// clang-format on

constexpr bool table_is_in_enum_order() noexcept {
  for (std::size_t i = 0; i < kOperationCount; ++i) {
    if (index_of(kOperations[i].operation) != i) return false;
  }
  return true;
}
static_assert(table_is_in_enum_order(), "kOperations must list every Operation in enum order");
static_assert(index_of(Operation::stream_wait_event) + 1 == kOperationCount,
              "kOperationCount must count every Operation");

constexpr const OperationInfo& info(Operation operation) noexcept {
  return kOperations[index_of(operation)];
}

// The operation a CUDA function name names ("cuMemMap"). InvalidArgumentError listing
// the known names for any other.
Operation operation_named(const std::string& cuda_name);
// The same, false (and `out` untouched) for an unknown name. Never throws.
bool find_operation(const std::string& cuda_name, Operation* out) noexcept;

}  // namespace aimdo
