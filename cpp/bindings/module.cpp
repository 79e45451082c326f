// aimdo._core: thin nanobind bindings. Type conversion, GIL release and exception
// translation only; every decision lives in the core. One bind_* function per concern
// (common.hpp); this file only assembles the module.
//
// Every call that can reach the driver or wait on a device lock releases the GIL, so
// Python threads driving different devices run in parallel.
#include "aimdo/vbar.hpp"
#include "common.hpp"

NB_MODULE(_core, m) {
  namespace nb = nanobind;
  using namespace aimdo::bindings;
  m.doc() = "aimdo's native core. Import `aimdo`, not this module.";
  // Objects still alive when the interpreter exits are normal for a Python library (a
  // global Manager, a module-level model); nanobind's report of them would read as a bug.
  nb::set_leak_warnings(false);
  bind_errors(m);
  // Where Vbar.alloc starts each allocation: its offset is a multiple of this many bytes,
  // so n allocations of s bytes need (n - 1) * round_up(s, this) + s bytes of a VBAR.
  m.attr("ALLOCATION_ALIGNMENT_BYTES") = aimdo::Vbar::kAllocationAlignment;
  bind_process(m);
  bind_driver(m);
  bind_adaptors(m);
  bind_sim(m);
  bind_vbar(m);
  bind_manager(m);
  bind_file_reads(m);
  bind_file_pump(m);
}
