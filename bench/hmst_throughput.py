"""HMST micro vs a transformer of equal active parameters: training/inference tokens/s on this
CPU, and the FLOPs (and time) saved by HMST's early exit.

    python bench/hmst_throughput.py [--quick] [--threads N] [--precision {fp32,bf16}] [--ablation-ckpt CKPT]

- HMST: configs/hmst_micro.yaml's model (vocab 2048). Its full stage-1 training step is
  timed (MoE, Mamba SSM, FAISS read + write, episodic store, controller, critic, exit head).
- Transformer: the baseline GPT (memlm.lightning_modules.transformer) with the same width and
  depth, its MLP width chosen so that its non-embedding parameters equal HMST's active
  non-embedding parameters of the language path (experts counted at top_k/n_experts;
  controller and critic excluded, they are off the token path).
- Steps alternate between the two models (interleaved) and the median step time is used.
- ``--precision bf16``: both models' forwards run under ``torch.autocast("cpu", bfloat16)``
  (the backward outside it, as Lightning's bf16-mixed does); the default fp32 compares them
  in full precision. Never one model in bf16 against the other in fp32.
- Early exit: FLOPs of an HMST forward (eval) with the exit gate forced on vs off, counted
  by torch.utils.flop_counter.FlopCounterMode, plus the measured forward time.
- ``--ablation-ckpt``: with a trained HMST checkpoint (e.g. from configs/hmst_micro.yaml),
  the validation loss of the builtin corpus's val split (4 streams of block_size segments,
  state carried) with each memory read / the early exit forced on or off.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlm.lightning_modules.hmst.module import HMSTLanguageModel  # noqa: E402
from memlm.lightning_modules.language_model import OptimizerConfig  # noqa: E402
from memlm.lightning_modules.transformer import TransformerLM  # noqa: E402
from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ON = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.0, "expert_bias": 0.0}


def lm_active_params(m: HMSTLanguageModel) -> int:
    c = m.model.param_counts()
    side = sum(p.numel() for p in m.model.critic.parameters()) + sum(p.numel() for p in m.model.controller.parameters())
    return c["active"] - c["embedding"] - side


def matched_transformer(hmst: HMSTLanguageModel, vocab: int) -> TransformerLM:
    cfg = hmst.config
    target = lm_active_params(hmst)
    d, L = cfg.d_model, cfg.n_layer
    # per layer: qkv + proj (4 d^2) + fc/proj (2 d h) + 2 LayerNorm weights (2 d); plus the final LayerNorm
    hidden = (target - d - L * (4 * d * d + 2 * d)) / (2 * d * L)
    ratio = max(0.25, hidden / d)
    torch.manual_seed(0)
    return TransformerLM(vocab_size=vocab, block_size=cfg.block_size, n_layer=L, n_head=cfg.n_head, n_embd=d,
                         mlp_ratio=ratio, optimizer=OptimizerConfig(warmup_steps=1))


def autocast(precision: str):
    """The same context for both models: bf16 autocast or nothing (fp32)."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(module, batch, opt, precision: str = "fp32"):
    def step():
        t0 = time.perf_counter()
        with autocast(precision):
            loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0
    return step


