"""Run plumbing the stage scripts share: how a script ends on a user's error, torchrun setup and ranks, seeding,
the lr schedule, atomic checkpoints and JSON, the epoch log, mid-epoch checkpoints and preemption, mixed
precision, metrics, and the command-line flags common to several stages."""
import argparse
import concurrent.futures
import contextlib
import datetime
import fcntl
import functools
import hashlib
import inspect
import io
import json
import math
import multiprocessing
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import models

EXIT_PREEMPTED = 3  # exit status after a SIGTERM / SIGUSR1 stop: the checkpoint is saved, rerun to resume


# ---------------------------------------------------------------------------------------------------------
# Errors a user can cause


class UsageError(ValueError):
    """A setting on the command line that cannot work: the script ends with one line and exit status 2."""


class DataError(Exception):
    """Input that cannot be used (a dataset's files or lists, a video): the script ends with one line and exit
    status 1."""


def run_script(main, parser, args=None):
    """Runs main(args), with args parsed from the command line unless given. The errors a user can cause
    (UsageError, DataError, models.CheckpointError, and a flag that argparse refuses) end the process with one line
    on stderr, `<script>: error: <message>` (from the first process only under torchrun), and exit status 2 for a
    bad setting, 1 for unusable input; any other exception is a bug and shows its traceback. The output folder
    that main locked (make_output_dir) is released when it returns."""
    later = int(os.environ.get("RANK", 0)) != 0
    if args is None:
        said = io.StringIO()  # under torchrun every process refuses the same flag: the first one says it
        try:
            with contextlib.redirect_stderr(said) if later else contextlib.nullcontext():
                args = parser.parse_args()
        except SystemExit:
            if later:
                time.sleep(2)  # torchrun stops this process during the pause, once the first one has exited
                sys.stderr.write(said.getvalue())
            raise
    # A warning is for the user, not a pointer into our source: one line, without the code line that raised it.
    plain_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"{parser.prog}: warning: {message}\n"
    try:
        return main(args)
    except (UsageError, DataError, models.CheckpointError) as err:
        if later:
            # Under torchrun every process usually meets the same error: the first one says it and exits, and
            # torchrun stops the others during this pause. An error of this process alone is still said after it.
            time.sleep(2)
        print(f"{parser.prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(err, UsageError) else 1)
    finally:
        warnings.formatwarning = plain_format
        release_output_dirs()


def not_a_file(path, kind="file"):
    """Why `path`, which is no regular file, cannot be read as one (a `kind`): for a message."""
    if os.path.isdir(path):
        return "is a folder"
    return "is not a regular file (a device or pipe?)" if os.path.exists(path) else f"no such {kind}"


def check_writable(path, what):
    """Creates the folder `path` if needed and refuses one that this process cannot write a file into (a file in
    the way, read-only disk, immutable folder, no permission), before any work: a run must not find out after
    hours. `what`: the flag or setting that gave the folder, for the message."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test."):
            pass
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{what} {path}: not a folder (a file is in the way)") from None
    except OSError as err:
        raise UsageError(f"{what} {path}: cannot write there ({err.strerror or err})") from None


_OUTPUT_LOCKS = {}  # realpath: the open .lock file of an output folder this process holds


def make_output_dir(path, lock=True, flag="--output-dir", data=None):
    """Creates --output-dir (`flag`) and its parents if needed, refusing a path that is a file, a folder that
    cannot be written, and one inside the dataset root `data` (a run's folder there would join the dataset).
    lock: the main process also takes the folder's lock, OUTPUT/.lock, held until the process ends (or
    release_output_dirs), with the holder's pid, host, start time and command written in it: one writer per folder,
    so that a second run into it is refused, naming the first, instead of interleaving its log and replacing its
    checkpoints."""
    if data is not None and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(data)):
        raise UsageError(f"{flag} {path} is inside --data {data}: no run writes into a dataset; give a folder "
                         f"outside it")
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{flag} {path}: a file is in the way (it must be a folder)") from None
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot be created ({err.strerror or err})") from None
    check_writable(path, flag)
    real = os.path.realpath(path)
    if lock and is_main_process() and real not in _OUTPUT_LOCKS:
        f = open(os.path.join(path, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            f.close()
            raise UsageError(f"{flag} {path} is in use by another run ({holder}): wait for it to end, or give "
                             f"another {flag}") from None
        except OSError as err:  # a file system without locks: the run goes on, unguarded
            f.close()
            warnings.warn(f"{flag} {path} cannot be locked ({err.strerror or err}): nothing stops a second run from "
                          f"writing into it at the same time", RuntimeWarning)
            return Path(path)
        f.seek(0)
        before, script = f.read().strip(), os.path.basename(sys.argv[0])
        other = before.partition(": ")[2].split(" ", 1)[0]
        if other and other != script:  # e.g. retrieval would replace a linear probe's results.json
            f.close()
            raise UsageError(f"{flag} {path} holds a run of {other} ({before}): give each stage its own {flag}")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(shlex.quote(a) for a in [script, *sys.argv[1:]])}\n")
        f.flush()
        _OUTPUT_LOCKS[real] = f
    return Path(path)


def release_output_dirs():
    """Releases the output folders this process locked (make_output_dir)."""
    for f in _OUTPUT_LOCKS.values():
        f.close()  # closing the file drops its flock
    _OUTPUT_LOCKS.clear()


# ---------------------------------------------------------------------------------------------------------
# torchrun


def init_distributed(timeout_minutes=60):
    """Sets up this process from torchrun's RANK, LOCAL_RANK, LOCAL_WORLD_SIZE and WORLD_SIZE (one process without
    them): nccl on GPUs, gloo on CPUs, collectives waiting up to `timeout_minutes` (--dist-timeout) for the other
    processes. Returns the device: cuda:LOCAL_RANK when CUDA is available, else cpu. Refuses more processes on
    this machine than it has GPUs."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not all(os.environ.get(k) for k in ("RANK", "MASTER_ADDR")):
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set without torchrun's RANK and MASTER_ADDR: "
                         f"start the processes with torchrun, or unset WORLD_SIZE for one process")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        gpus, local = torch.cuda.device_count(), max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), local_rank + 1)
        if local > gpus:
            raise UsageError(f"{local} processes on this machine but {gpus} GPU{'s' * (gpus != 1)}: start at most "
                             f"{gpus} (torchrun --nproc_per_node={gpus}), or run on the CPU with CUDA_VISIBLE_DEVICES= "
                             f"(empty)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed clip size: cuDNN picks its fastest kernels once
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


def default_workers():
    """Loader workers per process when --workers is not given: the cores this process may run on (its CPU
    affinity, which SLURM and containers restrict) shared among this machine's processes (torchrun's
    LOCAL_WORLD_SIZE), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))


def wrap_ddp(model, device, sync_buffers=True):
    """DistributedDataParallel of `model` on `device`. sync_buffers=False: buffers are not broadcast before each
    forward (MoCo's queue agrees on every process by construction). torch 2.13 renamed that flag
    forward_sync_buffers; it still broadcasts the buffers once here, which changes nothing, since every process
    builds the same ones from the seed. Older torch takes broadcast_buffers."""
    kwargs = {}
    if not sync_buffers:
        new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        kwargs["forward_sync_buffers" if new else "broadcast_buffers"] = False
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)


def broadcast_buffers(module):
    """Gives every process rank 0's buffers of `module`. Without DDP's broadcast before each forward (pretraining
    skips it: the queue, its largest buffer, agrees by construction), each process updates BatchNorm's running
    statistics from its own share of the batch; called wherever they are read (a checkpoint, the kNN monitor), so
    every process reads the statistics that a checkpoint holds and a resumed run continues from."""
    if get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    """The process count: the process group's, or WORLD_SIZE before it exists (checks before any work)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process():
    return get_rank() == 0


def group_device():
    """Where the process group's collectives take their tensors: this process's GPU under nccl, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def finish_distributed():
    """Ends the process group; every process calls it at the same point of a run."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo":
            # At torch 2.4, ProcessGroupGloo's destructor joins its worker threads holding the GIL, while a worker
            # that still releases the tensors of a finished collective waits for the GIL: the process hangs (a
            # two-process test hung in 4 of 18 runs, and in none of 22 with this barrier). The barrier waits, the
            # GIL released, until the workers are idle.
            dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# Seeding and the lr schedule


def derive_seed(*values):
    """One 63-bit seed from several integers (e.g. seed, epoch, index), well mixed."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed, epoch, step=0):
    """Seeds torch (CPU and CUDA), numpy and random from (seed, rank, epoch, step): processes draw differently,
    and a run resumed at any step draws what the uninterrupted run drew there."""
    value = derive_seed(seed, get_rank(), epoch, step) % 2 ** 32  # numpy takes 32 bits
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def learning_rate(epoch, args):
    """The lr of an epoch: x0.1 at each --schedule milestone, or a half cosine over --epochs with --cos."""
    if args.cos:
        return args.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    return args.lr * 0.1 ** sum(epoch >= milestone for milestone in args.schedule)


def adjust_learning_rate(optimizer, epoch, args):
    """Sets the lr of the epoch (learning_rate) on every parameter group; returns it."""
    lr = learning_rate(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# ---------------------------------------------------------------------------------------------------------
# Files


def environment():
    """What a run's numbers depend on beyond its flags and commit: the float rounding of CPU and GPU kernels varies
    with the torch version, the CPU's instruction set and the thread count, and a long training amplifies it."""
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_initialized() else None}  # the GPU this process used


@functools.cache  # asked by the script's printout and by every checkpoint: two git calls once per process
def git_commit():
    """The commit the code runs at ("+dirty" with uncommitted changes), or "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def atomic_write(path, write, mode="wb"):
    """Writes a file so that it is never seen half-written: write(f) fills a temporary file next to `path`,
    which is flushed to disk and renamed over `path`. A kill at any moment leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # the rename itself survives a crash once the directory is synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(state, path):
    """A plain-dict checkpoint (tensors, numbers, strings, lists, dicts: torch.load(weights_only=True) reads it),
    its tensors on the CPU, so that a machine without the GPU it was trained on reads it too."""
    atomic_write(path, lambda f: torch.save(to_cpu(state), f))


def to_cpu(obj):
    """obj with every tensor in its dicts, lists and tuples moved to the CPU (CPU tensors as they are)."""
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def plain(value):
    """JSON-safe plain types (what json and torch.load(weights_only=True) accept)."""
    return json.loads(json.dumps(value, default=str))


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(plain(obj), indent=2) + "\n"), mode="w")


