"""Decoder-only or encoder-decoder for ad copy? Both trained from scratch on AdvertiseGen under one wall-clock budget,
then compared on validation (the choice the copy issue asks to make there).

    flock /tmp/ecomray-heavy.lock .venv/bin/python benchmarks/copy_arch.py [--budget-s 900] [--epochs 30]
        [--root benchmarks/work/copy] [--eval-generate N] [--out PATH] [--note TEXT] [hydra overrides for both runs]

- Training: `python -m jobs.train experiment=copy_advertisegen model=<copy_lm | copy_seq2seq> model.init_from=null`,
  one run after the other, each a subprocess with the same settings (the experiment's: KOBE rows as extra training
  text, batch 32, lr 5e-4, epoch chosen on val BLEU-4 of `task.eval_generate` greedy val copies, patience 4) except
  `train.time_budget_s=--budget-s` and `train.epochs=--epochs`. No pretraining for either (the experiment's
  `model.init_from: copy_lm_pretrain` is decoder-only), so the tokenizer is fitted on the training rows, the same
  for both. Each registers under its own name (`registry_name=copy_arch_<model>`), never over copy_gen_advertisegen.
- Measured, from each run's registry version: parameters, epochs run, train seconds (the driver's `fit`, evaluation
  between epochs included), val loss / BLEU-4 / ROUGE-L / coverage (and test), and greedy decoding speed: copies/s
  at batch 32 over the first 320 val rows with the version's decoding defaults (2 torch threads, as in
  benchmarks/copy_gen.py).
- Data: the prepared `advertisegen` and `kobe` shard sets under `<root>/data` (benchmarks/copy_gen.py's root); when
  missing: `python -m jobs.prepare dataset=advertisegen paths.root=<root>` and the same with `dataset=kobe` (raw
  files under `paths.datasets`, default ../shared/datasets or $ECOMRAY_DATASETS).
Writes benchmarks/results/copy_arch.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecomray import registry  # noqa: E402

MODELS = {"copy_lm": "decoder-only", "copy_seq2seq": "encoder-decoder"}
SPEED_ROWS, SPEED_BATCH = 320, 32


def train(model: str, args: argparse.Namespace, registry_root: str) -> tuple[str, str, float]:
    """Train one architecture in a subprocess; returns its registry name, the version it registered, wall seconds."""
    name = f"copy_arch_{model}"
    before = set(registry.versions(registry_root, name))
    cmd = [sys.executable, "-m", "jobs.train", "experiment=copy_advertisegen", f"model={model}",
           "model.init_from=null", f"registry_name={name}", f"paths.root={args.root}",
           f"train.time_budget_s={args.budget_s}", f"train.epochs={args.epochs}"]
    if args.eval_generate is not None:
        cmd.append(f"task.eval_generate={args.eval_generate}")
    cmd += args.overrides
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    new = sorted(set(registry.versions(registry_root, name)) - before)
    if not new:
        raise SystemExit(f"{name}: the run registered no version in {registry_root}")
    return name, new[-1], time.time() - t0


def measure(name: str, version: str, registry_root: str) -> dict[str, Any]:
    import polars as pl
    import torch

    from ecomray.data import shards
    from ecomray.inference import load_model

    torch.set_num_threads(2)
    loaded = load_model(registry_root, name, version)
    cols = ["attributes", "title", "aspect", "audience"]
    val = shards.read_frame(loaded.config, loaded.config["dataset"]["name"]).filter(pl.col("split") == "val")
    rows = val.select(cols).head(SPEED_ROWS).to_dicts()
    loaded.task.predict(loaded.model, loaded.meta, rows[:SPEED_BATCH])                       # warm-up
    t0 = time.perf_counter()
    for lo in range(0, len(rows), SPEED_BATCH):
        loaded.task.predict(loaded.model, loaded.meta, rows[lo:lo + SPEED_BATCH])
    seconds = time.perf_counter() - t0
    m = loaded.metrics
    return {"model": loaded.config["model"]["_target_"].rsplit(".", 1)[1], "version": f"{name}:{version}",
            "model_config": {k: v for k, v in loaded.config["model"].items() if k not in ("_target_", "init_from")},
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "parameters_without_embeddings": sum(p.numel() for n, p in loaded.model.named_parameters()
                                                 if not n.endswith(("tok.weight", "pos.weight"))),
            "vocab_size": loaded.meta["model_kwargs"]["vocab_size"], "epochs_run": m.get("epochs_run"),
            "best_epoch": m.get("best_epoch"), "train_seconds": m.get("train_seconds"),
            **{k: v for k, v in m.items() if k.startswith(("val/", "test/"))},
            "speed_rows": len(rows), "copies_per_s_batch32_greedy": len(rows) / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=900, help="train.time_budget_s of each run (the same for both)")
    ap.add_argument("--epochs", type=int, default=30, help="train.epochs: the cap on epochs within the budget")
    ap.add_argument("--root", default=str(ROOT / "benchmarks" / "work" / "copy"),
                    help="paths.root: prepared data in <root>/data, versions in <root>/registry")
    ap.add_argument("--eval-generate", type=int, default=None,
                    help="task.eval_generate (val/test rows decoded per evaluation); default: the experiment's")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "copy_arch.json"))
    ap.add_argument("--note", default="nothing else running (flock /tmp/ecomray-heavy.lock)",
                    help="what else ran on the machine meanwhile (concurrent_load in the JSON)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both runs, e.g. train.batch_size=64")
    args = ap.parse_args()
    args.root = os.path.abspath(args.root)
    t0 = time.time()
    missing = [d for d in ("advertisegen", "kobe") if not (Path(args.root) / "data" / d / "manifest.json").exists()]
    if missing:
        raise SystemExit("not prepared under " + args.root + "/data: " + ", ".join(missing) + "; run " + " && ".join(
            f"python -m jobs.prepare dataset={d} paths.root={args.root}" for d in missing))
    registry_root = str(Path(args.root) / "registry")
    runs = []
    for model in args.models:
        name, version, wall = train(model, args, registry_root)
        runs.append({"architecture": MODELS[model], **measure(name, version, registry_root), "run_wall_s": wall})
    print(f"\n{'architecture':<17}{'params':>11}{'epochs':>8}{'train s':>9}{'val loss':>10}{'BLEU-4':>8}"
          f"{'ROUGE-L':>9}{'cover':>8}{'copies/s':>10}")
    nan = float("nan")                          # (task.eval_generate=0 runs have no bleu4 / rouge_l / coverage)
    for r in runs:
        print(f"{r['architecture']:<17}{r['parameters']:>11,}{r['epochs_run']:>8}{r['train_seconds']:>9.0f}"
              f"{r['val/loss']:>10.4f}{r.get('val/bleu4', nan):>8.2f}{r.get('val/rouge_l', nan):>9.2f}"
              f"{r.get('val/coverage', nan):>8.1%}{r['copies_per_s_batch32_greedy']:>10.1f}")
    import torch

    out = {"benchmark": "copy_arch_advertisegen", "question": "decoder-only vs encoder-decoder, from scratch, "
           "same wall-clock budget, chosen on val BLEU-4", "budget_s": args.budget_s, "epochs_cap": args.epochs,
           "eval_generate": args.eval_generate, "overrides": args.overrides, "root": args.root, "runs": runs,
           "speed": {"rows": f"first {SPEED_ROWS} val rows", "batch": SPEED_BATCH, "torch_threads": 2,
                     "decoding": "the version's defaults (greedy)"},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": torch.cuda.is_available(),
                       "torch": torch.__version__},
           "concurrent_load": args.note, "wall_s": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
