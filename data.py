"""Video data: dataset listings, probing and the index cache, PyAV decoding, clip sampling, VideoDataset, the
sharded sampler and loaders, and the batched colour augmentation (paper Sec. 4.2 and appendix A.2).

Layouts (`--data` is the root):
    ucf101    UCF-101/<Class>/v_*.avi, ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt
    hmdb51    <class>/*.avi, testTrainMulti_7030_splits/<class>_test_splitN.txt (1 train, 2 test, 0 unused)
    k400      train/<class>/*.mp4 and val/<class>/*.mp4 (classes sorted by name), or the common download:
              train/*.mp4 and val/*.mp4 named <youtube_id>_<start>_<end>.mp4 with annotations/{train,val}.csv
    diving48  rgb/<vid_name>.mp4, Diving48_V2_train.json, Diving48_V2_test.json (48 classes, V2 labels)
    folder    <class>/<video>; splits from train.txt/test.txt ("<class>/<video>" lines) or train/ and test/
              subfolders, else every video is in both splits
    synthetic generated on first use (synthetic.py) under --data, else $FAME_CACHE or ~/.cache/fame

Check a dataset before training: every video is probed once (the index is cached under $FAME_CACHE or
~/.cache/fame and reused while the files are unchanged) and the unreadable or missing ones are listed:

    python data.py --scan --dataset k400 --data /datasets/kinetics400

Videos shorter than a clip's span ((frames-1)*stride+1) are read with a reduced stride (down to 1); if they
have fewer frames than the clip, the last frame is repeated.
"""
import argparse
import bisect
import csv
import hashlib
import json
import math
import os
import warnings
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter

import fame
import utils

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
DATASETS = ("synthetic", "ucf101", "hmdb51", "k400", "diving48", "folder")
MODES = ("pretrain", "train", "test")
VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v", ".flv", ".ogv")
LAYOUTS = {
    "ucf101": "<root>/UCF-101/<Class>/v_*.avi and <root>/ucfTrainTestlist/{classInd.txt, trainlist0N.txt, "
              "testlist0N.txt}",
    "hmdb51": "<root>/<class>/*.avi and <root>/testTrainMulti_7030_splits/<class>_test_splitN.txt",
    "k400": "<root>/train/<class>/*.mp4 and <root>/val/<class>/*.mp4, or <root>/train/*.mp4 and <root>/val/*.mp4 "
            "(<youtube_id>_<start>_<end>.mp4) with <root>/annotations/train.csv and <root>/annotations/val.csv "
            "(columns label,youtube_id,time_start,time_end,split)",
    "diving48": "<root>/rgb/<vid_name>.mp4 with <root>/Diving48_V2_train.json and <root>/Diving48_V2_test.json",
    "folder": "<root>/<class>/<video> (optionally <root>/train.txt, <root>/test.txt or <root>/{train,test}/<class>/)",
    "synthetic": "<root>/splits/<split>.txt and <root>/meta.json, written by synthetic.py",
}
SPLIT_DATASETS = ("ucf101", "hmdb51")  # the datasets with official splits (--split)
INDEX_VERSION = 1
MAX_RETRIES = 10
MIN_CROP_SCALE = 0.2  # RandomResizedCrop's area share is in [0.2, 1] (A.2)
DECODE_THREADS_MIN_PIXELS = 640 * 480  # below this, frame threading costs more than it gains
SYNTHETIC_FLAGS = {"synthetic_version": 3, "synthetic_videos": 800, "synthetic_size": 64, "synthetic_length": 48,
                   "synthetic_seed": 0, "synthetic_sprite": "video", "synthetic_backdrop": "pattern"}


