"""HMST learned control on held-out synthetic facts: all gates on, the fixed schedule, the trained
controller, and the controller plus the critic.

    python bench/hmst_control.py [--quick] [--seed S] [--threads N] [--workdir DIR] [--plot docs/img/hmst_control_pareto.png]

Pipeline (everything in this process, offline, char tokenizer over the fact text):

1. stage 1: a small HMST trains on fact QA lines ("<fact> <distractor fact> Q: <question> A: <value>")
   of the ``train`` names, with the stage-1 gate schedule;
2. stage 3: :class:`memlm.callbacks.rl_stage.RLStage` (PPO) trains the controller from that
   checkpoint in a real Trainer (quality = log-likelihood gain on the answer's tokens, or the
   whole row with ``--quality row``; compute = the meter's), once per ``lambda_compute`` of the
   sweep; the main row uses ``--lambda-compute``;
3. stage 4: :class:`memlm.callbacks.critic_stage.CriticStage` trains the critic on
   (query, response, facts) triples (critic_data.py, shaped by ``CRITIC_DATA``); AUROC / ECE on
   triples of held-out names;
4. evaluation: every model's semantic memory is cleared and holds the stage-3 facts plus the
   held-out facts (:func:`knowledge_base`, as ``/ingest`` writes them), and each question (with
   its fact and a distractor in the prompt) is answered by :class:`HMSTInferenceEngine`; the
   answer is the reply's first sentence (:func:`is_right`). A fixed "exit + semantic read" row
   shows what the cheapest pattern that still reads memory does on its own.

The model uses the kNN-LM output over token-embedding keys (docs/hmst_control.md "Why the keys").

Per configuration: exact match, confident-error rate (wrong and not abstained, with critic
score >= threshold or no critic), abstain rate, metered compute and latency per answer.
The machine may be shared: absolute latencies are indicative; compute is counted, not timed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from memlm.apps.hmst_engine import EngineConfig, HMSTInferenceEngine  # noqa: E402
from memlm.callbacks.critic_stage import CriticStage  # noqa: E402
from memlm.callbacks.rl_stage import RLStage  # noqa: E402
from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import run_main  # noqa: E402
from memlm.core.tokenizer import build_tokenizer  # noqa: E402
from memlm.datamodules.critic_data import encode_examples, make_critic_examples  # noqa: E402
from memlm.datamodules.facts import make_facts  # noqa: E402
from memlm.lightning_modules.hmst.module import HMSTLanguageModel  # noqa: E402

BLOCK = 128
# stage-4 triples shaped like the engine's answers: the statement's rest after the cloze
# ("34 years old"), swapped values from the same relation (another capital, not a colour), and
# half the contexts one fact alone (the engine's evidence is often a single item)
CRITIC_DATA = {"response": "statement", "same_relation_swaps": True, "single_fact": 0.5}


def qa_line(f, d) -> str:
    return f"{prompt_of(f, d)} {f.value}\n"


def prompt_of(f, d) -> str:
    # the answer is asked in cloze form ("A: The capital of Zorbia is"), as in stage 2
    return f"{f.text} {d.text} Q: {f.question} A: {f.cloze}"


def build(tok, seed: int) -> HMSTLanguageModel:
    torch.manual_seed(seed)
    m = HMSTLanguageModel(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=4, n_head=4, d_model=96, d_ff=128,
                          n_experts=4, top_k=2, exit_layer=2, ssm_d_state=8, ssm_expand=1, mem_top_k=4,
                          # the stage-2 kNN-LM memory (docs/hmst.md): training rows are written at
                          # every token, so a fact seen in an earlier batch can be read back; the
                          # key window is 10 characters (about 3 BPE tokens: this bench is char-level)
                          mem_value="next_token", mem_key_window=10, mem_score_bias=8.0, mem_query_stride=1,
                          mem_write=True, mem_write_stride=1, mem_ingest_stride=1, mem_max_items=16384,
                          mem_text_tokens=48,
                          # the kNN-LM output: a retrieved item's next token is copied into the
                          # prediction (weight 0.8, sharp over the 4 items) when its key is a near
                          # match (cosine >= 0.95; below it a read costs more than it gives); an
                          # exiting row reads too
                          mem_knn_lambda=0.8, mem_knn_temperature=0.01, mem_knn_min_score=0.95,
                          # keys from the token embeddings (a 10-character n-gram key): an ingested
                          # fact stands alone, a question sees it after other text, and exit-layer
                          # keys carry that context (docs/hmst_control.md "Why the keys")
                          mem_key_source="embedding",
                          episodic_capacity=64, controller_hidden=32, critic_d_model=64, critic_layers=2,
                          critic_heads=4, critic_max_len=192,
                          # the critic's exact-match flags over character trigrams (critic.py): without
                          # them this critic stays at chance on held-out triples (docs/hmst_control.md)
                          critic_match_ngram=3,
                          optimizer={"learning_rate": 3e-3, "weight_decay": 0.0, "warmup_steps": 20, "min_lr_ratio": 0.1})
    m.set_tokenizer(tok)
    return m


def lm_batches(facts, tok, n_rows: int, seed: int, answer_only: bool = False):
    """QA rows; with ``answer_only`` the targets are the answer's tokens alone (" Value\n"), so
    stage 3's quality is the log-likelihood gain on what is asked: the dense form of exact match."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        i, j = torch.randint(len(facts), (2,), generator=g).tolist()
        j = j if j != i else (i + 1) % len(facts)
        # the row keeps the line's end (as the engine keeps the prompt's): two facts and the
        # question often exceed a block, and a row cut at its end would lose the answer
        ids = tok.encode(qa_line(facts[i], facts[j]))[-(BLOCK + 1):]
        n = len(ids)
        ids = ids + [tok.pad_id] * (BLOCK + 1 - len(ids))
        t = torch.tensor(ids)
        y = t[1:].clone()
        y[y == tok.pad_id] = -100
        if answer_only:  # the line ends with the answer's tokens
            y[: n - 1 - len(tok.encode(f" {facts[i].value}\n"))] = -100
        rows.append({"input_ids": t[:-1], "targets": y})
    return rows


