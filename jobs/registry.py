"""python -m jobs.registry {list | promote <model> <version> --alias prod | rollback <model> [--alias prod] | history
| migrate}

The model registry from the command line. This job takes argparse flags rather than Hydra overrides (it runs no
training config, only reads and moves aliases), but it finds the registry where the Hydra jobs do: `--registry`,
else `paths.registry` of conf/paths/default.yaml (`$ECOMRAY_HOME/registry`, else `./runs/registry`).

- `list [model]`: every model, its versions with their key metrics, training data and sweep, and its aliases.
- `promote <model> <version|alias> --alias prod`: point an alias at a version; warns loudly when the version was
  trained on research-only data (by its licence note in lineage.json).
- `rollback <model> [--alias prod]`: move the alias back to the version it pointed to before (the registry keeps
  every alias move in aliases_history.jsonl).
- `history <model>`: the alias moves.
- `migrate [model]`: upgrade versions written in an older registry format in place (see ecomray/registry.py).
- `gc [model] [--keep 5] [--keep-rollback 3] [--dry-run] [--runs DIR]`: delete versions no alias points at or rolls
  back to within its last N moves, no replica serves and that are not among the newest N; with `--runs`, also the
  sweep folders a re-run moved aside (`<sweep>.old-*`).
Deploy serves `prod` when set, else `best`, else the newest version (`ecomray.registry.resolve`).
"""
from __future__ import annotations

import argparse
import re
import os
import sys
from typing import Any

from ecomray import registry
from ecomray.runtime import UserError, abspath, user_errors


def default_root() -> str:
    """`paths.registry` as the jobs compose it (conf/paths/default.yaml)."""
    from ecomray.config import compose

    return compose("train")["paths"]["registry"]


def _key_metrics(metrics: dict[str, Any], keys: list[str]) -> str:
    """The task's first two key metrics (version.json), on val and test."""
    shown = [f"{s}/{k}" for k in keys[:2] for s in ("val", "test") if f"{s}/{k}" in metrics]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in shown if isinstance(metrics[k], (int, float)))


def _require(root: str, name: str) -> list[str]:
    """The versions of model `name`; a model with none (a typo, another registry) is an error naming the models
    there, not an empty result (`gc` and `migrate` of a missing model used to exit 0)."""
    have = registry.versions(root, name)
    if not have:
        raise UserError(f"no model {name!r} in registry {root} (models: {registry.models(root)})")
    return have


def list_models(root: str, only: str | None = None) -> list[dict[str, Any]]:
    """One row per version: {"model", "version", "aliases", "metrics", "dataset", "research_only", "sweep"}."""
    import json

    rows = []
    for name in [only] if only else registry.models(root):
        have = _require(root, name)
        by_version: dict[str, list[str]] = {}
        for alias, v in registry.aliases(root, name).items():
            by_version.setdefault(v, []).append(alias)
        for v in sorted(set(by_version) - set(have)):   # an alias left on a version deleted by hand: it was not shown
            rows.append({"model": name, "version": v, "aliases": sorted(by_version[v]),
                         "metrics": "(version missing, deleted by hand: promote another version before a new one takes its number)",
                         "dataset": None, "research_only": False, "created_at": None, "sweep": ""})
        for v in have:
            path = registry._safe(root, name, v)
            try:
                with open(os.path.join(path, "metrics.json")) as fh:
                    metrics = json.load(fh)
                with open(os.path.join(path, "lineage.json")) as fh:
                    lin = json.load(fh)
                info = registry.read_info(root, name, v)
            except (OSError, ValueError, UserError) as err:   # one damaged version: its row says so, the others still list
                what = os.path.basename(getattr(err, "filename", None) or "") or (
                    "version.json" if isinstance(err, UserError) else type(err).__name__)
                rows.append({"model": name, "version": v, "aliases": sorted(by_version.get(v, [])),
                             "metrics": f"(damaged: {what} unreadable; not a version ecomray wrote?)", "dataset": None,
                             "research_only": False, "created_at": None, "sweep": ""})
                continue
            sweep = lin.get("sweep") or {}
            fmt = info.get("format", 1)
            shown = (_key_metrics(metrics, info.get("key_metrics") or []) if fmt == registry.FORMAT
                     else f"(registry format {fmt}: a newer ecomray's)" if fmt > registry.FORMAT
                     else f"(registry format {fmt}: run `migrate`)")
            rows.append({"model": name, "version": v, "aliases": sorted(by_version.get(v, [])),
                         "metrics": shown, "dataset": lin.get("dataset"),
                         "research_only": bool(lin.get("research_only")), "created_at": lin.get("created_at"),
                         "sweep": f"{sweep['name']}/{sweep['trial_id']}" if sweep else ""})
    order = {m: k for k, m in enumerate(dict.fromkeys(r["model"] for r in rows))}
    return sorted(rows, key=lambda r: (order[r["model"]], int(r["version"][1:]) if re.fullmatch(r"v\d+", r["version"])
                                       else 10**12, r["version"]))