def add_data_args(parser):
    """The data flags of every stage script."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="dataset root (synthetic: the folder the benchmark is generated in; default $FAME_CACHE or "
                        "~/.cache/fame)")
    g.add_argument("--dataset", default=None, choices=DATASETS,
                   help="layout of --data (required with --data; without it, the synthetic benchmark)")
    g.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="official split (ucf101, hmdb51)")
    g.add_argument("--frames", type=int, default=16, help="frames per clip T")
    g.add_argument("--stride", type=int, default=2, help="temporal stride between the frames of a clip")
    g.add_argument("--crop", type=int, default=112, help="crop size S (S x S pixels)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=[MIN_CROP_SCALE, 1.0], metavar=("MIN", "MAX"),
                   help="area share of the frame that a training RandomResizedCrop takes (A.2: 0.2 1)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flip of training clips, probability 0.5 (A.2)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="loader worker processes per process (and index probing processes)")
    g.add_argument("--synthetic-version", type=int, default=SYNTHETIC_FLAGS["synthetic_version"], choices=(1, 2, 3),
                   help="synthetic: benchmark version; 2: one object look in every video, per-video motion parameters; "
                        "3: version 2 with the object at a quarter of the frame "
                        "(synthetic.render)")
    g.add_argument("--synthetic-videos", type=int, default=SYNTHETIC_FLAGS["synthetic_videos"],
                   help="synthetic: training videos per training split (test splits get half as many)")
    g.add_argument("--synthetic-size", type=int, default=SYNTHETIC_FLAGS["synthetic_size"],
                   help="synthetic: frame size (square, even)")
    g.add_argument("--synthetic-length", type=int, default=SYNTHETIC_FLAGS["synthetic_length"],
                   help="synthetic: frames per video")
    g.add_argument("--synthetic-seed", type=int, default=SYNTHETIC_FLAGS["synthetic_seed"],
                   help="synthetic: generator seed")
    g.add_argument("--synthetic-sprite", default=SYNTHETIC_FLAGS["synthetic_sprite"], choices=("video", "shared"),
                   help="synthetic version 1: video: each video draws its object's shape, colour and size; shared: one "
                        "white disc of one size in every video (texture still per video)")
    g.add_argument("--synthetic-backdrop", default=SYNTHETIC_FLAGS["synthetic_backdrop"], choices=("pattern", "flat"),
                   help="synthetic: the scene family's pattern, or a flat grey frame under the same motions (the "
                        "scene-free twin of the benchmark: only the motion tells videos apart)")
    return parser


def check_data_args(args):
    """Refuses bad or ineffective data flags before any work, and checks the dataset layout."""
    for name in ("frames", "stride", "crop"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise ValueError(f"--crop-scale needs 0 < MIN <= MAX <= 1, got {args.crop_scale[0]} {args.crop_scale[1]}")
    if getattr(args, "clips", 1) < 1:
        raise ValueError(f"--clips must be positive, got {args.clips}")
    if args.split != 1 and args.dataset not in SPLIT_DATASETS:
        raise ValueError(f"--split has no effect for {args.dataset} (only {' and '.join(SPLIT_DATASETS)} have splits)")
    if args.dataset == "synthetic":
        if args.synthetic_size % 2 or args.synthetic_size < 16:
            raise ValueError(f"--synthetic-size must be even and >= 16, got {args.synthetic_size}")
        if args.synthetic_videos < 8 or args.synthetic_length < 2:
            raise ValueError("--synthetic-videos must be >= 8 and --synthetic-length >= 2")
        if args.synthetic_version != 1 and args.synthetic_sprite != "video":
            raise ValueError("--synthetic-sprite applies to --synthetic-version 1 (versions 2 and 3 have one look for all)")
        return args
    given = [f"--{k.replace('_', '-')}" for k, v in SYNTHETIC_FLAGS.items() if getattr(args, k) != v]
    if given:
        raise ValueError(f"{', '.join(given)} only apply to --dataset synthetic, not {args.dataset}")
    if getattr(args, "target", "action") == "scene":
        raise ValueError("--target scene needs --dataset synthetic (only it has scene labels)")
    for split in ("train", "test"):
        list_videos(args.dataset, args.data, split, args.split)
    return args


# ----------------------------------------------------------------------------------------------------------
# Listings: (relative paths, labels, class names, scene labels or None) of a split, one function per layout


class _LayoutError(Exception):
    pass


def _read_lines(path):
    if not os.path.isfile(path):
        raise _LayoutError(f"missing split file {path}")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _require_dir(path):
    if not os.path.isdir(path):
        raise _LayoutError(f"missing folder {path}")


def _is_video(name):
    return name.lower().endswith(VIDEO_EXTS)


def _class_dirs(folder):
    _require_dir(folder)
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise _LayoutError(f"no class folders in {folder}")
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


def _list_ucf101(root, split, fold):
    lists = os.path.join(root, "ucfTrainTestlist")
    classes = [line.split()[1] for line in _read_lines(os.path.join(lists, "classInd.txt"))]
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    lines = [line.split()[0] for line in _read_lines(os.path.join(lists, f"{split}list0{fold}.txt"))]
    _require_dir(os.path.join(root, "UCF-101"))
    return ([os.path.join("UCF-101", line) for line in lines], [lookup[line.split("/")[0].lower()] for line in lines],
            classes, None)


def _list_hmdb51(root, split, fold):
    lists = os.path.join(root, "testTrainMulti_7030_splits")
    suffix = f"_test_split{fold}.txt"
    files = sorted(f for f in os.listdir(lists) if f.endswith(suffix)) if os.path.isdir(lists) else []
    if not files:
        raise _LayoutError(f"no *{suffix} files in {lists}")
    classes = [f[: -len(suffix)] for f in files]
    tag = "1" if split == "train" else "2"
    rel, labels = [], []
    for label, (name, f) in enumerate(zip(classes, files)):
        for line in _read_lines(os.path.join(lists, f)):
            video, t = line.split()[:2]
            if t == tag:
                rel.append(os.path.join(name, video))
                labels.append(label)
    return rel, labels, classes, None


def _list_k400(root, split, fold):
    sub = "train" if split == "train" else "val"
    if os.path.isfile(os.path.join(root, "annotations", "train.csv")):  # the common download: flat folders + csv
        rows = {s: _kinetics_rows(os.path.join(root, "annotations", f"{s}.csv")) for s in ("train", sub)}
        classes = sorted({row["label"] for row in rows["train"]})
        lookup = {c: i for i, c in enumerate(classes)}
        _require_dir(os.path.join(root, sub))
        rel = [os.path.join(sub, f"{r['youtube_id']}_{int(r['time_start']):06d}_{int(r['time_end']):06d}.mp4")
               for r in rows[sub]]
        return rel, [lookup[r["label"]] for r in rows[sub]], classes, None
    if not os.path.isdir(os.path.join(root, "train")):
        raise _LayoutError("neither annotations/train.csv nor a train/ folder")
    classes = _class_dirs(os.path.join(root, "train"))
    _require_dir(os.path.join(root, sub))
    return (*_scan_classes(os.path.join(root, sub), classes, sub), classes, None)


def _kinetics_rows(path):
    if not os.path.isfile(path):
        raise _LayoutError(f"missing annotation file {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"label", "youtube_id", "time_start", "time_end"} - set(rows[0] if rows else ())
    if missing:
        raise _LayoutError(f"{path} lacks the columns {sorted(missing)}")
    return rows


def _list_diving48(root, split, fold):
    path = os.path.join(root, f"Diving48_V2_{split}.json")
    if not os.path.isfile(path):
        raise _LayoutError(f"missing split file {path}")
    _require_dir(os.path.join(root, "rgb"))
    with open(path) as f:
        entries = json.load(f)
    vocab = os.path.join(root, "Diving48_vocab.json")
    if os.path.isfile(vocab):
        with open(vocab) as f:
            classes = ["_".join(map(str, v)) for v in json.load(f)]
    else:
        classes = [f"class_{i:02d}" for i in range(48)]
    return ([os.path.join("rgb", e["vid_name"] + ".mp4") for e in entries], [int(e["label"]) for e in entries],
            classes, None)


def _list_folder(root, split, fold):
    if os.path.isfile(os.path.join(root, "train.txt")):
        lines = [line.split()[0] for line in _read_lines(os.path.join(root, f"{split}.txt"))]
        classes = sorted({line.split("/")[0] for line in _read_lines(os.path.join(root, "train.txt"))})
        lookup = {c: i for i, c in enumerate(classes)}
        return lines, [lookup[line.split("/")[0]] for line in lines], classes, None
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
        classes = _class_dirs(os.path.join(root, "train"))
        return (*_scan_classes(os.path.join(root, split), classes, split), classes, None)
    classes = _class_dirs(root)
    rel, labels = _scan_classes(root, classes)
    if not rel:
        raise _LayoutError("no video files in the class folders")
    return rel, labels, classes, None


def _list_synthetic(root, split, fold):
    import synthetic

    if split not in synthetic.SPLITS:
        raise ValueError(f"synthetic split must be one of {synthetic.SPLITS}, got {split!r}")
    fields = [line.split() for line in _read_lines(os.path.join(root, "splits", f"{split}.txt"))]
    return [f[0] for f in fields], [int(f[1]) for f in fields], list(synthetic.MOTIONS), [int(f[2]) for f in fields]


LISTINGS = {"ucf101": _list_ucf101, "hmdb51": _list_hmdb51, "k400": _list_k400, "diving48": _list_diving48,
            "folder": _list_folder, "synthetic": _list_synthetic}


def list_videos(dataset, root, split, fold=1):
    """(relative paths, labels, class names, scene labels or None) of `split` ("train" or "test"; synthetic has
    more) of the dataset at `root`. Raises FileNotFoundError naming the expected layout when it does not fit."""
    if dataset not in LISTINGS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if dataset != "synthetic" and split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for {dataset}, got {split!r}")
    try:
        if root is None or not os.path.isdir(root):
            raise _LayoutError("root folder not found")
        return LISTINGS[dataset](root, split, fold)
    except _LayoutError as e:
        raise FileNotFoundError(f"{dataset} dataset at {root!r}: {e}. Expected layout: {LAYOUTS[dataset]}") from None


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
            s.codec_context.thread_count = 1  # one probing process per core
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


def cache_dir():
    """Where dataset indexes (and, without --data, the synthetic benchmark) are cached: $FAME_CACHE, else
    ~/.cache/fame. Shared by every run, so a dataset is probed once."""
    return os.environ.get("FAME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fame")


def load_index(root, rel_paths, cache_file, workers=1, progress=None):
    """Probe entries for rel_paths (a dict, or an error string for unreadable or missing files), probing in
    parallel only the files that are new or whose size or mtime changed since the cache was written. progress:
    a description to show a progress bar with."""
    with utils.file_lock(cache_file + ".lock"):
        cached = {}
        if os.path.isfile(cache_file):
            try:
                with open(cache_file) as f:
                    index = json.load(f)
                if index.get("version") == INDEX_VERSION:
                    cached = index["entries"]
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
            paths = [os.path.join(root, r) for r in todo]
            for rel, result in zip(todo, utils.parallel_map(_probe_safe, paths, workers, progress)):
                entries[rel] = result
            index = {"version": INDEX_VERSION, "root": os.path.abspath(root),
                     "entries": {**cached, **{r: [stats[r], entries[r]] for r in stats}}}
            utils.atomic_write(cache_file, lambda f: json.dump(index, f, separators=(",", ":")), mode="w")
    return [entries[rel] for rel in rel_paths]


def index_split(args, split, progress=None):
    """The listing of `split` and the index entries of its videos: (root, rel, labels, classes, scenes, infos)."""
    root = synthetic_root(args) if args.dataset == "synthetic" else args.data
    rel, labels, classes, scenes = list_videos(args.dataset, root, split, args.split)
    key = hashlib.sha1(f"{args.dataset}|{os.path.abspath(root)}|{split}|{args.split}".encode()).hexdigest()[:12]
    cache_file = os.path.join(cache_dir(), f"index_{args.dataset}_{split}_{key}.json")
    infos = load_index(root, rel, cache_file, max(1, args.workers), progress)
    return root, rel, labels, classes, scenes, infos


def synthetic_root(args):
    """The synthetic benchmark of args' --synthetic-* flags under --data (default: cache_dir()), generated on
    first use."""
    import synthetic

    return synthetic.ensure(args.data or cache_dir(), args.synthetic_videos, args.synthetic_size,
                            args.synthetic_length, args.synthetic_seed, args.synthetic_sprite, max(1, args.workers),
                            args.synthetic_version, args.synthetic_backdrop)


# ----------------------------------------------------------------------------------------------------------
# Decoding


def decode_frames(path, indices, info, short_side=None, counter=None):
    """RGB uint8 frames (len(indices), H, W, 3) at the given frame indices (any order, repeats allowed).
    Seeks to the keyframe before each needed run only when that skips frames; converts only the frames that
    are used. short_side: a number, or a function of the frame's (width, height); frames whose short side
    exceeds twice it are downscaled to it right away (bounded memory for HD/4K sources), smaller ones keep their
    size, as scaling in swscale costs about 3x the colour conversion and the loader's one crop and resize does it
    anyway. counter["decoded"] counts decoded frames.

    In a loader worker, decoding and colour conversion use one thread (the workers are the parallelism);
    elsewhere FFmpeg picks the thread count."""
    fps, tb, start = info["fps"], Fraction(*info["tb"]), info["start"]
    scale = float(tb) * fps

    def index_of(pts):
        return round((pts - start) * scale)

    key_idx = [index_of(k) for k in info["keys"]] if info["pts"] else [0]
    want = sorted(set(indices))
    out, decoded = {}, 0
    threads = 1 if torch.utils.data.get_worker_info() is not None else 0  # 0: FFmpeg's choice
    with av.open(path) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = threads
        if threads != 1 and s.codec_context.width * s.codec_context.height >= DECODE_THREADS_MIN_PIXELS:
            s.thread_type = "AUTO"  # frame threading pays off only on large frames
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
                                                    interpolation="AREA", threads=threads).to_ndarray()
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
    if callable(short_side):
        short_side = short_side(w, h)
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
    return torch.Generator().manual_seed(utils.derive_seed(seed, epoch, index))


def clip_layout(num_frames, frames, stride):
    """(stride, span) used for a video: the stride shrinks (down to 1) for videos shorter than the span."""
    if frames > 1 and (frames - 1) * stride + 1 > num_frames:
        stride = max(1, (num_frames - 1) // (frames - 1))
    return stride, (frames - 1) * stride + 1


def clip_indices(start, num_frames, frames, stride):
    """Frame indices of one clip; indices past the end repeat the last frame."""
    return [min(start + k * stride, num_frames - 1) for k in range(frames)]


def random_resized_crop_box(h, w, scale=(MIN_CROP_SCALE, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
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


def center_crop_box(h, w, crop, resize=True):
    """The centred square box of the test-time crop. resize: the box that equals resizing the short side to
    round(crop * 8 / 7) and cropping crop x crop (the paper's "crop and resize"); else crop x crop pixels of the
    frame as it is (the authors' eval.py), or its short side when that is smaller."""
    side = round(min(h, w) * crop / round(crop * 8 / 7)) if resize else crop
    side = max(1, min(side, h, w))
    return (h - side) // 2, (w - side) // 2, side, side


def training_short_side(crop, min_scale=MIN_CROP_SCALE):
    """Short side, for frames of width w and height h, below which a training frame is never shrunk: the one at
    which the smallest RandomResizedCrop box (area share min_scale, aspect 3/4) still has `crop` pixels on its
    short side, so that no crop is upsampled (at 0.2: about 2.24 x crop for 4:3 frames, 1.94 x for 16:9)."""
    return lambda w, h: math.ceil(crop / math.sqrt(min_scale * 3 / 4 * max(w, h) / min(w, h)))


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
    """Indexed videos, sampled per mode. An item is a dict: pretrain {"q", "k"}: two clips (3, T, S, S) uint8 of
    one video at different times, each with its own random crop and flip (with background_clip, also "bg": a
    third clip at a third time, the intra-video background of Table 3); train {"clip", "label"}: one random clip;
    test {"clip": (N, 3, T, S, S), "label"}: N uniformly spaced centre-cropped clips (test_crop: "resize" or
    "center", see center_crop_box); all with "index" (the requested video) and "failed" (videos replaced
    because they failed to decode)."""

    def __init__(self, root, rel_paths, labels, classes, infos, mode, frames, stride, crop, clips=10,
                 scenes=None, name="", test_crop="resize", background_clip=False, crop_scale=(MIN_CROP_SCALE, 1.0),
                 flip=True):
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
        self.test_crop, self.background_clip = test_crop, background_clip
        self.crop_scale, self.flip = tuple(crop_scale), flip
        if mode != "test":
            self.short_side = training_short_side(crop, self.crop_scale[0])
        else:  # a raw centre crop needs the frames as they are
            self.short_side = round(crop * 8 / 7) if test_crop == "resize" else None
        self.counter = {}

    def __len__(self):
        return len(self.paths)

    def starts(self, i, generator=None):
        """Clip start frames for video i in this mode (random for pretrain/train)."""
        n = self.num_frames[i]
        stride, span = clip_layout(n, self.frames, self.stride)
        last = max(0, n - span)
        if self.mode == "pretrain":
            return _distinct_starts(last, 3 if self.background_clip else 2, generator), stride
        if self.mode == "train":
            return [_randint(0, last, generator)], stride
        return [round(last * k / max(1, self.clips - 1)) for k in range(self.clips)], stride

    def load(self, i, generator=None):
        starts, stride = self.starts(i, generator)
        n = self.num_frames[i]
        idx = [j for s in starts for j in clip_indices(s, n, self.frames, stride)]
        frames = decode_frames(self.paths[i], idx, self.infos[i], self.short_side, self.counter)
        frames = frames.reshape(len(starts), self.frames, *frames.shape[1:])  # (N, T, H, W, 3)
        h, w = frames.shape[2:4]
        if self.mode == "test":
            box = center_crop_box(h, w, self.crop, resize=self.test_crop == "resize")
            return {"clip": torch.stack([crop_resize(f, box, self.crop) for f in frames]),
                    "label": int(self.labels[i])}  # (N, 3, T, S, S)
        # the flip is drawn with or without --flip, so that --no-flip changes nothing else
        clips = [crop_resize(f, random_resized_crop_box(h, w, self.crop_scale, generator=generator), self.crop,
                             (_uniform(0, 1, generator) < 0.5) and self.flip) for f in frames]
        if self.mode == "pretrain":
            return dict(zip(("q", "k", "bg"), clips))
        return {"clip": clips[0], "label": int(self.labels[i])}

    def __getitem__(self, key):
        """key: a dataset index (randomness from torch's global RNG), or (index, seed, epoch) as the sampler of
        build_loader yields (randomness from item_generator). A failing video is reported and replaced by a
        random other one (at most MAX_RETRIES times); "index" stays the requested index so that evaluation
        gathers stay complete."""
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


def _distinct_starts(last, n, generator=None):
    """n random start frames in [0, last], all different when the video allows it (last + 1 >= n)."""
    starts = []
    for _ in range(n):
        if len(starts) > last:
            starts.append(_randint(0, last, generator))
            continue
        s = _randint(0, last - len(starts), generator)
        for taken in sorted(starts):  # the s-th value not taken yet
            s += s >= taken
        starts.append(s)
    return starts


def build_dataset(args, split, mode, background_clip=False):
    """VideoDataset of `split` ("train" / "test"; synthetic also "test_swapped", "balanced_train",
    "balanced_test") in `mode` (MODES). Unreadable videos are warned about once and left out."""
    root, rel, labels, classes, scenes, infos = index_split(args, split)
    ok = [k for k, info in enumerate(infos) if isinstance(info, dict)]
    bad = [(rel[k], infos[k]) for k in range(len(rel)) if not isinstance(infos[k], dict)]
    if bad and utils.is_main_process():
        shown = "; ".join(f"{r} ({why})" for r, why in bad[:20]) + (" ..." if len(bad) > 20 else "")
        warnings.warn(f"{args.dataset}/{split}: skipping {len(bad)} unreadable of {len(rel)} videos: {shown}",
                      RuntimeWarning)
    if not ok:
        raise RuntimeError(f"{args.dataset}/{split} at {root!r}: no readable videos (layout: {LAYOUTS[args.dataset]})")
    if getattr(args, "target", "action") == "scene":
        import synthetic

        labels, classes = scenes, list(synthetic.SCENES)
    return VideoDataset(root, [rel[k] for k in ok], [labels[k] for k in ok], classes, [infos[k] for k in ok],
                        mode, args.frames, args.stride, args.crop, getattr(args, "clips", 1),
                        None if scenes is None else [scenes[k] for k in ok], name=f"{args.dataset}/{split}",
                        test_crop=getattr(args, "test_crop", "resize"), background_clip=background_clip,
                        crop_scale=args.crop_scale, flip=args.flip)


# ----------------------------------------------------------------------------------------------------------
# Distributed sampling and evaluation


class ShardedSampler(torch.utils.data.Sampler):
    """One permutation of the videos per epoch, seeded by (seed, epoch) and shared by all processes; process r
    takes the r-th contiguous slice, so that an epoch partitions the videos exactly. drop_last (training): the
    permutation is cut to a multiple of the process count so that all get equal counts; otherwise slices differ
    by at most one video and nothing is padded. It yields (index, seed, epoch), from which VideoDataset draws the
    item's randomness, so that an item is the same in any loader worker. set_epoch(epoch, skip) starts the epoch
    after `skip` of this process's items (a resume inside an epoch)."""

    def __init__(self, dataset, shuffle=True, seed=0):
        self.n, self.shuffle, self.seed = len(dataset), shuffle, seed
        self.rank, self.world_size = utils.get_rank(), utils.get_world_size()
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def _bounds(self):
        if self.shuffle:  # drop_last
            per = self.n // self.world_size
            return self.rank * per, (self.rank + 1) * per
        return self.n * self.rank // self.world_size, self.n * (self.rank + 1) // self.world_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(utils.derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        lo, hi = self._bounds()
        return iter([(i, self.seed, self.epoch) for i in order[lo + self.skip:hi].tolist()])

    def __len__(self):
        lo, hi = self._bounds()
        return max(0, hi - lo - self.skip)


def build_loader(dataset, batch_size, args, train=True, seed=0):
    """DataLoader over this process's shard, `batch_size` items per process. train: shuffled, drop_last."""
    sampler = ShardedSampler(dataset, shuffle=train, seed=seed)
    if train and len(sampler) < batch_size:
        raise ValueError(f"{dataset.name}: {len(dataset)} videos over {sampler.world_size} processes is less than "
                         f"one batch of {batch_size}")
    workers = max(0, args.workers)
    # Loader workers run torch on one thread (DataLoader's own setting) and decode on one (decode_frames).
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(utils.derive_seed(seed, sampler.rank)),  # the workers' base seed
        prefetch_factor=4 if workers > 0 else None)


def build_test_loader(dataset, args):
    """Loader of a test-mode dataset: each item holds --clips clips of one video; about --batch-size clips per
    batch."""
    return build_loader(dataset, max(1, args.batch_size // utils.get_world_size() // args.clips), args, train=False)


# ----------------------------------------------------------------------------------------------------------
# Device-side batched augmentation (A.2): one parameter draw per clip, applied to all its frames

AUGMENTATION = {"gray": 0.2, "jitter": 0.8, "blur": 0.5}  # probabilities of A.2's basic augmentation
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
BLUR_SIGMA = (0.1, 2.0)
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                        dtype=torch.float64)


def _unit_float(clips):
    return clips.float().div_(255) if clips.dtype == torch.uint8 else clips


def normalize(clips):
    """Kinetics mean/std normalization of clips (..., 3, T, H, W): uint8, or float in [0, 1]."""
    clips = _unit_float(clips)
    shape = (3, 1, 1, 1)
    mean = torch.tensor(KINETICS_MEAN, device=clips.device, dtype=clips.dtype).view(shape)
    std = torch.tensor(KINETICS_STD, device=clips.device, dtype=clips.dtype).view(shape)
    return (clips - mean) / std


def augment(clips, generator=None):
    """A.2's basic augmentation, the same for all frames of a clip, then normalization: (B, 3, T, H, W) uint8 or
    float in [0, 1] -> normalized float clips on the same device. RandomGrayscale (p 0.2), then ColorJitter
    (p 0.8), then GaussianBlur (p 0.5), in the authors' order; the loader did the crop and flip. Every parameter
    is drawn per clip, from `generator` (else torch's global RNG)."""
    x = _unit_float(clips)
    return normalize(apply_augmentation(x, augmentation_params(len(x), generator, x.device)))


def augmentation_params(B, generator=None, device=None):
    """Per-clip parameters of augment() (B,) each, the identity where an augmentation is not drawn, and the order
    of the four jitter operations (one random order per batch, as kornia's ColorJitter draws it)."""
    draw_device = generator.device if generator is not None else device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=draw_device).to(device)

    gray = rand(B) < AUGMENTATION["gray"]
    jitter = (rand(B) < AUGMENTATION["jitter"]).float()
    brightness, contrast, saturation = ((1 + (2 * rand(B) - 1) * f) * jitter + (1 - jitter) for f in JITTER[:3])
    hue = (2 * rand(B) - 1) * JITTER[3] * jitter
    order = torch.randperm(4, generator=generator, device=draw_device).tolist()
    blur = rand(B) < AUGMENTATION["blur"]
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * rand(B)
    return {"gray": gray, "brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue,
            "order": order, "blur": blur, "sigma": sigma}


def apply_augmentation(x, p):
    """augment() with given parameters (augmentation_params) on float clips in [0, 1], before normalization."""
    x = torch.where(p["gray"].view(-1, 1, 1, 1, 1), _gray(x).expand_as(x), x)
    x = color_jitter(x, p["brightness"], p["contrast"], p["saturation"], p["hue"], p["order"])
    if bool(p["blur"].any()):
        x = x.clone()
        x[p["blur"]] = gaussian_blur(x[p["blur"]], p["sigma"][p["blur"]])
    return x


def _gray(x):
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1, 1)
    return (x * w).sum(1, keepdim=True)  # (B, 1, T, H, W)


