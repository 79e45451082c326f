#include "call_line.hpp"

#include "log_line.hpp"

namespace aimdo {
namespace {

std::string value_text(Field field, const Call& call, const AddressNaming& naming) {
  switch (field) {
    case Field::device: return std::to_string(call.device);
    case Field::current: return std::to_string(call.current);
    case Field::size: return std::to_string(call.size_bytes);
    case Field::alignment: return std::to_string(call.alignment_bytes);
    case Field::address: return naming.name(call.address);
    case Field::handle: return hex(call.handle);
    case Field::pointer: return naming.name(call.pointer);
    case Field::source: return naming.name(call.source);
    case Field::event: return hex(call.event);
    case Field::free_bytes: return std::to_string(call.free_bytes);
    case Field::total_bytes: return std::to_string(call.total_bytes);
  }
  return "?";
}

}  // namespace

std::string call_line(const Call& call, const DriverStatus& status, const AddressNaming& naming) {
  const OperationInfo& row = info(call.operation);
  LineText line(row.cuda_name);
  for (const Field field : row.arguments) {
    line.add(field_key(field), value_text(field, call, naming));
  }
  line.answer(status.name);
  if (!status.ok()) return line.str();
  for (const Field field : row.outputs) {
    line.add(field_key(field), value_text(field, call, naming));
  }
  return line.str();
}

}  // namespace aimdo
