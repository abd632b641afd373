"""MoCo + FAME self-supervised pretraining (paper Sec. 4.2 and A.1).

Reproduces the paper's Kinetics-400 pretraining of R(2+1)D-18 (8 GPUs, global batch 64, 200 epochs):

    torchrun --nproc_per_node=8 pretrain.py --beta 0.5 --dataset k400 --data /datasets/kinetics400

and, with no --data, trains on the embedded synthetic background-bias benchmark with CPU-sized settings
(a few minutes on a 2-core CPU), then prints the checkpoint and the evaluation commands to run next:

    python pretrain.py --beta 0.5

Each step: two clips of one video (random crop + flip in the loader) -> FAME on the query clip (or both,
--fame-branches both) with backgrounds from the same per-process batch -> colour augmentation on the device ->
symmetric MoCo InfoNCE, Eq. (1) -> SGD. --beta 1.0 is vanilla MoCo (FAME is never built).

Outputs in --output-dir: checkpoint.pth (every epoch, atomic; a rerun resumes from it), checkpoint_NNNN.pth
(every --save-every epochs), log.jsonl (one line per epoch), args.json. "clips/s" counts both clips of a video.
"""
import argparse
import itertools
import json
import math
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import fame
import models
from models import git_commit, init_distributed, keep_log_until, learning_rate, plain, seed_everything, write_json

# Defaults that depend on the dataset, applied by resolve_args() to flags left unset (None) by the user.
# Paper A.1 for real data; for the synthetic benchmark the sizes of issue 7's sketch, with an epoch count that
# keeps `python pretrain.py --beta 0.5` (data generation included) within 10 minutes on a 2-core CPU, and a
# faster key-encoder momentum because an epoch there is only ~25 steps.
PAPER_DEFAULTS = {"arch": "r2plus1d_18", "batch_size": 64, "epochs": 200, "moco_m": 0.999}
SYNTHETIC_DEFAULTS = {"arch": "r2plus1d_tiny", "batch_size": 32, "epochs": 12, "moco_m": 0.99}
QUEUE_SIZE = {"k400": 65536, "synthetic": 512}  # K; paper A.1: 65536 for K400, 2048 for UCF101 (and the rest)
DEFAULT_QUEUE_SIZE = 2048


