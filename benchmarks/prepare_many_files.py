"""Benchmark: `ecomray prepare` on a folder of many small CSV files (an hourly log dump), side by side with the same
rows one by one and in one file, and with plain Polars reading the folder.

    python benchmarks/prepare_many_files.py                            # 200,000 rows in 2,000 files of 100 rows
    python benchmarks/prepare_many_files.py --rows 2000000 --files 2000
    python benchmarks/prepare_many_files.py --format parquet   # typed Parquet part files (as Spark writes them)
    python benchmarks/prepare_many_files.py --format jsonl

The rows are the first `--rows` of the `benchmarks/prepare.py` generator's CSV (the same synthetic shop and noise:
duplicates and unknown events), cut into `--files` consecutive files with the header repeated; with `--format
parquet` or `jsonl` each file is then rewritten in that format, with typed `price`, `quantity` and `ts`. Sides, interleaved
`--repeat` times in one process (medians quoted):

- `baseline`: `pl.scan_csv(files).sink_parquet(out)` (`scan_parquet`, `scan_ndjson`), no validation or anything else;
- `grouped`: `ecomray prepare` as it runs by default: small files validated together (`prepare.group_bytes`);
- `one_by_one`: `prepare.group_bytes=1`, every file staged alone (how prepare ran before groups);
- `one_file`: the same rows as one file.

`grouped` and `one_by_one` must write the same shards and quarantine: the manifest hashes are compared. Writes
benchmarks/results/prepare_many_files.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import prepare as single  # noqa: E402  (benchmarks/prepare.py: the generator, the config, the machine facts)


def split_csv(csv: str, rows: int, files: int, folder: str) -> list[str]:
    """The first `rows` rows of `csv` as `files` consecutive CSV files, each with the header."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    per = -(-rows // files)
    paths = []
    with open(csv) as fh:
        header = fh.readline()
        for f in range(files):
            path = os.path.join(folder, f"hour-{f:05d}.csv")
            with open(path, "w") as out:
                out.write(header)
                for _ in range(per):
                    line = fh.readline()
                    if not line:
                        break
                    out.write(line)
            paths.append(path)
    return paths


TYPED = {"price": "Float64", "quantity": "Int64"}


def convert(paths: list[str], fmt: str) -> list[str]:
    """Each CSV file rewritten as `fmt` (parquet, jsonl) beside it, typed as an export would be: numbers as numbers,
    `ts` as a timestamp (Parquet) or its ISO text (JSONL)."""
    import polars as pl

    out = []
    for p in paths:
        df = pl.read_csv(p, infer_schema=False).with_columns(
            *(pl.col(c).cast(getattr(pl, t), strict=False) for c, t in TYPED.items()))
        new = p[: -len(".csv")] + "." + fmt
        if fmt == "parquet":
            df.with_columns(pl.col("ts").str.to_datetime(strict=False)).write_parquet(new)
        else:
            df.write_ndjson(new)
        os.remove(p)
        out.append(new)
    return out


def one_file(paths: list[str], path: str) -> str:
    if not paths[0].endswith(".csv"):
        import polars as pl

        scan = pl.scan_parquet if paths[0].endswith(".parquet") else pl.scan_ndjson
        frames = [scan(p).collect() for p in paths]
        df = pl.concat(frames, how="diagonal_relaxed")
        df.write_parquet(path) if path.endswith(".parquet") else df.write_ndjson(path)
        return path
    with open(path, "w") as out:
        for k, p in enumerate(paths):
            with open(p) as fh:
                if k:
                    fh.readline()
                shutil.copyfileobj(fh, out)
    return path


def run_prepare(source: str, out: str, group_bytes: int | None) -> dict:
    from ecomray.data import prepare as P

    cfg = single.prepare_config(source, out, 8, "polars")
    cfg["dataset"]["format"] = "auto"          # by extension: the benchmark's --format
    if group_bytes is not None:
        cfg["prepare"]["group_bytes"] = group_bytes
    t0 = time.perf_counter()
    m = P.run(cfg)
    return {"seconds": time.perf_counter() - t0, "rows_in": m["rows_in"], "rows_out": m["rows_out"],
            "rows_quarantined": m["rows_quarantined"], "hash": m["hash"]}


