"""Train the same tiny Transformer once per attention variant on a long-range task; compare
accuracy, time per step and peak memory (the "downstream" view of approximation error).

Task — associative recall, generated on the fly: a sequence of ``seq_len − 1`` (key, value)
pairs with distinct keys, one pair per position (token = key embedding + value embedding),
then a query position holding one of the keys and a query marker. The model must output the
value stored with that key. The matching pair sits anywhere in the sequence, uniformly, so a
variant that cannot reach far (a window of ``w`` tokens) answers at chance for all but a
``w / seq_len`` fraction of queries, while exact attention can solve it with one layer.

    PYTHONPATH=. python3 benchmarks/train_compare.py --config benchmarks/train_compare.yaml

Each variant trains in a fresh subprocess (spawned), so its peak memory is its own: on CPU the
peak resident set size during training minus the RSS before it (``ru_maxrss``, KiB precision),
on CUDA ``torch.cuda.max_memory_allocated``. Variants not registered in this checkout (for
example ones still on other branches) are skipped with a note. Results: a Markdown table on
stdout and ``results.json`` / ``results.md`` / ``train_compare.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparse_linear_attn as sla

DEFAULTS: dict[str, Any] = {
    "task": {"seq_len": 128, "num_pairs": 8, "num_keys": 32, "num_values": 16},
    "model": {"layers": 2, "d_model": 64, "heads": 4, "ffn": 128, "positional": None, "causal": False},
    "train": {
        "steps": 300,
        "batch_size": 32,
        "lr": 3e-3,
        "eval_samples": 1024,
        "seed": 0,
        "threads": 1,
        "device": "cpu",
    },
    "variants": [{"variant": "full"}],
}


# ---------------------------------------------------------------------------------------------
# Task


def associative_recall(
    batch: int, seq_len: int, num_pairs: int, num_keys: int, num_values: int, generator: torch.Generator
):
    """``keys, values (B, seq_len)`` int64 and ``target (B,)``.

    ``num_pairs`` (key, value) pairs with distinct keys sit at random positions among
    ``seq_len − 1`` filler positions (key ``num_keys``, value ``num_values + 1``); the last
    position is the query: one of the stored keys with the marker value ``num_values``.
    """
    slots = seq_len - 1
    if not (1 <= num_pairs <= min(slots, num_keys)):
        raise ValueError(f"num_pairs must be in [1, min(seq_len - 1, num_keys)], got {num_pairs}")
    rows = torch.arange(batch)
    keys = torch.full((batch, slots), num_keys)
    values = torch.full((batch, slots), num_values + 1)
    where = torch.rand(batch, slots, generator=generator).argsort(dim=1)[:, :num_pairs]
    pair_keys = torch.rand(batch, num_keys, generator=generator).argsort(dim=1)[:, :num_pairs]
    pair_values = torch.randint(0, num_values, (batch, num_pairs), generator=generator)
    keys.scatter_(1, where, pair_keys)
    values.scatter_(1, where, pair_values)
    pick = torch.randint(0, num_pairs, (batch,), generator=generator)
    target = pair_values[rows, pick]
    keys = torch.cat([keys, pair_keys[rows, pick][:, None]], dim=1)
    values = torch.cat([values, torch.full((batch, 1), num_values)], dim=1)
    return keys, values, target


# ---------------------------------------------------------------------------------------------
# Model


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int, attention: dict, positional: str | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = sla.MultiheadAttention(d_model, heads, batch_first=True, attention=attention, positional=positional)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False, is_causal=causal)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, task: dict, model: dict, attention: dict):
        super().__init__()
        d = model["d_model"]
        self.key_emb = nn.Embedding(task["num_keys"] + 1, d)  # + filler
        self.val_emb = nn.Embedding(task["num_values"] + 2, d)  # + query marker, filler
        self.blocks = nn.ModuleList(
            Block(d, model["heads"], model["ffn"], attention, model.get("positional")) for _ in range(model["layers"])
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, task["num_values"])
        self.causal = bool(model.get("causal", False))

    def forward(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        x = self.key_emb(keys) + self.val_emb(values)
        for block in self.blocks:
            x = block(x, self.causal)
        return self.head(self.norm(x[:, -1]))


# ---------------------------------------------------------------------------------------------
# One run


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def train_one(attention: dict, cfg: dict) -> dict:
    """Train from scratch with one attention config; returns the measurements."""
    task, model_cfg, tr = cfg["task"], cfg["model"], cfg["train"]
    torch.set_num_threads(int(tr["threads"]))
    device = torch.device(tr["device"])
    torch.manual_seed(tr["seed"])
    model = TinyTransformer(task, model_cfg, attention).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tr["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tr["lr"], total_steps=tr["steps"], pct_start=0.1)
    gen = torch.Generator().manual_seed(tr["seed"] + 1)
    loss_fn = nn.CrossEntropyLoss()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_kib()
    step_times, losses = [], []
    for _ in range(tr["steps"]):
        k, v, y = (t.to(device) for t in associative_recall(tr["batch_size"], **task, generator=gen))
        t0 = time.perf_counter()
        loss = loss_fn(model(k, v), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if cuda:
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    model.eval()
    egen = torch.Generator().manual_seed(10_000 + tr["seed"])
    correct, total = 0, 0
    with torch.no_grad():
        while total < tr["eval_samples"]:
            k, v, y = (
                t.to(device) for t in associative_recall(min(256, tr["eval_samples"] - total), **task, generator=egen)
            )
            correct += int((model(k, v).argmax(-1) == y).sum())
            total += len(y)
    warm = step_times[min(5, len(step_times) - 1) :]
    return {
        "accuracy": correct / total,
        "final_loss": statistics.fmean(losses[-20:]),
        "ms_per_step": 1e3 * statistics.median(warm),
        "peak_mib": max(0.0, peak_mib),
        "params": sum(p.numel() for p in model.parameters()),
    }


def _worker(attention: dict, cfg: dict, queue) -> None:
    try:
        queue.put(("ok", train_one(attention, cfg)))
    except Exception as e:  # reported in the table, the other variants still run
        queue.put(("failed", f"{type(e).__name__}: {e}"))


def run_variant(attention: dict, cfg: dict, subprocess: bool) -> tuple[str, Any]:
    if not subprocess:
        try:
            return "ok", train_one(attention, cfg)
        except Exception as e:
            return "failed", f"{type(e).__name__}: {e}"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(attention, cfg, queue))
    proc.start()
    status, result = queue.get()
    proc.join()
    return status, result


# ---------------------------------------------------------------------------------------------
# Config, checks, report


def load_config(path: str | None) -> dict:
    cfg = json.loads(json.dumps(DEFAULTS))
    if path:
        import yaml

        with open(path, encoding="utf-8") as f:
            user = yaml.safe_load(f) or {}
        for section in ("task", "model", "train"):
            cfg[section].update(user.get(section, {}))
        if "variants" in user:
            cfg["variants"] = user["variants"]
    return cfg


def label(attention: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in attention.items() if k not in ("variant", "label"))
    return attention.get("label") or (attention["variant"] + (f" ({extra})" if extra else ""))


def check_variant(attention: dict, cfg: dict) -> str | None:
    """Why this variant cannot run here (None if it can): unknown name, bad params, or a
    combination the layer refuses — found before spending a subprocess on it."""
    name = attention.get("variant")
    if name not in sla.available_variants():
        known = ", ".join(sla.available_variants())
        return f"skipped: variant {name!r} is not registered in this checkout (known: {known})"
    try:
        m = cfg["model"]
        sla.MultiheadAttention(
            m["d_model"], m["heads"], batch_first=True, attention=attention, positional=m.get("positional")
        )
    except Exception as e:
        return f"skipped: {type(e).__name__}: {e}"
    return None


def table(rows: list[dict], cfg: dict) -> str:
    t = cfg["task"]
    chance = 1.0 / t["num_values"]
    head = (
        f"associative recall, seq_len={t['seq_len']}, {t['num_values']} values (chance {chance:.3f}); "
        f"{cfg['model']['layers']} layers, d_model={cfg['model']['d_model']}, heads={cfg['model']['heads']}, "
        f"{cfg['train']['steps']} steps × batch {cfg['train']['batch_size']} on {cfg['train']['device']}\n\n"
    )
    lines = ["| variant | accuracy | final loss | ms/step | peak MiB | note |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] == "ok":
            m = r["result"]
            lines.append(
                f"| {r['label']} | {m['accuracy']:.3f} | {m['final_loss']:.3f} | {m['ms_per_step']:.1f} | "
                f"{m['peak_mib']:.1f} | |"
            )
        else:
            lines.append(f"| {r['label']} | – | – | – | – | {r['result']} |")
    return head + "\n".join(lines)


def plot(rows: list[dict], cfg: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install matplotlib)"
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "nothing to plot"
    names = [r["label"] for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(
        axes,
        ("accuracy", "ms_per_step", "peak_mib"),
        ("accuracy (held-out)", "time per step (ms)", "peak memory (MiB)"),
    ):
        ax.bar(range(len(ok)), [r["result"][key] for r in ok], color="tab:blue")
        ax.set_xticks(range(len(ok)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].axhline(1.0 / cfg["task"]["num_values"], color="gray", ls="--", lw=1, label="chance")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"associative recall, seq_len={cfg['task']['seq_len']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).with_name("train_compare.yaml")))
    ap.add_argument("--steps", type=int, help="override train.steps")
    ap.add_argument("--seq-len", type=int, help="override task.seq_len")
    ap.add_argument("--device", help="override train.device (cpu, cuda)")
    ap.add_argument("--out", default="results/train_compare")
    ap.add_argument("--no-subprocess", action="store_true", help="run in this process (peak memory then accumulates)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if args.steps:
        cfg["train"]["steps"] = args.steps
    if args.seq_len:
        cfg["task"]["seq_len"] = args.seq_len
    if args.device:
        cfg["train"]["device"] = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for attention in cfg["variants"]:
        attention = dict(attention)
        name = label(attention)
        attention.pop("label", None)
        problem = check_variant(attention, cfg)
        if problem:
            rows.append({"label": name, "attention": attention, "status": "skipped", "result": problem})
            print(f"{name}: {problem}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        status, result = run_variant(attention, cfg, subprocess=not args.no_subprocess)
        rows.append({"label": name, "attention": attention, "status": status, "result": result})
        summary = f"acc {result['accuracy']:.3f}, {result['ms_per_step']:.1f} ms/step" if status == "ok" else result
        print(f"{name}: {summary}  [{time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    text = table(rows, cfg)
    print(text)
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps({"config": cfg, "rows": rows}, indent=2, default=str), encoding="utf-8"
    )
    note = plot(rows, cfg, out / "train_compare.png")
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}" + ("" if note else f", {out / 'train_compare.png'}"))
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
