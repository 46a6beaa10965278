"""Our torch.func baselines vs captum, side by side on the same model and data.

    HF_HUB_OFFLINE=1 python benchmarks/bench_baselines.py [--repeats 3] [--threads 1]

Rows: GradDot vs captum TracInCP with one checkpoint (lr 1: TracInCP == GradDot); TracIn (3 checkpoints,
``normalize_train=False`` = TracInCP) vs captum TracInCP; HIF Arnoldi vs captum ArnoldiInfluenceFunction
(same Krylov dimension, top-k, algebraically-largest selection, equivalent damping). Each cell is the
median wall time of ``--repeats`` runs, ours and captum's interleaved; "agree" compares the score matrices (max |ours - captum| relative
to max |captum|, and Pearson r). Writes a Markdown table to stdout and to
``benchmarks/results_baselines.md``.

captum's Hessian is that of the SUMMED loss over its Hessian data; ours that of the MEAN loss. With
``hessian_reg = N * damping`` the two define the same damped operator up to the factor N, so we compare
``ours`` with ``N * captum``.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from untrac_pl.baselines import graddot, hif_arnoldi, tracin  # noqa: E402
from untrac_pl.data.collate import PadCollator  # noqa: E402
from untrac_pl.losses import IGNORE_INDEX, per_example_loss  # noqa: E402


class LogitsOnly(torch.nn.Module):
    """captum calls ``model(*features)`` and wants a tensor back."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


def make_examples(n, vocab, seed, min_len, max_len):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(2, vocab, (length,), generator=gen).tolist()
        labels = list(ids)
        if i % 2 == 0:
            labels[:4] = [IGNORE_INDEX] * 4
        out.append({"input_ids": ids, "labels": labels, "index": i})
    return out


def build(args):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4, vocab_size=args.vocab, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")
    train = make_examples(args.n_train, args.vocab, 1, 12, 24)
    queries = make_examples(args.n_query, args.vocab, 2, 12, 24)
    # a few Adam steps so the weights are not a random init (a more LM-like Hessian)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = PadCollator(0)(train)
    model.train()
    for _ in range(args.pretrain_steps):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = per_example_loss(out.logits, batch["labels"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, train, queries


def timed_pair(fns, repeats):
    """Median wall time of each function; runs are interleaved (a, b, a, b, ...) so that a change in
    machine load hits both sides alike. Returns ``[(median_seconds, last_result), ...]``."""
    times = [[] for _ in fns]
    results = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), r) for t, r in zip(times, results)]


