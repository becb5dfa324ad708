"""Training throughput: ecomray (one Ray Train worker, the platform's loop) vs a plain PyTorch loop, same run.

    python benchmarks/train_throughput.py [--dataset amazon_beauty] [--epochs 3] [--threads 2]

Same model (the beauty_sasrec experiment's: a 3-member SASRec ensemble), same batches (the task's
`train_batches`), same loss, same optimizer, the same weight EMA when the experiment sets `train.ema_decay`, and
the same number of torch threads on both sides (the Ray worker gets `--threads` CPUs, and Ray sets its torch threads
from them; the plain loop calls torch.set_num_threads). Reports training samples/s (sequences/s,
evaluation excluded) of the epochs after the first. Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(cfg: dict, epochs: int, threads: int) -> list[float]:
    from ecomray.tasks import next_item as task
    from ecomray.train.loop import update_ema

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = task.build_data(cfg, 0, 1)
    model = task.build_model(cfg, data)
    opt = instantiate(cfg["optim"])(params=model.parameters())
    decay = float(cfg["train"].get("ema_decay") or 0.0)
    ema = copy.deepcopy(model).requires_grad_(False) if decay else None
    rates = []
    for epoch in range(epochs):
        model.train()
        t, seen = time.time(), 0
        for batch in list(task.train_batches(data, epoch, 0, int(cfg["train"]["batch_size"]))):
            loss = task.loss_step(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                update_ema(ema, model, decay)
            seen += len(batch["seq"])
        rates.append(seen / (time.time() - t))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="amazon_beauty")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("ECOMRAY_DATASETS", str(ROOT.parent / "shared" / "datasets"))
    from ecomray.data.prepare import run as prepare
    from ecomray.runtime import to_plain
    from ecomray.train.driver import fit

    root = ROOT / "benchmarks" / "work" / "throughput"
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = to_plain(compose("train", overrides=[
            "experiment=beauty_sasrec", f"dataset={args.dataset}", f"paths.root={root}", "overwrite=true",
            f"train.epochs={args.epochs}", "train.patience=100", f"scaling.resources_per_worker.CPU={args.threads}"]))
    prepare(cfg)
    plain = plain_loop(cfg, args.epochs, args.threads)
    out = fit(cfg, register=False)
    ours = [h["samples_per_s"] for h in out["history"]]
    p, o = statistics.mean(plain[1:] or plain), statistics.mean(ours[1:] or ours)
    print(f"\n{'side':12s}{'samples/s':>12s}  per epoch")
    print(f"{'plain torch':12s}{p:12,.0f}  {[round(x) for x in plain]}")
    print(f"{'ecomray':12s}{o:12,.0f}  {[round(x) for x in ours]}")
    print(f"ratio ecomray/plain: {o / p:.3f} (target >= 0.9); torch threads {args.threads} on both sides")
    res = {"dataset": args.dataset, "threads": args.threads, "epochs": args.epochs, "plain_samples_per_s": p,
           "ecomray_samples_per_s": o, "ratio": o / p, "plain_per_epoch": plain, "ecomray_per_epoch": ours,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    path = ROOT / "benchmarks" / "results" / "train_throughput.json"
    path.write_text(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
