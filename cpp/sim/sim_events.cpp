// The simulator's powers as event-log lines (see "Events" in sim_driver.hpp): each power
// writes its line where it succeeds; replay_event() reads one back and uses the power
// again. One entry per power below, its fields read in the form the power wrote them.
#include <array>

#include "aimdo/errors.hpp"
#include "sim_state.hpp"

namespace aimdo::sim {
namespace {

struct PowerEvent {
  const char* name;
  void (*replay)(SimDriver& sim, LogLine& line);
};

std::size_t bytes(LogLine& line) {
  return line.unsigned_decimal("bytes");
}

constexpr std::array<PowerEvent, 8> kPowerEvents = {{
    {"@add_external_usage",
     [](SimDriver& sim, LogLine& line) {
       sim.add_external_usage(line.integer("dev"), bytes(line));
     }},
    {"@remove_external_usage",
     [](SimDriver& sim, LogLine& line) {
       sim.remove_external_usage(line.integer("dev"), bytes(line));
     }},
    {"@advance",
     [](SimDriver& sim, LogLine& line) {
       sim.advance(line.integer("dev"), line.signed_decimal("ns"));
     }},
    {"@copy_to_device",
     [](SimDriver& sim, LogLine& line) { sim.copy_to_device(line.integer("dev"), bytes(line)); }},
    {"@compute",
     [](SimDriver& sim, LogLine& line) {
       sim.compute(line.integer("dev"), line.signed_decimal("ns"));
     }},
    {"@copy_async",
     [](SimDriver& sim, LogLine& line) {
       sim.copy_async(line.integer("dev"), bytes(line), line.signed_decimal("after"));
     }},
    {"@peer_copy_async",
     [](SimDriver& sim, LogLine& line) {
       sim.peer_copy_async(line.integer("dev"), line.integer("peer"), bytes(line),
                           line.signed_decimal("after"));
     }},
    {"@compute_async",
     [](SimDriver& sim, LogLine& line) {
       sim.compute_async(line.integer("dev"), line.signed_decimal("ns"),
                         line.signed_decimal("after"));
     }},
}};

}  // namespace

bool SimDriver::recording() const noexcept {
  return events_ != nullptr && events_->recording();
}

void SimDriver::note(std::string line) const {
  if (recording()) events_->append(std::move(line));
}

bool SimDriver::replay_event(LogLine& line) {
  for (const PowerEvent& event : kPowerEvents) {
    if (line.name() == event.name) {
      event.replay(*this, line);
      return true;
    }
  }
  return false;
}

}  // namespace aimdo::sim
