#!/usr/bin/env bash
# The GPU path, once, in under 8 minutes on one GPU: Amazon Beauty with the beauty_sasrec experiment on
# scaling=gpu1 (one Ray Train worker, NCCL backend, bf16 autocast), a 5-minute training budget, then the CTR family
# (frappe_deepfm) for 2 epochs on the same GPU. Writes benchmarks/results/gpu_check.json: samples/s per epoch and the
# metrics, beside the CPU figures committed in benchmarks/results/ (rec_quality.json, ctr.json).
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU; installs a CUDA build of torch in .venv
set -euo pipefail
cd "$(dirname "$0")/.."
export ECOMRAY_DATASETS=${ECOMRAY_DATASETS:-../shared/datasets}
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  ECOMRAY_TORCH=${ECOMRAY_TORCH:-"torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"} bash scripts/setup.sh
fi
.venv/bin/python - <<'PY'
import json, os, platform, subprocess, sys, time
import torch

root = "benchmarks/work/gpu"
out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "platform": platform.platform(), "runs": {}}
for name, args in {
    "beauty_sasrec": ["experiment=beauty_sasrec", "scaling=gpu1", "train.bf16=true", "train.time_budget_s=300",
                      "scaling.resources_per_worker={CPU: 4, GPU: 1}"],
    "frappe_deepfm": ["experiment=frappe_deepfm", "scaling=gpu1", "train.bf16=true", "train.epochs=2"],
}.items():
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "jobs.prepare", *args[:1], f"paths.root={root}", "overwrite=true"],
                   check=True, capture_output=True)
    res = subprocess.run([sys.executable, "-m", "jobs.train", *args, f"paths.root={root}"], capture_output=True,
                         text=True)
    lines = [l for l in (res.stdout + res.stderr).splitlines() if "[train]" in l]
    out["runs"][name] = {"returncode": res.returncode, "wall_s": round(time.time() - t0, 1),
                         "epoch_lines": sorted(set(l.split("[train]", 1)[1].strip() for l in lines if "epoch" in l)),
                         "best": [l.split("[train]", 1)[1].strip() for l in lines if "best model" in l],
                         "tail": (res.stdout + res.stderr)[-1500:] if res.returncode else ""}
    print(name, out["runs"][name]["returncode"], out["runs"][name]["best"], flush=True)
os.makedirs("benchmarks/results", exist_ok=True)
with open("benchmarks/results/gpu_check.json", "w") as fh:
    json.dump(out, fh, indent=2)
print("wrote benchmarks/results/gpu_check.json")
PY
