// Native stress program: several threads drive the core on the simulator with a seeded
// random mix of operations, then the per-device invariants are checked. The simulator is
// wrapped as aimdo.sim wraps it (a recorder, recording, over a failure injector), so the
// adaptors' locking is stressed too: every call the injector counted is in the log once.
// The devices are linked all to all (as NVLink peers): some VBARs are shared with another
// device and their allocations published, and threads pin them as a peer's copy does
// (pin_resident, then unpin), racing their owners' faults, evictions and closes.
// A second phase stresses FileReads: threads queue reads of a temporary file with random
// offsets and lengths, some through the aligned (O_DIRECT) arithmetic, wait and poke each
// other's waits, and check every byte read; the reads are closed from two threads with
// some still queued.
// Built and run under AddressSanitizer + UBSan and under ThreadSanitizer by .ci/run (no
// Python).
//
//   aimdo_stress [--devices N] [--threads N] [--ops N] [--seed N]
//
// Exit status 0 when every invariant holds, 1 otherwise (the seed is printed).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "aimdo/errors.hpp"
#include "aimdo/file_reads.hpp"
#include "aimdo/manager.hpp"
#include "failing_driver.hpp"
#include "recording_driver.hpp"
#include "sim_driver.hpp"

namespace {

constexpr std::size_t kPage = std::size_t{2} << 20;

struct Config {
  int devices = 8;
  int threads = 16;
  int ops = 4000;
  std::uint64_t seed = 1;
};

struct OwnedVbar {
  std::shared_ptr<aimdo::Vbar> vbar;
  std::vector<aimdo::Allocation> allocations;
  std::vector<int> pins;  // per allocation, taken by this thread
};

struct Counters {
  std::atomic<std::uint64_t> ops{0};
  std::atomic<std::uint64_t> offloaded{0};
  std::atomic<std::uint64_t> out_of_memory{0};
  std::atomic<std::uint64_t> refused_external{0};
  std::atomic<std::uint64_t> unexpected{0};
  std::atomic<std::uint64_t> peer_pins{0};  // pin_resident calls that pinned
};

// Allocations any thread may pin as a peer would: (VBAR, allocation), guarded by `mutex`.
struct Published {
  std::mutex mutex;
  std::vector<std::pair<std::shared_ptr<aimdo::Vbar>, aimdo::Allocation>> entries;

