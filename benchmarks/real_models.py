"""Real model classes offloaded in place (issue 12): the diffusers Qwen-Image transformer at a
24 GiB limit and a Llama-3-8B-like transformers model decoding at a 6 GiB limit, built from
their libraries' config classes with random bf16 weights (made on the GPU, then moved to
host memory), against all-resident and the offloaders a user would pick instead, in one
run.

    python -m benchmarks.real_models --model qwen-image [--vram-limit 24GiB] [--steps 6]
        [--baselines resident,group-offload,dispatch,cpu-offload]
    python -m benchmarks.real_models --model llama-8b [--vram-limit 6GiB] [--tokens 32]
    python -m benchmarks.real_models --model qwen-image --tiny   # tiny config, CPU simulator

Qwen-Image: a 1024x1024 image (4096 latent tokens) and 512 text tokens; guidance as one
batch-2 call and as two batch-1 calls per step (what the pipeline does). Llama: a 2048-token
prefill, then greedy decode; the figure is seconds per generated token.

The floor is max(all-resident step, bytes aimdo must copy per step / measured pinned
bandwidth), the all-resident step taken as aimdo's is, the median after the first (its
fastest is reported beside it: the all-resident steps vary more from step to step). Host
memory: aimdo's pinned bytes and the process's resident set (VmRSS) after the offload,
against the model's weight bytes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re

import aimdo
import aimdo.torch as atorch
import torch

from ._common import environment, run_trials, show_log, steady_median, write
from ._trace import profile_step
from .streaming import pinned_bandwidth, time_steps

GiB = 1 << 30
#: The parts of the resident set reported beside it (/proc/self/status: RssAnon, ...).
PARTS = ("anon", "file", "shmem")


def memory_status() -> dict[str, int]:
    """This process's memory figures from one read of /proc/self/status, in bytes: VmRSS
    (its resident set) and RssAnon, RssFile, RssShmem (its anonymous, file-backed and
    shared parts), among others."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields = value.split()
            if len(fields) == 2 and fields[1] == "kB":
                found[name] = int(fields[0]) * 1024
    return found


def rss_bytes() -> int:
    return memory_status().get("VmRSS", 0)


def weight_bytes(model) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- the models ------------------------------------------------------------------------------


def qwen_shapes(tiny: bool) -> tuple[int, int, int, int]:
    """(latent tokens, text tokens, latent channels, latent side) of the inputs."""
    return (16, 6, 16, 4) if tiny else (4096, 512, 64, 64)


def qwen_inputs(tiny: bool, model, batch: int, seed: int, where) -> dict:
    """A forward's keyword arguments, made on the host from `seed`, moved to `where`."""
    tokens, text, channels, side = qwen_shapes(tiny)
    width = model.config.joint_attention_dim
    g = torch.Generator().manual_seed(seed)
    values = {
        "hidden_states": torch.randn(batch, tokens, channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, width, generator=g),
        "encoder_hidden_states_mask": torch.ones(batch, text),
        "timestep": torch.full((batch,), 0.5),
        "img_shapes": [(1, side, side)] * batch,
    }
    bf16 = ("hidden_states", "encoder_hidden_states")
    return {
        k: v.to(where, torch.bfloat16 if k in bf16 else None) if isinstance(v, torch.Tensor) else v
        for k, v in values.items()
    }


#: The guidance halves: seeds of the conditional and unconditional batch-1 inputs.
QWEN_HALF_SEEDS = (2, 3)


def qwen_config(tiny: bool) -> dict:
    """QwenImageTransformer2DModel's arguments: the default configuration (60 layers,
    20.4 B parameters), or a tiny one."""
    if not tiny:
        return {}
    return dict(
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(8, 12, 12),
    )


def qwen_image(tiny: bool, device):
    import diffusers

    with torch.device(device):
        model = diffusers.QwenImageTransformer2DModel(**qwen_config(tiny))
        model = model.to(torch.bfloat16).eval()
    both = qwen_inputs(tiny, model, 2, 1, device)
    halves = [qwen_inputs(tiny, model, 1, seed, device) for seed in QWEN_HALF_SEEDS]
    forms = {
        "guidance as batch 2": lambda m: m(**both, return_dict=True).sample,
        "guidance as two batch-1 calls": lambda m: torch.cat(
            [m(**half, return_dict=True).sample for half in halves]
        ),
    }
    return model, forms


def llama_8b(tiny: bool, device, tokens: int):
    import transformers

    if tiny:
        config = transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        prompt = 16
    else:  # Llama-3-8B's shapes
        config = transformers.LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        )
        prompt = 2048
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(
        0, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1)
    ).to(device)

    def generate(count: int):
        def run(m):
            out = m.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
            return out[:, prompt:]

        return run

    # Seconds per decoded token: the difference of the two, over tokens - 1.
    return model, {"prefill + 1 token": generate(1), f"prefill + {tokens} tokens": generate(tokens)}


