"""Weights from disk (issue 14): the streaming benchmark's synthetic model saved as a
sharded safetensors checkpoint on the machine's local disk, then offloaded by aimdo
straight from the files (the module built on the meta device) at several host-memory
limits, each run in a process of its own so that its peak RSS is its own: time from the
files to the first finished step, the steady step, pinned bytes, peak RSS; against
accelerate's ``load_checkpoint_and_dispatch`` (Qwen-Image: diffusers' ``from_pretrained``
with ``device_map="auto"``) from the same files at the same VRAM limit;
and the disk's read bandwidth over the files, cold (each file's pages dropped from the
page cache first with ``posix_fadvise``) and warm.

    python -m benchmarks.from_files [--model synthetic|qwen-image]
        [--blocks 60] [--hidden 5120] [--tokens 2048]
        [--vram-limit 24GiB] [--limits none,8GiB,0,0-cold] [--steps 6]
        [--dir /tmp/aimdo-checkpoint] [--rings 4x16,8x32]
    python -m benchmarks.from_files --tiny      # tiny model, CPU simulator

``--model qwen-image`` runs the diffusers Qwen-Image transformer (default configuration,
random weights, 38 GiB; a 1024x1024 image, guidance as batch 2) instead of the synthetic
stack (``--blocks``/``--hidden``/``--tokens`` then unused), built for the runs as diffusers'
loader builds it, under ``accelerate.init_empty_weights()``, and saved as diffusers saves
it (``save_pretrained``). Use another ``--dir`` per model.

A limit is a ``host_limit``: ``none`` pins every weight, ``0`` leaves every block in the
files, ``0-cold`` the same with the files' pages dropped before the run, ``0-nocache``
the same with them dropped before every step (a host whose page cache cannot keep the
files). ``--direct cached|direct`` forces offload's ``file_reads`` (default: auto, the
library's choice). ``--rings`` runs
every limit that reads the files once per ring, READERSxMiB[xBUFFERS[xAHEAD]] (that many
reader threads, exactly that many buffers of that many MiB: twice the readers unless
given; AHEAD MiB read ahead of the copies queued, 0 for none: the library's "auto" unless
given), instead of once with the library's own. ``--switch-interval S`` sets Python's
switch interval for each run.
``--trace DIR`` profiles one more step of each aimdo run (torch.profiler, after the timed
steps; benchmarks/_trace.py), its trace saved in DIR and its summary (the compute and copy
streams' busy and idle time, the largest gaps) in the results.
After its timed steps each aimdo run times one more step block by block: its stall by
the source of the stalled block's copy, the blocks it stalled on most, the tiers in the
order its copies ran (``copy_sources``) and the stall of the blocks read from the files
by the source of the copy before theirs (``file_copies_after``).
``--splits 0,2`` runs every limit that reads the files once per size of the parts a piece
is read in (MiB; 0: whole; ``_torch_stream.READ_SPLIT_BYTES``), named ``LIMIT/splitS``.
``--repeat N`` runs each of them N times, one after another (named ``NAME#2`` on), and
prints each limit's median step of its runs and their spread, against the median of
``none``'s: one run of the synthetic model at 8 GiB measured 291.4 to 320.7 ms on two
machines (benchmarks/RESULTS.md, eleventh session).
``--prefetch 2,4,auto`` runs every aimdo limit once per prefetch depth (offload's
``prefetch``; default: the library's own), named ``LIMIT@RING/pN``; with ``auto``, the
steps the offload takes to choose run untimed, after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import aimdo
import aimdo.torch as atorch
import torch
from aimdo import _torch_stream
from aimdo._manager import DEFAULTS

from ._common import environment, run_trials, show_log, steady_median, write
from ._trace import profile_step
from .streaming import build, sync

GiB = 1 << 30
SHARD_BYTES = 4 * GiB
INDEX = "model.safetensors.index.json"
#: The most untimed steps settle() runs.
SETTLE_STEPS = 100
#: The core's counters recorded after each step (Manager.stats).
COUNTERS = ("evictions", "evicted_bytes", "pages_released", "oom_retries")


def make_model(args, device: str) -> torch.nn.Module:
    """The benchmark's model on `device` ("meta" for the runs that read the files): the
    streaming benchmark's synthetic stack, or the diffusers Qwen-Image transformer."""
    if args.model == "synthetic":
        return build(args.blocks, args.hidden, args.dtype, device)
    import diffusers

    from .real_models import qwen_config

    torch.manual_seed(0)
    if device == "meta":
        # As diffusers' own loader does: parameters on the meta device, while tensors
        # the model computes when built (its rotary tables) stay real.
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = diffusers.QwenImageTransformer2DModel(**qwen_config(args.tiny))
    else:
        with torch.device(device):
            model = diffusers.QwenImageTransformer2DModel(**qwen_config(args.tiny))
    return model.to(args.dtype).eval()