def run_baseline(paths: list[str], out: str) -> dict:
    import polars as pl

    scan = {"csv": pl.scan_csv, "parquet": pl.scan_parquet, "jsonl": pl.scan_ndjson}[paths[0].rsplit(".", 1)[1]]
    t0 = time.perf_counter()
    scan(paths).sink_parquet(out)
    return {"seconds": time.perf_counter() - t0, "rows_in": pl.scan_parquet(out).select(pl.len()).collect().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--format", choices=["csv", "parquet", "jsonl"], default="csv")
    ap.add_argument("--work", default=os.path.join(HERE, "work"))
    args = ap.parse_args()
    if args.rows < args.files or args.files < 1:
        raise SystemExit("--rows must be >= --files >= 1")

    meta = single.ensure_csv(args.rows, args.work)
    scratch = os.path.join(args.work, "many-files")
    paths = split_csv(meta["path"], args.rows, args.files, os.path.join(scratch, "in"))
    if args.format != "csv":
        paths = convert(paths, args.format)
    whole = one_file(paths, os.path.join(scratch, f"one.{args.format}"))
    folder = os.path.dirname(paths[0])
    # one dataset name on every side (it is part of the manifest hash), each under its own paths.data
    sides = {"baseline": lambda: run_baseline(paths, os.path.join(scratch, "baseline.parquet")),
             "grouped": lambda: run_prepare(folder, os.path.join(scratch, "grouped", "hours"), None),
             "one_by_one": lambda: run_prepare(folder, os.path.join(scratch, "one_by_one", "hours"), 1),
             "one_file": lambda: run_prepare(whole, os.path.join(scratch, "one_file", "hours"), None)}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.repeat):
        for name, fn in sides.items():
            runs[name].append(fn())
            print(f"round {r + 1}/{args.repeat} {name:11s} {runs[name][-1]['seconds']:7.2f} s", flush=True)
    if runs["grouped"][-1]["hash"] != runs["one_by_one"][-1]["hash"]:
        raise SystemExit("grouped and one-by-one prepares wrote different datasets (manifest hashes differ)")

    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    out = {"benchmark": "prepare_many_files", "machine": single.machine(),
           "input": {"rows": args.rows, "files": len(paths), "format": args.format, "rows_per_file": -(-args.rows // len(paths)),
                     "bytes": sum(os.path.getsize(p) for p in paths), "generator": meta.get("key")},
           "repeat": args.repeat, "in_one_process": True,
           "other_load": "none: run alone on the machine (heavy runs take /tmp/ecomray-heavy.lock)",
           "sides": {k: {"seconds": round(med[k], 3), "runs_seconds": [round(r["seconds"], 3) for r in v],
                         **{f: v[-1][f] for f in ("rows_in", "rows_out", "rows_quarantined", "hash") if f in v[-1]}}
                     for k, v in runs.items()},
           "speedup_grouped_vs_one_by_one": round(med["one_by_one"] / med["grouped"], 2),
           "grouped_vs_one_file": round(med["grouped"] / med["one_file"], 2),
           "same_dataset": True, "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])}
    print(f"\n{args.rows:,} rows in {len(paths):,} {args.format} files ({out['input']['bytes'] / 1e6:.1f} MB)")
    print(f"| side | median s | runs |\n|---|---:|---|")
    for k in sides:
        print(f"| {k} | {med[k]:.2f} | {', '.join(f'{r:.2f}' for r in out['sides'][k]['runs_seconds'])} |")
    print(f"grouped is {out['speedup_grouped_vs_one_by_one']}x faster than one by one; "
          f"{out['grouped_vs_one_file']}x the one-file time; same dataset (hash) both ways")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    name = "prepare_many_files" + ("" if args.format == "csv" else f"-{args.format}") + \
        ("" if (args.rows, args.files) == (200_000, 2000) else f"-{args.rows}-{args.files}") + ".json"
    with open(os.path.join(HERE, "results", name), "w") as fh:
        json.dump(out, fh, indent=2)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
