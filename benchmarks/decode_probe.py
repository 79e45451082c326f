"""Why does greedy decoding of the random-weight Llama-8B through aimdo differ from the
all-resident model after some tokens, while every prefill is bit-identical? This probe
tells a numerical difference (kernels chosen differently) from corrupted weights (a race):

- the all-resident model decodes twice: is it even deterministic?
- aimdo at each prefetch depth decodes twice, with the scores of every step;
- per depth, the first step whose scores differ from the resident ones, and by how much;
- the weights read back through the offload after decoding, against the originals.

    python -m benchmarks.decode_probe [--prefetch 2,1] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json

import aimdo
import aimdo.torch as atorch
import torch

from ._common import environment, write
from .real_models import llama_8b

GiB = 1 << 30


def decode(model, ids, tokens: int):
    out = model.generate(
        ids,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, ids.shape[1] :].cpu(), [s.float().cpu() for s in out.scores]


def compare(scores, reference) -> dict:
    """The first step whose scores differ from the reference's, its largest difference and
    whether the chosen token differs there."""
    for step, (mine, theirs) in enumerate(zip(scores, reference, strict=False)):
        if not torch.equal(mine, theirs):
            return {
                "first_step_differing": step,
                # Over the finite scores: a processor sets some to -inf in both.
                "max_abs_difference": (mine - theirs)[theirs.isfinite()].abs().max().item(),
                "same_token_there": bool(mine.argmax() == theirs.argmax()),
                "top2_gap_in_reference": float(theirs.topk(2).values.diff().abs().item()),
            }
    return {"first_step_differing": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefetch", default="2,1")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--vram-limit", type=aimdo.parse_size, default=6 * GiB)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    model, _ = llama_8b(False, device, args.tokens)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 2048)).to(device)
    with torch.no_grad():
        first = decode(model, ids, args.tokens)
        second = decode(model, ids, args.tokens)
    result = {
        "benchmark": "decode_probe",
        "environment": environment(),
        "args": vars(args),
        "resident_deterministic": torch.equal(first[0], second[0])
        and all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True)),
        "runs": {},
    }
    print(f"resident decodes twice the same: {result['resident_deterministic']}", flush=True)
    originals = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.to("cpu")
    torch.cuda.empty_cache()
    for prefetch in [int(p) for p in args.prefetch.split(",")]:
        with aimdo.Manager("cuda", [0], vram_limit=args.vram_limit) as manager:
            with atorch.offload(model, 0, manager=manager, prefetch=prefetch) as handle:
                runs = [decode(model, ids.to(device), args.tokens) for _ in range(2)]
                prefetch_used = handle.prefetch
            # Undone: the weights are the module's own again, read back from the host.
            changed = [k for k, v in model.state_dict().items() if not torch.equal(v, originals[k])]
        entry = {
            "prefetch": prefetch_used,
            "same_tokens_as_resident": [torch.equal(r[0], first[0]) for r in runs],
            "same_as_each_other": torch.equal(runs[0][0], runs[1][0])
            and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True)),
            "against_resident": [compare(r[1], first[1]) for r in runs],
            "weights_changed": changed[:5],
        }
        result["runs"][f"prefetch {prefetch}"] = entry
        print(f"prefetch {prefetch}: {json.dumps(entry)}", flush=True)
        torch.cuda.empty_cache()
    write("decode_probe", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