@contextlib.contextmanager
def file_lock(path, waiting=None, shared=False):
    """A lock across processes, held for the with block (e.g. the processes of one run waiting for the first one
    to build a dataset index): exclusive, or with shared=True shared with the other readers and exclusive of a
    writer. `waiting`: what to print, once and from the first process of a run only, when another process holds
    it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    if os.path.isdir(path):
        raise DataError(f"the lock file {path} is a folder: remove it")
    with open(path, "a") as f:
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every process waits alike: one says it
                print(f"waiting for {path}: held by another process" + (f" ({waiting})" if waiting else ""),
                      flush=True)
            fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parallel_map(fn, items, workers, progress=None):
    """[fn(x) for x in items] over `workers` forked processes (in this process for one worker or item), with a
    progress bar described by `progress` if given."""
    bar = functools.partial(tqdm, total=len(items), desc=progress, disable=progress is None, mininterval=1.0)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in bar(items)]
    context = multiprocessing.get_context("fork")  # the workers need the modules already imported
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(bar(pool.map(fn, items, chunksize=max(1, min(64, len(items) // (4 * workers))))))


class Log:
    """log.jsonl of a run, one JSON line per finished epoch. Opened at a resume after `epochs` epochs, it drops
    the lines of later epochs (and a line cut short by a kill), so that every epoch appears once."""

    def __init__(self, path, epochs=0):
        self.path = Path(path)
        if is_main_process() and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["epoch"] <= epochs:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass
            atomic_write(self.path, lambda f: f.write("".join(kept)), mode="w")

    def entries(self):
        """The epochs logged so far, as dicts."""
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def write(self, entry):
        """Appends one epoch's entry (on the main process) and prints it."""
        if is_main_process():
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Resuming, mid-epoch checkpoints, preemption