def step_of(args, model, device):
    """The step: a function of the model giving its output, its inputs on `device`
    (Qwen-Image: a 1024x1024 image and 512 text tokens, guidance as batch 2)."""
    if args.model == "synthetic":
        x = inputs(args).to(device)
        return lambda m: m(x)
    from .real_models import qwen_inputs

    both = qwen_inputs(args.tiny, model, 2, 1, device)
    return lambda m: m(**both, return_dict=True).sample


#: accelerate's no_split_module_classes for each model.
NO_SPLIT = {"synthetic": ["Block"], "qwen-image": ["QwenImageTransformerBlock"]}


def save_checkpoint(args, folder: str) -> None:
    """The model, its all-resident step and its output, saved in `folder` (once)."""
    from safetensors.torch import save_file

    device = "cpu" if args.tiny else "cuda:0"
    model = make_model(args, device)
    step = step_of(args, model, device)
    with torch.no_grad():
        step(model)
        sync(torch.device(device))
        start = time.perf_counter()
        out = step(model)
        sync(torch.device(device))
        compute = time.perf_counter() - start
    saved_output = out.float().cpu()
    if args.model != "synthetic":
        # As diffusers saves it (config.json, shards and their index), so that its own
        # loader reads the same files.
        model.save_pretrained(folder, max_shard_size="4GB" if not args.tiny else "1MB")
        del model, out
        if device != "cpu":
            torch.cuda.empty_cache()
        # The output to compare with: the model as diffusers loads it from these files (its
        # rotary tables computed on the host, as every run here computes them), all on the
        # device; the one built above computed them on the device, a few bits apart.
        import diffusers

        loaded = diffusers.QwenImageTransformer2DModel.from_pretrained(
            folder, torch_dtype=args.dtype
        ).to(device)
        with torch.no_grad():
            saved_output = step(loaded).float().cpu()
        del loaded
        if device != "cpu":
            torch.cuda.empty_cache()
        torch.save({"output": saved_output, "compute_seconds": compute}, f"{folder}/out.pt")
        return
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    del model, out
    if device != "cpu":
        # Give the GPU back: the runs are other processes, and a Manager counts what this
        # one would keep reserved as others' memory (its budget would shrink by it).
        torch.cuda.empty_cache()
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > (SHARD_BYTES if not args.tiny else 1 << 20):
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    weight_map = {}
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, f"{folder}/{file}")
        weight_map.update({name: file for name in shard})
    with open(f"{folder}/{INDEX}", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    torch.save({"output": saved_output, "compute_seconds": compute}, f"{folder}/out.pt")


def inputs(args) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, args.tokens, args.hidden, dtype=args.dtype, generator=gen)


def files_of(folder: str) -> list[str]:
    return sorted(f"{folder}/{n}" for n in os.listdir(folder) if n.endswith(".safetensors"))