def per_token(runs: dict) -> float:
    """Decode seconds per token: the medians of the N-token and the 1-token generate calls
    of one configuration (`runs`: form name -> its figures), their difference over N - 1."""
    (one_name, one), (many_name, many) = sorted(
        runs.items(), key=lambda item: int(item[0].split()[2])
    )
    tokens = int(many_name.split()[2])
    return (steady_median(many["step_seconds"]) - steady_median(one["step_seconds"])) / (tokens - 1)


# --- runs ----------------------------------------------------------------------------------


#: Forwards of the whole model in one step of a form: its bytes copied per step are this
#: many times the last forward's (each forward copies what is not resident).
FORWARDS_PER_STEP = {"guidance as two batch-1 calls": 2}


#: --keep-first's groups: patterns of the names of Qwen-Image's weights whose compute is
#: short for their bytes (the modulation layers, applied to one vector per sample; the
#: text stream's weights, applied to its 512 tokens against the image's 4096).
KEEP_FIRST = {
    "modulation": r"\.(img|txt)_mod\.1$",
    "text": r"\.(txt_mlp\.net\.(0\.proj|2)|attn\.(add_[qkv]_proj|to_add_out))$",
}


def kept_first(model, groups: str) -> list:
    """The names of `model`'s weight-owning modules in --keep-first's groups, group by
    group, each in the model's order (an empty list: offload's default placement)."""
    names = [name for name, m in model.named_modules() if any(True for _ in m.parameters(False))]
    kept = []
    for group in filter(None, groups.split(",")):
        pattern = re.compile(KEEP_FIRST[group])
        kept += [name for name in names if pattern.search(name) and name not in kept]
    return kept


def run_aimdo(
    model, forms, args, device, reference, compute, fastest, bandwidth, prefetch, keep
) -> dict:
    backend = aimdo.SimBackend("1x8GiB", real_bytes=True) if args.tiny else "cuda"
    results = {}
    with aimdo.Manager(
        backend, [0], vram_limit=args.vram_limit, page_size=(2 << 20) if args.tiny else None
    ) as manager:
        before = rss_bytes()
        staging = {} if args.staging is None else {"staging_bytes": args.staging}
        kept = kept_first(model, keep)
        if kept:
            modules = dict(model.named_modules())
            nbytes = sum(
                p.numel() * p.element_size() for n in kept for p in modules[n].parameters(False)
            )
            print(f"  keep_first: {len(kept)} modules, {nbytes / GiB:.2f} GiB", flush=True)
        handle = atorch.offload(
            model, 0, manager=manager, prefetch=prefetch, keep_first=kept, **staging
        )
        try:
            for name, run in forms.items():
                # prefetch="auto": the depths it tries run untimed, in this form
                trials = run_trials(handle, lambda run=run: time_steps(run, model, 1, device))
                times, out = time_steps(run, model, args.steps, device)
                stats = handle.last_stats
                step = steady_median(times)
                copied = stats.bytes_copied * FORWARDS_PER_STEP.get(name, 1)
                floor = max(compute[name], copied / bandwidth)
                free, total = manager.memory_info(0)
                results[name] = {
                    "step_seconds": times,
                    "median_step_seconds": step,
                    "floor_seconds": floor,
                    "of_floor": floor / step,
                    # the floor from the fastest all-resident step instead of its median
                    "of_fastest_floor": max(fastest[name], copied / bandwidth) / step,
                    "bytes_copied": stats.bytes_copied,
                    "bytes_copied_per_step": copied,
                    "hits": stats.hits,
                    "offloaded_layers": stats.offloaded_layers,
                    "identical_to_resident": torch.equal(out.float().cpu(), reference[name]),
                    "resident_bytes": manager.resident_bytes(0),
                    "budget_bytes": manager.budget_bytes(0),
                    "others_bytes": total - free - manager.usage_bytes(0),
                    "staging_bytes": handle.staging_bytes,
                    "prefetch": handle.prefetch,
                    "prefetch_predictions": handle.prefetch_predictions,
                    "prefetch_measured": handle.prefetch_measured,
                    "trial_steps": trials,
                    "prefetch_choosing": handle.prefetch_choosing,
                }
            status = memory_status()  # one snapshot: the parts add up to the whole
            results["host"] = {  # before any trace: loading one grows the process
                "pinned_bytes": handle.pinned_bytes,
                "rss_bytes": status.get("VmRSS", 0),
                "rss_before_offload_bytes": before,
                # The parts: the libraries' code and data are file-backed (RssFile).
                **{f"rss_{part}_bytes": status.get(f"Rss{part.title()}", 0) for part in PARTS},
            }
            if args.trace:
                for index, (name, run) in enumerate(forms.items()):
                    depth = "default" if prefetch is None else prefetch
                    path = f"{args.trace}/trace-{args.model}-p{depth}-{index}.json.gz"
                    results[name]["trace"] = profile_step(run, model, device, path)
        finally:
            handle.undo()
    return results