def resume_path(args):
    """The checkpoint a run resumes from: --resume PATH, or with --resume auto <output-dir>/checkpoint.pth when
    it exists; None for a fresh start."""
    if args.resume != "auto":
        if not os.path.isfile(args.resume):
            raise UsageError(f"--resume {args.resume}: {not_a_file(args.resume, 'checkpoint file')}")
        return args.resume
    path = os.path.join(args.output_dir, "checkpoint.pth")
    return path if os.path.isfile(path) else None


# The flags of every training stage that a resume may change (each stage's RESUMABLE adds its own)
RESUMABLE = (
    "epochs", "schedule",  # the schedule's length (the default milestones scale with it): the epochs left follow it
    "resume", "output_dir",  # where the checkpoint is read from and the run's files go
    "workers",  # loader processes: every clip is drawn from its own seed, whatever process decodes it
    "save_every_steps", "save_every_minutes",  # how often checkpoint.pth is written inside an epoch
    "log_every", "dist_timeout",  # how often the step statistics are read back; how long collectives wait
    "channels_last", "compile")  # memory layout and compilation: the same model, computed faster
# Settings of a run that are not flags: what the refusal of a resume calls them
DERIVED_SETTINGS = {"pretrained_sha1": "the weights behind --pretrained (sha1 of the loaded backbone)"}
# A setting that only one stage has: a checkpoint's stored settings say which stage wrote it
STAGE_SETTINGS = {"pretrain.py": "moco_k", "finetune.py": "dropout", "linear_probe.py": "cache_features"}
# The running sums of checkpoints that stored them by position, by their count: pretraining's; finetuning's and
# the linear probe's
POSITIONAL_SUMS = {4: ("loss", "acc", "failed_videos", "seconds"),
                   5: ("loss", "correct", "clips", "failed_videos", "seconds")}


def load_resume(path, args, parser):
    """Loads a checkpoint to resume, refusing one trained with other settings: every setting of `args` (the flags
    and DERIVED_SETTINGS) must equal the checkpoint's, except the flags in parser.resumable, whose changes are
    printed and take effect. A setting that the checkpoint does not hold (a flag added to the script after it was
    saved) counts as having had its default, the parser's for this --dataset (a derived setting has none, so it
    is refused); a stored setting that the script no longer has is ignored. Also refuses a checkpoint saved inside
    an epoch by another number of processes (the position in the epoch would not carry over)."""
    ckpt = models.load_checkpoint(path)
    old = ckpt.get("args") if isinstance(ckpt, dict) else None
    if not isinstance(old, dict):
        raise models.CheckpointError(f"{path} is not a checkpoint of this script (no stored settings): delete it to "
                                     f"start fresh, or use another --output-dir")
    for key, value in (("epoch", ckpt.get("epoch")), ("step", ckpt.get("step", 0))):
        if type(value) is not int or value < 0:
            raise models.CheckpointError(f"{path} is damaged or not a checkpoint of this script: its {key!r} is "
                                         f"{value!r}, not a count")
    defaults = vars(parser.parse_args(["--dataset", args.dataset]))
    other = [script for script, key in STAGE_SETTINGS.items() if key in old and key not in defaults]
    if other:
        raise models.CheckpointError(f"{path} is a checkpoint of {other[0]} (its settings have "
                                     f"{_flags([STAGE_SETTINGS[other[0]]])}), not of {parser.prog}: give "
                                     f"{parser.prog} another --output-dir or --resume")
    refused, changed = [], []
    for key, value in vars(args).items():
        before = old.get(key, defaults.get(key))
        if not _same_setting(before, value):
            note = "" if key in old else "; the checkpoint predates it: its default assumed"
            if key in getattr(parser, "given", {}):  # a setting the script derived from the flag: both
                note += f"; from {_flags([key])} {parser.given[key]} as given"
            (changed if key in parser.resumable else refused).append(
                f"{DERIVED_SETTINGS.get(key, _flags([key]))} {plain(before)} (now {plain(value)}{note})")
    if refused:
        raise UsageError(f"{path} was trained with other settings: {', '.join(refused)}. Resume with the "
                         f"checkpoint's values, or use another --output-dir for a new run (a resume may change only "
                         f"{_flags(parser.resumable)})")
    if ckpt.get("step", 0) and ckpt.get("world_size") != get_world_size():
        raise UsageError(f"{path} was saved inside epoch {ckpt['epoch'] + 1} by {ckpt.get('world_size')} processes; "
                         f"resume it with that many (this run has {get_world_size()})")
    if is_main_process():
        where = f"in epoch {ckpt['epoch'] + 1} after step {ckpt['step']}" if ckpt.get("step") else \
            f"after epoch {ckpt['epoch']}"
        print(f"resuming from {path} ({where})" + (f"; changed: {', '.join(changed)}" if changed else ""))
    return ckpt


def _same_setting(a, b):
    """Equal settings; paths compare by where they point."""
    a, b = plain(a), plain(b)
    if isinstance(a, str) and isinstance(b, str) and os.sep in a + b:
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def _flags(keys):
    """Settings as their flags: "--epochs, --save-every"."""
    return ", ".join("--" + key.replace("_", "-") for key in keys)


