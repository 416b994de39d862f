"""Training throughput at 1k context: HAMT vs the transformer baseline of matched parameters.

    python bench/hamt_throughput.py [--quick] [--seq-len 1024] [--batch-size 4]

``hamt`` is the default fused path (reads through [C, C] matrices per chunk, C = ``--chunk``);
``hamt_materialized`` the path before it (every token's slot states built, C = 64), kept as the
tested reference. ``--clock process`` times this process's CPU seconds instead of wall time.

Also measures the memory recurrence alone: the chunked parallel scan against the per-token
reference loop (same results, tested in tests/hamt), and HAMT's recurrent gate mode (sequential scan).
All variants are timed interleaved, round by round, in one process; the median per variant is reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memlm.models.hamt.memory import scan_chunk, scan_reference  # noqa: E402
from memlm.models.hamt.model import HAMTConfig, HAMTModel  # noqa: E402
from memlm.models.transformer import GPT, GPTConfig  # noqa: E402
from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import run_main  # noqa: E402

SIZES = {  # (hamt layers, transformer layers, width, heads): matched non-embedding parameters
    "micro": (4, 5, 128, 4),
    "tiny": (4, 5, 288, 6),
}


def train_step(model, opt, x, y):
    out = model(x)
    loss = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), y.reshape(-1))
    for v in out.aux_losses.values():
        loss = loss + v
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", default="micro", choices=sorted(SIZES))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=8, help="HAMT scan_chunk of the fused path")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="process = this process's CPU time (steadier on a shared machine; use with --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 6)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    torch.manual_seed(0)
    hl, tl, d, h = SIZES[args.size]
    T, B = args.seq_len, args.batch_size
    models = {
        "hamt": HAMTModel(HAMTConfig(vocab_size=args.vocab, n_layer=hl, n_embd=d, scan_chunk=args.chunk)),
        # the path before the fused read: every token's slot states built chunk by chunk (C = 64)
        "hamt_materialized": HAMTModel(HAMTConfig(vocab_size=args.vocab, n_layer=hl, n_embd=d, scan_impl="materialized",
                                                  scan_chunk=64)),
        "hamt_recurrent_gate": HAMTModel(HAMTConfig(vocab_size=args.vocab, n_layer=hl, n_embd=d, gate_mode="recurrent")),
        "transformer": GPT(GPTConfig(vocab_size=args.vocab, block_size=T, n_layer=tl, n_head=h, n_embd=d)),
    }
    if args.quick:
        models.pop("hamt_recurrent_gate")
    params = {k: (m.param_count() if hasattr(m, "param_count") else m.num_params()) for k, m in models.items()}
    opts = {k: torch.optim.AdamW(m.to(dev).parameters(), lr=1e-4) for k, m in models.items()}
    x = torch.randint(0, args.vocab, (B, T), device=dev)
    y = torch.randint(0, args.vocab, (B, T), device=dev)
    times = {k: [] for k in models}
    for k, m in models.items():  # warm-up
        train_step(m, opts[k], x, y)
    for _ in range(rounds):
        for k, m in models.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            train_step(m, opts[k], x, y)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(clock() - t0)
    rows, figures = [], {}
    base = statistics.median(times["transformer"])
    for k in models:
        med = statistics.median(times[k])
        tps = B * T / med
        rows.append({"model": k, "params_non_emb": params[k], "step_s": med, "tokens_per_s": tps,
                     "speed_vs_transformer": base / med})
        figures[f"{k}_tokens_per_s"] = round(tps, 1)
    figures["hamt_over_transformer_speed"] = round(base / statistics.median(times["hamt"]), 3)
    figures["hamt_materialized_over_transformer_speed"] = round(base / statistics.median(times["hamt_materialized"]), 3)
    print(f"training step, batch {B} x {T} tokens, {args.size} size, device {dev.type}")
    print_table(rows)

    # the recurrence alone: chunked parallel scan vs per-token loop (forward + backward)
    S, D = 8, d
    b = torch.randn(B, T, D, device=dev, requires_grad=True)
    g = torch.rand(B, T, S, device=dev, requires_grad=True)
    ld = torch.log(torch.linspace(0.8, 0.999, S, device=dev))
    m0 = torch.zeros(B, S, D, device=dev)

    def chunked(C=64):
        outs, m = [], m0
        for c0 in range(0, T, C):
            mm = scan_chunk(b[:, c0:c0 + C], g[:, c0:c0 + C], ld, m)
            m = mm[:, :, -1]
            outs.append(mm)
        return torch.cat(outs, 2)

    scans = {"chunked_parallel": chunked, "per_token_loop": lambda: scan_reference(b, g, ld, m0)}
    st = {k: [] for k in scans}
    for _ in range(max(2, rounds // 2)):
        for k, fn in scans.items():
            t0 = time.perf_counter()
            fn().sum().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            st[k].append(time.perf_counter() - t0)
    srows = [{"scan": k, "fwd_bwd_s": statistics.median(v)} for k, v in st.items()]
    speedup = statistics.median(st["per_token_loop"]) / statistics.median(st["chunked_parallel"])
    for r in srows:
        r["speedup_vs_loop"] = statistics.median(st["per_token_loop"]) / r["fwd_bwd_s"]
    print(f"\nmemory recurrence alone, B={B} T={T} S={S} D={D}")
    print_table(srows)
    figures["scan_chunked_speedup_vs_loop"] = round(speedup, 2)
    print_result(figures, {"quick": args.quick, "size": args.size, "seq_len": T, "batch_size": B, "rounds": rounds,
                           "device": dev.type, "threads": torch.get_num_threads(),
                           "chunk": args.chunk, "clock": args.clock})
    return 0


if __name__ == "__main__":
    run_main(main)