def get_args_parser():
    parser = argparse.ArgumentParser(
        "pretrain.py", description="MoCo + FAME self-supervised video pretraining (paper Sec. 4.2, A.1).",
        formatter_class=HelpFormatter)
    data.add_data_args(parser)
    parser.add_argument("--arch", default=None, choices=sorted(models.ARCHS),
                        help="backbone (default: r2plus1d_18; r2plus1d_tiny on the synthetic benchmark)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch (videos), divided over the processes (default: 64; 32 synthetic)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default: 200; {SYNTHETIC_DEFAULTS['epochs']} synthetic)")
    parser.add_argument("--lr", type=float, default=0.01, help="initial SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    parser.add_argument("--schedule", type=int, nargs="+", default=None,
                        help="epochs at which the lr is multiplied by 0.1 (default: 60%% and 90%% of --epochs, "
                             "i.e. 120 180 for the paper's 200)")
    parser.add_argument("--cos", action="store_true", help="half-cosine lr decay per epoch instead of --schedule")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast to bf16 (fp16 with loss scaling on GPUs without bf16) (default: on for "
                             "CUDA, off on CPU)")
    parser.add_argument("--beta", type=float, default=0.5,
                        help="FAME foreground fraction, Eq. (3), in (0, 1]; 1.0 = vanilla MoCo, FAME skipped")
    parser.add_argument("--fame-method", default="fame", choices=fame.METHODS,
                        help="foreground mask variant (paper Table 4)")
    parser.add_argument("--background", default="inter", choices=["inter", "intra"],
                        help="inter: background of another video in the batch; intra: of the other clip of the "
                             "same video (paper Table 3)")
    parser.add_argument("--fame-branches", default="one", choices=["one", "both"],
                        help="apply FAME to the query clip only, or to both clips (paper Table 1)")
    parser.add_argument("--moco-dim", type=int, default=128, help="embedding dimension of the projection head")
    parser.add_argument("--moco-k", type=int, default=None,
                        help="queue size K (default: 65536 for k400, 512 synthetic, 2048 otherwise); rounded down to "
                             "a multiple of 2 x batch and capped at the videos per epoch, with a printed note")
    parser.add_argument("--moco-m", type=float, default=None,
                        help="key encoder momentum m (default: 0.999; 0.99 synthetic)")
    parser.add_argument("--moco-t", type=float, default=0.1, help="InfoNCE temperature T, Eq. (1)")
    parser.add_argument("--output-dir", default=None,
                        help="checkpoints and logs (default: runs/pretrain_<dataset>_<arch>_beta<beta>[_<method>]"
                             "[_intra][_both]_seed<seed>)")
    parser.add_argument("--resume", default=None,
                        help="checkpoint to resume from (default: <output-dir>/checkpoint.pth when it exists)")
    parser.add_argument("--save-every", type=int, default=50,
                        help="also keep checkpoint_NNNN.pth every this many epochs (0: never)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, sampling and augmentation")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="time N training steps (after 2 warm-up steps) and report clips/s, the share of "
                             "each part of a step and peak memory; writes no checkpoint")
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None, whose meaning the help text itself states."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def resolve_args(args):
    """Fill every default left as None (see PAPER_DEFAULTS / SYNTHETIC_DEFAULTS) and reject bad settings before
    any work. K is adjusted later, once the dataset size is known (queue_size())."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 < args.beta <= 1:
        error(f"--beta {args.beta} is outside (0, 1]: use e.g. 0.5 (FAME) or 1.0 (vanilla MoCo)")
    if args.resume is not None and not Path(args.resume).is_file():
        error(f"--resume {args.resume}: no such checkpoint file")
    if args.cos and args.schedule is not None:
        error("--cos and --schedule exclude each other: drop one")
    data.resolve_data_args(args)
    defaults = SYNTHETIC_DEFAULTS if args.dataset == "synthetic" else PAPER_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.moco_k is None:
        args.moco_k = QUEUE_SIZE.get(args.dataset, DEFAULT_QUEUE_SIZE)
    if args.schedule is None:
        args.schedule = [round(0.6 * args.epochs), round(0.9 * args.epochs)]
    if args.amp is None:
        args.amp = torch.cuda.is_available()
    if args.output_dir is None:
        name = f"pretrain_{args.dataset}_{args.arch}_beta{args.beta:g}"
        for flag, default in (("fame_method", "fame"), ("background", "inter"), ("fame_branches", "one")):
            if getattr(args, flag) != default:
                name += f"_{getattr(args, flag)}"
        args.output_dir = str(Path("runs") / f"{name}_seed{args.seed}")

    for name in ("epochs", "batch_size", "moco_k", "moco_dim"):
        if getattr(args, name) < 1:
            error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.moco_m < 1:
        error(f"--moco-m {args.moco_m} must be in [0, 1)")
    if args.batch_size % world_size:
        error(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes: "
              f"use a multiple of {world_size}")
    if args.beta < 1 and args.background == "inter" and args.batch_size // world_size < 2:
        error(f"inter-video FAME needs at least 2 clips per process to swap backgrounds; the batch per process "
              f"is {args.batch_size // world_size}: raise --batch-size or use --background intra")
    return args


def main(args):
    """Pretrain; returns the (unwrapped) MoCo model."""
    resolve_args(args)
    rank, world_size, device = init_distributed()
    is_main = rank == 0
    torch.manual_seed(args.seed)  # identical initialisation (and queue) on every process
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    if is_main:
        print(f"pretrain.py at git {commit}, {world_size} process(es) on {device}; effective settings:")
        for name, value in sorted(vars(args).items()):
            print(f"  {name}: {value}")

    dataset = data.build_dataset(args, "train", "pretrain")
    local_batch = args.batch_size // world_size
    loader = data.build_loader(dataset, local_batch, args, train=True, seed=args.seed)
    K = queue_size(args.moco_k, args.batch_size, len(loader) * args.batch_size)
    if K != args.moco_k and is_main:
        print(f"note: --moco-k {args.moco_k} -> {K}: K must be a multiple of the {2 * args.batch_size} keys enqueued "
              f"per step and at most the {len(loader) * args.batch_size} videos of an epoch, so that a query "
              f"rarely meets a key of its own video among the negatives")
    args.moco_k = K

    model = models.MoCo(lambda: models.build_backbone(args.arch), dim=args.moco_dim, K=K, m=args.moco_m,
                        T=args.moco_t, mlp=True).to(device)
    ddp_model = model
    if world_size > 1:
        # The queue is identical on every rank by construction (same seed, all-gathered keys): re-sending it
        # (32 MB at K=65536) from rank 0 at every forward, as broadcast_buffers=True would, is waste.
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            broadcast_buffers=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.wd)
    amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type) if args.amp and amp_dtype == torch.float16 else None
    fame_op = fame.FAME(beta=args.beta, method=args.fame_method) if args.beta < 1 else None
    step_fn = Step(ddp_model, fame_op, optimizer, scaler, args, device, amp_dtype)

    if args.benchmark:
        benchmark(step_fn, loader, args, device, world_size, is_main)
        return model

    start_epoch = 0
    resume = args.resume or (out / "checkpoint.pth" if (out / "checkpoint.pth").is_file() else None)
    if resume is not None:
        start_epoch = load_state(resume, model, optimizer, scaler, args, is_main)
    if is_main:
        write_json(out / "args.json", {**vars(args), "git_commit": commit, "world_size": world_size})
        keep_log_until(out / "log.jsonl", start_epoch)

    for epoch in range(start_epoch, args.epochs):
        seed_everything(args.seed, rank, epoch)  # a resumed run draws the same numbers as an uninterrupted one
        loader.sampler.set_epoch(epoch)
        lr = learning_rate(epoch, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = train_one_epoch(step_fn, loader, epoch, args, world_size, is_main)
        stats["key_sim"] = round(model.key_similarity(), 4)  # collapse monitor: 1.0 = all keys the same
        if is_main:  # log first: a run killed between the two lines redoes this epoch and rewrites its log line
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "lr": lr, **stats}) + "\n")
            state = {"encoder_q": model.encoder_q.state_dict(), "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "args": plain(vars(args)),
                     "git_commit": commit, **({"scaler": scaler.state_dict()} if scaler else {})}
            models.save_checkpoint(state, out / "checkpoint.pth")
            if args.save_every and (epoch + 1) % args.save_every == 0:
                models.save_checkpoint(state, out / f"checkpoint_{epoch + 1:04d}.pth")

    if is_main:
        if start_epoch >= args.epochs:
            print(f"{resume} already holds {start_epoch} epochs (--epochs {args.epochs}): nothing to train")
        print(f"checkpoint: {out / 'checkpoint.pth'}")
        print("next, evaluate it:\n" + "\n".join(f"  {cmd}" for cmd in next_commands(args, out / "checkpoint.pth")))
    if world_size > 1:
        dist.destroy_process_group()
    return model


class Step:
    """One training step on a batch from the loader, split into parts that --benchmark times separately."""

    def __init__(self, model, fame_op, optimizer, scaler, args, device, amp_dtype):
        self.model, self.fame_op, self.optimizer, self.scaler = model, fame_op, optimizer, scaler
        self.args, self.device, self.amp_dtype = args, device, amp_dtype

    def __call__(self, batch, timer):
        q = batch["q"].to(self.device, non_blocking=True).float().div_(255)  # (B, 3, T, S, S) in [0, 1]
        k = batch["k"].to(self.device, non_blocking=True).float().div_(255)  # (B, 3, T, S, S)
        timer.mark("data")
        if self.fame_op is not None:
            intra = self.args.background == "intra"  # background = the other clip of the same video (Table 3)
            q_merged = self.fame_op(q, background=k if intra else None)  # Eq. (4); None: derangement in batch
            if self.args.fame_branches == "both":
                k = self.fame_op(k, background=q if intra else None)
            q = q_merged
        timer.mark("fame")
        q = data.augment(q, "pretrain")  # (B, 3, T, S, S), normalized
        k = data.augment(k, "pretrain")
        timer.mark("augment")
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.args.amp):
            logits, labels = self.model(q, k)  # (2B, 1 + K), (2B,): both clips act as query and as key
        loss = F.cross_entropy(logits.float(), labels)  # Eq. (1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        acc = (logits.detach().argmax(1) == labels).float().mean()
        timer.mark("encoders")
        return torch.stack([loss.detach(), acc, batch["failed"].sum().to(loss.device, torch.float)])  # (3,)


def train_one_epoch(step_fn, loader, epoch, args, world_size, is_main, timer=None, max_steps=None):
    """Train over one epoch (or max_steps batches); returns the epoch's log entry. Stops the whole run on a
    non-finite loss before anything of this epoch is saved."""
    timer = timer or Timer(None, enabled=False)
    step_fn.model.train()
    steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    totals = torch.zeros(3, dtype=torch.float64)  # sums of loss, acc, failed videos
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main, dynamic_ncols=True,
               mininterval=1.0)
    start = time.perf_counter()
    for i, batch in enumerate(itertools.islice(loader, steps)):
        stats = step_fn(batch, timer)
        if world_size > 1:
            dist.all_reduce(stats)
            stats[:2] /= world_size
        stats = stats.double().cpu()
        if not math.isfinite(stats[0]):
            error(f"non-finite loss ({stats[0].item()}) at epoch {epoch + 1}, step {i + 1}: stopping without "
                  f"saving; the last good checkpoint is left as it was. Try a lower --lr or --no-amp.")
        totals += stats
        clips_per_s = 2 * args.batch_size * (i + 1) / (time.perf_counter() - start)
        lr = step_fn.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{stats[0]:.3f}", acc=f"{stats[1]:.3f}", lr=f"{lr:.3g}", clips_s=f"{clips_per_s:.1f}",
                        refresh=False)
        bar.update()
        timer.mark("other")
        timer.end_step(2 * args.batch_size)
    bar.close()
    seconds = time.perf_counter() - start
    return {"loss": totals[0].item() / steps, "acc": totals[1].item() / steps, "time": round(seconds, 2),
            "clips_per_s": round(2 * args.batch_size * steps / seconds, 2), "skipped": int(totals[2])}


class Timer:
    """Seconds spent per named part of a training step (--benchmark). mark(name) books the time since the previous
    mark to `name`; on CUDA it synchronizes first, so queued GPU work is booked to the part that queued it. The first
    `warmup` steps are not counted. Disabled, it costs nothing."""

    def __init__(self, device, enabled=True, warmup=2):
        self.device, self.enabled, self.warmup = device, enabled, warmup
        self.seconds, self.steps, self.clips, self.last = defaultdict(float), 0, 0, time.perf_counter()
        self.cpu_start = time.process_time()

    def mark(self, name):
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] += now - self.last
        self.last = now

    def end_step(self, clips):
        if not self.enabled:
            return
        self.warmup -= 1
        if self.warmup >= 0:  # still warming up: forget this step
            self.seconds.clear()
            self.cpu_start = time.process_time()
            if self.warmup == 0 and self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.steps += 1
        self.clips += clips


def benchmark(step_fn, loader, args, device, world_size, is_main):
    """Time args.benchmark steps (continuing over epochs if needed) and print where a step's time goes."""
    timer = Timer(device, warmup=2)
    epoch = 0
    while timer.steps < args.benchmark:
        loader.sampler.set_epoch(epoch)
        train_one_epoch(step_fn, loader, epoch, args, world_size, is_main, timer,
                        max_steps=args.benchmark - timer.steps + max(timer.warmup, 0))
        epoch += 1
    if not is_main:
        return
    total = sum(timer.seconds.values())
    if device.type == "cuda":
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (max_memory_allocated)"
    else:  # ru_maxrss is in KiB on Linux; loader workers are other processes and not included
        peak = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (main process)"
    print(f"benchmark: {timer.steps} steps of global batch {args.batch_size} ({args.arch}, {args.frames}x{args.crop}"
          f"x{args.crop}, amp {args.amp}, {world_size} process(es), {args.workers} workers, threads "
          f"{torch.get_num_threads()}) on {device}: {timer.clips / total:.1f} clips/s, "
          f"{1000 * total / timer.steps:.1f} ms/step, {peak}")
    cpu = time.process_time() - timer.cpu_start  # all threads of this process; below wall x threads = shared CPU
    print(f"  main-process CPU time {1000 * cpu / timer.steps:.1f} ms/step ({cpu / total:.2f} cores busy on average)")
    names = {"data": "data waiting + copy", "fame": "FAME", "augment": "colour augmentation",
             "encoders": "encoders fwd/bwd + SGD", "other": "logging"}
    for name, label in names.items():
        s = timer.seconds.get(name, 0.0)
        print(f"  {label:<24} {1000 * s / timer.steps:8.1f} ms/step {100 * s / total:5.1f}%")