class Checkpointing:
    """The checkpoints of a training run, and where the run is: `epoch` (epochs done), `step` (steps done in the
    next one) and that epoch's running `sums` by name. A checkpoint holds the state objects given (e.g. model=,
    optimizer=, scaler=: their state_dict; a plain dict such as the best score so far: as it is), where the run is,
    the autocast dtype `amp` resolved on this machine, and the settings; resume() restores them in place.

    Inside an epoch, add() keeps each step's values where they are (on the GPU: no wait for the device), and
    check() reads them back every --log-every steps, summed over the processes: it stops the run on a non-finite
    loss (before anything of those steps is saved), and saves checkpoint.pth every --save-every-steps steps, every
    --save-every-minutes, and after SIGTERM or SIGUSR1 (what SLURM sends before a preemption or the time limit),
    then stops the run. Every process decides alike, at the same step. Use as a context manager around the epochs:
    it installs the signal handlers and puts the previous ones back."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, args, amp=None, **state):
        self.args, self.state, self.commit = args, state, git_commit()
        self.amp = AMP_NAMES[amp]
        self.epoch, self.step, self.sums = 0, 0, {}
        self.every_steps, self.every_seconds = args.save_every_steps, 60 * args.save_every_minutes
        self.read_every = max(1, getattr(args, "log_every", 1))
        self.last_save, self.last_step, self.signal, self.previous = time.monotonic(), None, None, {}
        self.pending = []  # the steps added since the last read: (names, values, reduce, seconds) each

    def __enter__(self):
        self.last_save = time.monotonic()  # --save-every-minutes counts from the first step, not from set-up
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._receive)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _receive(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def resume(self, parser):
        """Restores the run from its checkpoint, if there is one (resume_path; load_resume checks the settings
        against `parser`'s). Returns the epochs done (0 for a fresh start)."""
        path = resume_path(self.args)
        if path is None:
            return 0
        ckpt = load_resume(path, self.args, parser)
        stored = ckpt.get("amp")
        for name, obj in self.state.items():
            try:
                if isinstance(obj, dict):
                    obj.update(ckpt[name])
                elif isinstance(obj, torch.amp.GradScaler) and (stored not in (None, self.amp) or
                                                                 (obj.is_enabled() and not ckpt[name])):
                    # --amp auto resolved otherwise on this GPU (e.g. a bf16 run requeued onto a GPU without bf16):
                    # the saved loss scale, if any, belongs to the other precision
                    if is_main_process():
                        print(f"note: {path} was trained with {stored or 'another'} autocast; --amp {self.args.amp} "
                              f"is {self.amp} on this machine: the loss scaler starts afresh")
                else:
                    obj.load_state_dict(ckpt[name])
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise models.CheckpointError(f"{path} is incomplete or damaged: its {name!r} cannot be restored "
                                             f"({models._first_line(err)}); delete it to start fresh, or use "
                                             f"another --output-dir") from None
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.sums = ckpt["sums"] if self.step else {}
        if isinstance(self.sums, list):
            self.sums = {"steps": self.step, **dict(zip(POSITIONAL_SUMS[len(self.sums)], self.sums))}
        return self.epoch

    def begin_epoch(self):
        """Starts the clock of the epoch's steps; returns (the epoch, the steps already done in it)."""
        self.last_step = time.perf_counter()
        return self.epoch, self.step

    def add(self, values, reduce=True):
        """After a step: keeps its values ({name: number or tensor}) for the next read, with the step's seconds.
        reduce: each value summed over the processes (False: every process computed the same values)."""
        now = time.perf_counter()
        self.pending.append((sorted(values), values, reduce, now - self.last_step))
        self.step, self.last_step = self.step + 1, now

    def check(self):
        """After add(): reads the steps' values back when due (every --log-every steps, and before any save), saves
        checkpoint.pth when due; after a signal, saves it and stops the run. Returns the values read, summed over
        the steps read (with their count, "steps"), or None when nothing was read."""
        due = bool(self.every_steps and self.step % self.every_steps == 0)
        # one process acts on a signal at once; processes of a run learn of each other's at a read
        if not (due or self.step % self.read_every == 0 or (self.signal and get_world_size() == 1)):
            return None
        window, stop, late = self._read()
        if stop or due or late:
            self.last_save = time.monotonic()
            path = Path(self.args.output_dir) / "checkpoint.pth"
            self.save(path)
            if stop:
                if is_main_process():
                    print(f"stopped by {self.signal or 'a signal on another process'}: saved {path}; run the same "
                          f"command again to resume from it", flush=True)
                finish_distributed()
                sys.exit(EXIT_PREEMPTED)
        return window

    def _read(self):
        """Adds the pending steps to the epoch's sums, their values summed over the processes in one collective
        with the stop flags (a signal, --save-every-minutes passed) of every process, read back in one wait for the
        device (one process on a GPU waits for each value). Stops the run on a non-finite loss. Returns (the steps' sums, stop, save due by the clock)."""
        device, world, pending = group_device(), get_world_size(), self.pending
        self.pending = []
        flags = torch.tensor([self.signal is not None,
                              bool(self.every_seconds and time.monotonic() - self.last_save >= self.every_seconds)],
                             dtype=torch.float64)
        # One process on a GPU sums on the CPU, and a copy from the GPU that does not block returns before the
        # values are there: only copies onto a GPU go without waiting.
        wait = device.type == "cpu"
        rows = [torch.stack([torch.as_tensor(values[name]).detach().to(device, torch.float64, non_blocking=not wait)
                             for name in names]) for names, values, _, _ in pending]
        table = torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.float64, device=device)
        flags = flags.to(device, non_blocking=True)
        if world > 1:
            if pending and pending[0][2]:  # reduce: the values and the flags in one all-reduce
                both = torch.cat([table.flatten(), flags])
                dist.all_reduce(both)
                table, flags = both[:-2].view_as(table), both[-2:]
            else:
                dist.all_reduce(flags)
        table, (stop, late) = table.tolist(), flags.tolist()
        window = {}
        first = self.step - len(pending)
        for k, ((names, _, _, seconds), row) in enumerate(zip(pending, table)):
            stats = dict(zip(names, row))
            check_finite(stats.get("loss", 0.0), self.epoch, first + k + 1)
            for name, value in {**stats, "steps": 1, "seconds": seconds}.items():
                self.sums[name] = self.sums.get(name, 0) + value
                window[name] = window.get(name, 0) + value
        return window, stop > 0, late > 0

    def end_epoch(self):
        """After the epoch's last step: returns its sums (every step read), and the run is at the start of the next
        epoch."""
        self._read()
        sums = self.sums
        self.epoch, self.step, self.sums = self.epoch + 1, 0, {}
        return sums

    def save(self, path):
        """Writes a checkpoint of the run as it is now, atomically (on the main process; every process calls it,
        since the steps not read yet are read first)."""
        if self.pending:
            self._read()
        for obj in self.state.values():
            if isinstance(obj, torch.nn.Module):
                broadcast_buffers(obj)
        if is_main_process():
            save_checkpoint({**{name: obj if isinstance(obj, dict) else obj.state_dict()
                                for name, obj in self.state.items()},
                             "epoch": self.epoch, "step": self.step, "sums": self.sums, "amp": self.amp,
                             "world_size": get_world_size(), "args": plain(vars(self.args)), "git_commit": self.commit},
                            path)