def report(key: str, results: dict, forms, weights: int) -> None:
    for name in forms:
        r = results[name]
        print(
            f"  {key}, {name}: {r['median_step_seconds'] * 1000:.1f} ms, floor "
            f"{r['floor_seconds'] * 1000:.1f} ms ({r['of_floor']:.1%}; "
            f"{r['of_fastest_floor']:.1%} of the fastest's); {r['hits']} hits, "
            f"{r['offloaded_layers']} offloaded, {r['bytes_copied'] / GiB:.2f} GiB copied; "
            f"resident {r['resident_bytes'] / GiB:.2f} GiB of the {r['budget_bytes'] / GiB:.2f}"
            f" GiB budget, others {r['others_bytes'] / GiB:.2f} GiB, staging "
            f"{r['staging_bytes'] / 2**20:.0f} MiB, prefetch {r['prefetch']}; identical: "
            f"{r['identical_to_resident']}"
            + (
                " (not reproducible all resident either)"
                if reproducible_only_by_chance(name)
                else ""
            ),
            flush=True,
        )
        if "trace" in r:
            print(f"    trace: {json.dumps(r['trace'])}", flush=True)
    host = results["host"]
    parts = ", ".join(f"{part} {host.get(f'rss_{part}_bytes', 0) / GiB:.2f}" for part in PARTS)
    print(
        f"  host: pinned {host['pinned_bytes'] / weights:.3f}x the weights, RSS "
        f"{host['rss_bytes'] / GiB:.2f} GiB ({host['rss_bytes'] / weights:.3f}x the weights; "
        f"{parts} GiB; {host['rss_before_offload_bytes'] / GiB:.2f} GiB before the offload)",
        flush=True,
    )


