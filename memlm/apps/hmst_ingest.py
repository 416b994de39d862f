"""Ingest a text file into an HMST checkpoint's semantic memory.

    python -m memlm.apps.hmst_ingest --ckpt runs/hmst_micro/version_0/checkpoints/last.ckpt \
        --file notes.txt [--out PATH] [--stride N]

The text is run through the model in block_size segments (SSM state carried); every
``stride``-th token becomes one FAISS item (key: its exit-layer state; value: its final
hidden state; text: the preceding ``mem_text_tokens`` tokens). The checkpoint is rewritten
with the grown memory (in place unless ``--out`` is given; written atomically), so chat.py
and further training see the new items.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from memlm.core.errors import MemLMError, run_main


def ingest_file(ckpt: str | Path, file: str | Path, out: str | Path | None = None, stride: int | None = None) -> dict:
    from memlm.lightning_modules.hmst.module import HMSTLanguageModel
    from memlm.checkpoint import load_module, read_checkpoint

    file = Path(file)
    if not file.is_file():
        raise MemLMError(f"text file not found: {file}; pass --file PATH to a UTF-8 text file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MemLMError(f"{file} is not UTF-8 text ({exc.reason}); convert it first") from exc
    module = load_module(ckpt)
    if not isinstance(module, HMSTLanguageModel):
        raise MemLMError(f"{ckpt} holds a {type(module).__name__}, not an HMST model; ingest needs an hmst_* checkpoint")
    before = len(module.semantic)
    ids = module.ingest(text, stride=stride)
    raw = read_checkpoint(ckpt)
    # the other entries (the training gates' generator state) stay, so training can still resume exactly
    raw["hmst_memory"] = {**(raw.get("hmst_memory") or {}), "semantic": module.semantic.state_dict(),
                          "episodic": module.episodic.state_dict()}
    target = Path(out) if out else Path(ckpt)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    torch.save(raw, tmp)
    os.replace(tmp, target)
    return {"written": int(ids.numel()), "before": before, "after": len(module.semantic), "out": str(target),
            "first_id": int(ids[0]) if ids.numel() else None, "last_id": int(ids[-1]) if ids.numel() else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memlm.apps.hmst_ingest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="HMST checkpoint (.ckpt)")
    ap.add_argument("--file", required=True, help="UTF-8 text file to ingest")
    ap.add_argument("--out", default=None, help="write the updated checkpoint here (default: update --ckpt in place)")
    ap.add_argument("--stride", type=int, default=None, help="write every N-th token (default: the model's mem_write_stride)")
    args = ap.parse_args(argv)
    r = ingest_file(args.ckpt, args.file, args.out, args.stride)
    print(f"ingested {r['written']} items (ids {r['first_id']}..{r['last_id']}); semantic memory {r['before']} -> "
          f"{r['after']} items; wrote {r['out']}")
    return 0


if __name__ == "__main__":
    run_main(main)