  void add(const std::shared_ptr<aimdo::Vbar>& vbar, const aimdo::Allocation& allocation) {
    std::lock_guard<std::mutex> lock(mutex);
    entries.emplace_back(vbar, allocation);
  }
  void remove(const aimdo::Vbar* vbar) {
    std::lock_guard<std::mutex> lock(mutex);
    entries.erase(std::remove_if(entries.begin(), entries.end(),
                                 [&](const auto& entry) { return entry.first.get() == vbar; }),
                  entries.end());
  }
  bool pick(std::size_t at, std::pair<std::shared_ptr<aimdo::Vbar>, aimdo::Allocation>* out) {
    std::lock_guard<std::mutex> lock(mutex);
    if (entries.empty()) return false;
    *out = entries[at % entries.size()];
    return true;
  }
};

// A peer's copy: pin the pages if resident, then let them go. A VBAR its owner closed
// meanwhile answers InvalidStateError, which a peer expects.
void pin_as_peer(Published& published, std::size_t at, Counters& counters) {
  std::pair<std::shared_ptr<aimdo::Vbar>, aimdo::Allocation> entry;
  if (!published.pick(at, &entry)) return;
  try {
    if (entry.first->pin_resident(entry.second)) {
      counters.peer_pins.fetch_add(1, std::memory_order_relaxed);
      entry.first->unpin(entry.second);
    }
  } catch (const aimdo::InvalidStateError&) {
  }
}

void unpin_all(OwnedVbar& owned) {
  for (std::size_t i = 0; i < owned.allocations.size(); ++i) {
    while (owned.pins[i] > 0) {
      owned.vbar->unpin(owned.allocations[i]);
      --owned.pins[i];
    }
  }
}

void drive(aimdo::Manager& manager, aimdo::sim::SimDriver& sim, const Config& config, int index,
           Counters& counters, std::vector<OwnedVbar>& kept, Published& published) {
  std::mt19937_64 random(config.seed * 1000003u + static_cast<std::uint64_t>(index));
  const auto pick = [&](std::uint64_t n) { return static_cast<std::size_t>(random() % n); };
  std::vector<OwnedVbar> vbars;
  std::vector<std::size_t> external(static_cast<std::size_t>(config.devices), 0);

  for (int op = 0; op < config.ops; ++op) {
    counters.ops.fetch_add(1, std::memory_order_relaxed);
    const int device = static_cast<int>(pick(static_cast<std::uint64_t>(config.devices)));
    try {
      const std::size_t choice = pick(100);
      if (vbars.empty() || choice < 5) {
        OwnedVbar owned;
        owned.vbar = manager.create_vbar(device, (4 + pick(28)) * kPage + pick(kPage));
        const std::size_t count = 1 + pick(12);
        for (std::size_t i = 0; i < count; ++i) {
          try {
            owned.allocations.push_back(owned.vbar->alloc(1 + pick(3 * kPage)));
            owned.pins.push_back(0);
          } catch (const aimdo::InvalidArgumentError&) {
            break;  // the range is full
          }
        }
        if (config.devices > 1 && pick(4) == 0) {
          const int peer =
              (device + 1 +
               static_cast<int>(pick(static_cast<std::uint64_t>(config.devices - 1)))) %
              config.devices;
          owned.vbar->share_with(peer);
          for (const auto& allocation : owned.allocations) published.add(owned.vbar, allocation);
        }
        vbars.push_back(std::move(owned));
        continue;
      }
      OwnedVbar& owned = vbars[pick(vbars.size())];
      if (owned.allocations.empty()) continue;
      const std::size_t a = pick(owned.allocations.size());
      if (choice < 45) {
        if (owned.vbar->fault(owned.allocations[a])) {
          ++owned.pins[a];
        } else {
          counters.offloaded.fetch_add(1, std::memory_order_relaxed);
        }
      } else if (choice < 75) {
        if (owned.pins[a] > 0) {
          owned.vbar->unpin(owned.allocations[a]);
          --owned.pins[a];
        }
      } else if (choice < 79) {
        owned.vbar->prioritize();
      } else if (choice < 82) {
        owned.vbar->deprioritize();
      } else if (choice < 85) {
        owned.vbar->set_watermark(pick(owned.vbar->page_count() + 1) * kPage);
      } else if (choice < 87) {
        owned.vbar->set_floor(pick(owned.vbar->page_count() / 2 + 1) * kPage);
      } else if (choice < 90) {
        owned.vbar->free_memory(pick(6) * kPage);
      } else if (choice < 93) {
        manager.reclaim(device, pick(8) * kPage);
      } else if (choice < 95) {
        unpin_all(owned);
        published.remove(owned.vbar.get());
        owned.vbar->close();
        owned = std::move(vbars.back());
        vbars.pop_back();
      } else if (choice < 97) {
        pin_as_peer(published, pick(1u << 20), counters);
      } else if (choice < 98) {
        const std::size_t bytes = (1 + pick(6)) * kPage;
        try {
          sim.add_external_usage(device, bytes);
          external[static_cast<std::size_t>(device)] += bytes;
        } catch (const aimdo::InvalidArgumentError&) {
          counters.refused_external.fetch_add(1, std::memory_order_relaxed);
        }
      } else {
        std::size_t& mine = external[static_cast<std::size_t>(device)];
        sim.remove_external_usage(device, mine);
        mine = 0;
      }
    } catch (const aimdo::OutOfMemoryError&) {
      counters.out_of_memory.fetch_add(1, std::memory_order_relaxed);
    } catch (const std::exception& error) {
      std::fprintf(stderr, "thread %d op %d: unexpected %s\n", index, op, error.what());
      counters.unexpected.fetch_add(1, std::memory_order_relaxed);
    }
  }
  for (auto& owned : vbars) unpin_all(owned);
  for (int d = 0; d < config.devices; ++d) {
    sim.remove_external_usage(d, external[static_cast<std::size_t>(d)]);
  }
  for (auto& owned : vbars) kept.push_back(std::move(owned));
}

bool parse(int argc, char** argv, Config* config) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    const long long value = std::strtoll(argv[i + 1], nullptr, 10);
    if (value <= 0) return false;
    if (key == "--devices")
      config->devices = static_cast<int>(value);
    else if (key == "--threads")
      config->threads = static_cast<int>(value);
    else if (key == "--ops")
      config->ops = static_cast<int>(value);
    else if (key == "--seed")
      config->seed = static_cast<std::uint64_t>(value);
    else
      return false;
  }
  return argc % 2 == 1 && config->devices <= 64;
}

// The simulator under the adaptors aimdo.sim puts over it, recording.
struct Stack {
  std::shared_ptr<aimdo::EventLog> events = std::make_shared<aimdo::EventLog>();
  std::shared_ptr<aimdo::sim::SimDriver> sim;
  std::shared_ptr<aimdo::adaptors::FailingDriver> failing;
  std::shared_ptr<aimdo::adaptors::RecordingDriver> recorder;