def queue_size(K, batch_size, videos_per_epoch):
    """The queue size used for the requested K: a multiple of the 2 * batch keys enqueued per step (symmetric
    loss), at most one epoch's videos (then the queue spans at most half an epoch of keys, and a query finds a
    stale key of its own video there with probability <= 1/8), and at least one step's keys."""
    per_step = 2 * batch_size
    return max(per_step, min(K, videos_per_epoch) // per_step * per_step)


def load_state(path, model, optimizer, scaler, args, is_main):
    """Restore a checkpoint written by main(); returns the number of epochs it holds."""
    ckpt = models.load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    if is_main:
        ignore = {"epochs", "resume", "output_dir", "workers", "benchmark", "save_every"}
        changed = {k: (v, getattr(args, k, None)) for k, v in ckpt["args"].items()
                   if k not in ignore and plain(getattr(args, k, None)) != v}
        print(f"resuming from {path} after epoch {ckpt['epoch']}"
              + (f"; settings that differ from the checkpoint's (old, new): {changed}" if changed else ""))
    return ckpt["epoch"]


def next_commands(args, ckpt):
    """Evaluation commands for a checkpoint (K400 pretraining is evaluated on UCF101, as in the paper)."""
    if args.dataset == "synthetic":
        target = ""
    elif args.dataset == "k400":
        target = " --dataset ucf101 --data PATH/TO/UCF101"
    else:
        target = f" --dataset {args.dataset} --data {args.data}"
    common = f" --arch {args.arch} --frames {args.frames} --stride {args.stride} --crop {args.crop}{target}"
    fast = " --cache-features" if args.dataset == "synthetic" else ""  # seconds instead of minutes on a CPU
    return [f"python linear_probe.py --pretrained {ckpt}{common}{fast}",
            f"python retrieve.py --pretrained {ckpt}{common}",
            f"python finetune.py --pretrained {ckpt}{common}"]


def error(message):
    """Stop with a message that says what to change (exit status 1, no traceback)."""
    sys.exit(f"pretrain.py: error: {message}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