def check_finite(loss, epoch, step):
    """Stops the run on a non-finite loss, before anything of this step is saved."""
    if not math.isfinite(loss):
        sys.exit(f"non-finite loss ({loss}) in epoch {epoch + 1}, step {step}: stopping; the last saved checkpoint "
                 f"is kept as it was. Lower --lr, try --amp off, or check the input data.")


# ---------------------------------------------------------------------------------------------------------
# Mixed precision


AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}  # autocast dtypes as --amp names it


def amp_dtype(mode, device):
    """The autocast dtype of --amp on `device`, or None for float32. auto: bf16 on GPUs that compute in it (compute
    capability 8.0 on), fp16 (with loss scaling) on older ones, which only emulate bf16, float32 on CPU."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def conv3d_cudnn_warning(device, dtype):
    """Why 3D convolutions in `dtype` autocast (None: float32) on `device` will run without cuDNN, or None: cuDNN
    switched off, or a torch build that routes bf16/fp16 Conv3d around it (pytorch/pytorch#166122: torch 2.9.0
    with cuDNN 9.8 or later; later builds while cuDNN is 9.8 to 9.14), several times slower and with many times
    the memory. Reads version numbers only; None off CUDA."""
    if device.type != "cuda":
        return None
    if not torch.backends.cudnn.enabled:
        return "cuDNN is disabled (torch.backends.cudnn.enabled is False): Conv3d runs several times slower"
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    cudnn = torch.backends.cudnn.version() or 0
    release = tuple(int(v) for v in re.match(r"(\d+)\.(\d+)\.(\d+)", torch.__version__).groups())
    if (release == (2, 9, 0) and cudnn >= 90800) or (release > (2, 9, 0) and 90800 <= cudnn < 91500):
        return (f"torch {torch.__version__} with cuDNN {cudnn} runs {str(dtype).replace('torch.', '')} Conv3d "
                f"without cuDNN (pytorch/pytorch#166122): several times slower, with many times the memory. Install "
                f"torch 2.9.1 or later with cuDNN 9.15 or later, or train with --amp off")
    return None


def grad_scaler(dtype, device):
    """Loss scaling for fp16 autocast; a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def load_pretrained(model, args):
    """Loads the backbone weights of --pretrained (models.load_backbone refuses another arch's); says so loudly
    when there are none, and notes clip settings that differ from those the checkpoint was trained with."""
    if args.pretrained is None:
        if is_main_process():
            print("=" * 78 + "\nWARNING: no --pretrained given: evaluating a RANDOMLY INITIALISED backbone\n"
                  + "=" * 78)
        return
    info = models.load_backbone(model, args.pretrained, unsafe=args.unsafe_unpickle)
    if is_main_process():
        print(f"loaded {args.pretrained}; left at init: {info['missing']}; skipped: {len(info['dropped'])} "
              f"head/classifier and {len(info['unexpected'])} other checkpoint keys")
        stored = info["args"] or {}
        differ = [f"--{k} {stored[k]} (now {getattr(args, k)})" for k in ("frames", "stride", "crop")
                  if k in stored and stored[k] != getattr(args, k)]
        if differ:
            print(f"note: {args.pretrained} was trained with other clip settings: {', '.join(differ)}; the "
                  f"evaluation uses the new ones")


def weights_sha1(model):
    """A hash of a model's weights and buffers (what an evaluation evaluates, whatever file they came from)."""
    h = hashlib.sha1()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@torch.no_grad()
def clip_outputs(fn, loader, device):
    """fn over every clip of a test-mode loader, gathered over the processes in dataset order.

    fn maps uint8 clips (n, 3, T, S, S) on `device` to (n, ...). Returns (V, N, ...) on the CPU for the V videos
    of N clips each, and a (V,) bool mask of the videos that decoded (the others' outputs are meaningless: leave
    them out); every video counts once however many processes share the loader.
    """
    outputs, index, failed = [], [], []
    for batch in tqdm(loader, desc=f"{loader.dataset.name} clips", disable=not is_main_process(), leave=False):
        b, n = batch["clip"].shape[:2]
        out = fn(batch["clip"].to(device, non_blocking=True).flatten(0, 1))  # (b * n, ...)
        outputs.append(out.unflatten(0, (b, n)))
        index.append(batch["index"])
        failed.append(batch["failed"])
    if not outputs:
        raise RuntimeError(f"this process got no test videos: {len(loader.dataset)} videos for {get_world_size()} "
                           f"processes")
    index = torch.cat(index).to(device)
    values = gather_by_index(torch.cat(outputs), index, len(loader.dataset)).cpu()
    failed = gather_by_index(torch.cat(failed).to(device)[:, None], index, len(loader.dataset)).cpu()[:, 0]
    ok = failed == 0
    finite = torch.isfinite(values.flatten(1).float()).all(1)  # (V,): every process sees the same, so all stop
    if not bool(finite[ok].all()):
        bad = (ok & ~finite).nonzero()[:, 0].tolist()
        raise DataError(f"{loader.dataset.name}: the backbone gives non-finite outputs (NaN or inf) for {len(bad)} of "
                        f"{len(ok)} videos, e.g. {loader.dataset.paths[bad[0]]}: such scores mean nothing; check the "
                        f"weights of --pretrained (or try --amp off)")
    return values, ok


def gather_by_index(values, index, total):
    """All-gathers this process's (n, ...) values with their dataset indices (n,) and returns (total, ...)
    ordered by index. Call once with everything a process evaluated (counts may differ across ranks).
    Raises if an index is missing or duplicated, so evaluation is exact for any process count."""
    index = torch.as_tensor(index, device=values.device).long()
    world = get_world_size()
    if world > 1:
        count = torch.tensor([len(index)], device=values.device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count)
        m = int(max(c.item() for c in counts))
        pv = values.new_zeros((m, *values.shape[1:]))
        pv[: len(index)] = values
        pi = index.new_full((m,), -1)
        pi[: len(index)] = index
        gv, gi = [torch.zeros_like(pv) for _ in range(world)], [torch.zeros_like(pi) for _ in range(world)]
        dist.all_gather(gv, pv.contiguous())
        dist.all_gather(gi, pi)
        values = torch.cat([v[: int(c.item())] for v, c in zip(gv, counts)])
        index = torch.cat([i[: int(c.item())] for i, c in zip(gi, counts)])
    hits = torch.zeros(total, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))
    if not bool((hits == 1).all()):
        raise RuntimeError(f"gather_by_index: {int((hits == 0).sum())} indices missing, "
                           f"{int((hits > 1).sum())} duplicated of {total}")
    out = values.new_empty((total, *values.shape[1:]))
    out[index] = values
    return out