def agreement(ours, theirs):
    a, b = ours.double().flatten(), theirs.double().flatten()
    rel = float((a - b).abs().max() / b.abs().max())
    a0, b0 = a - a.mean(), b - b.mean()
    return rel, float(a0 @ b0 / (a0.norm() * b0.norm()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--n_train", type=int, default=64)
    ap.add_argument("--n_query", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--pretrain_steps", type=int, default=30)
    ap.add_argument("--arnoldi_iterations", type=int, default=30)
    ap.add_argument("--top_k", type=int, default=10)
    ap.add_argument("--hessian_examples", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_baselines.md")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import captum
    from captum.influence import TracInCP
    from captum.influence._core.arnoldi_influence_function import (
        ArnoldiInfluenceFunction,
    )

    load0 = os.getloadavg()[0]
    model, train, queries = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    collate = PadCollator(0)
    tb, qb = collate(train), collate(queries)
    q_inputs = (qb["input_ids"], qb["attention_mask"], qb["labels"])
    train_ds = torch.utils.data.TensorDataset(tb["input_ids"], tb["attention_mask"], tb["labels"])
    hess_ex = train[: args.hessian_examples]
    hb = collate(hess_ex)
    hess_ds = torch.utils.data.TensorDataset(hb["input_ids"], hb["attention_mask"], hb["labels"])
    tmp = Path(tempfile.mkdtemp(prefix="bench_baselines_"))

    # checkpoints: the model plus two perturbed copies
    gen = torch.Generator().manual_seed(5)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ckpts, paths = [], []
    for c, lr in enumerate([1e-3, 5e-4, 2e-4]):
        sd = {n: (v + (0.0 if c == 0 else 0.01) * torch.randn(v.shape, generator=gen)) for n, v in base.items()}
        ckpts.append((sd, lr))
        path = tmp / f"ckpt{c}.pt"
        torch.save({"state": {"lm." + n: v for n, v in sd.items()}, "lr": lr}, path)
        paths.append(str(path))
    unit_path = tmp / "unit.pt"
    torch.save({"state": {"lm." + n: v for n, v in base.items()}, "lr": 1.0}, unit_path)

    def load(m, path):
        blob = torch.load(path)
        m.load_state_dict(blob["state"], strict=False)
        return blob["lr"]

    wrapped = LogitsOnly(copy.deepcopy(model)).eval()
    rows = []

    # 1. GradDot vs TracInCP(1 checkpoint, lr 1)
    def captum_dot():
        ref = TracInCP(wrapped, train_ds, [str(unit_path)], checkpoints_load_func=load,
                       loss_fn=per_example_loss, batch_size=args.batch_size)
        return ref.influence(q_inputs)

    (t_ours, ours), (t_loop, _), (t_cap, cap) = timed_pair([
        lambda: graddot(model, train, queries, batch_size=args.batch_size)["example_scores"],
        lambda: graddot(model, train, queries, batch_size=args.batch_size, use_vmap=False)["example_scores"],
        captum_dot], args.repeats)
    rows.append(("GradDot (vmap per-example grads)", "TracInCP, 1 checkpoint, lr=1", t_ours, t_cap,
                 *agreement(ours, cap)))
    rows.append(("GradDot, per-example loop (use_vmap=False)", "TracInCP, 1 checkpoint, lr=1", t_loop, t_cap,
                 float("nan"), float("nan")))

    # 2. TracIn, 3 checkpoints
    def captum_tracin():
        ref = TracInCP(wrapped, train_ds, paths, checkpoints_load_func=load, loss_fn=per_example_loss,
                       batch_size=args.batch_size)
        return ref.influence(q_inputs)

    (t_ours, ours), (t_cap, cap) = timed_pair([
        lambda: tracin(model, train, queries, checkpoints=ckpts, normalize_train=False,
                       batch_size=args.batch_size)["example_scores"],
        captum_tracin], args.repeats)
    rows.append(("TracIn (3 ckpts, normalize_train=False)", "TracInCP, 3 checkpoints", t_ours, t_cap,
                 *agreement(ours, cap)))

    # 3. Arnoldi (same Krylov dimension, top-k, selection; damping equivalent up to the factor N)
    n_h = len(hess_ex)
    damping = 1e-2

    def ours_arnoldi(mode):
        return hif_arnoldi(model, train, queries, iterations=args.arnoldi_iterations, top_k=args.top_k,
                           damping=damping, select="largest", hessian_batches=hess_ex,
                           batch_size=args.batch_size, hvp_mode=mode)["example_scores"]

    def captum_arnoldi():
        ref = ArnoldiInfluenceFunction(wrapped, train_ds, str(unit_path), checkpoints_load_func=load,
                                       loss_fn=per_example_loss, batch_size=args.batch_size,
                                       hessian_dataset=hess_ds, projection_dim=args.top_k,
                                       arnoldi_dim=args.arnoldi_iterations, arnoldi_tol=1e-6,
                                       hessian_reg=n_h * damping, hessian_inverse_tol=0.0, seed=0)
        return ref.influence(q_inputs)

    (t_fr, fr), (t_rr, rr), (t_cap, cap) = timed_pair(
        [lambda: ours_arnoldi("fwd_rev"), lambda: ours_arnoldi("rev_rev"), captum_arnoldi], args.repeats)
    name = f"HIF Arnoldi ({args.arnoldi_iterations} it, top {args.top_k})"
    rows.append((name + ", hvp_mode=fwd_rev (default)", "ArnoldiInfluenceFunction (x N)", t_fr, t_cap,
                 *agreement(fr, n_h * cap)))
    rows.append((name + ", hvp_mode=rev_rev", "ArnoldiInfluenceFunction (x N)", t_rr, t_cap,
                 *agreement(rr, n_h * cap)))

    head = (f"model: GPT-2 {args.layers}x{args.width}, vocab {args.vocab}, {n_params:,} params; "
            f"{args.n_train} train x {args.n_query} query examples (12-24 tokens), batch {args.batch_size}; "
            f"Hessian data {n_h} examples; torch {torch.__version__}, captum {captum.__version__}, "
            f"{args.threads} thread(s), {platform.machine()}, {os.cpu_count()} CPUs, load average at start "
            f"{load0:.1f}; median of {args.repeats} interleaved runs")
    lines = [head, "", "| ours | captum | ours (s) | captum (s) | speed-up | max rel. diff | Pearson r |",
             "|---|---|---|---|---|---|---|"]
    for name, ref, t_o, t_c, rel, r in rows:
        rel_s = "-" if rel != rel else f"{rel:.1e}"
        r_s = "-" if r != r else f"{r:.6f}"
        lines.append(f"| {name} | {ref} | {t_o:.2f} | {t_c:.2f} | {t_c / t_o:.1f}x | {rel_s} | {r_s} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
