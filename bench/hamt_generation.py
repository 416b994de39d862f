"""Time and memory per generated token at contexts 1k .. 64k: HAMT (constant state) vs transformer (KV cache).

    python bench/hamt_generation.py [--quick] [--contexts 1024,4096,16384,65536] [--new-tokens 32]

The per-token cost depends only on the *size* of the state a model carries at context n, not on
what the n tokens were, so each model gets a state of the right size directly (HAMT: M of its
fixed shape with position n; transformer: a KV cache filled to n) instead of a long prefill; then
both generate ``--new-tokens`` greedily, one token per forward call with the state, interleaved per
context. Memory: the bytes of state each model carries per sequence (exact), and on CUDA the peak
allocated memory during generation.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from memlm.models.hamt.model import HAMTConfig, HAMTModel  # noqa: E402
from memlm.models.transformer import GPT, GPTConfig, KVCache  # noqa: E402
from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import MemLMError, run_main  # noqa: E402


def state_bytes(state) -> int:
    if state is None:
        return 0
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    if isinstance(state, KVCache):
        return state_bytes(state.keys) + state_bytes(state.values)
    return 0


def hamt_state(model: HAMTModel, n: int, dev) -> dict:
    st = model.init_state(1, device=dev)
    g = torch.Generator(device="cpu").manual_seed(n)
    for layer in st["layers"]:
        layer["M"] = torch.randn(layer["M"].shape, generator=g).to(dev)
        layer["conv"] = torch.randn(layer["conv"].shape, generator=g).to(dev)
    st["pos"] = torch.tensor(n, device=dev)
    return st


def kv_state(model: GPT, n: int, dev) -> KVCache:
    c = model.cfg
    cache = KVCache(c.n_layer)
    g = torch.Generator(device="cpu").manual_seed(n)
    for i in range(c.n_layer):
        cache.keys[i] = torch.randn(1, c.n_head, n, c.head_dim, generator=g).to(dev)
        cache.values[i] = torch.randn(1, c.n_head, n, c.head_dim, generator=g).to(dev)
    cache.length = n
    return cache


@torch.no_grad()
def generate(model, state, first_token: torch.Tensor, new_tokens: int, dev) -> tuple[list[float], object]:
    tok = first_token
    times = []
    for _ in range(new_tokens):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(tok, state)
        state = out.state
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, state


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--contexts", default=None, help="comma-separated context lengths")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        contexts = [int(v) for v in (args.contexts or ("1024,4096,16384" if args.quick else "1024,4096,16384,65536")).split(",")]
    except ValueError as exc:
        raise MemLMError(f"--contexts must be comma-separated integers ({exc})") from exc
    new = args.new_tokens or (16 if args.quick else 32)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    d = args.width
    hamt = HAMTModel(HAMTConfig(vocab_size=args.vocab, n_layer=4, n_embd=d)).to(dev).eval()
    gpt = GPT(GPTConfig(vocab_size=args.vocab, block_size=max(contexts) + new + 1, n_layer=5, n_head=4, n_embd=d)).to(dev).eval()
    first = torch.tensor([[1]], device=dev)
    generate(hamt, hamt_state(hamt, 16, dev), first, 4, dev)  # warm-up
    generate(gpt, kv_state(gpt, 16, dev), first, 4, dev)
    rows, figures = [], {}
    for n in contexts:
        per = {}
        for name, model, make in (("hamt", hamt, hamt_state), ("transformer", gpt, kv_state)):
            st = make(model, n, dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times, st = generate(model, st, first, new, dev)
            ms = statistics.median(times) * 1e3
            row = {"context": n, "model": name, "ms_per_token": ms, "state_MiB": state_bytes(st) / 2**20}
            if dev.type == "cuda":
                row["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            rows.append(row)
            per[name] = ms
            figures[f"{name}_ms_per_token_{n}"] = round(ms, 3)
            figures[f"{name}_state_MiB_{n}"] = round(row["state_MiB"], 4)
            del st
        rows[-1]["transformer_over_hamt_time"] = per["transformer"] / per["hamt"]
    print(f"greedy generation, {new} new tokens per context, batch 1, device {dev.type}")
    print_table(rows, ["context", "model", "ms_per_token", "state_MiB", "transformer_over_hamt_time"]
                + (["peak_extra_MiB"] if dev.type == "cuda" else []))
    h = [figures[f"hamt_ms_per_token_{n}"] for n in contexts]
    t = [figures[f"transformer_ms_per_token_{n}"] for n in contexts]
    figures["hamt_time_growth_first_to_last"] = round(h[-1] / h[0], 3)
    figures["transformer_time_growth_first_to_last"] = round(t[-1] / t[0], 3)
    print_result(figures, {"quick": args.quick, "contexts": contexts, "new_tokens": new, "width": d,
                           "hamt_layers": 4, "transformer_layers": 5, "device": dev.type,
                           "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    run_main(main)