def knn_top1(query, query_labels, gallery, gallery_labels, k=20, temperature=0.07, chunk=1024):
    """Top-1 (%) of a weighted kNN classifier: each query (Q, D) takes the label with the largest sum of
    exp(cosine / temperature) over its k most similar gallery features (G, D) (k clipped to G). Queries go
    `chunk` at a time, so that memory stays (chunk, G) on datasets of Kinetics' size."""
    query, gallery = F.normalize(query.float(), dim=1), F.normalize(gallery.float(), dim=1)
    gallery_labels, classes, correct = gallery_labels.to(gallery.device), int(gallery_labels.max()) + 1, 0
    for start in range(0, len(query), chunk):
        sim, idx = (query[start:start + chunk] @ gallery.T).topk(min(k, len(gallery)), dim=1)  # (chunk, k)
        votes = torch.zeros(len(sim), classes, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, gallery_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == query_labels[start:start + chunk].to(votes.device)).sum())
    return 100.0 * correct / len(query)


def classification_metrics(scores, labels, classes, ok=None):
    """Video-level top-1 / top-5 (%) and per-class accuracy from (V, C) scores, over the videos where the (V,)
    mask `ok` is set (those that decoded); "videos": how many were scored."""
    ok = torch.ones(len(labels), dtype=torch.bool) if ok is None else ok.cpu()
    if not bool(ok.any()):
        raise DataError(f"none of the {len(labels)} test videos could be decoded")
    scores, labels = scores[ok.to(scores.device)], labels[ok].to(scores.device)
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (V, 5)
    correct = top[:, 0] == labels
    per_class = {name: 100.0 * correct[labels == c].float().mean().item()
                 for c, name in enumerate(classes) if bool((labels == c).any())}
    return {"top1": 100.0 * correct.float().mean().item(),
            "top5": 100.0 * (top == labels[:, None]).any(1).float().mean().item(),
            "mean_class_acc": sum(per_class.values()) / len(per_class), "per_class_acc": per_class,
            "videos": len(labels)}


FAILED_TO_DECODE = "failed to decode"  # the reason an evaluation adds to the listing's (data.LEFT_OUT_REASONS)


def video_accounting(dataset, ok):
    """Every listed video of an evaluated dataset accounted for: listed = scored + left out. dataset: a
    data.build_dataset dataset (its manifest: the videos left out when listed and indexed); ok: the (V,) mask of
    its videos that decoded at test time (clip_outputs). Returns {"listed", "scored", "left_out", "left_out_by_reason"
    (every reason, zeros included), "left_out_videos" [[path, reason, detail]]}."""
    manifest = dataset.manifest
    left_out = [list(entry) for entry in manifest["left_out"]]
    left_out += [[os.path.relpath(dataset.paths[i], dataset.root), FAILED_TO_DECODE, "at test time"]
                 for i in (~ok.cpu()).nonzero()[:, 0].tolist()]
    reasons = {**manifest["left_out_by_reason"], FAILED_TO_DECODE: len(left_out) - len(manifest["left_out"])}
    counts = {"listed": manifest["listed"], "scored": int(ok.sum()), "left_out": len(left_out)}
    if counts["listed"] != counts["scored"] + counts["left_out"]:
        raise RuntimeError(f"{dataset.name}: {counts} do not add up")
    return {**counts, "left_out_by_reason": reasons, "left_out_videos": left_out}


def eval_splits(args):
    """The splits an evaluation reports: --test-split, and on the synthetic benchmark also test and test_swapped
    (their difference is the background-bias gap)."""
    splits = [args.test_split]
    if args.dataset == "synthetic":
        splits += [s for s in ("test", "test_swapped") if s not in splits]
    return splits


def eval_output_dir(args, stage, dataset):
    """--output-dir, by default runs/<stage>_<dataset>_<target>_<train split>[_<test split>]_<pretraining run or
    random_init> (dataset: data.dataset_tag; the test split when it is not test); created and locked by
    make_output_dir."""
    if args.output_dir is None:
        tag = "random_init"
        if args.pretrained:
            path = Path(args.pretrained)
            tag = path.parent.name + ("" if path.stem == "checkpoint" else f"_{path.stem}")
        splits = args.train_split + ("" if args.test_split == "test" else f"_{args.test_split}")
        args.output_dir = str(Path("runs") / f"{stage}_{dataset}_{args.target}_{splits}_{tag}")
    return make_output_dir(args.output_dir, data=args.data)