def promote(root: str, name: str, ref: str, alias: str = "prod") -> dict[str, Any]:
    version = registry.resolve(root, name, ref)
    lin = registry.load(root, name, version)["lineage"]
    warning = None
    if lin.get("research_only"):
        warning = (f"WARNING: {name} {version} was trained on research-only data ({lin.get('dataset')}: "
                   f"{lin.get('licence')}). Do not serve it to customers or use it commercially.")
        bar = "!" * min(len(warning), 100)
        print(f"{bar}\n{warning}\n{bar}", file=sys.stderr, flush=True)
    before = registry.set_alias(root, name, alias, version)   # (read under the alias lock: a concurrent move shows)
    print(f"{name}: {alias} -> {version}" + (f" (was {before})" if before else ""), flush=True)
    return {"name": name, "alias": alias, "version": version, "previous": before, "warning": warning}


def rollback(root: str, name: str, alias: str = "prod") -> dict[str, Any]:
    was, now = registry.rollback(root, name, alias)
    print(f"{name}: {alias} rolled back {was} -> {now}", flush=True)
    return {"name": name, "alias": alias, "version": now, "previous": was}


def migrate(root: str, only: str | None = None) -> list[str]:
    """Upgrade format-1 versions in place: `version.json` (task, key metrics) and, where the task asks for it
    (`upgrade_meta(meta, config)`), the meta.json keys format 2 requires (`model_kwargs`, self-contained maps)."""
    import json

    import yaml

    from ecomray.tasks import key_metrics, load_task

    done = []
    if only:
        _require(root, only)
    failed = []
    for name in [only] if only else registry.models(root):
        for v in registry.versions(root, name):
            try:
                fmt = registry.read_info(root, name, v).get("format", 1)
                if fmt > registry.FORMAT:    # a newer ecomray's version: rewriting it would downgrade it
                    print(f"{name} {v}: registry format {fmt} is newer than this ecomray's ({registry.FORMAT}): "
                          f"left as it is", flush=True)
                    continue
                if fmt == registry.FORMAT:
                    continue
                path = registry._safe(root, name, v)
                with open(os.path.join(path, "config.yaml")) as fh:
                    config = yaml.safe_load(fh)
                with open(os.path.join(path, "meta.json")) as fh:
                    meta = json.load(fh)
                task = load_task(config)
                if hasattr(task, "upgrade_meta"):
                    meta = task.upgrade_meta(meta, config)
                if "model_kwargs" not in meta:
                    raise UserError(f"task {config['task']['name']} gives no model_kwargs")
                registry.rewrite_meta(root, name, v, meta, registry.version_info(config, key_metrics(task)))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError, UserError) as err:
                why = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {str(err)[:160]}"
                print(f"{name} {v}: cannot migrate ({why})", flush=True)      # the others still migrate
                failed.append(f"{name}:{v}")
                continue
            print(f"{name} {v}: migrated to registry format {registry.FORMAT}", flush=True)
            done.append(f"{name}:{v}")
    if failed:
        raise UserError(f"{len(failed)} version(s) could not be migrated ({', '.join(failed)}); "
                        f"{len(done)} migrated")
    if not done:
        print(f"nothing to migrate in {root}", flush=True)
    return done


