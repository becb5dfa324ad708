"""Copy decoding speed, this tree against a git ref, side by side in one run.

    python benchmarks/copy_decode.py --model copy_gen_advertisegen:v0001 --base 1c1915e [--rows 352] [--rounds 3]

Both sides load the same registry version and decode the same AdvertiseGen dev rows greedily in batches of 32 (the
version's decoding defaults: repetition penalty, banned terms, every value stated, ungiven values masked), the first
batch a warm-up. `--base` is checked out into a temporary git worktree and run from there; the two sides alternate,
`--rounds` times each, in fresh processes with 2 torch threads. The outputs of both sides are compared: a speed-up
that changes the copy is reported as such. Writes benchmarks/results/copy_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside each side's tree (sys.argv: tree, registry, name, version, dev file, rows, output file).
CHILD = r"""
import json, sys, time
tree, reg, name, version, dev_file, n, out = sys.argv[1:]
sys.path.insert(0, tree)
import torch
torch.set_num_threads(2)
from ecomray.inference import load_model
loaded = load_model(reg, name, version)
with open(dev_file, encoding="utf-8") as fh:
    rows = [{"attributes": json.loads(line)["content"]} for line in fh if line.strip()][: int(n)]
loaded.task.predict(loaded.model, loaded.meta, rows[:32])                       # warm-up
texts, t0 = [], time.perf_counter()
for lo in range(32, len(rows), 32):
    texts += [r["variants"][0]["text"] if r["variants"] else "" for r in loaded.task.predict(loaded.model, loaded.meta, rows[lo:lo + 32])]
seconds = time.perf_counter() - t0
json.dump({"copies": len(texts), "seconds": seconds, "texts": texts}, open(out, "w"), ensure_ascii=False)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="copy_gen_advertisegen:best")
    ap.add_argument("--root", default=str(ROOT / "benchmarks" / "work" / "copy"))
    ap.add_argument("--base", required=True, help="git ref to compare against (e.g. the commit before a change)")
    ap.add_argument("--rows", type=int, default=352, help="dev rows decoded per run (the first 32 are the warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--note", default="nothing else running (flock /tmp/ecomray-heavy.lock)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "copy_decode.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from ecomray import registry

    name, version = registry.parse_ref(args.model)
    reg = str(Path(args.root) / "registry")
    version = registry.load(reg, name, version, state=False)["version"]
    dev = Path(os.environ.get("ECOMRAY_DATASETS", ROOT.parent / "shared" / "datasets")) / "advertisegen" / "dev.json"
    base_sha = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    results: dict[str, list[dict]] = {"base": [], "tree": []}
    with tempfile.TemporaryDirectory(prefix="ecomray-decode-") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), base_sha], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for k in range(args.rounds):
                for side, tree in (("base", base_tree), ("tree", ROOT)):
                    out = Path(tmp) / f"{side}-{k}.json"
                    subprocess.run([sys.executable, "-c", CHILD, str(tree), reg, name, version, str(dev),
                                    str(args.rows), str(out)], check=True, cwd=tmp)
                    r = json.loads(out.read_text())
                    r["copies_per_s"] = r["copies"] / r["seconds"]
                    results[side].append(r)
                    print(f"round {k + 1} {side:<5} {r['copies_per_s']:6.2f} copies/s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
    same = sum(a == b for a, b in zip(results["base"][0]["texts"], results["tree"][0]["texts"]))
    summary = {side: {"median_copies_per_s": statistics.median(r["copies_per_s"] for r in rs),
                      "runs_copies_per_s": [round(r["copies_per_s"], 2) for r in rs]} for side, rs in results.items()}
    speedup = summary["tree"]["median_copies_per_s"] / summary["base"]["median_copies_per_s"]
    n = results["tree"][0]["copies"]
    print(f"{'side':<28}{'median copies/s':>16}  runs")
    for side, label in (("base", f"base {base_sha}"), ("tree", f"this tree ({head}{', modified' if dirty else ''})")):
        print(f"{label:<28}{summary[side]['median_copies_per_s']:>16.2f}  {summary[side]['runs_copies_per_s']}")
    print(f"speed-up {speedup:.2f}x; identical copies {same} of {n}")
    doc = {"benchmark": "copy_decode_greedy_batch32", "model": f"{name}:{version}", "rows_timed": n,
           "base": base_sha, "tree": head, "tree_modified": dirty, **summary, "speedup": speedup,
           "identical_copies": same, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": False},
           "concurrent_load": args.note, "date": time.strftime("%Y-%m-%d")}
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
