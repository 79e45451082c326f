// Signature, Allocation and Vbar. A fault or unpin that needs neither the driver nor a
// wait completes with the GIL held (cheaper than releasing it around a call of a few
// hundred nanoseconds); everything else releases the GIL.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "aimdo/vbar.hpp"
#include "common.hpp"

namespace aimdo::bindings {

namespace {

void bind_signature(nb::module_& m) {
  nb::class_<Signature>(m, "Signature",
                        "Per-page serial numbers from a fault. Equal to an earlier signature "
                        "of the same allocation exactly when no page under it was re-mapped.")
      .def_prop_ro("serials",
                   [](const Signature& s) {
                     nb::list out;
                     for (auto serial : s.serials) out.append(serial);
                     return nb::tuple(out);
                   })
      .def(
          "__eq__", [](const Signature& a, const Signature& b) { return a == b; },
          nb::is_operator())
      .def(
          "__eq__", [](const Signature&, nb::handle) { return false; }, nb::is_operator())
      .def(
          "__ne__", [](const Signature& a, const Signature& b) { return a != b; },
          nb::is_operator())
      .def(
          "__ne__", [](const Signature&, nb::handle) { return true; }, nb::is_operator())
      .def("__hash__",
           [](const Signature& s) {
             std::uint64_t h = 1469598103934665603ULL;
             for (auto serial : s.serials) h = (h ^ serial) * 1099511628211ULL;
             return static_cast<Py_hash_t>(h >> 1);
           })
      .def("__len__", [](const Signature& s) { return s.serials.size(); })
      .def("__repr__", [](const Signature& s) {
        std::string out = "Signature(";
        for (std::size_t i = 0; i < s.serials.size(); ++i) {
          out += (i ? ", " : "") + std::to_string(s.serials[i]);
        }
        return out + ")";
      });
}

void bind_allocation(nb::module_& m) {
  nb::class_<Allocation>(m, "Allocation", "A byte range of a VBAR handed to one tensor.")
      .def_prop_ro(
          "offset_bytes", [](const Allocation& a) { return a.offset_bytes; },
          "Bytes from the VBAR's base (a multiple of ALLOCATION_ALIGNMENT_BYTES).")
      .def_prop_ro(
          "size_bytes", [](const Allocation& a) { return a.size_bytes; }, "Bytes.")
      // The names before the convention (sizes end in _bytes), kept for existing code.
      .def_prop_ro(
          "offset", [](const Allocation& a) { return a.offset_bytes; }, "Alias of offset_bytes.")
      .def_prop_ro(
          "size", [](const Allocation& a) { return a.size_bytes; }, "Alias of size_bytes.")
      .def_prop_ro("address", &Allocation::address, "Device virtual address of the first byte.")
      .def_prop_ro("vbar", [](const Allocation& a) { return a.vbar; })
      .def_prop_ro("device", [](const Allocation& a) { return a.vbar->device(); })
      .def("__repr__", [](const Allocation& a) {
        return "Allocation(device=" + std::to_string(a.vbar->device()) +
               ", offset=" + std::to_string(a.offset_bytes) +
               ", size=" + std::to_string(a.size_bytes) + ")";
      });
}

// What a VBAR is and the calls a forward makes: alloc, fault, unpin.
void add_vbar_faults(nb::class_<Vbar>& vbar) {
  vbar.def_prop_ro("device", &Vbar::device)
      .def_prop_ro("driver", &Vbar::driver, "The backend its memory belongs to.")
      .def_prop_ro("size_bytes", &Vbar::size_bytes, "Bytes asked for at creation.")
      .def_prop_ro("page_size_bytes", &Vbar::page_size_bytes)
      // The names before the convention (sizes end in _bytes), kept for existing code.
      .def_prop_ro("size", &Vbar::size_bytes, "Alias of size_bytes.")
      .def_prop_ro("page_size", &Vbar::page_size_bytes, "Alias of page_size_bytes.")
      .def_prop_ro("page_count", &Vbar::page_count)
      .def_prop_ro("address", &Vbar::base_address, "Device virtual address of the range.")
      .def(
          "alloc", [](Vbar& v, IntArg n) { return v.alloc(to_size(n, "nbytes")); }, "nbytes"_a,
          release_gil(),
          "Hand out the next `nbytes` of the range (512-byte aligned, in call order).")
      .def(
          "fault",
          [](Vbar& v, const Allocation& a) {
            // A hit needs neither the driver nor a wait: done with the GIL held. Anything
            // else runs with the GIL released.
            std::optional<Signature> out;
            if (v.try_fault(a, &out)) return out;
            nb::gil_scoped_release release;
            return v.fault(a);
          },
          "allocation"_a,
          "Make the allocation resident and pin it: its Signature, or None if offloaded.")
      .def(
          "unpin",
          [](Vbar& v, const Allocation& a) {
            if (v.try_unpin(a)) return;
            nb::gil_scoped_release release;
            v.unpin(a);
          },
          "allocation"_a, "Drop the pin taken by one successful fault (or pin_resident).")
      .def("pin_resident", &Vbar::pin_resident, "allocation"_a, release_gil(),
           "Pin the allocation's pages if every one is resident: its Signature; None, with "
           "nothing pinned, otherwise. Never maps or evicts (a peer's copy reads them).")
      .def(
          "share_with", [](Vbar& v, int peer) { v.share_with(peer); }, "peer"_a, release_gil(),
          "Grant device `peer` access to every page this VBAR maps (now and later). "
          "DriverError when the driver refuses it.")
      .def_prop_ro(
          "readers",
          [](const Vbar& v) {
            nb::gil_scoped_release release;
            return v.readers();
          },
          "The peers share_with granted access to its pages.");
}

// Priority, watermark, floor, eviction, figures and close.
void add_vbar_limits(nb::class_<Vbar>& vbar) {
  vbar.def("prioritize", &Vbar::prioritize, release_gil(),
           "Move to the top of the device's priority list; reset the watermark to all pages.")
      .def("deprioritize", &Vbar::deprioritize, release_gil(),
           "Move to the bottom of the device's priority list.")
      .def_prop_ro("watermark_bytes",
                   [](const Vbar& v) {
                     nb::gil_scoped_release release;
                     return v.watermark_bytes();
                   })
      .def(
          "set_watermark", [](Vbar& v, IntArg n) { v.set_watermark(to_size(n, "nbytes")); },
          "nbytes"_a, release_gil(),
          "Offload pages starting at or above `nbytes` (rounded up to a page), releasing "
          "unpinned ones; may also raise the watermark.")
      .def_prop_rw(
          "floor_bytes",
          [](const Vbar& v) {
            nb::gil_scoped_release release;
            return v.floor_bytes();
          },
          [](Vbar& v, IntArg n) {
            const std::size_t bytes = to_size(n, "floor_bytes");
            nb::gil_scoped_release release;
            v.set_floor(bytes);
          },
          "Eviction never lowers the watermark below this (rounded up to a page).")
      .def(
          "free_memory", [](Vbar& v, IntArg n) { return v.free_memory(to_size(n, "nbytes")); },
          "nbytes"_a, release_gil(), "Evict from this VBAR alone; returns bytes freed.")
      .def_prop_ro("loaded_bytes",
                   [](const Vbar& v) {
                     nb::gil_scoped_release release;
                     return v.loaded_bytes();
                   })
      .def_prop_ro("allocated_bytes",
                   [](const Vbar& v) {
                     nb::gil_scoped_release release;
                     return v.allocated_bytes();
                   })
      .def(
          "residency",
          [](const Vbar& v) {
            std::vector<PageResidency> pages;
            {
              nb::gil_scoped_release release;
              pages = v.residency();
            }
            nb::list out;
            for (const auto& p : pages) out.append(nb::make_tuple(p.resident, p.pinned));
            return out;
          },
          "Per page: (resident, pinned).")
      .def("close", &Vbar::close, release_gil(),
           "Release every page (pinned ones too) and the address range. Idempotent.")
      .def_prop_ro("closed", [](const Vbar& v) {
        nb::gil_scoped_release release;
        return v.closed();
      });
}

}  // namespace

void bind_vbar(nb::module_& m) {
  bind_signature(m);
  bind_allocation(m);
  nb::class_<Vbar> vbar(m, "Vbar",
                        "One model's reserved address range on one device (design.md §1).");
  add_vbar_faults(vbar);
  add_vbar_limits(vbar);
}

}  // namespace aimdo::bindings