  explicit Stack(const Config& config) {
    std::vector<aimdo::sim::SimDeviceSpec> specs(static_cast<std::size_t>(config.devices));
    for (auto& spec : specs) spec.total_bytes = 256 * kPage;
    aimdo::sim::SimOptions options;
    const auto count = static_cast<std::size_t>(config.devices);
    options.topology.peers.assign(count, std::vector<aimdo::sim::SimPeerLink>(count));
    for (std::size_t i = 0; i < count; ++i) {
      for (std::size_t j = 0; j < count; ++j) {
        if (i != j) options.topology.peers[i][j].bytes_per_s = 390e9;
      }
    }
    sim = std::make_shared<aimdo::sim::SimDriver>(specs, options, events);
    failing = std::make_shared<aimdo::adaptors::FailingDriver>(sim, config.seed, events);
    recorder =
        std::make_shared<aimdo::adaptors::RecordingDriver>(failing, events, sim->address_naming());
    recorder->start();
  }

  // Every call the failure injector counted was written to the log exactly once.
  bool log_is_whole() const {
    std::uint64_t counted = 0;
    for (const aimdo::OperationInfo& row : aimdo::kOperations) {
      counted += failing->call_count(row.cuda_name, -1);
    }
    std::uint64_t logged = 0;
    for (const std::string& line : events->lines()) logged += line[0] == '@' ? 0u : 1u;
    if (counted == logged) return true;
    std::fprintf(stderr, "the injector counted %llu calls, the log has %llu\n",
                 static_cast<unsigned long long>(counted), static_cast<unsigned long long>(logged));
    return false;
  }
};

// Per device: what the VBARs hold is what aimdo accounts, and what the simulator has
// allocated is exactly that.
bool check_devices(aimdo::Manager& manager, aimdo::sim::SimDriver& sim, const Config& config,
                   const std::vector<std::vector<OwnedVbar>>& kept) {
  bool ok = true;
  std::vector<std::size_t> loaded(static_cast<std::size_t>(config.devices), 0);
  for (const auto& list : kept) {
    for (const auto& owned : list) {
      if (owned.vbar->closed()) continue;
      loaded[static_cast<std::size_t>(owned.vbar->device())] += owned.vbar->loaded_bytes();
      for (const auto& page : owned.vbar->residency()) {
        if (page.pinned) {
          std::fprintf(stderr, "a page is still pinned after every pin was dropped\n");
          ok = false;
        }
      }
    }
  }
  for (int d = 0; d < config.devices; ++d) {
    const auto device = manager.device(d);
    const std::size_t resident = device->resident_bytes();
    const std::size_t physical = sim.physical_bytes(d);
    if (resident != loaded[static_cast<std::size_t>(d)] || physical != resident ||
        device->usage_bytes() != resident || sim.external_usage(d) != 0) {
      std::fprintf(stderr,
                   "device %d: VBARs hold %zu bytes, aimdo accounts %zu (usage %zu), the "
                   "simulator has %zu physical and %zu external\n",
                   d, loaded[static_cast<std::size_t>(d)], resident, device->usage_bytes(),
                   physical, sim.external_usage(d));
      ok = false;
    }
  }
  return ok;
}

// The byte at `offset` of the file stress_file_reads writes.
unsigned char file_byte(std::size_t offset) {
  return static_cast<unsigned char>((offset * 131 + 7) % 251);
}

