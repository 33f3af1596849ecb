"""Activation memory of one training step per attention kind: the bytes autograd keeps for backward.

Claim 1 of the paper is that EA costs no more memory than DPA. Parameters and optimizer state
are identical across kinds (the kind adds none), so the difference is in what the forward pass
saves for backward. This counts it exactly, with ``torch.autograd.graph.saved_tensors_hooks``:
every tensor saved for backward, deduplicated by storage, parameters left out. It is a count,
not a timing, so a busy machine does not disturb it, and it is the same on any device.

    python -m benchmarks.bench_memory --json docs/data/attention-memory.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from workers.attention import ATTENTION_KINDS
from workers.model import ModelConfig, Transformer

# (d_model, n_layers, n_heads, context, batch): the sizes of benchmarks/bench_attention.py
SIZES = {
    "d32": (32, 2, 2, 32, 64),
    "d64": (64, 2, 4, 64, 64),
    "d128": (128, 4, 4, 128, 32),
    "d256": (256, 4, 8, 128, 32),
}
VOCAB = 64


def saved_bytes(model: Transformer, inputs: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(inputs).float().logsumexp(-1).mean()
    loss.backward()
    return sum(seen.values())


def measure(sizes: dict[str, tuple[int, int, int, int, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, (d, layers, heads, context, batch) in sizes.items():
        inputs = torch.randint(VOCAB, (batch, context), generator=torch.Generator().manual_seed(0))
        out[name] = {}
        for kind in ATTENTION_KINDS:
            torch.manual_seed(0)
            cfg = ModelConfig(
                vocab_size=VOCAB, context_length=context, d_model=d, n_layers=layers, n_heads=heads, attention=kind
            )
            out[name][kind] = saved_bytes(Transformer(cfg), inputs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(SIZES)
    print("| size | " + " | ".join(f"{k} MiB" for k in ATTENTION_KINDS) + " | ea/dpa | ea_norm/dpa |")
    print("|---|" + "---:|" * (len(ATTENTION_KINDS) + 2))
    for name, by_kind in result.items():
        mib = " | ".join(f"{by_kind[k] / 2**20:.2f}" for k in ATTENTION_KINDS)
        print(f"| {name} | {mib} | {by_kind['ea'] / by_kind['dpa']:.3f} | {by_kind['ea_norm'] / by_kind['dpa']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            meta = {"torch": torch.__version__, "python": platform.python_version(), "sizes": SIZES}
            json.dump({"meta": meta, "saved_bytes": result}, f, indent=1, sort_keys=True)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
