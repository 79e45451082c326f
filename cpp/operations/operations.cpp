#include "operations.hpp"

#include "aimdo/errors.hpp"

namespace aimdo {

const char* field_key(Field field) noexcept {
  switch (field) {
    case Field::device: return "dev";
    case Field::current: return "cur";
    case Field::size: return "size";
    case Field::alignment: return "align";
    case Field::address: return "va";
    case Field::handle: return "handle";
    case Field::pointer: return "ptr";
    case Field::source: return "src";
    case Field::event: return "ev";
    case Field::free_bytes: return "free";
    case Field::total_bytes: return "total";
  }
  return "?";
}

bool find_operation(const std::string& cuda_name, Operation* out) noexcept {
  for (const OperationInfo& row : kOperations) {
    if (cuda_name == row.cuda_name) {
      *out = row.operation;
      return true;
    }
  }
  return false;
}

Operation operation_named(const std::string& cuda_name) {
  Operation found = Operation::memory_info;
  if (find_operation(cuda_name, &found)) return found;
  std::string known;
  for (const OperationInfo& row : kOperations) {
    known += (known.empty() ? "" : ", ") + std::string(row.cuda_name);
  }
  throw InvalidArgumentError("unknown driver operation '" + cuda_name + "'; known: " + known);
}

}  // namespace aimdo
