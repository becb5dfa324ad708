"""Driver-side plumbing shared by every job: config resolution, paths, Ray start-up, user errors.

Hydra stops here: `to_plain(cfg)` resolves the config once into plain dicts with absolute paths,
and only those dicts travel to Ray workers, Tune trials and Serve replicas.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

__all__ = ["UserError", "is_uri", "abspath", "to_plain", "init_ray", "user_errors", "quiet_libraries",
           "quiet_termination"]

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """A problem with the user's input or config: printed as one line, exit code 2, no traceback."""


def is_uri(path: str) -> bool:
    """True for object-store style locations such as s3://bucket/x or gs://bucket/x."""
    return "://" in str(path)


def abspath(path: str | os.PathLike[str]) -> str:
    """Absolute local path, or the URI unchanged. Workers chdir, so nothing relative may reach them."""
    p = str(path)
    return p if is_uri(p) else str(Path(p).expanduser().resolve())


def to_plain(cfg: Any) -> dict[str, Any]:
    """Resolve a Hydra/OmegaConf config to a plain dict and make every `paths.*` entry absolute.

    The config groups Hydra chose (`dataset: synthetic`, ...) are kept as `choices`: a tune job's exported experiment
    names the same groups, and a registry version's config.yaml records them."""
    from omegaconf import OmegaConf

    if isinstance(cfg, dict):
        plain = dict(cfg)
    else:
        choices = _hydra_choices(cfg)
        if "hydra" in cfg:                       # compose(return_hydra_config=True): keep only the choices
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        plain = OmegaConf.to_container(cfg, resolve=True)
        if choices:
            plain["choices"] = choices
    paths = plain.get("paths") or {}
    for key, value in list(paths.items()):
        if isinstance(value, str) and value:
            paths[key] = abspath(value)
    plain["paths"] = paths
    quiet_libraries(bool(plain.get("verbose")))      # every job passes here first: its logging is set up here too
    return plain


def _hydra_choices(cfg: Any) -> dict[str, str]:
    """{group: option} of the config groups a Hydra config was composed from (not Hydra's own groups)."""
    choices: dict[str, Any] = {}
    try:
        if "hydra" in cfg:
            choices = dict(cfg.hydra.runtime.choices)
        else:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                choices = dict(HydraConfig.get().runtime.choices)
    except Exception:  # noqa: BLE001 - informative only
        return {}
    return {str(k): str(v) for k, v in choices.items() if v and not str(k).startswith("hydra")}


# Loggers of libraries that talk at INFO about their own workings (Hydra's job logging sets the root logger to INFO,
# so without this every one of them prints): Ray's driver-side logs, Tune's TensorBoard writer renaming each
# `val/ndcg@10` to `val/ndcg_10` (a line per metric per report), filelock, urllib3.
NOISY = ("ray", "tensorboardX", "filelock", "urllib3", "fsspec", "numexpr", "matplotlib", "PIL", "asyncio", "httpx",
         "httpcore")