// FileReads under several threads; false (with a message) when a byte or a result is
// wrong.
bool stress_file_reads(const Config& config) {
  constexpr std::size_t kFileBytes = std::size_t{1} << 20;
  constexpr std::size_t kAlign = aimdo::kDirectReadAlign;
  char path[] = "/tmp/aimdo_stress_XXXXXX";
  const int fd = mkstemp(path);
  if (fd < 0) {
    std::fprintf(stderr, "file reads: cannot make a temporary file\n");
    return false;
  }
  unlink(path);
  std::vector<unsigned char> data(kFileBytes);
  for (std::size_t i = 0; i < kFileBytes; ++i) data[i] = file_byte(i);
  bool ok = pwrite(fd, data.data(), data.size(), 0) == static_cast<ssize_t>(data.size());
  struct stat status{};
  ok = ok && fstat(fd, &status) == 0;
  aimdo::ReadRequest base;
  base.fd = fd;
  base.size = static_cast<std::int64_t>(status.st_size);
  base.mtime_ns =
      static_cast<std::int64_t>(status.st_mtim.tv_sec) * 1000000000 + status.st_mtim.tv_nsec;
  base.inode = static_cast<std::uint64_t>(status.st_ino);
  std::atomic<unsigned long long> wrong{0};
  {
    aimdo::FileReads reads(4);
    std::vector<std::thread> threads;
    for (int t = 0; t < config.threads && ok; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 random(config.seed * 7919 + static_cast<unsigned long long>(t));
        for (int op = 0; op < config.ops / 10; ++op) {
          aimdo::ReadRequest request = base;
          request.count = 1 + random() % (kAlign * 3);
          request.offset = static_cast<std::int64_t>(random() % (kFileBytes - request.count));
          const bool aligned = random() % 2 == 0;
          request.direct_fd = aligned ? fd : -1;
          const std::size_t capacity = request.count + 2 * kAlign;
          std::vector<unsigned char> area(capacity + kAlign);
          auto start = reinterpret_cast<std::uintptr_t>(area.data());
          start += (kAlign - start % kAlign) % kAlign;
          request.into = start;
          request.capacity = capacity;
          const std::uint64_t ticket = reads.submit(request);
          if (random() % 4 == 0) reads.poke();
          while (!reads.wait(ticket)) {
          }
          const aimdo::ReadResult result = reads.take(ticket);
          const auto* got = reinterpret_cast<const unsigned char*>(start) + result.lead;
          bool same =
              result.status == aimdo::ReadStatus::kDone &&
              result.lead == (aligned ? static_cast<std::size_t>(request.offset) % kAlign : 0);
          for (std::size_t i = 0; same && i < request.count; ++i) {
            same = got[i] == file_byte(static_cast<std::size_t>(request.offset) + i);
          }
          if (!same) wrong.fetch_add(1);
        }
      });
    }
    for (auto& thread : threads) thread.join();
    // Closed with reads still queued: they are read, and their results can be taken.
    std::vector<std::vector<unsigned char>> last(32, std::vector<unsigned char>(64));
    std::vector<std::uint64_t> tickets;
    for (auto& buffer : last) {
      aimdo::ReadRequest request = base;
      request.count = buffer.size();
      request.into = reinterpret_cast<std::uintptr_t>(buffer.data());
      request.capacity = buffer.size();
      tickets.push_back(reads.submit(request));
    }
    std::thread closer([&reads] { reads.close(); });  // two closes: both wait for the reads
    reads.close();
    closer.join();
    for (const auto ticket : tickets) {
      if (!reads.wait(ticket) || reads.take(ticket).status != aimdo::ReadStatus::kDone) {
        wrong.fetch_add(1);
      }
    }
  }
  close(fd);
  if (wrong.load() != 0) {
    std::fprintf(stderr, "file reads: %llu reads wrong\n", wrong.load());
  }
  return ok && wrong.load() == 0;
}

}  // namespace

int main(int argc, char** argv) {
  Config config;
  if (!parse(argc, argv, &config)) {
    std::fprintf(stderr, "usage: %s [--devices N<=64] [--threads N] [--ops N] [--seed N]\n",
                 argv[0]);
    return 2;
  }
  Stack stack(config);
  bool ok = true;
  Counters counters;
  {
    aimdo::Manager manager(stack.recorder);
    for (int d = 0; d < config.devices; ++d) {
      aimdo::DeviceOptions options;
      options.page_size_bytes = kPage;
      options.headroom_bytes = kPage;
      options.vram_limit_bytes = 32 * kPage + static_cast<std::size_t>(d) * kPage;
      options.poll_interval_ns = 0;
      manager.add_device(d, options);
    }
    std::vector<std::vector<OwnedVbar>> kept(static_cast<std::size_t>(config.threads));
    Published published;
    std::vector<std::thread> threads;
    for (int t = 0; t < config.threads; ++t) {
      threads.emplace_back(drive, std::ref(manager), std::ref(*stack.sim), std::cref(config), t,
                           std::ref(counters), std::ref(kept[static_cast<std::size_t>(t)]),
                           std::ref(published));
    }
    for (auto& thread : threads) thread.join();
    ok = check_devices(manager, *stack.sim, config, kept);
    manager.close();
  }
  const auto leaks = stack.sim->leaks();
  for (const auto& leak : leaks) std::fprintf(stderr, "leak: %s\n", leak.c_str());
  ok = ok && leaks.empty() && counters.unexpected.load() == 0 && stack.log_is_whole();
  ok = stress_file_reads(config) && ok;
  std::printf(
      "aimdo_stress seed=%llu devices=%d threads=%d: %llu ops, %llu offloaded, %llu out of "
      "memory, %llu external refused, %llu peer pins, %llu unexpected: %s\n",
      static_cast<unsigned long long>(config.seed), config.devices, config.threads,
      static_cast<unsigned long long>(counters.ops.load()),
      static_cast<unsigned long long>(counters.offloaded.load()),
      static_cast<unsigned long long>(counters.out_of_memory.load()),
      static_cast<unsigned long long>(counters.refused_external.load()),
      static_cast<unsigned long long>(counters.peer_pins.load()),
      static_cast<unsigned long long>(counters.unexpected.load()), ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