def collect(root: str, only: str | None, keep: int, dry_run: bool, runs: str | None,
            keep_rollback: int = 3) -> dict[str, Any]:
    """`gc`: the registry's retention, and optionally old sweep folders."""
    import shutil

    out: dict[str, Any] = {}
    if only and not os.path.isdir(registry._safe(root, only)):   # (a folder of half-written versions is collected)
        _require(root, only)
    for name in [only] if only else registry.models(root, with_leftovers=True):
        res = registry.gc(root, name, keep, dry_run, keep_rollback)
        out[name] = res
        verb = "would delete" if dry_run else "deleted"
        tmp = f"; {verb} {len(res['tmp'])} half-written .tmp-* folder(s)" if res["tmp"] else ""
        print(f"{name}: {verb} {len(res['deleted'])} version(s) {res['deleted'] or ''}; kept {res['kept']} "
              f"(aliased, among each alias's last {keep_rollback} rollback steps, served, or among the newest "
              f"{max(keep, 1)}){tmp}", flush=True)
    if runs:
        # a sweep folder a re-run set aside: `<sweep>.old-<pid>`, a folder (not a file that happens to match)
        old = sorted(os.path.join(runs, d) for d in os.listdir(runs)
                     if re.fullmatch(r".+\.old-[0-9-]+", d) and os.path.isdir(os.path.join(runs, d)))
        for d in old:
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
        left = [d for d in old if os.path.exists(d)] if not dry_run else []
        print(f"{runs}: {'would delete' if dry_run else 'deleted'} {len(old) - len(left)} old sweep folder(s)"
              + (f"; could not delete {left}" if left else ""), flush=True)
        out["_old_sweeps"] = [d for d in old if d not in left]
    return out


def main(argv: list[str] | None = None) -> dict | list | None:
    p = argparse.ArgumentParser(prog="python -m jobs.registry", description=__doc__.split("\n")[0])
    where = argparse.ArgumentParser(add_help=False)   # --registry before or after the command, as users type it
    where.add_argument("--registry", default=argparse.SUPPRESS,
                       help="registry root (default: paths.registry, i.e. $ECOMRAY_HOME/registry or ./runs/registry)")
    p.add_argument("--registry", default=None, help="registry root (also accepted after the command)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[where], **kwargs)

    ls = command("list", help="models, versions, key metrics, aliases")
    ls.add_argument("model", nargs="?")
    pr = command("promote", help="point an alias (default prod) at a version")
    pr.add_argument("model")
    pr.add_argument("version", help="v0003, or an alias such as best")
    pr.add_argument("--alias", default="prod")
    rb = command("rollback", help="move an alias (default prod) back to its previous version")
    rb.add_argument("model")
    rb.add_argument("--alias", default="prod")
    hi = command("history", help="every alias move of a model")
    hi.add_argument("model")
    mi = command("migrate", help="upgrade versions of an older registry format in place")
    mi.add_argument("model", nargs="?")
    gc = command("gc", help="delete old versions: keeps aliased, served and the newest --keep")
    gc.add_argument("model", nargs="?")
    gc.add_argument("--keep", type=int, default=5, help="newest versions kept per model (default 5)")
    gc.add_argument("--keep-rollback", type=int, default=3,
                    help="versions kept per alias for rollback: where it pointed before, up to this many (default 3)")
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--runs", default=None, help="also delete the <sweep>.old-* folders in this runs folder")
    args = p.parse_args(argv)
    root = abspath(args.registry) if args.registry else default_root()
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"registry {root} is a file, not a registry folder (--registry, or paths.registry)")
    if getattr(args, "runs", None) and not os.path.isdir(args.runs):    # a typo looked like "deleted 0"
        raise UserError(f"gc --runs {args.runs} is a file, not a runs folder" if os.path.exists(args.runs)
                        else f"gc --runs {args.runs}: no such folder")
    if args.cmd in ("gc", "migrate") and not args.model and not os.path.exists(root):   # a typo'd --registry: silent
        raise UserError(f"no registry at {root} (--registry, or paths.registry / ECOMRAY_HOME)")
    if args.cmd == "list":
        rows = list_models(root, args.model)
        if not rows:
            print(f"(no models in {root})")
        header = ["model", "version", "aliases", "key metrics", "data", "sweep/trial"]
        table = [[r["model"], r["version"], ",".join(r["aliases"]), r["metrics"],
                  f"{r['dataset']}{' (research only)' if r['research_only'] else ''}", r["sweep"]] for r in rows]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
        for row in [header, *table]:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        return rows
    if args.cmd == "promote":
        return promote(root, args.model, args.version, args.alias)
    if args.cmd == "rollback":
        return rollback(root, args.model, args.alias)
    if args.cmd == "migrate":
        return migrate(root, args.model)
    if args.cmd == "gc":
        if args.keep < 0 or args.keep_rollback < 0:
            raise UserError(f"gc: --keep and --keep-rollback must be >= 0 (got {args.keep}, {args.keep_rollback})")
        return collect(root, args.model, args.keep, args.dry_run, args.runs, args.keep_rollback)
    _require(root, args.model)
    moves = registry.alias_history(root, args.model)
    for h in moves:
        print(f"{h['ts']}  {h['action']:8s}  {h['alias']:8s}  {h.get('previous') or '-':>6} -> {h['version']}")
    return moves


if __name__ == "__main__":
    user_errors(main)()