def write_results(args, results, **extra):
    """Writes <output-dir>/results.json: the metrics of each evaluated split, the background-bias gap when both
    synthetic test splits were evaluated, extra entries as given, and the settings."""
    if not is_main_process():
        return
    key = "R@1" if "R@1" in next(iter(results.values())) else "top1"
    out = {"pretrained": args.pretrained, "splits": results, **extra, "args": vars(args),
           "git_commit": git_commit(), "environment": environment()}
    if "test" in results and "test_swapped" in results:
        out["bias_gap"] = results["test"][key] - results["test_swapped"][key]  # percentage points
    for split, metrics in results.items():
        print(f"{split}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
        if "listed" in metrics:
            said = ", ".join(f"{n} {reason}" for reason, n in metrics["left_out_by_reason"].items() if n)
            print(f"{split}: {metrics['listed']} listed = {metrics['scored']} scored + {metrics['left_out']} left out"
                  + (f" ({said})" if said else ""))
    if "bias_gap" in out:
        print(f"background-bias gap ({key}, test - test_swapped): {out['bias_gap']:.2f} points")
    path = Path(args.output_dir) / "results.json"
    write_json(path, out)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------
# Command lines


class Number:
    """An argparse type: a finite int or float (NaN and inf refused) in [low, high], each bound left out of the
    range when open_low / open_high, None for none; even: an even int. Its `range` reads like "in (0, 1]" in the
    error message."""

    def __init__(self, kind=float, low=None, high=None, open_low=False, open_high=False, even=False):
        self.kind, self.low, self.high, self.open_low, self.open_high = kind, low, high, open_low, open_high
        self.even = even
        self.__name__ = kind.__name__  # argparse names the type by it

    @property
    def range(self):
        low, high = (v if v is None or self.kind is int else f"{v:g}" for v in (self.low, self.high))
        if low is not None and high is not None:
            return f"in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"
        if self.low == 0:
            return "positive" if self.open_low else "at least 0"
        if low is not None:
            return f"{'above' if self.open_low else 'at least'} {low}"
        return "finite" if high is None else f"{'below' if self.open_high else 'at most'} {high}"

    def __call__(self, text):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {'an integer' if self.kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.open_high else value > self.high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {self.range}, got {text}")
        if self.kind is float and 0 < abs(value) < sys.float_info.min:  # below float64's normal range: rounds to 0
            raise argparse.ArgumentTypeError(f"{text} is below {sys.float_info.min:.3g}, where numbers lose their "
                                             f"precision (subnormal): give a normal number, or 0 where allowed")
        if self.even and value % 2:
            raise argparse.ArgumentTypeError(f"must be even, got {text}")
        return value


FINITE = Number(float)
POSITIVE = Number(float, 0, open_low=True)
NON_NEGATIVE = Number(float, 0)
FRACTION = Number(float, 0, 1)
SHARE = Number(float, 0, 1, open_high=True)  # momentum, dropout: 1 would freeze the weights or drop everything
POSITIVE_INT = Number(int, 1)
NON_NEGATIVE_INT = Number(int, 0)
SEED = Number(int, 0, 2 ** 63 - 1)  # what numpy's SeedSequence and torch.manual_seed both take


def device(text):
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:N)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU that torch can use")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return text


class Parser(argparse.ArgumentParser):
    """A stage's command line: its defaults are the paper's, and `presets` holds the defaults that change with
    --dataset (e.g. the CPU-sized settings of the synthetic benchmark, the default when --data is omitted).
    After parsing, --dataset is set and an unset --schedule is the paper's milestones scaled to --epochs (none at
    epoch 0, none at or after the last epoch); a given --schedule with a milestone at or after --epochs is refused.
    `resumable`: the settings that may differ from a checkpoint's when a run resumes from it (load_resume)."""

    def __init__(self, description, presets=None, paper_schedule=None, resumable=(), **kwargs):
        self.presets, self.paper_schedule = presets or {}, paper_schedule  # paper_schedule: (epochs, milestones)
        self.resumable = resumable
        lines = [f"  --dataset {name}: " + " ".join(_shown(k, v) for k, v in p.items())
                 for name, p in self.presets.items()]
        epilog = "defaults that depend on --dataset:\n" + "\n".join(lines) if lines else None
        super().__init__(description=description, epilog=epilog, formatter_class=_HelpFormatter, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        first, _ = super().parse_known_args(args, None)
        dataset = first.dataset
        if dataset is None:
            if first.data is not None:
                self.error("--dataset is required with --data (ucf101, hmdb51, k400, diving48, folder or synthetic)")
            dataset = "synthetic"
        preset = self.presets.get(dataset, {})
        saved = {k: self.get_default(k) for k in preset}
        self.set_defaults(**preset)
        try:
            args, rest = super().parse_known_args(args, namespace)
        finally:
            self.set_defaults(**saved)
        args.dataset = dataset
        if self.paper_schedule and args.schedule is None:
            # scaled to --epochs: a milestone never falls on epoch 0 (the whole run at lr / 10) nor at or after the
            # last epoch (where it does nothing)
            epochs, milestones = self.paper_schedule
            scaled = (max(1, round(m * args.epochs / epochs)) for m in milestones)
            args.schedule = [m for m in scaled if m < args.epochs]
        elif self.paper_schedule and args.cos:
            self.error("--cos and --schedule exclude each other: drop one (where a preset sets --cos, pass --no-cos "
                       "with --schedule)")
        elif self.paper_schedule and any(m >= args.epochs for m in args.schedule):
            self.error(f"--schedule {' '.join(map(str, args.schedule))}: a milestone at or after --epochs "
                       f"{args.epochs} never lowers the lr; give milestones below {args.epochs}")
        return args, rest


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default, and the epilog's lines as written."""


def _shown(key, value):
    """A preset default as the flags that set it: --cos / --no-cos for booleans."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} " + (" ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))


def add_run_args(parser, arch="r2plus1d_18", batch_size=64):
    """Flags of every stage: backbone, batch, seed, output folder, mixed precision."""
    parser.add_argument("--arch", default=arch, choices=sorted(models.ARCHS), help="backbone")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=batch_size,
                        help="global batch size (clips; pretraining: videos), divided over the processes (a multiple "
                             "of their count)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of initialisation, sampling and augmentation")
    parser.add_argument("--output-dir", default=None,
                        help="checkpoints, log.jsonl and results (default: runs/<stage>_<settings>)")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                        help="autocast dtype; auto: bf16 on GPUs of compute capability 8.0 on, fp16 with loss scaling "
                             "on older ones (bf16 there is emulated), float32 on CPU")
    parser.add_argument("--dist-timeout", type=POSITIVE, default=60.0, metavar="MINUTES",
                        help="under torchrun, how long a process waits for the others in a collective (e.g. while "
                             "the first one indexes a large dataset) before the run fails")


def add_training_args(parser, epochs, milestones, lr, momentum, wd):
    """Flags of the stages that train: SGD, the schedule, resuming and mid-epoch checkpoints."""
    parser.add_argument("--epochs", type=POSITIVE_INT, default=epochs, help="training epochs")
    parser.add_argument("--lr", type=POSITIVE, default=lr, help="initial SGD learning rate (for the global batch)")
    parser.add_argument("--momentum", type=SHARE, default=momentum, help="SGD momentum, in [0, 1)")
    parser.add_argument("--wd", type=NON_NEGATIVE, default=wd, help="weight decay (--lr x --wd below 1)")
    parser.add_argument("--schedule", type=POSITIVE_INT, nargs="+", default=None,
                        help=f"epochs at which the lr is multiplied by 0.1, each in [1, --epochs) (default: the "
                             f"paper's {' '.join(map(str, milestones))} of {epochs} epochs, scaled to --epochs, "
                             f"those that fall on the last epoch or later left out)")
    parser.add_argument("--cos", action=argparse.BooleanOptionalAction, default=False,
                        help="half-cosine lr decay over --epochs instead of --schedule")
    parser.add_argument("--resume", default="auto", metavar="PATH",
                        help=f"checkpoint to resume from; auto: <output-dir>/checkpoint.pth when it exists. A resume "
                             f"refuses any setting that differs from the checkpoint's, except "
                             f"{_flags(parser.resumable)}")
    parser.add_argument("--save-every-steps", type=NON_NEGATIVE_INT, default=0, metavar="N",
                        help="also save checkpoint.pth every N steps inside an epoch (0: only at epoch ends)")
    parser.add_argument("--save-every-minutes", type=NON_NEGATIVE, default=30.0, metavar="M",
                        help="also save checkpoint.pth inside an epoch once M minutes passed since the last save "
                             "(0: never); SIGTERM/SIGUSR1 always save and stop")
    parser.add_argument("--log-every", type=POSITIVE_INT, default=10, metavar="N",
                        help="read the step statistics back from the device every N steps (the only steps that "
                             "wait for the GPU): the progress line, the non-finite loss check, and under torchrun "
                             "acting on SIGTERM/SIGUSR1 and --save-every-minutes")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last_3d memory format for the clips and the network (off until measured "
                             "faster: python bench.py gpu)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (off until measured faster: python bench.py gpu)")


def add_unsafe_arg(parser):
    """The opt-in to full unpickling of --pretrained files (models.load_checkpoint)."""
    parser.add_argument(models.UNSAFE_FLAG, action="store_true",
                        help="read --pretrained files that hold more than tensors and plain containers with full "
                             "unpickling. UNSAFE: such a file can run any code on this machine; only for files you "
                             "trust")


def check_training_args(args, problems=()):
    """Refuses training settings (add_training_args, add_run_args) that cannot work or would not do what they say,
    before any work, with the `problems` a script found itself. (The flags' types refuse values out of their
    range.)"""
    problems = list(problems)
    if args.lr * args.wd >= 1:  # each step multiplies the weights by 1 - lr x wd: zero or a sign flip
        problems.append(f"--lr {args.lr:g} x --wd {args.wd:g} = {args.lr * args.wd:g}: weight decay alone would zero "
                        f"the weights or flip their sign in one step; keep the product below 1")
    problems += run_problems(args)
    if problems:
        raise UsageError("; ".join(problems))


def run_problems(args):
    """Settings of add_run_args that cannot work: a global --batch-size that the processes cannot share equally
    (each would silently use a smaller one), clips the backbone cannot take (backbone_problems)."""
    world = get_world_size()
    problems = backbone_problems(args.arch, args.frames, args.crop)
    if args.batch_size % world:
        problems.append(f"--batch-size {args.batch_size} is not divisible by the {world} processes: use a multiple "
                        f"of {world}")
    return problems


def backbone_problems(arch, frames, crop):
    """Clip sizes a backbone cannot take: I3D's 7x7x7 first convolution ('same' padding, stride 2) needs at least 2
    frames of at least 2x2 pixels."""
    if arch == "i3d" and (frames < 2 or crop < 2):
        return [f"--arch i3d needs --frames and --crop of at least 2 (its first 7x7x7 convolution), got --frames "
                f"{frames} --crop {crop}"]
    return []


def fame_problems(beta, frames, crop):
    """What makes FAME meaningless at --beta, --frames and --crop (it runs when beta < 1): its mask comes from frame
    differences, and it keeps int(beta x crop x crop) foreground pixels."""
    if beta >= 1:
        return []
    problems = []
    if frames < 2:
        problems.append(f"FAME (--beta {beta:g}) needs --frames of at least 2 (its mask comes from frame "
                        f"differences), got {frames}")
    if int(beta * crop * crop) == 0:
        problems.append(f"--beta {beta:g} keeps no foreground pixel of a {crop}x{crop} crop (int(beta x {crop * crop} "
                        f"pixels) = 0): every clip would be replaced by another clip; use --beta of at least "
                        f"{1 / (crop * crop):.3g}, or --beta 1 for no FAME")
    return problems


def check_eval_args(args):
    """Refuses a --pretrained path that is not a file (none: a random backbone), a global --batch-size the
    processes cannot share and clips the backbone cannot take (run_problems), before any work."""
    if args.pretrained is not None and not os.path.isfile(args.pretrained):
        raise UsageError(f"--pretrained {args.pretrained}: {not_a_file(args.pretrained)} (give a checkpoint file; "
                         f"none: a randomly initialised backbone)")
    problems = run_problems(args)
    if args.unsafe_unpickle and args.pretrained is None:
        problems.append(f"{models.UNSAFE_FLAG} applies to a --pretrained file, and none is given")
    if problems:
        raise UsageError("; ".join(problems))


def add_eval_args(parser):
    """Flags of the three evaluation protocols (finetune, linear probe, retrieval)."""
    parser.add_argument("--pretrained", default=None, metavar="PATH", type=lambda s: None if s == "none" else s,
                        help="our pretrain checkpoint, the authors' MoCo checkpoint or a backbone state dict; "
                             "none: a randomly initialised backbone")
    add_unsafe_arg(parser)
    parser.add_argument("--train-split", default="train",
                        help="labelled split to train on (retrieve.py: the gallery); synthetic also has "
                             "balanced_train")
    parser.add_argument("--test-split", default="test",
                        help="split to test on (retrieve.py: the queries); synthetic also has test_swapped, "
                             "balanced_test")
    parser.add_argument("--target", default="action", choices=("action", "scene"),
                        help="label to predict; scene: the synthetic benchmark's background family")
    parser.add_argument("--clips", type=POSITIVE_INT, default=10,
                        help="uniformly spaced clips per test video (paper: 10)")
    parser.add_argument("--test-crop", default="resize", choices=("resize", "center"),
                        help="test clips: resize the short side to 8/7 x --crop and take the centre (the paper's "
                             "\"crop and resize\"), or take the centre --crop pixels of the frames as they are (the "
                             "authors' eval.py)")
