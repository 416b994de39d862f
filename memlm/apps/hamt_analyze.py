"""Analyse the memory of a saved HAMT checkpoint: slot-norm heatmaps, gate statistics, binding fidelity.

    python -m memlm.apps.hamt_analyze --ckpt runs/hamt_micro/version_0/checkpoints/last.ckpt --out /tmp/analysis
        [--text FILE] [--length 1024] [--batch 4] [--chunk 64] [--seed 0]

The model reads ``batch`` sequences of ``length`` tokens (from ``--text``, encoded with the checkpoint's
tokenizer, or seeded random token ids) in chunks of ``chunk`` tokens with its state carried, the way it
generates. After every chunk each layer reports its statistics (the same ones the training-time
:class:`memlm.callbacks.memory_analysis.MemoryAnalysis` callback logs). Written to ``--out``:

- ``slot_norms.png``: per layer, RMS norm of each slot (y) against the position (x);
- ``gates.png``: per layer, each slot's mean write gate against the position, and the gate histogram;
- ``fidelity.png``: binding fidelity cos(unbind(M_t, k_t), i_t) per layer against the position, and the
  learned decay of every slot;
- ``summary.json``: the numbers behind the figures (per layer: decay, gate and read weight per slot,
  gate mean/std, slot utilisation, fidelity, final slot norms).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from memlm.callbacks.memory_analysis import MemoryAnalysis
from memlm.checkpoint import load_module
from memlm.core.errors import MemLMError, run_main


def input_ids(module, text_path: str | None, batch: int, length: int, seed: int) -> torch.Tensor:
    vocab = module.config.vocab_size
    if text_path is None:
        return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    if module.tokenizer is None:
        raise MemLMError("this checkpoint has no tokenizer, so --text cannot be encoded; omit --text")
    ids = module.tokenizer.encode(Path(text_path).read_text(encoding="utf-8"))
    need = batch * length
    if len(ids) < need:
        raise MemLMError(f"--text gives {len(ids)} tokens, fewer than --batch x --length = {need}; lower them")
    return torch.tensor(ids[:need], dtype=torch.long).view(batch, length)


@torch.no_grad()
def collect(module, ids: torch.Tensor, chunk: int) -> dict:
    """Per chunk and layer statistics: {"positions": [end of each chunk], "chunks": [[layer summary]]}."""
    model = module.model
    state = model.init_state(ids.size(0), ids.device)
    positions, chunks = [], []
    model.collect_stats = True
    try:
        for start in range(0, ids.size(1), chunk):
            out = model(ids[:, start:start + chunk], state)
            state = out.state
            fidelity = [float(e["fidelity"]) for e in model.last_stats]
            layers = []
            for st, fid in zip(model.last_stats, fidelity):
                s = MemoryAnalysis._summarise(dict(st, fidelity=torch.tensor(fid)))
                layers.append(s)
            positions.append(start + min(chunk, ids.size(1) - start))
            chunks.append(layers)
    finally:
        model.collect_stats = False
    return {"positions": positions, "chunks": chunks}


def summarise(stats: dict) -> dict:
    chunks = stats["chunks"]
    n_layers = len(chunks[0])
    layers = []
    for i in range(n_layers):
        per = [c[i] for c in chunks]
        gates = np.concatenate([p["gate_hist"] for p in per])
        layers.append({
            "decay": per[-1]["decay"].tolist(),
            "gate_mean_slot": np.mean([p["gate_slot"] for p in per], axis=0).tolist(),
            "read_weight_slot": np.mean([p["read_slot"] for p in per], axis=0).tolist(),
            "gate_mean": float(gates.mean()),
            "gate_std": float(gates.std()),
            "gate_frac_above_0.5": float((gates > 0.5).mean()),
            "utilisation": float(np.mean([p["utilisation"] for p in per])),
            "write_util": float(np.mean([p["write_util"] for p in per])),
            "fidelity": float(np.mean([p["fidelity"] for p in per])),
            "fidelity_by_chunk": [float(p["fidelity"]) for p in per],
            "slot_norm_final": per[-1]["slot_norm"].tolist(),
        })
    return {"positions": stats["positions"], "layers": layers}


def render(stats: dict, summary: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pos = np.asarray(stats["positions"])
    n_layers = len(summary["layers"])
    paths = []

    def heatmaps(key: str, title: str, fname: str, cmap: str, with_hist: bool = False):
        rows = 2 if with_hist else 1
        fig, axes = plt.subplots(rows, n_layers, figsize=(4 * n_layers, 3 * rows), squeeze=False)
        for i in range(n_layers):
            mat = np.stack([c[i][key] for c in stats["chunks"]], axis=1)  # [S, chunks]
            ax = axes[0, i]
            im = ax.imshow(mat, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest",
                           extent=[0, pos[-1], -0.5, mat.shape[0] - 0.5])
            ax.set_title(f"layer {i}: {title}")
            ax.set_xlabel("position")
            ax.set_ylabel("slot")
            fig.colorbar(im, ax=ax)
            if with_hist:
                gates = np.concatenate([c[i]["gate_hist"] for c in stats["chunks"]])
                axes[1, i].hist(gates, bins=40, range=(0, 1))
                axes[1, i].set_title(f"layer {i}: write gates (mean {gates.mean():.3f})")
        fig.tight_layout()
        p = out / fname
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths.append(str(p))

    heatmaps("slot_norm", "slot RMS norm", "slot_norms.png", "viridis")
    heatmaps("gate_slot", "mean write gate", "gates.png", "magma", with_hist=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for i, layer in enumerate(summary["layers"]):
        axes[0].plot(pos, layer["fidelity_by_chunk"], label=f"L{i}")
        axes[1].plot(1.0 / (1.0 - np.asarray(layer["decay"])), "o-", label=f"L{i}")
    axes[0].set_title("binding fidelity cos(unbind(M_t,k_t), i_t)")
    axes[0].set_xlabel("position")
    axes[1].set_title("slot time constant 1/(1-decay)")
    axes[1].set_xlabel("slot")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "fidelity.png"
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths.append(str(p))
    return paths


def analyze(ckpt: str, out_dir: str, text: str | None = None, length: int = 1024, batch: int = 4, chunk: int = 64,
            seed: int = 0) -> dict:
    for name, v in (("length", length), ("batch", batch), ("chunk", chunk)):
        if v < 1:
            raise MemLMError(f"--{name} must be positive, got {v}")
    module = load_module(ckpt)
    if not hasattr(getattr(module, "model", None), "collect_stats") or not hasattr(module.model, "init_state"):
        raise MemLMError(f"{ckpt} holds a {type(module).__name__}, not a HAMT model; pass a HAMT checkpoint")
    ids = input_ids(module, text, batch, length, seed)
    stats = collect(module, ids, chunk)
    summary = summarise(stats)
    summary.update(checkpoint=str(ckpt), tokens=int(ids.numel()), source=text or f"random ids (seed {seed})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary["figures"] = render(stats, summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memlm.apps.hamt_analyze", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--text", default=None, help="text file to read (default: seeded random token ids)")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    s = analyze(a.ckpt, a.out, a.text, a.length, a.batch, a.chunk, a.seed)
    for i, layer in enumerate(s["layers"]):
        print(f"layer {i}: gate mean {layer['gate_mean']:.3f} (std {layer['gate_std']:.3f}), "
              f"read utilisation {layer['utilisation']:.2f}, fidelity {layer['fidelity']:.3f}")
    print("wrote", ", ".join(s["figures"] + [str(Path(a.out) / "summary.json")]))
    return 0


if __name__ == "__main__":
    run_main(main)