def quiet_libraries(verbose: bool = False) -> None:
    """Libraries log at WARNING and above unless `verbose=true`; our own progress lines are prints."""
    import logging

    level = logging.INFO if verbose else logging.WARNING
    for name in NOISY:
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("RAY_LOGGER_LEVEL", "info" if verbose else "warning")   # workers a local Ray starts
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def quiet_termination() -> None:
    """In a Ray worker process (a Tune trial, a Train worker): stay silent when Ray ends the process.

    When a trial is stopped (ASHA, the time budget), Ray sends its actor SIGTERM, and Ray's handler raises
    SystemExit in whatever Python code is running. If that is a garbage-collector callback (a WeakSet's `_remove`),
    Python cannot propagate it and prints "Exception ignored in ... Traceback ... SystemExit: 1" through
    `sys.unraisablehook`, which the driver forwards to the user's console: a traceback from a trial that ended as
    planned. This hook drops exactly that case (a SystemExit that could not be raised: the process is exiting
    anyway) and hands every other unraisable exception to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_ecomray_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, SystemExit):
            return
        previous(unraisable)

    hook._ecomray_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def init_ray(num_cpus: int | None = None, verbose: bool = False, dashboard: bool | None = None, **kwargs: Any) -> None:
    """Connect to RAY_ADDRESS when it is set (a cluster, or `ray job submit`), else start a local Ray, with its
    dashboard unless `dashboard` is false (`ray.include_dashboard`; None: Ray's default, on when installed). Ray's
    own logging stays at WARNING unless `verbose`."""
    import logging

    import ray

    if ray.is_initialized():
        return
    quiet_libraries(verbose)
    kwargs.setdefault("logging_level", logging.INFO if verbose else logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        if dashboard is not None:
            kwargs.setdefault("include_dashboard", bool(dashboard))
        ray.init(num_cpus=num_cpus, **kwargs)
    _rearm_sigterm()


def _rearm_sigterm() -> None:
    """`ray.init` starts the driver's C++ core worker, whose failure-signal handler takes over SIGTERM from Python's:
    a `kill` or `ray job stop` printed a C++ stack dump and aborted (exit 134), skipping every cleanup (a batch
    scoring's `<out>.tmp-<pid>` was left). `_exit_on_sigterm`'s handler is installed again, so SIGTERM exits through
    the job's `finally` blocks with one line and exit code 143."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _exit_on_sigterm()


def ray_started_here() -> bool:
    """Whether this process started the Ray it is connected to: a local Ray that no autoscaler will ever add a node
    to. False when it joined a cluster (RAY_ADDRESS, or a `ray start` cluster on this machine) and inside a Ray
    worker (a Tune trial), where a request that does not fit yet may fit once nodes are added."""
    try:
        import ray._private.worker as worker

        node = getattr(worker, "_global_node", None)
        return bool(node is not None and getattr(node, "head", False))
    except Exception:  # noqa: BLE001 - a private attribute: when in doubt, do not claim the Ray is ours
        return False


def bundles_that_fit(bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many copies of a resource `bundle` (a Train worker, a Serve replica) the nodes' total resources hold
    at once: each copy on one node."""
    need = {r: float(v) for r, v in bundle.items() if float(v) > 0}
    if not need:
        return 10**9
    return sum(min(int(node.get(r, 0.0) / v + 1e-9) for r, v in need.items()) for node in nodes)


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of each live node of the connected Ray."""
    import ray

    return [node.get("Resources") or {} for node in ray.nodes() if node.get("Alive")]


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError at the root of an error that Ray wrapped, as a plain UserError (one clear line), or None.

    Ray Train's WorkerGroupError holds each worker's error (`worker_failures`); a RayTaskError holds the task's
    (`cause`) and is itself an instance of that class, with Ray's traceback in its text; Tune and other code chain
    errors (`__cause__`). Shared by training, tuning and prepare's Ray engine."""
    stack: list[BaseException] = [err]
    for _ in range(64):
        if not stack:
            break
        e = stack.pop()
        failures = getattr(e, "worker_failures", None)
        if failures:
            stack.extend(reversed(list(failures.values())))
            continue
        wrapped = getattr(e, "cause", None)
        if isinstance(wrapped, BaseException):
            stack.append(wrapped)
            continue
        if isinstance(e, UserError):
            return UserError(str(e))
        if e.__cause__ is not None:
            stack.append(e.__cause__)
    return None


def cannot_place(job: str, why: str, fix: str, then: str = "") -> None:
    """Work that no node of the Ray cluster can hold (Ray waits for it without a word): on a Ray this process
    started, an error saying `fix`; on a cluster it joined (RAY_ADDRESS, a `ray start` cluster, a Tune trial), a
    line saying it waits, since an autoscaling cluster adds nodes."""
    if not ray_started_here():
        print(f"[{job}] waiting: {why}; an autoscaling cluster adds nodes, otherwise stop (Ctrl-C){then}", flush=True)
        return
    raise UserError(f"{why}: {fix}, or connect to a cluster with RAY_ADDRESS")


def check_number(path: str, value: Any, ok: Callable[[float], bool], rule: str, integer: bool = False) -> None:
    """A setting that must be a finite number (an integer with `integer`) for which `ok` holds; else one error
    naming the setting and the `rule`, before any work starts."""
    import math

    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and ok(value)
    if not valid or (integer and int(value) != value):
        raise UserError(f"{path}={value!r}: must be {'an integer ' if integer else 'a number '}{rule}")


@contextlib.contextmanager
def one_at_a_time(lock_path: str, what: str, log: Callable[[str], None] = print,
                  busy: str | None = None) -> Iterator[None]:
    """An exclusive lock on `lock_path` for a whole run of `what` (a prepare of one dataset, a batch scoring into
    one folder); a second run waits, saying for whom, or with `busy` (what to do instead) is refused at once. The
    kernel drops the lock when its holder dies, however it dies, so what a killed run left can be cleaned up under
    the lock. (The file stays: deleting a lock file races.)"""
    import fcntl
    import socket

    try:
        fh = open(lock_path, "a+")
    except OSError as err:   # its folder is missing or not writable: name it, not a traceback
        raise UserError(f"cannot lock {lock_path} for the {what}: {err.strerror}; check the folder exists and is "
                        f"writable") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            if busy is not None:
                raise UserError(f"another {what} is running ({holder}): {busy}") from None
            log(f"another {what} is running ({holder}); waiting for it to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        yield


@contextlib.contextmanager
def output_folder(out: str, setting: str, marker: str | tuple[str, ...], kind: str,
                  log: Callable[[str], None] = print, owns: Callable[[str], bool] | None = None) -> Iterator[str]:
    """A job's output folder, written whole: yields a work folder (`<out>.tmp-<pid>`, not yet made) that replaces
    `out` when the block ends, and is removed if it fails. One run per folder (a lock beside it); under the lock,
    what killed runs left (`<out>.tmp-*`, `<out>.old-*`) is removed, and a folder holding files but not every
    `marker`, or (with `owns`) an entry the job never writes, is not a `kind` that a run may replace: it is refused,
    naming `setting`. (A finished sweep folder has a `summary.json` too: `opinion.out` pointed at one deleted its
    trials.)"""
    import glob
    import shutil

    parent = os.path.dirname(out)
    if os.path.exists(out) and not os.path.isdir(out):   # it failed at the very end, after all the work
        raise UserError(f"{setting}: {out} is a file, not a folder; choose a folder (a run writes one whole)")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise UserError(f"{setting}: cannot create {parent} ({err.strerror})") from None
    with one_at_a_time(os.path.join(parent, f".{os.path.basename(out)}.lock"), f"run writing {out}", log):
        for left in sorted(glob.glob(f"{glob.escape(out)}.tmp-*") + glob.glob(f"{glob.escape(out)}.old-*")):
            shutil.rmtree(left, ignore_errors=True)       # a killed run's; none is a live run's (the lock)
            log(f"removed {left}: left by a killed run")
        markers = (marker,) if isinstance(marker, str) else marker
        held = os.listdir(out) if os.path.isdir(out) else []
        missing = [m for m in markers if m not in held]
        foreign = sorted(name for name in held if owns is not None and not owns(name))
        if held and (missing or foreign):
            why = f"no {missing[0]}" if missing else f"{foreign[0]!r}{' and more' if len(foreign) > 1 else ''}"
            raise UserError(f"{setting}: {out} holds files that are not {kind} ({why}), and a run replaces its "
                            f"output folder whole; choose an empty or new folder")
        work = f"{out}.tmp-{os.getpid()}"
        try:
            yield work
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        replace_dir(work, out)


def check_outside(path: str, root: str, setting: str, what: str) -> None:
    """`path` (a job's output) must not be `root` (the registry, a dataset folder) or lie inside it: a predictions
    folder written as `<registry>/<model>/v0002` looked like a version to every registry command."""
    a, b = os.path.realpath(path), os.path.realpath(root)
    if a == b or a.startswith(b.rstrip(os.sep) + os.sep):
        raise UserError(f"{setting}={path} is inside {what} {root}; write outputs elsewhere")


def replace_dir(work: str, final: str) -> None:
    """Put the finished folder `work` at `final`, replacing what was there whole: the old folder is renamed aside,
    the new one renamed in, then the old one deleted. A reader sees one run's files, never a mix of two."""
    import shutil
    import signal

    old = None
    # SIGTERM ends a job through an exception (`user_errors`); held back between the renames, so no stop leaves
    # neither folder at `final`
    masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        if os.path.isdir(final):
            old = f"{final}.old-{os.getpid()}"
            os.rename(final, old)
        os.rename(work, final)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, masked)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(path: str, what: str) -> None:
    """Make the folder `path` (a local one; URIs are left to their filesystem) and prove a file can be written in
    it, so a job that would write there only at its end (a trained model's registration) fails at its start."""
    if is_uri(path):
        return
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise UserError(f"{what}: cannot write to {path} ({err.strerror or err})") from None


def write_atomic(path: str, text: str) -> None:
    """Write a small text file so that readers (and a later run after a crash) see the old file or the new one,
    never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


_stopped_by: int | None = None       # the signal `_exit_on_sigterm`'s handler took, once it has


def _exit_on_sigterm() -> None:
    """SIGTERM (`ray job stop`, a scheduler, `kill`) ends a job as an exception does, so its `finally` blocks
    remove temporary folders; Python's default is to die at once. Installed again after `ray.init`
    (`_rearm_sigterm`)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def stop(signum: int, frame: Any) -> None:
            global _stopped_by
            _stopped_by = signum
            print("ecomray: stopped (SIGTERM)", file=sys.stderr, flush=True)
            sys.exit(128 + signum)

        signal.signal(signal.SIGTERM, stop)


def user_errors(fn: F) -> F:
    """Wrap a job's entry point: a UserError becomes one clear line on stderr and exit code 2; SIGTERM (143) and
    Ctrl-C (130) exit through the job's cleanups with one line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _exit_on_sigterm()
        try:
            return fn(*args, **kwargs)
        except BaseException as err:
            if _stopped_by is not None:
                # SIGTERM's SystemExit may come out as another exception (Ray Train's fit turns it into its own
                # error, and the job exited 1): after the one line its handler printed, exit 128 + the signal
                sys.exit(128 + _stopped_by)
            if isinstance(err, UserError):
                print(f"ecomray: error: {err}", file=sys.stderr)
                sys.exit(2)
            if isinstance(err, KeyboardInterrupt):   # Ctrl-C: the cleanups ran on the way; a traceback tells nothing
                print("ecomray: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
                sys.exit(130)
            raise

    return wrapper  # type: ignore[return-value]


class Progress:
    """Progress of a long loop as a line every `every_s` seconds ("[train] epoch 0: 500/938 steps (53%), 1.3 s/step,
    ~9 min left"), not a redrawn bar: log files and `ray job logs` keep every line. A loop shorter than `every_s`
    prints nothing."""

    def __init__(self, label: str, total: int, unit: str = "steps", every_s: float = 60.0, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.unit, self.every_s, self.enabled, self.clock = label, total, unit, every_s, enabled, clock
        self.done = 0
        self.t0 = self.last = clock()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if not self.enabled or self.done >= self.total or now - self.last < self.every_s:
            return
        self.last = now
        per = (now - self.t0) / self.done
        left = per * (self.total - self.done)
        left_text = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
        print(f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({self.done / self.total:.0%}), "
              f"{per:.2f} s each, ~{left_text} left", flush=True)