def trainer(steps: int, callbacks) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     num_sanity_val_steps=0, limit_val_batches=0)


def save(m, path: Path) -> str:
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def stage3(ckpt: str, tok, train_facts, lam: float, steps: int, seed: int,
           answer_only: bool = True) -> tuple[HMSTLanguageModel, float]:
    m = build(tok, seed)
    grads = []

    class GradLog(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if pl_module.rl_phase.last_stats:
                grads.append(pl_module.rl_phase.last_stats["grad_norm"])

    cb = RLStage(init_checkpoint=ckpt, algorithm="ppo", epochs=4, lambda_compute=lam, ent_coef=0.01)
    m.optimizer_config = type(m.optimizer_config)(learning_rate=3e-3, weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0)
    data = DataLoader(lm_batches(train_facts, tok, 16 * steps, seed + 11, answer_only), batch_size=16)
    trainer(steps * 4, [cb, GradLog()]).fit(m, train_dataloaders=data)
    return m, statistics.fmean(grads) if grads else 0.0


def critic_metrics(m, tok, facts_n: int, seed: int) -> dict:
    from torchmetrics.classification import BinaryAUROC, BinaryCalibrationError

    ex = make_critic_examples(facts_n, seed, "eval", **CRITIC_DATA)
    b = encode_examples(ex, tok, tok.pad_id)
    with torch.no_grad():
        p = m.model.critic(b["query_ids"], b["response_ids"], b["fact_ids"], pad_id=tok.pad_id).p_correct
    y = b["labels"].long()
    return {"auroc": float(BinaryAUROC()(p, y)), "ece": float(BinaryCalibrationError(n_bins=15)(p, y)),
            "acc": float(((p > 0.5).long() == y).float().mean())}


def stage4(ckpt: str, tok, steps: int, n_facts: int, seed: int) -> HMSTLanguageModel:
    m = build(tok, seed)
    m.optimizer_config = type(m.optimizer_config)(learning_rate=1e-3, weight_decay=0.0, warmup_steps=20, min_lr_ratio=0.1)
    ex = make_critic_examples(n_facts, seed, "train", **CRITIC_DATA)
    data = DataLoader(ex, batch_size=32, shuffle=True, collate_fn=lambda xs: encode_examples(xs, tok, tok.pad_id),
                      generator=torch.Generator().manual_seed(seed))
    trainer(steps, [CriticStage(init_checkpoint=ckpt)]).fit(m, train_dataloaders=data)
    return m


def answer_of(text: str) -> str:
    """The answer's first sentence (the engine stops at "." too, see STOP)."""
    return text.strip().split("\n")[0].split(".")[0].strip()


def is_right(text: str, value: str) -> bool:
    """The first sentence is the value, or the value and the rest of its statement
    ("34 years old" for the cloze "Zorbia is")."""
    a = answer_of(text)
    return a == value or a.startswith(value + " ")


STOP = ("\n", ".")  # the answer is one sentence: generation ends at its period


def knowledge_base(m, facts) -> None:
    """The semantic memory holds exactly these facts (every token, as the engine's /ingest
    writes them): what stage 1's training stream left there is cleared, so that every model is
    asked with the same memory, and the memory the controller trains with holds its questions' facts."""
    m.semantic.clear()
    for f in facts:
        m.ingest(f.text)


def evaluate(m, eval_facts, cfg: EngineConfig, show: int = 0) -> dict:
    eng = HMSTInferenceEngine(m, cfg)
    em = conf_err = abstain = 0
    compute, latency = [], []
    for i, f in enumerate(eval_facts):
        d = eval_facts[(i + 1) % len(eval_facts)]
        res = eng.answer(prompt_of(f, d), query=f.question)
        right = is_right(res.text, f.value)
        if i < show:  # sample outputs, so an EM of 0 can be told apart from an extraction fault
            got = [r["text"] for r in res.attempts[-1].retrieved] if res.attempts else []
            print(f"sample {cfg.gate_mode}: Q {f.question!r} expected {f.value!r} got {res.text!r} retrieved {got}")
        em += int(right and not res.abstained)
        abstain += int(res.abstained)
        score = res.critic_score
        conf_err += int(not right and not res.abstained and (score is None or score >= cfg.threshold))
        compute.append(res.compute_total)
        latency.append(res.latency_s)
    n = len(eval_facts)
    return {"em": em / n, "confident_error": conf_err / n, "abstain": abstain / n,
            "compute_per_answer": statistics.fmean(compute), "latency_ms": 1000 * statistics.fmean(latency)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lambda-compute", type=float, default=0.3)
    p.add_argument("--sweep", default="0,0.1,0.2,0.3,1,3", help="lambda_compute values for the Pareto curve")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--plot", default=None, help="write the quality/compute sweep as a PNG here")
    p.add_argument("--stage1-steps", type=int, default=None, help="override the stage-1 training steps")
    p.add_argument("--quality", choices=("answer", "row"), default="answer",
                   help="stage 3's quality: log-likelihood gain on the answer tokens, or on the whole QA row")
    p.add_argument("--workdir", default=None,
                   help="keep the checkpoints here; a stage-1 checkpoint already there (same model settings, "
                        "steps and seed) is reused")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    s1, s3, s4, n_eval = (150, 40, 400, 40) if args.quick else (1500, 40, 800, 200)
    s1 = args.stage1_steps or s1
    train_facts = make_facts(400 if args.quick else 2000, args.seed, "train")
    eval_facts = make_facts(n_eval, args.seed, "eval")
    corpus = [qa_line(f, f) for f in train_facts + eval_facts]
    tok = build_tokenizer("char", corpus)
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hmst_control_"))
    tmp.mkdir(parents=True, exist_ok=True)

    # stage 1 (reused from --workdir when it was trained with the same size, seed and steps)
    base = build(tok, args.seed)
    sig = hashlib.sha1(json.dumps(dict(base.hparams), sort_keys=True, default=str).encode()).hexdigest()[:8]
    cached = tmp / f"stage1_{'quick' if args.quick else 'full'}_s{s1}_seed{args.seed}_{sig}.ckpt"
    if cached.exists():
        ck = torch.load(cached, weights_only=True)
        base.load_state_dict(ck["state_dict"])
        base.on_load_checkpoint(ck)
        print(f"stage 1: reusing {cached}")
    else:
        trainer(s1, []).fit(base, train_dataloaders=DataLoader(lm_batches(train_facts, tok, 16 * s1, args.seed), batch_size=16))
        save(base, cached)
    # the controller learns on questions about facts that are in semantic memory, as at evaluation
    rl_facts = train_facts[:200]
    knowledge_base(base, rl_facts)
    ckpt1 = save(base, tmp / "stage1.ckpt")

    # stage 3 (the main lambda, then the sweep)
    lams = sorted({float(x) for x in args.sweep.split(",") if x.strip()} | {args.lambda_compute})
    models, grad_norm = {}, 0.0
    for lam in lams:
        m, g = stage3(ckpt1, tok, rl_facts, lam, s3, args.seed, args.quality == "answer")
        models[lam] = m
        if lam == args.lambda_compute:
            grad_norm = g
    ctl = models[args.lambda_compute]
    ckpt3 = save(ctl, tmp / "stage3.ckpt")

    # stage 4
    before = critic_metrics(ctl, tok, 100, args.seed)
    crit = stage4(ckpt3, tok, s4, 600 if args.quick else 3000, args.seed)
    after = critic_metrics(crit, tok, 100 if args.quick else 300, args.seed)

    # evaluation: held-out facts in semantic memory, questions through the engine
    for m in [*models.values(), crit, base]:
        m.eval()
        knowledge_base(m, rl_facts + eval_facts)  # the training questions' facts stay, as distractors
    never = dict(verify="never", max_new_tokens=16, threshold=args.threshold, stop=STOP)
    rows = {
        "all_on": evaluate(base, eval_facts, EngineConfig(gate_mode="all_on", **never), show=5),
        "schedule": evaluate(base, eval_facts, EngineConfig(gate_mode="schedule", **never)),
        "controller": evaluate(ctl, eval_facts, EngineConfig(gate_mode="controller", **never)),
        "controller_critic": evaluate(crit, eval_facts, EngineConfig(gate_mode="controller", verify="always",
                                                                     max_retries=1, max_new_tokens=16,
                                                                     threshold=args.threshold, stop=STOP)),
    }
    # the cheapest pattern that still reads memory, fixed: what the controller can be compared with
    fixed = base.eval_schedule
    base.eval_schedule = {"exit": 1.0, "episodic": 0.0, "semantic": 1.0, "verify": 0.0, "expert_bias": 0.0}
    rows["fixed_exit_read"] = evaluate(base, eval_facts, EngineConfig(gate_mode="schedule", **never))
    base.eval_schedule = fixed
    table = [{"config": k, **{c: round(v, 4) for c, v in r.items()}} for k, r in rows.items()]
    print_table(table, ["config", "em", "confident_error", "abstain", "compute_per_answer", "latency_ms"])
    sweep = []
    for lam, m in models.items():
        r = evaluate(m, eval_facts, EngineConfig(gate_mode="controller", **never))
        sweep.append({"lambda_compute": lam, "em": r["em"],
                      "compute_ratio": r["compute_per_answer"] / rows["all_on"]["compute_per_answer"]})
    print_table(sweep)
    print_table([{"critic": "before stage 4", **before}, {"critic": "after stage 4", **after}])
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        pts = sorted(sweep, key=lambda s: s["compute_ratio"])
        ax.plot([s["compute_ratio"] for s in pts], [s["em"] for s in pts], "o-")
        for i, s in enumerate(pts):  # λs that land on the same point get stacked labels
            same = [t["lambda_compute"] for t in pts if abs(t["compute_ratio"] - s["compute_ratio"]) < 0.01
                    and abs(t["em"] - s["em"]) < 0.005]
            if s["lambda_compute"] != same[0]:
                continue
            ax.annotate("λ=" + ",".join(f"{x:g}" for x in same), (s["compute_ratio"], s["em"]),
                        textcoords="offset points", xytext=(4, -12 if i % 2 else 6), fontsize=8)
        ax.set_xlim(0, 1.1)
        ax.set_ylim(0, 1)
        ax.axhline(rows["all_on"]["em"], ls="--", c="gray", label="all gates on")
        ax.set_xlabel("metered compute / all gates on")
        ax.set_ylabel("exact match (held-out facts)")
        ax.set_title("HMST stage-3 λ_compute sweep" + (" (--quick)" if args.quick else ""))
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    figures = {
        "em_all_on": rows["all_on"]["em"], "em_schedule": rows["schedule"]["em"],
        "em_controller": rows["controller"]["em"], "em_controller_critic": rows["controller_critic"]["em"],
        "confident_error_all_on": rows["all_on"]["confident_error"],
        "confident_error_controller_critic": rows["controller_critic"]["confident_error"],
        "abstain_controller_critic": rows["controller_critic"]["abstain"],
        "compute_ratio_controller": rows["controller"]["compute_per_answer"] / rows["all_on"]["compute_per_answer"],
        "compute_ratio_schedule": rows["schedule"]["compute_per_answer"] / rows["all_on"]["compute_per_answer"],
        "em_fixed_exit_read": rows["fixed_exit_read"]["em"],
        "compute_ratio_fixed_exit_read": rows["fixed_exit_read"]["compute_per_answer"] / rows["all_on"]["compute_per_answer"],
        "compute_ratio_controller_critic": rows["controller_critic"]["compute_per_answer"] / rows["all_on"]["compute_per_answer"],
        "latency_ms_all_on": rows["all_on"]["latency_ms"], "latency_ms_controller": rows["controller"]["latency_ms"],
        "critic_auroc": after["auroc"], "critic_ece": after["ece"], "critic_auroc_before": before["auroc"],
        "controller_grad_norm": grad_norm,
        "sweep": sweep,
    }
    print_result(figures, vars(args))
    return 0


if __name__ == "__main__":
    run_main(main)