def _hue_matrices(h):
    """(B, 3, 3) RGB -> RGB hue rotations by h turns: a rotation of the chroma plane of YIQ (a linear stand-in for
    kornia's HSV hue shift, so that all clips take one batched matmul)."""
    a = 2 * math.pi * h.double()
    rot = torch.zeros(len(h), 3, 3, dtype=torch.float64, device=h.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
    yiq = _RGB2YIQ.to(h.device)
    return torch.linalg.inv(yiq) @ rot @ yiq


def color_jitter(x, b, c, s, h, order=(0, 1, 2, 3)):
    """Brightness, contrast, saturation and hue, applied in `order` (0-3 in that list), with per-clip factors (B,)
    (identity: 1, 1, 1, 0); each result is clamped to [0, 1]. Contrast blends towards the clip's mean grey over
    all frames, so that it is constant in time."""
    v = (-1, 1, 1, 1, 1)

    def contrast(x):
        m = _gray(x).mean(dim=(1, 2, 3, 4), keepdim=True)
        return c.view(v) * x + (1 - c.view(v)) * m

    ops = (lambda x: x * b.view(v), contrast, lambda x: s.view(v) * x + (1 - s.view(v)) * _gray(x),
           lambda x: torch.einsum("bij,bjthw->bithw", _hue_matrices(h).to(x.dtype), x))
    for k in order:
        x = ops[k](x).clamp_(0, 1)
    return x


def gaussian_blur(x, sigma):
    """Separable Gaussian blur of (B, C, T, H, W) with a per-clip sigma (B,), by grouped convolutions with a
    reflected border. The kernel size follows the authors' moco/loader.py (Augment_GPU_pre): int(0.1 * crop) // 2
    * 2 + 1, i.e. 11 at 112 px and 23 at 224 (the paper's "radius 23"), as FAME's smoothing."""
    B, C, T, H, W = x.shape
    r = min(fame.gaussian_kernel_size(min(H, W)) // 2, min(H, W) - 1)
    if r == 0:
        return x
    k = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    w = torch.exp(-(k[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B * C, 2r + 1)
    y = F.pad(x.reshape(1, B * C, T * H, W), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, w.view(B * C, 1, 1, -1), groups=B * C).view(B, C, T, H, W)  # along W
    y = F.pad(y.transpose(3, 4).reshape(1, B * C, T * W, H), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, w.view(B * C, 1, 1, -1), groups=B * C).view(B, C, T, W, H)  # along H
    return y.transpose(3, 4)


# ----------------------------------------------------------------------------------------------------------
# Command line: scan a dataset


def get_args_parser():
    parser = argparse.ArgumentParser(description="Scan a dataset: build its index and list the videos that cannot "
                                                 "be read", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(parser)
    parser.add_argument("--scan", action="store_true", required=True, help="probe every video of both splits")
    parser.add_argument("--report", default=None,
                        help="text file listing the unreadable and missing videos (default: "
                             "unreadable_<dataset>.txt in the index cache folder)")
    return parser


def main(args):
    if args.dataset is None:
        raise SystemExit("--dataset is required (" + ", ".join(DATASETS) + ")")
    check_data_args(args)
    lines, total, bad = [], 0, 0
    for split in ("train", "test"):
        root, rel, _, _, _, infos = index_split(args, split, progress=f"probing {args.dataset}/{split}")
        failed = [(r, why) for r, why in zip(rel, infos) if not isinstance(why, dict)]
        missing = sum(why == "file not found" for _, why in failed)
        total, bad = total + len(rel), bad + len(failed)
        print(f"{args.dataset}/{split}: {len(rel)} videos, {len(rel) - len(failed)} readable, "
              f"{len(failed) - missing} unreadable, {missing} missing")
        lines += [f"# {split}: {len(failed) - missing} unreadable, {missing} missing of {len(rel)} under {root}"]
        lines += [f"{r}\t{why}" for r, why in failed]
    report = args.report or os.path.join(cache_dir(), f"unreadable_{args.dataset}.txt")
    utils.atomic_write(report, lambda f: f.write("\n".join(lines) + "\n"), mode="w")
    print(f"{bad} of {total} videos cannot be read (training leaves them out): listed in {report}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