def fwd_time(fn, repeats, precision: str = "fp32"):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(precision):
            fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gate_ablation(ckpt: str, max_tokens: int) -> list[dict]:
    import torch.nn.functional as F

    from memlm.datamodules.text import TextDataModule
    from memlm.checkpoint import load_module

    m = load_module(ckpt)
    if not isinstance(m, HMSTLanguageModel):
        from memlm.core.errors import MemLMError

        raise MemLMError(f"{ckpt} is not an HMST checkpoint")
    T = m.config.block_size
    dm = TextDataModule(source="builtin", tokenizer="bpe", vocab_size=m.vocab_size, block_size=T, sampler="stream")
    dm.prepare_data()
    dm.setup("fit")
    if dm.tokenizer.fingerprint() != m.tokenizer.fingerprint():
        from memlm.core.errors import MemLMError

        raise MemLMError("the checkpoint was not trained on the builtin corpus with this tokenizer; use an hmst_micro checkpoint")
    ids = torch.as_tensor(dm.split_ids("val").astype("int64"))
    B = 4
    n = min((ids.numel() - 1) // (B * T), max(1, max_tokens // (B * T))) * B * T
    x_all, y_all = ids[:n].view(B, -1), ids[1:n + 1].view(B, -1)
    rows = []
    for name, sch in [("all reads on", ON), ("semantic off", {**ON, "semantic": 0.0}), ("episodic off", {**ON, "episodic": 0.0}),
                      ("both off", {**ON, "semantic": 0.0, "episodic": 0.0}), ("early exit forced", {**ON, "exit": 1.0})]:
        state, nll = None, 0.0
        with torch.no_grad():
            for s in range(0, x_all.size(1), T):
                out = m(x_all[:, s:s + T], state=state, schedule=sch)
                state = out.state
                nll += F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)).float(),
                                       y_all[:, s:s + T].reshape(-1), reduction="sum").item()
        rows.append({"gates": name, "val_loss": nll / y_all.numel(), "tokens": y_all.numel()})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="fp32, or bf16 autocast for BOTH models (forward under autocast, backward outside)")
    ap.add_argument("--ablation-ckpt", default=None, help="trained hmst_micro checkpoint for the gate ablation")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 4 if args.quick else 12
    vocab = 2048
    cfg = yaml.safe_load((ROOT / "configs" / "hmst_micro.yaml").read_text())["model"]["init_args"]
    torch.manual_seed(0)
    hmst = HMSTLanguageModel(vocab_size=vocab, **cfg)
    gpt = matched_transformer(hmst, vocab)
    for m in (hmst, gpt):
        m.log = lambda *a, **k: None  # outside a Trainer
        m.train()
    T = hmst.config.block_size
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (args.batch, T * (rounds + 3) + 1), generator=g)

    def batch(k):
        x = data[:, k * T:(k + 1) * T]
        return {"input_ids": x, "targets": data[:, k * T + 1:(k + 1) * T + 1], "stream": True, "first": k == 0}

    opt_h = torch.optim.AdamW(hmst.parameters(), lr=1e-3)
    opt_g = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
    times_h, times_g = [], []
    for k in range(rounds + 2):  # 2 warm-up rounds; HMST sees consecutive stream chunks (state carried)
        th = make_step(hmst, batch(k), opt_h, args.precision)()
        tg = make_step(gpt, batch(k), opt_g, args.precision)()
        if k >= 2:
            times_h.append(th)
            times_g.append(tg)
    tok = args.batch * T
    train_h, train_g = tok / statistics.median(times_h), tok / statistics.median(times_g)

    # inference (eval gates: every memory read on, no exit) and early exit
    hmst.eval()
    gpt.eval()
    x = data[:, :T]
    reps = 3 if args.quick else 8
    # interleaved as the training steps: HMST, transformer, HMST with the exit gate on, repeated
    ti_h, ti_g, ti_x = [], [], []
    for _ in range(2):  # warm-up (first eval calls allocate), not timed
        fwd_time(lambda: hmst(x, schedule=ON), 1, args.precision)
        fwd_time(lambda: gpt(x), 1, args.precision)
    for _ in range(reps):
        ti_h.append(fwd_time(lambda: hmst(x, schedule=ON), 1, args.precision))
        ti_g.append(fwd_time(lambda: gpt(x), 1, args.precision))
        ti_x.append(fwd_time(lambda: hmst(x, schedule={**ON, "exit": 1.0}), 1, args.precision))
    inf_h, inf_g, inf_exit = statistics.median(ti_h), statistics.median(ti_g), statistics.median(ti_x)
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn):
        fc = FlopCounterMode(display=False)
        with fc, torch.no_grad():
            fn()
        return fc.get_total_flops()

    f_full = flops(lambda: hmst(x, schedule=ON))
    f_exit = flops(lambda: hmst(x, schedule={**ON, "exit": 1.0}))
    f_gpt = flops(lambda: gpt(x))

    rows = [
        {"model": "hmst_micro", "active_params": lm_active_params(hmst), "total_params": hmst.model.param_counts()["total"],
         "train_tok_s": train_h, "infer_tok_s": tok / inf_h, "fwd_GFLOP_per_batch": f_full / 1e9},
        {"model": "hmst_micro (exit gate on)", "active_params": "", "total_params": "",
         "train_tok_s": "", "infer_tok_s": tok / inf_exit, "fwd_GFLOP_per_batch": f_exit / 1e9},
        {"model": "transformer (matched)", "active_params": sum(p.numel() for p in gpt.parameters()) - gpt.model.wte.weight.numel(),
         "total_params": sum(p.numel() for p in gpt.parameters()), "train_tok_s": train_g, "infer_tok_s": tok / inf_g,
         "fwd_GFLOP_per_batch": f_gpt / 1e9},
    ]
    print_table(rows)
    figures = {
        "hmst_train_tokens_per_s": round(train_h, 1),
        "transformer_train_tokens_per_s": round(train_g, 1),
        "train_speed_ratio_hmst_over_transformer": round(train_h / train_g, 3),
        "hmst_infer_tokens_per_s": round(tok / inf_h, 1),
        "transformer_infer_tokens_per_s": round(tok / inf_g, 1),
        "infer_speed_ratio_hmst_over_transformer": round(inf_g / inf_h, 3),
        "hmst_active_params_lm": lm_active_params(hmst),
        "transformer_nonembedding_params": rows[2]["active_params"],
        "early_exit_flops_full": f_full,
        "early_exit_flops_exit": f_exit,
        "early_exit_flops_saved_frac": round(1 - f_exit / f_full, 4),
        "early_exit_time_saved_frac": round(1 - inf_exit / inf_h, 4),
    }
    if args.ablation_ckpt:
        abl = gate_ablation(args.ablation_ckpt, 2048 if args.quick else 6144)
        print_table(abl)
        for r in abl:
            figures["val_loss_" + r["gates"].replace(" ", "_")] = round(r["val_loss"], 4)
    print(f"early exit: {100 * (1 - f_exit / f_full):.1f}% fewer forward FLOPs, {100 * (1 - inf_exit / inf_h):.1f}% less time")
    print(f"HMST/transformer training throughput: {train_h / train_g:.3f}x")
    print_result(figures, {"quick": args.quick, "batch": args.batch, "precision": args.precision, "seq_len": T, "rounds": rounds, "vocab": vocab,
                           "config": "configs/hmst_micro.yaml", "threads": torch.get_num_threads(),
                           "ablation_ckpt": args.ablation_ckpt})
    return 0


if __name__ == "__main__":
    run_main(main)