def drop_cache(folder: str) -> None:
    for path in files_of(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bandwidth(folder: str, cold: bool) -> float:
    """Bytes per second reading every file once, sequentially, in 64 MiB pieces."""
    if cold:
        drop_cache(folder)
    buffer = bytearray(64 << 20)
    total, start = 0, time.perf_counter()
    for path in files_of(folder):
        with open(path, "rb", buffering=0) as f:
            while count := f.readinto(buffer):
                total += count
    return total / (time.perf_counter() - start)


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries
    that across exec, so a run started from the benchmark's own large process would
    report the parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_device_bytes() -> dict[str, int]:
    """The device memory each process holds on GPU 0 as nvidia-smi reports it (contexts
    included), keyed "self" for this one, or its pid; {} when nvidia-smi cannot say."""
    try:
        uuid = subprocess.run(
            ["nvidia-smi", "-i", "0", "--query-gpu=uuid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        listed = subprocess.run(
            [
                "nvidia-smi",
                "--query-compute-apps=gpu_uuid,pid,used_memory",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    held = {}
    for line in listed.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 3 and fields[0] == uuid and fields[2].isdigit():
            key = "self" if fields[1] == str(os.getpid()) else fields[1]
            held[key] = int(fields[2]) << 20  # MiB
    return held


def memory_now(manager, cuda: bool) -> dict:
    """After a step: the VBAR's watermark, torch's pool (now and its peak; 0 on the
    simulator), the device's free memory and the core's counters so far; a watermark
    lowered shows when, and whether others' memory or the core's evictions lowered it."""
    stats = manager.stats(0)
    return {
        "watermark_bytes": [v["watermark_bytes"] for v in manager.report(0)["vbars"]],
        "torch_reserved_bytes": torch.cuda.memory_reserved(0) if cuda else 0,
        "torch_peak_reserved_bytes": torch.cuda.max_memory_reserved(0) if cuda else 0,
        "free_bytes": torch.cuda.mem_get_info(0)[0] if cuda else 0,
        **{k: stats[k] for k in COUNTERS},
    }


def settle(manager, run_step) -> int:
    """Untimed steps until two of the Manager's polls have passed since the first step:
    the budget's measured figure is read at most once per poll_interval (2 s), so the
    memory the first steps made outside aimdo (PyTorch's pool: activations, staging) is
    given back by a later step's faults. Without this, runs with slow steps settle within
    the timed steps and runs with fast ones do not, and the fast ones keep more of the
    model resident than the limit allows. Returns the steps run."""
    poll = DEFAULTS["poll_interval"]
    until, steps = time.perf_counter() + 2 * poll + 0.1, 0
    while time.perf_counter() < until and steps < SETTLE_STEPS:
        run_step()
        steps += 1
    return steps


def read_ahead(handle) -> tuple[int, int]:
    """The offload's copies that found their block read ahead, and its blocks read ahead
    and dropped, so far ((0, 0) with no block in the files)."""
    stream = handle._stream
    return (0, 0) if stream is None else (stream.read_ahead_used, stream.read_ahead_dropped)


def depth_of(text: str):
    """A --prefetch depth: an int, or "auto"."""
    return text if text == "auto" else int(text)


def child_arguments(args, child: str) -> list[str]:
    """The arguments of a child process of this benchmark: `child` (save, a host_limit,
    or accelerate) and the model, checkpoint and run options given to this one."""
    command = ["-m", "benchmarks.from_files", "--child", child]
    command += ["--model", args.model, "--direct", args.direct, "--log", args.log]
    command += ["--blocks", str(args.blocks), "--hidden", str(args.hidden)]
    command += ["--tokens", str(args.tokens), "--vram-limit", str(args.vram_limit)]
    command += ["--steps", str(args.steps), "--dir", args.dir]
    command += ["--tiny"] if args.tiny else []
    command += ["--trace", args.trace] if args.trace else []
    if args.switch_interval is not None:
        command += ["--switch-interval", str(args.switch_interval)]
    return command


def child(args) -> dict:
    """One run, in this process: the module built on the meta device, offloaded from the
    checkpoint at `args.child` (a host_limit, or accelerate), timed."""
    saved = torch.load(f"{args.dir}/out.pt")
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    start = time.perf_counter()
    if args.child == "accelerate" and args.model != "synthetic":
        import diffusers

        # diffusers' own loader, placing the layers with accelerate as from_pretrained does
        model = diffusers.QwenImageTransformer2DModel.from_pretrained(
            args.dir,
            torch_dtype=args.dtype,
            device_map="auto",
            max_memory={0: args.vram_limit, "cpu": 1 << 42},
        )
        stats = {}
        manager = None
    elif args.child == "accelerate":
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch

        with init_empty_weights():
            model = make_model(args, "cpu")
        model = load_checkpoint_and_dispatch(
            model,
            f"{args.dir}/{INDEX}",
            device_map="auto",
            max_memory={0: args.vram_limit, "cpu": 1 << 42},
            no_split_module_classes=NO_SPLIT[args.model],
        )
        stats = {}
        manager = None
    else:
        limit = args.child.removesuffix("-cold").removesuffix("-nocache")
        host_limit = None if limit == "none" else aimdo.parse_size(limit)
        backend = aimdo.SimBackend("1x8GiB", real_bytes=True) if args.tiny else "cuda"
        options = {"page_size": 2 << 20, "headroom": 0} if args.tiny else {}
        manager = aimdo.Manager(backend, [0], vram_limit=args.vram_limit, **options)
        model = make_model(args, "meta")
        if args.ring:
            readers, mib, *more = (int(n) for n in args.ring.split("x"))
            _torch_stream.READERS = readers
            _torch_stream.reader_threads = lambda: readers  # whatever the host's CPUs
            _torch_stream.RING_BUFFERS = more[0] if more else 2 * readers
            _torch_stream.RING_BLOCKS = 0  # exactly these buffers, whatever the blocks
            _torch_stream.RING_BUFFER_BYTES = mib << 20
        if args.split:
            _torch_stream.READ_SPLIT_BYTES = int(float(args.split) * 2**20)
        handle = atorch.offload(
            model,
            0,
            manager=manager,
            checkpoint=args.dir,  # the folder: its one index
            host_limit=host_limit,
            file_reads=args.direct,
            **({"prefetch": depth_of(args.prefetch_depth)} if args.prefetch_depth else {}),
        )
        stats = {"pinned_bytes": handle.pinned_bytes, "streamed_bytes": handle.streamed_bytes}
        if args.ring and len(more) > 1 and handle._stream is not None:
            handle._stream.read_ahead_bytes = more[1] << 20  # MiB read ahead (0: none)
    step = step_of(args, model, device)
    times, out, memory, settling, trials = [], None, [], 0, 0
    nocache = args.child.endswith("-nocache")

    def one_step():
        if nocache:  # as on a host whose cache cannot keep the files: none of them cached
            drop_cache(args.dir)
        return step(model)

    with torch.no_grad():
        for index in range(args.steps):
            out = one_step()
            sync(device)
            times.append(time.perf_counter() - start)
            if manager is not None:
                memory.append(memory_now(manager, cuda=not args.tiny))
            if index == 0 and manager is not None:
                settling = settle(manager, lambda: (one_step(), sync(device)))
                # prefetch="auto": the depths it tries run untimed
                trials = run_trials(handle, lambda: (one_step(), sync(device)))
                if trials:
                    settling += trials + settle(manager, lambda: (one_step(), sync(device)))
                memory.append(memory_now(manager, cuda=not args.tiny))
                ahead = read_ahead(handle)  # before the timed steps
            start = time.perf_counter()
    result = {
        "first_step_seconds": times[0],  # from the files to the first finished step
        "step_seconds": times,
        "median_step_seconds": steady_median(times),
        "peak_rss_bytes": peak_rss_bytes(),
        "identical": torch.equal(out.float().cpu(), saved["output"]),
        "memory_after_steps": memory,  # after the first step, after settling, then each
        "settling_steps": settling,
        **stats,
    }
    if manager is not None:
        result["pinned_bytes"] = handle.pinned_bytes  # with the ring, made by now
        result["prefetch"] = handle.prefetch
        result["prefetch_measured"] = handle.prefetch_measured
        result["trial_steps"] = trials
        result["prefetch_choosing"] = handle.prefetch_choosing  # still, after run_trials
        result["bytes_copied_per_step"] = handle.last_stats.bytes_copied
        result["bytes_from_files_per_step"] = handle.last_stats.bytes_from_files
        if handle._stream is not None:  # blocks read ahead of their copies, in timed steps
            now = read_ahead(handle)
            result["read_ahead_used"] = now[0] - ahead[0]
            result["read_ahead_dropped"] = now[1] - ahead[1]
        result["budget_bytes"] = manager.budget_bytes(0)
        result["resident_bytes"] = manager.resident_bytes(0)
        # Where the budget went: the VBAR's pages, the staging buffers, torch's own pool.
        report = manager.report(0)
        result["usage_bytes"] = report["usage_bytes"]
        result["watermark_bytes"] = [v["watermark_bytes"] for v in report["vbars"]]
        result["staging_bytes"] = handle.staging_bytes
        result["torch_reserved_bytes"] = torch.cuda.memory_reserved(0) if not args.tiny else 0
        # The room the budget sees now (negative: a deficit), from its last poll.
        result["room_bytes"] = -manager.deficit_bytes(0)
        result["last_poll"] = manager.poll(0)
        if not args.tiny:  # who holds the device's memory beside torch's pool and aimdo's
            result["device_total_bytes"] = torch.cuda.mem_get_info(0)[1]
            result["process_device_bytes"] = process_device_bytes()
        if args.trace:  # one more step under the profiler, outside the median's
            path = f"{args.trace}/trace-{args.model}-{args.child}.json.gz"
            result["trace"] = profile_step(step, model, device, path)
        handle.timings = True  # one more step, timed, outside the median's
        with torch.no_grad():
            step(model)
        timed = handle.last_timings.as_dict()
        result["last_step_timings"] = {k: timed[k] for k in timed if k not in ("blocks", "spans")}
        stalls: dict = {}  # the timed step's stall by where the stalled block's copy read
        for b in timed["blocks"]:
            source = b["source"] or "none"
            stalls[source] = stalls.get(source, 0) + b["stall_seconds"]
        result["stall_by_source"] = stalls
        ranked = sorted(timed["blocks"], key=lambda b: -b["stall_seconds"])[:6]
        result["most_stalled"] = [
            [b["name"], b["nbytes"], b["source"], b["stall_seconds"], b["compute_seconds"]]
            for b in ranked
        ]
        # The tiers in the order the copies ran (H host, F file, P peer), and the blocks
        # read from the files by the source of the copy before theirs: a block read right
        # after another has only that one's copy to hide its reads behind.
        result["copy_sources"], result["file_copies_after"] = copy_order(timed["blocks"])
        handle.undo()
        manager.close()
    return result


def copy_order(blocks: list) -> tuple[str, dict]:
    """From a timed forward's blocks (as_dict, in the order of their first use): the
    sources of its copies in that order (H host, F file, P peer), and {the source of the
    copy before: [the blocks read from the files after such a copy, their stall
    seconds]} ("none" for the first copy)."""
    copied = [b for b in blocks if b["source"] is not None]
    after: dict = {}
    for before, b in zip([None, *copied], copied, strict=False):  # each, the one before
        if b["source"] == "file":
            entry = after.setdefault(before["source"] if before else "none", [0, 0.0])
            entry[0] += 1
            entry[1] += b["stall_seconds"]
    return "".join(b["source"][0].upper() for b in copied), after


def repeated(runs: dict) -> dict:
    """Each run name's steps over its repeats (NAME, NAME#2, ...): {name: {"steps": their
    median steps, "median": the median of them, "of_none": that against none's}}."""
    steps: dict = {}
    for name, run in runs.items():
        if "median_step_seconds" in run:
            steps.setdefault(name.split("#")[0], []).append(run["median_step_seconds"])
    out = {name: {"steps": each, "median": statistics.median(each)} for name, each in steps.items()}
    if "none" in out:
        for each in out.values():
            each["of_none"] = each["median"] / out["none"]["median"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(NO_SPLIT), default="synthetic")
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vram-limit", type=aimdo.parse_size, default=24 * GiB)
    parser.add_argument("--limits", default="none,8GiB,0,0-cold")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dir", default="/tmp/aimdo-checkpoint")
    parser.add_argument("--accelerate", action="store_true", help="also accelerate's loader")
    parser.add_argument("--rings", default="", help="READERSxMiB[xBUFFERS],...: rings to compare")
    parser.add_argument("--direct", choices=("auto", "cached", "direct"), default="auto")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--ring", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="seconds: sys.setswitchinterval in each run (how long a thread waits for the GIL)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, one after another")
    parser.add_argument(
        "--splits", default="", help="MiB,...: the parts pieces are read in, to compare (0: whole)"
    )
    parser.add_argument("--split", default="", help=argparse.SUPPRESS)
    parser.add_argument("--prefetch", default="", help="N,...: prefetch depths to compare")
    parser.add_argument("--prefetch-depth", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--trace", default=None, help="folder: profile one more step of each aimdo run"
    )
    parser.add_argument(
        "--log", default="warning", help="aimdo's log level shown (info: its choices)"
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    show_log(args.log)
    if args.tiny and args.trace:
        parser.error("--trace profiles CUDA: not with --tiny")
    if args.tiny:
        args.blocks, args.hidden, args.tokens, args.steps = 4, 128, 16, 3
        args.vram_limit = 4 << 20
    args.dtype = torch.float32 if args.tiny and args.model == "synthetic" else torch.bfloat16
    if args.child == "save":
        save_checkpoint(args, args.dir)
        return 0
    if args.child is not None:
        if args.switch_interval is not None:
            sys.setswitchinterval(args.switch_interval)
        print(json.dumps(child(args)))
        return 0
    os.makedirs(args.dir, exist_ok=True)
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)  # the profiler writes into it, not making it
    if not os.path.exists(f"{args.dir}/out.pt"):  # written last
        # In a process of its own, as every run is: this one never holds a CUDA context
        # (about 0.73 GiB on an H200), which each run's budget would count as others'.
        subprocess.run([sys.executable, *child_arguments(args, "save")], check=True)
    checkpoint_bytes = sum(os.path.getsize(p) for p in files_of(args.dir))
    result = {
        "benchmark": "from_files",
        "environment": environment(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "checkpoint_bytes": checkpoint_bytes,
        "compute_seconds": torch.load(f"{args.dir}/out.pt")["compute_seconds"],
        "disk_read_bytes_per_s": {
            "cold": read_bandwidth(args.dir, cold=True),
            "warm": read_bandwidth(args.dir, cold=False),
        },
        "runs": {},
    }
    print(
        f"checkpoint {checkpoint_bytes / GiB:.2f} GiB; reading it: cold "
        f"{result['disk_read_bytes_per_s']['cold'] / 1e9:.2f} GB/s, warm "
        f"{result['disk_read_bytes_per_s']['warm'] / 1e9:.2f} GB/s; all-resident step "
        f"{result['compute_seconds'] * 1000:.1f} ms",
        flush=True,
    )
    rings = args.rings.split(",") if args.rings else [""]
    depths = [depth_of(n) for n in args.prefetch.split(",")] if args.prefetch else [None]
    splits = args.splits.split(",") if args.splits else [""]
    runs = [
        (limit, ring, depth, split, turn)
        for limit in args.limits.split(",")
        for ring in (rings if limit != "none" else [""])
        for depth in depths
        for split in (splits if limit != "none" else [""])
        for turn in range(1, args.repeat + 1)
    ]
    runs += [("accelerate", "", None, "", 1)] if args.accelerate and not args.tiny else []
    for limit, ring, depth, split, turn in runs:
        name = f"{limit}@{ring}" if ring else limit
        name += f"/p{depth}" if depth is not None else ""
        name += f"/split{split}" if split else ""
        name += f"#{turn}" if turn > 1 else ""
        if limit.endswith("-cold"):
            drop_cache(args.dir)
        command = [sys.executable, *child_arguments(args, limit)]
        command += ["--ring", ring] if ring else []
        command += ["--prefetch-depth", str(depth)] if depth is not None else []
        command += ["--split", split] if split else []
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"  {name}: failed\n{done.stderr[-3000:]}", flush=True)
            result["runs"][name] = {"failed": done.stderr[-3000:]}
            continue
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run["log"] = [line for line in done.stderr.splitlines() if line.startswith("  log ")]
        result["runs"][name] = run
        print(
            f"  {name}: first step {run['first_step_seconds']:.2f} s from the files, then "
            f"{run['median_step_seconds'] * 1000:.1f} ms a step; pinned "
            f"{run.get('pinned_bytes', 0) / GiB:.2f} GiB, peak RSS "
            f"{run['peak_rss_bytes'] / GiB:.2f} GiB, streamed "
            f"{run.get('streamed_bytes', 0) / GiB:.2f} GiB; a step copies "
            f"{run.get('bytes_copied_per_step', 0) / GiB:.2f} GiB, "
            f"{run.get('bytes_from_files_per_step', 0) / GiB:.2f} GiB of it from the files "
            f"(resident {run.get('resident_bytes', 0) / GiB:.2f} GiB); identical: "
            f"{run['identical']}",
            flush=True,
        )
        if "read_ahead_used" in run:
            print(
                f"    read ahead, in the timed steps: {run['read_ahead_used']} copies found "
                f"their block read already, {run['read_ahead_dropped']} blocks read ahead "
                "were dropped",
                flush=True,
            )
        for line in run["log"]:
            print(f"  {line}", flush=True)
        if "prefetch" in run:
            tried = run.get("prefetch_measured")
            print(
                f"    prefetch {run['prefetch']}"
                + (
                    " (auto, in untimed steps it measured "
                    + ", ".join(f"{p}: {s * 1000:.1f} ms" for p, s in tried.items())
                    + ")"
                    if tried
                    else ""
                )
                + (
                    " (auto: still choosing, its steps timed)"
                    if run.get("prefetch_choosing")
                    else ""
                ),
                flush=True,
            )
        if "usage_bytes" in run:
            print(
                f"    budget {run['budget_bytes'] / GiB:.2f} GiB, usage "
                f"{run['usage_bytes'] / GiB:.2f} GiB, staging {run['staging_bytes'] / GiB:.2f} "
                f"GiB, torch reserved {run['torch_reserved_bytes'] / GiB:.2f} GiB, watermark "
                f"{[round(w / GiB, 2) for w in run['watermark_bytes']]} GiB, room "
                f"{run['room_bytes'] / GiB:.2f} GiB (last poll: "
                f"{run['last_poll']['free_bytes'] / GiB:.2f} GiB free, aimdo's usage "
                f"{run['last_poll']['usage_bytes'] / GiB:.2f} GiB)",
                flush=True,
            )
        if run.get("process_device_bytes"):
            held = run["process_device_bytes"]
            used = run["device_total_bytes"] - run["last_poll"]["free_bytes"]
            mine, torch_held = held.get("self", 0), run["torch_reserved_bytes"]
            if "self" not in held:  # nvidia-smi lists pids of another namespace
                print(f"    device memory by process (pids unmatched): {held}", flush=True)
            print(
                f"    device memory: {used / GiB:.2f} GiB used at the last poll; this "
                f"process holds {mine / GiB:.2f} GiB now, of it beside aimdo's "
                f"{run['usage_bytes'] / GiB:.2f} and torch's {torch_held / GiB:.2f}:"
                f" {(mine - run['usage_bytes'] - torch_held) / GiB:.2f} GiB; "
                f"other processes {sum(v for k, v in held.items() if k != 'self') / GiB:.2f} GiB",
                flush=True,
            )
        for i, m in enumerate(run.get("memory_after_steps", [])):
            when = "step 1" if i == 0 else "settling" if i == 1 else f"timed step {i}"
            if not run.get("settling_steps"):
                when = f"step {i + 1}"
            print(
                f"    after {when}: watermark "
                f"{[round(w / GiB, 2) for w in m['watermark_bytes']]} GiB, torch reserved "
                f"{m['torch_reserved_bytes'] / GiB:.2f} GiB (peak "
                f"{m['torch_peak_reserved_bytes'] / GiB:.2f}), free "
                f"{m['free_bytes'] / GiB:.2f} GiB; evictions so far "
                f"{ {k: m[k] for k in COUNTERS} }",
                flush=True,
            )
        if "last_step_timings" in run:
            t = run["last_step_timings"]
            print(
                f"    timed step {t['seconds'] * 1000:.1f} ms: compute "
                f"{t['compute_seconds'] * 1000:.1f} ms, stalled "
                f"{t['stall_seconds'] * 1000:.1f} ms, copies {t['copy_seconds'] * 1000:.1f} ms",
                flush=True,
            )
        if "stall_by_source" in run:
            print(
                "    timed step's stall by source: "
                + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in run["stall_by_source"].items())
                + "; most stalled: "
                + "; ".join(
                    f"{n} ({b / 2**20:.0f} MiB, {src}) {st * 1000:.1f} ms stalled, "
                    f"{c * 1000:.1f} ms compute"
                    for n, b, src, st, c in run["most_stalled"]
                ),
                flush=True,
            )
        if run.get("file_copies_after"):
            print(
                "    copies from the files, by the copy before: "
                + ", ".join(
                    f"after {k}: {n} ({st * 1000:.1f} ms stalled)"
                    for k, (n, st) in run["file_copies_after"].items()
                )
                + f" (of {len(run['copy_sources'])} copies)",
                flush=True,
            )
        if "trace" in run:
            print(f"    trace: {json.dumps(run['trace'])}", flush=True)
    if args.repeat > 1:
        result["repeated"] = repeated(result["runs"])
        for name, each in result["repeated"].items():
            print(
                f"  {name}, {len(each['steps'])} runs: median step {each['median'] * 1000:.1f} "
                f"ms ({', '.join(f'{t * 1000:.1f}' for t in each['steps'])})"
                + (f", {each['of_none']:.3f}x none's" if "of_none" in each else ""),
                flush=True,
            )
    write("from_files", result, args.out, keep=not args.tiny)
    return 0 if all(r.get("identical", False) for r in result["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