def run_baseline(kind: str, model, forms, args, device, last: bool) -> dict:
    """A deep copy of the host model under another offloader; the copy is dropped after.
    The `last` baseline of a run takes the model itself (nothing runs after it): a copy
    of Qwen-Image's 38 GiB beside the one group offload pins would not fit the 128 GiB of
    host memory of an `nvidia-h200`."""
    replica = model if last else copy.deepcopy(model)
    if kind == "group-offload":
        replica.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
    elif kind == "dispatch":
        from accelerate import dispatch_model, infer_auto_device_map

        device_map = infer_auto_device_map(
            replica,
            max_memory={0: args.vram_limit, "cpu": 1 << 40},
            no_split_module_classes=getattr(replica, "_no_split_modules", None),
        )
        replica = dispatch_model(replica, device_map=device_map)
    elif kind == "cpu-offload":
        from accelerate import cpu_offload

        replica = cpu_offload(replica, execution_device=device)
    out = {}
    for name, run in forms.items():
        times, _ = time_steps(run, replica, args.baseline_steps, device)
        out[name] = {"step_seconds": times, "median_step_seconds": steady_median(times)}
    del replica
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["qwen-image", "llama-8b"], required=True)
    parser.add_argument("--vram-limit", type=aimdo.parse_size, default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--baseline-steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="llama: tokens to generate")
    parser.add_argument(
        "--prefetch",
        default="default",
        help="aimdo's prefetch (a depth, auto, or default: offload's own); a comma-separated "
        "list runs one offload for each",
    )
    parser.add_argument("--trace", default=None, help="folder: profile one step of each form")
    parser.add_argument(
        "--staging",
        type=aimdo.parse_size,
        default=None,
        help="aimdo's staging_bytes (default: offload's own)",
    )
    parser.add_argument(
        "--keep-first",
        default="",
        help=f"offload's keep_first: a comma-separated list of {sorted(KEEP_FIRST)} (qwen-image); "
        "several, separated by ';', run one offload each (empty: the default placement)",
    )
    parser.add_argument("--baselines", default="resident,group-offload,dispatch,cpu-offload")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU simulator")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--log", default="warning", help="aimdo's log level shown (info: its choices)"
    )
    args = parser.parse_args()
    unknown = [g for g in filter(None, re.split("[,;]", args.keep_first)) if g not in KEEP_FIRST]
    if unknown:
        parser.error(f"--keep-first: unknown {unknown}; known: {sorted(KEEP_FIRST)}")
    show_log(args.log)
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)  # the profiler writes into it, not making it
    if args.vram_limit is None:
        args.vram_limit = (24 if args.model == "qwen-image" else 6) * GiB
    if args.tiny:
        args.vram_limit, args.steps, args.baseline_steps = 8 << 20, 3, 2
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    if args.model == "qwen-image":
        model, forms = qwen_image(args.tiny, device)
    else:
        model, forms = llama_8b(args.tiny, device, args.tokens if not args.tiny else 4)
    baselines = [b for b in args.baselines.split(",") if b and b not in ("resident", "none")]
    if args.tiny:
        baselines = []  # the other offloaders need a GPU
    elif args.model == "llama-8b":
        baselines = [b for b in baselines if b != "group-offload"]  # a diffusers feature
    result = {
        "benchmark": "real_models",
        "model": args.model,
        "environment": environment(),
        "args": vars(args),
        "weight_bytes": weight_bytes(model),
        "runs": {},
    }
    print(
        f"{args.model}: {weight_bytes(model) / GiB:.2f} GiB of weights, vram_limit "
        f"{args.vram_limit / GiB:.2f} GiB",
        flush=True,
    )

    # All resident: the compute floor and the reference outputs.
    compute, fastest, reference = {}, {}, {}
    for name, run in forms.items():
        times, out = time_steps(run, model, max(3, args.steps), device)
        compute[name] = steady_median(times)  # as aimdo's step is taken
        fastest[name] = min(times[1:])
        reference[name] = out.float().cpu()
        result["runs"].setdefault("resident", {})[name] = {"step_seconds": times}
        print(
            f"  all resident, {name}: {compute[name] * 1000:.1f} ms (fastest "
            f"{fastest[name] * 1000:.1f} ms)",
            flush=True,
        )
    model.to("cpu")
    if not args.tiny:
        torch.cuda.empty_cache()
    bandwidth = 50e9 if args.tiny else pinned_bandwidth(device)
    result["pinned_h2d_bytes_per_s"] = bandwidth

    weights = result["weight_bytes"]
    prefetches = [
        None if p == "default" else p if p == "auto" else int(p)
        for p in str(args.prefetch).split(",")
    ]
    placements = args.keep_first.split(";")  # one offload for each, after the depths
    runs = [(p, placements[0]) for p in prefetches] + [(prefetches[0], k) for k in placements[1:]]
    for prefetch, keep in runs:
        key = "aimdo"
        if prefetch != prefetches[0]:
            key += f" prefetch {prefetch}"
        if keep != placements[0]:
            key += f" keep_first {keep or 'none'}"
        result["runs"][key] = run_aimdo(
            model, forms, args, device, reference, compute, fastest, bandwidth, prefetch, keep
        )
        report(key, result["runs"][key], forms, weights)
    aimdo_results = result["runs"]["aimdo"]

    for kind in baselines:
        last = kind == baselines[-1]
        result["runs"][kind] = run_baseline(kind, model, forms, args, device, last)
        for name, r in result["runs"][kind].items():
            theirs, ours = r["median_step_seconds"], aimdo_results[name]["median_step_seconds"]
            print(
                f"  {kind}, {name}: {theirs * 1000:.1f} ms (aimdo {theirs / ours:.2f}x faster)",
                flush=True,
            )

    if args.model == "llama-8b":
        decode = {
            kind: per_token({n: r for n, r in runs.items() if n in forms})
            for kind, runs in result["runs"].items()
        }
        last = aimdo_results[max(forms, key=lambda n: int(n.split()[2]))]["bytes_copied"]
        floor = max(decode["resident"], last / bandwidth)
        result["decode_seconds_per_token"] = decode
        result["decode_floor_seconds_per_token"] = floor
        print(
            "  decode per token: "
            + ", ".join(f"{kind} {seconds * 1000:.2f} ms" for kind, seconds in decode.items())
            + f"; aimdo's floor {floor * 1000:.2f} ms ({floor / decode['aimdo']:.0%} reached)",
            flush=True,
        )

    write(f"real_models-{args.model}", result, args.out, keep=not args.tiny)
    # Greedy decoding of many tokens is not reproducible even all resident (RESULTS.md,
    # decode probe): only the other forms must be identical.
    checked = [name for name in forms if not reproducible_only_by_chance(name)]
    identical = all(aimdo_results[name]["identical_to_resident"] for name in checked)
    return 0 if identical else 1


def reproducible_only_by_chance(form: str) -> bool:
    """A form whose output varies from run to run all resident: decoding more than one
    token of the random-weight Llama (its near-flat logits turn PyTorch's own run-to-run
    differences into other tokens)."""
    return form.startswith("prefill + ") and form != "prefill + 1 token"


if __name__ == "__main__":
    raise SystemExit(main())
