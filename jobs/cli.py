"""`ecomray <job> [hydra overrides]`: the same as `python -m jobs.<job> [hydra overrides]`."""

from __future__ import annotations

import runpy
import sys

JOBS = ("prepare", "train", "tune", "evaluate", "registry", "deploy", "batch_predict", "opinion", "pipeline")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(f"usage: ecomray <job> [hydra overrides]\n  jobs: {', '.join(JOBS)}")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    job = sys.argv[1]
    if job not in JOBS:
        print(f"ecomray: error: unknown job {job!r}; choose one of {', '.join(JOBS)}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"jobs.{job}", *sys.argv[2:]]
    runpy.run_module(f"jobs.{job}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
