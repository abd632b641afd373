"""Video data: dataset listings, probing and the index cache, PyAV decoding, clip sampling with the random crop and
flip (paper Sec. 4.2 and appendix A.2), VideoDataset, the sharded sampler and loaders. The colour augmentation
runs on the device, in augment.py.

Layouts (`--data` is the root):
    ucf101    UCF-101/<Class>/v_*.avi, ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt
    hmdb51    <class>/*.avi, testTrainMulti_7030_splits/<class>_test_splitN.txt (1 train, 2 test, 0 unused)
    k400      train/<class>/*.mp4 and val/<class>/*.mp4 (classes sorted by name), or the common download:
              train/*.mp4 and val/*.mp4 named <youtube_id>_<start>_<end>.mp4 with annotations/{train,val}.csv
    diving48  rgb/<vid_name>.mp4, Diving48_V2_train.json, Diving48_V2_test.json (48 classes, V2 labels)
    folder    <class>/<video>; splits from train.txt/test.txt ("<class>/<video>" lines) or train/ and test/
              subfolders, else every video is in both splits (pretraining; the evaluations refuse this)

In list files, a line's fields are separated by tabs if it has any; otherwise its numbers (labels) are read from the
end of the line, so that paths may hold spaces.
    synthetic generated on first use (synthetic.py) under --data, else $FAME_CACHE or ~/.cache/fame

Check a dataset before training: every video is probed once (the index is cached under $FAME_CACHE or
~/.cache/fame and reused while the files are unchanged) and the unreadable or missing ones are listed:

    python data.py --scan --dataset k400 --data /datasets/kinetics400

Write a training copy that a loader worker reads 2-5x faster (bench.py loader on Kinetics-like sources: a keyframe
every 16 frames, frames no larger than the crops need, x264's fast-decode tuning; the same layout, frame rate and
frame count), then pass it as --data to any stage. It is resumable, never writes into the source, and lists the unreadable videos it leaves out:

    python data.py --prepare --dataset k400 --data /datasets/kinetics400 --out /datasets/kinetics400_prepared

Videos shorter than a clip's span ((frames-1)*stride+1) are read with a reduced stride (down to 1); if they
have fewer frames than the clip, the last frame is repeated.
"""
import argparse
import bisect
import csv
import functools
import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter

import utils

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
    g.add_argument("--workers", type=int, default=utils.default_workers(),
                   help="loader worker processes per process (and index probing and --prepare encoding processes); "
                        "default: this process's CPU cores shared among the processes on this machine, at most 8")
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
    """Refuses bad or ineffective data flags before any work (utils.UsageError), and checks the dataset layout."""
    for name in ("frames", "stride", "crop"):
        if getattr(args, name) < 1:
            raise utils.UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.frames == 3:  # fame.py and augment.py refuse (B, 3, 3, H, W): frames and colours cannot be told apart
        raise utils.UsageError("--frames 3: clips of 3 frames cannot be told from frames-first (B, T, 3, H, W) clips "
                               "by their shape, and FAME and the augmentation refuse them; use 2, or 4 or more")
    if args.workers < 0:
        raise utils.UsageError(f"--workers must be at least 0 (0: load in the main process), got {args.workers}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise utils.UsageError(f"--crop-scale needs 0 < MIN <= MAX <= 1, got {args.crop_scale[0]} "
                               f"{args.crop_scale[1]}")
    if getattr(args, "clips", 1) < 1:
        raise utils.UsageError(f"--clips must be positive, got {args.clips}")
    if args.split != 1 and args.dataset not in SPLIT_DATASETS:
        raise utils.UsageError(f"--split has no effect for {args.dataset} (only {' and '.join(SPLIT_DATASETS)} have "
                               f"splits)")
    if args.data is not None and os.path.exists(args.data) and not os.path.isdir(args.data):
        raise utils.UsageError(f"--data {args.data} is a file; give the dataset's root folder")
    if args.dataset == "synthetic":
        if args.synthetic_size % 2 or args.synthetic_size < 16:
            raise utils.UsageError(f"--synthetic-size must be even and >= 16, got {args.synthetic_size}")
        if args.synthetic_videos < 8 or args.synthetic_length < 2:
            raise utils.UsageError("--synthetic-videos must be >= 8 and --synthetic-length >= 2")
        if args.synthetic_version != 1 and args.synthetic_sprite != "video":
            raise utils.UsageError("--synthetic-sprite applies to --synthetic-version 1 (versions 2 and 3 have one "
                                   "look for all)")
        return args
    given = [f"--{k.replace('_', '-')}" for k, v in SYNTHETIC_FLAGS.items() if getattr(args, k) != v]
    if given:
        raise utils.UsageError(f"{', '.join(given)} only apply to --dataset synthetic, not {args.dataset}")
    if getattr(args, "target", "action") == "scene":
        raise utils.UsageError("--target scene needs --dataset synthetic (only it has scene labels)")
    if args.data is None:
        raise utils.UsageError(f"--data is required with --dataset {args.dataset} (layout: {LAYOUTS[args.dataset]})")
    if not os.path.isdir(args.data):
        raise utils.UsageError(f"--data {args.data}: no such folder (expected layout: {LAYOUTS[args.dataset]})")
    for split in ("train", "test"):
        list_videos(args.dataset, args.data, split, args.split)
    return args


def check_held_out(args):
    """Refuses an evaluation whose test videos would be its training videos: a folder dataset without split lists
    or split folders lists every video in both splits (fine for pretraining, which only reads train). A split made
    up here is no way out: clips cut from one source video usually share a class folder, and a random split puts
    such near-duplicates on both sides."""
    if args.dataset == "folder" and not has_test_split(args.dataset, args.data) and args.test_split == "test":
        raise utils.DataError(f"--data {args.data}: {FOLDER_NO_TEST}")


# ----------------------------------------------------------------------------------------------------------
# Listings: (relative paths, labels, class names, scene labels or None) of a split, one function per layout


class LayoutError(utils.DataError, FileNotFoundError):
    """A dataset root whose files do not fit the layout of --dataset."""


class _LayoutError(Exception):
    pass


def _read_lines(path):
    if not os.path.isfile(path):
        raise _LayoutError(f"missing split file {path}")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _path_and_numbers(line):
    """A list line "<path> [<number> ...]" -> (path, [numbers as str]): the fields are split at tabs if the line
    has any, else the numbers are the whitespace-separated integers at the end, so that a path may hold spaces
    ("walk/my clip.mp4 1" -> ("walk/my clip.mp4", ["1"]))."""
    if "\t" in line:
        path, *fields = [f.strip() for f in line.split("\t")]
        return path, fields
    path, numbers = re.fullmatch(r"(.+?)((?:\s+-?\d+)*)\s*", line).groups()
    return path, numbers.split()


def _label_of(lookup, name, where):
    """The label of class `name` listed in `where`; a class unknown to the training split is named."""
    try:
        return lookup[name]
    except KeyError:
        raise _LayoutError(f"{where} lists class {name!r}, which the training split does not have (classes: "
                           f"{', '.join(list(lookup)[:10])}{' ...' if len(lookup) > 10 else ''})") from None


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
    """The videos of class folders; refuses a class folder the training split lacks, warns about empty class
    folders and counts files that are not taken as videos (another extension)."""
    unknown = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name not in classes)
    if unknown:
        raise _LayoutError(f"{folder} has class folders that the training split does not have: "
                           f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
    rel, labels, empty, others = [], [], [], []
    for label, name in enumerate(classes):
        d = os.path.join(folder, name)
        if os.path.isdir(d):
            files = [f for f in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, f))]
            videos = [f for f in files if _is_video(f)]
            others += [os.path.join(name, f) for f in files if not _is_video(f)]
            if not videos:
                empty.append(name)
            rel += [os.path.join(prefix, name, f) for f in videos]
            labels += [label] * len(videos)
    if empty:
        warnings.warn(f"{folder}: {len(empty)} class folders hold no videos: {', '.join(empty[:10])}"
                      f"{' ...' if len(empty) > 10 else ''}", RuntimeWarning)
    if others:
        warnings.warn(f"{folder}: {len(others)} files are not taken as videos (extensions other than "
                      f"{' '.join(VIDEO_EXTS)}), e.g. {', '.join(others[:3])}", RuntimeWarning)
    return rel, labels


def _list_ucf101(root, split, fold):
    lists = os.path.join(root, "ucfTrainTestlist")
    classes = [line.split(None, 1)[-1] for line in _read_lines(os.path.join(lists, "classInd.txt"))]
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    listed = os.path.join(lists, f"{split}list0{fold}.txt")
    lines = [_path_and_numbers(line)[0] for line in _read_lines(listed)]
    _require_dir(os.path.join(root, "UCF-101"))
    return ([os.path.join("UCF-101", line) for line in lines],
            [_label_of(lookup, line.split("/")[0].lower(), listed) for line in lines], classes, None)


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
            video, numbers = _path_and_numbers(line)
            if numbers[:1] == [tag]:
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
        where = os.path.join(root, "annotations", f"{sub}.csv")
        return rel, [_label_of(lookup, r["label"], where) for r in rows[sub]], classes, None
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


FOLDER_NO_TEST = ("this folder dataset has no test split (no train.txt and test.txt, no train/ and test/ folders), "
                  "so its test videos would be its training videos and every score would be overstated: list the "
                  "held-out videos in train.txt and test.txt (README, 'Errors and bad input')")


def has_test_split(dataset, root):
    """False only for a folder dataset without split lists or split folders: both its splits list every video."""
    return dataset != "folder" or os.path.isfile(os.path.join(root, "train.txt")) or (
        os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")))


def _list_folder(root, split, fold):
    if os.path.isfile(os.path.join(root, "train.txt")):
        listed = os.path.join(root, f"{split}.txt")
        lines = [_path_and_numbers(line)[0] for line in _read_lines(listed)]
        classes = sorted({_path_and_numbers(line)[0].split("/")[0]
                          for line in _read_lines(os.path.join(root, "train.txt"))})
        lookup = {c: i for i, c in enumerate(classes)}
        return lines, [_label_of(lookup, line.split("/")[0], listed) for line in lines], classes, None
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
        raise utils.UsageError(f"synthetic split must be one of {synthetic.SPLITS}, got {split!r}")
    fields = [line.split() for line in _read_lines(os.path.join(root, "splits", f"{split}.txt"))]
    return [f[0] for f in fields], [int(f[1]) for f in fields], list(synthetic.MOTIONS), [int(f[2]) for f in fields]


LISTINGS = {"ucf101": _list_ucf101, "hmdb51": _list_hmdb51, "k400": _list_k400, "diving48": _list_diving48,
            "folder": _list_folder, "synthetic": _list_synthetic}


def list_videos(dataset, root, split, fold=1):
    """(relative paths, labels, class names, scene labels or None) of `split` ("train" or "test"; synthetic has
    more) of the dataset at `root`. Raises LayoutError (a FileNotFoundError) naming the expected layout when it does
    not fit."""
    if dataset not in LISTINGS:
        raise utils.UsageError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if dataset != "synthetic" and split not in ("train", "test"):
        raise utils.UsageError(f"split must be 'train' or 'test' for {dataset}, got {split!r}")
    try:
        if root is None or not os.path.isdir(root):
            raise _LayoutError("root folder not found")
        return LISTINGS[dataset](root, split, fold)
    except _LayoutError as e:
        raise LayoutError(f"{dataset} dataset at {root!r}: {e}. Expected layout: {LAYOUTS[dataset]}") from None


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
    # shared by the readers of an existing index (the processes of a run check it at once), exclusive to build one
    with utils.file_lock(cache_file + ".lock", shared=os.path.isfile(cache_file),
                         waiting="another run is indexing the same videos; this one goes on when it is done"):
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


def decode_frames(path, indices, info, short_side=None, counter=None, threads=None, stacked=True):
    """RGB uint8 frames (len(indices), H, W, 3) at the given frame indices (any order, repeats allowed); with
    stacked=False a list of (H, W, 3) arrays instead, a repeated index sharing one array (no copy).
    Seeks to the keyframe before each needed run only when that skips frames; converts only the frames that
    are used. short_side: a number, or a function of the frame's (width, height); frames whose short side
    exceeds twice it are downscaled to it right away (bounded memory for HD/4K sources), smaller ones keep their
    size, as scaling in swscale costs about 3x the colour conversion and the loader's one crop and resize does it
    anyway. counter["decoded"] counts decoded frames.

    threads: decoding and colour conversion threads; None: one in a loader worker (the workers are the
    parallelism), else FFmpeg's choice."""
    index_of, scale = frame_index(info), float(Fraction(*info["tb"])) * info["fps"]
    start = info["start"]
    key_idx = [index_of(k) for k in info["keys"]] if info["pts"] else [0]
    want = sorted(set(indices))
    out, decoded = {}, 0
    if threads is None:
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
    frames = [out[have[max(0, bisect.bisect_right(have, j) - 1)]] for j in indices]
    return np.stack(frames) if stacked else frames


HEAP_KEEP = 64 * 2 ** 20  # freed memory a process keeps for the next sample's frames


@functools.cache
def keep_frame_memory():
    """Makes glibc serve the frames' large buffers from the heap and keep up to HEAP_KEEP bytes of it when they
    are freed (once per process). By default each sample maps its converted frames afresh and unmaps them after,
    and the page faults of every new mapping cost more than the colour conversion itself. The same memory is
    reused sample after sample, so it stays flat. Elsewhere than glibc, nothing changes."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 * 2 ** 20)  # M_MMAP_THRESHOLD: glibc's largest, only bigger blocks get their own mapping
    mallopt(-1, HEAP_KEEP)  # M_TRIM_THRESHOLD


def frame_index(info):
    """pts -> frame index of a video's index entry: its frame rate's count of frames since its first pts."""
    start, scale = info["start"], float(Fraction(*info["tb"])) * info["fps"]
    return lambda pts: round((pts - start) * scale)


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
    return functools.partial(_training_short_side, crop, min_scale)


def _training_short_side(crop, min_scale, w, h):
    return math.ceil(crop / math.sqrt(min_scale * 3 / 4 * max(w, h) / min(w, h)))


def crop_resize(frames, box, size, flip=False):
    """T frames (H,W,3) uint8 numpy (an array (T,H,W,3) or a list) -> (3,T,size,size) uint8 tensor: crop first,
    then one antialiased resize."""
    top, left, ch, cw = box
    crops = np.stack([f[top:top + ch, left:left + cw] for f in frames])  # the one copy of the pixels used
    x = torch.from_numpy(crops).permute(0, 3, 1, 2)  # (T,3,h,w), channels_last in memory
    if (ch, cw) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if flip:
        x = x.flip(-1)
    # (T,S,S,3) in memory -> (3,T,S,S): numpy's 2-D transpose is about twice as fast as torch's permuted copy
    y = np.ascontiguousarray(x.permute(0, 2, 3, 1).contiguous().numpy().reshape(-1, 3).T)
    return torch.from_numpy(y).view(3, -1, size, size)


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
        self.counter, self.decode_threads, self.warned_small = {}, None, False  # decode_threads: decode_frames'

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
        keep_frame_memory()
        starts, stride = self.starts(i, generator)
        n = self.num_frames[i]
        idx = [j for s in starts for j in clip_indices(s, n, self.frames, stride)]
        frames = decode_frames(self.paths[i], idx, self.infos[i], self.short_side, self.counter,
                               self.decode_threads, stacked=False)
        frames = [frames[k:k + self.frames] for k in range(0, len(frames), self.frames)]  # N clips of T (H, W, 3)
        h, w = frames[0][0].shape[:2]
        if min(h, w) < self.crop and not self.warned_small:
            self.warned_small = True  # once per dataset and loader process
            warnings.warn(f"{self.name}: frames of {w}x{h} (e.g. {self.paths[i]}) are smaller than --crop "
                          f"{self.crop}: clips are upsampled", RuntimeWarning)
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
        build_loader yields (randomness from item_generator). In training, a failing video is reported and
        replaced by a random other one (at most MAX_RETRIES times); in test mode it is reported and its item holds
        blank clips with "failed" 1, for the evaluation to leave out (never scored as another video). "index" stays
        the requested index so that evaluation gathers stay complete."""
        index, generator = (key[0], item_generator(*key[1:], key[0])) if isinstance(key, tuple) else (key, None)
        i, failed = index, 0
        while True:
            try:
                item = self.load(i, generator)
                break
            except (av.error.FFmpegError, RuntimeError, ValueError, OSError) as e:
                failed += 1
                if self.mode == "test":
                    warnings.warn(f"could not decode {self.paths[i]} ({e}); left out of the evaluation",
                                  RuntimeWarning)
                    clips = torch.zeros(self.clips, 3, self.frames, self.crop, self.crop, dtype=torch.uint8)
                    item = {"clip": clips, "label": int(self.labels[i])}
                    break
                warnings.warn(f"could not decode {self.paths[i]} ({e}); replacing it with a random video",
                              RuntimeWarning)
                if failed > MAX_RETRIES:
                    raise utils.DataError(f"{failed} videos in a row failed to decode, last {self.paths[i]} "
                                          f"({e})") from e
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
        raise utils.DataError(f"{args.dataset}/{split} at {root!r}: no readable videos (layout: "
                              f"{LAYOUTS[args.dataset]})")
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
        raise utils.UsageError(f"--batch-size: {dataset.name} has {len(dataset)} videos over {sampler.world_size} "
                               f"processes, less than one batch of {batch_size} per process")
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
# A prepared training copy: every video re-encoded for fast random access, in the source's layout

META_EXTS = (".txt", ".csv", ".json")  # split lists, Kinetics annotations, Diving48 and synthetic metadata
PREPARE_CRF = 20


def prepare_size(w, h, short_side):
    """Even (width, height) of a prepared copy: the short side brought down to `short_side` (an int or a function
    of (w, h), None: kept), the aspect ratio kept; a frame already at or below it keeps its size (to an even
    number of pixels, as yuv420p needs)."""
    if callable(short_side):
        short_side = short_side(w, h)
    if short_side is None or min(w, h) <= short_side:
        return max(2, w - w % 2), max(2, h - h % 2)
    r = short_side / min(w, h)
    return 2 * math.ceil(w * r / 2), 2 * math.ceil(h * r / 2)  # never below short_side


def encode_copy(src, f, info, gop=16, short_side=None, crf=PREPARE_CRF, fastdecode=True, threads=1):
    """Re-encodes the video at `src` (index entry `info`) into the open file `f`: H.264 (libx264) yuv420p in MP4,
    no audio, a closed GOP of exactly `gop` frames, short side per prepare_size(). Frame k of the copy is frame k
    of the source as decode_frames() reads it (a frame missing at a pts gap or at the end repeats the one before),
    at the source's frame rate, so that a clip covers the same seconds in both."""
    rate = Fraction(info["fps"]).limit_denominator(100000)
    total, index_of = info["frames"], frame_index(info)
    params = f"keyint={gop}:min-keyint={gop}:scenecut=0"
    options = {"crf": str(crf), "x264-params": params, **({"tune": "fastdecode"} if fastdecode else {})}
    with av.open(src) as c, av.open(f, "w", format="mp4") as out:
        s = c.streams.video[0]
        s.codec_context.thread_count = threads
        o = out.add_stream("libx264", rate=rate, options=options)
        o.width, o.height = prepare_size(s.codec_context.width, s.codec_context.height, short_side)
        o.pix_fmt, o.codec_context.thread_count, o.codec_context.time_base = "yuv420p", threads, 1 / rate
        last, k, count = None, 0, -1
        for frame in c.decode(s):
            count += 1
            idx = index_of(frame.pts) if (info["pts"] and frame.pts is not None) else count
            count = idx
            if k >= total:
                break  # every frame of the copy is written
            if idx < k:
                continue  # a repeated or late timestamp
            image = frame.reformat(width=o.width, height=o.height, format="yuv420p", interpolation="AREA")
            while k <= min(idx, total - 1):  # frames before the first decoded one repeat it, as in decode_frames
                k = _encode_frame(out, o, image if k == idx or last is None else last, k)
            last = image
        while last is not None and k < total:
            k = _encode_frame(out, o, last, k)
        out.mux(o.encode(None))
    if last is None:
        raise RuntimeError("no frames decoded")


def _encode_frame(out, stream, image, k):
    image.pts, image.time_base = k, stream.codec_context.time_base  # the encoder keeps its own reference
    image.pict_type = av.video.frame.PictureType.NONE  # a source's I frame would force a keyframe off the GOP
    out.mux(stream.encode(image))
    return k + 1


def _prepare_one(job):
    """Writes one prepared file atomically (a kill leaves no file under its name); the error text, or None."""
    src, dst, info, opts = job
    try:
        utils.atomic_write(dst, lambda f: encode_copy(src, f, info, **opts))
    except (av.error.FFmpegError, RuntimeError, ValueError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def prepare(args):
    """`data.py --prepare`: the prepared copy of every readable video of every split in args.out, in the source's
    layout (directories and its .txt/.csv/.json files, written last); resumable, see the module docstring."""
    if args.split != 1:
        raise utils.UsageError("--prepare copies the videos of every split; leave out --split")
    check_data_args(args)
    src = synthetic_root(args) if args.dataset == "synthetic" else args.data
    out = os.path.join(args.out, os.path.basename(src)) if args.dataset == "synthetic" else args.out
    a, b = os.path.realpath(src), os.path.realpath(out)
    if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
        raise utils.UsageError(f"--out {args.out} overlaps the source {src}: write the copy to a folder outside it")
    settings = {"source": a, "dataset": args.dataset, "gop": args.gop, "crf": args.crf, "fastdecode": args.fastdecode,
                "short_side": args.short_side or f"training_short_side({args.crop}, {args.crop_scale[0]})"}
    os.makedirs(out, exist_ok=True)
    with utils.file_lock(os.path.join(out, ".prepare.lock")):
        old = os.path.join(out, "prepare.json")
        if os.path.isfile(old):
            with open(old) as f:
                if json.load(f) != settings:
                    raise utils.UsageError(f"{out} holds a copy made with other settings ({old}); use another --out")
        utils.write_json(old, settings)
        return _prepare_locked(args, src, out)


def _prepare_locked(args, src, out):
    import synthetic

    t0 = time.time()
    jobs, bad = {}, {}
    splits = synthetic.SPLITS if args.dataset == "synthetic" else ("train", "test")
    for fold in (1, 2, 3) if args.dataset in SPLIT_DATASETS else (1,):
        fold_args = argparse.Namespace(**{**vars(args), "split": fold})
        for split in splits:
            try:
                _, rel, _, _, _, infos = index_split(fold_args, split, f"probing {args.dataset}/{split}")
            except FileNotFoundError:
                if fold == 1:
                    raise
                continue  # a dataset copy with only the first official split's lists
            for r, info in zip(rel, infos):
                (jobs if isinstance(info, dict) else bad)[r] = info
    for dirpath, dirnames, filenames in os.walk(out):  # files a killed run left half-written
        for name in filenames:
            if re.fullmatch(r"\..+\.\d+\.tmp", name):
                os.remove(os.path.join(dirpath, name))
    short_side = args.short_side or training_short_side(args.crop, args.crop_scale[0])
    opts = {"gop": args.gop, "short_side": short_side, "crf": args.crf, "fastdecode": args.fastdecode,
            "threads": max(1, (os.cpu_count() or 1) // max(1, args.workers))}
    todo = [(os.path.join(src, r), os.path.join(out, r), info, opts) for r, info in jobs.items()
            if not os.path.isfile(os.path.join(out, r))]
    errors = utils.parallel_map(_prepare_one, todo, args.workers, f"preparing {args.dataset} ({len(todo)} videos)")
    failed = {os.path.relpath(job[1], out): why for job, why in zip(todo, errors) if why is not None}
    for dirpath, dirnames, filenames in os.walk(src):  # the layout: folders (empty classes too), then lists
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, src)
        os.makedirs(os.path.join(out, rel_dir), exist_ok=True)
        for name in sorted(filenames):
            if name.lower().endswith(META_EXTS) and name not in ("prepare.json", "prepare_report.txt"):
                if not (args.dataset == "synthetic" and name == "meta.json"):
                    _copy_atomic(os.path.join(dirpath, name), os.path.join(out, rel_dir, name))
    if args.dataset == "synthetic":  # its presence marks a complete benchmark
        _copy_atomic(os.path.join(src, "meta.json"), os.path.join(out, "meta.json"))
    left_out = {**bad, **failed}
    report = args.report or os.path.join(out, "prepare_report.txt")
    lines = [f"# {len(left_out)} of {len(jobs) + len(bad)} videos of {src} left out of {out}"]
    utils.atomic_write(report, lambda f: f.write("\n".join(lines + [f"{r}\t{why}" for r, why in sorted(
        left_out.items())]) + "\n"), mode="w")
    size_in = sum(os.path.getsize(os.path.join(src, r)) for r in jobs)
    size_out = sum(os.path.getsize(os.path.join(out, r)) for r in jobs if r not in failed)
    print(f"prepared {len(jobs) - len(failed)} of {len(jobs) + len(bad)} videos into {out} in "
          f"{time.time() - t0:.0f} s: {len(todo) - len(failed)} encoded now, {len(jobs) - len(todo)} already there, "
          f"{len(bad)} unreadable and {len(failed)} failing to encode left out (listed in {report}); "
          f"{size_in / 2 ** 20:,.1f} MiB in, {size_out / 2 ** 20:,.1f} MiB out")
    return {"videos": len(jobs) - len(failed), "encoded": len(todo) - len(failed), "left_out": left_out,
            "bytes_in": size_in, "bytes_out": size_out, "root": out}


def _copy_atomic(src, dst):
    with open(src, "rb") as f:
        utils.atomic_write(dst, lambda out: shutil.copyfileobj(f, out))


# ----------------------------------------------------------------------------------------------------------
# Command line: scan a dataset, or write a prepared copy


PREPARE_FLAGS = {"out": None, "gop": 16, "short_side": None, "crf": PREPARE_CRF, "fastdecode": True}


def get_args_parser():
    parser = argparse.ArgumentParser(description="Scan a dataset (build its index and list the videos that cannot "
                                                 "be read), or write a prepared training copy of it",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(parser)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--scan", action="store_true", help="probe every video of both splits")
    mode.add_argument("--prepare", action="store_true",
                      help="write a training copy of every readable video of every split to --out, in the same "
                           "layout (use it as --data), re-encoded for fast random access; resumable")
    parser.add_argument("--report", default=None,
                        help="text file listing the unreadable and missing videos (default: --scan: "
                             "unreadable_<dataset>.txt in the index cache folder; --prepare: "
                             "prepare_report.txt in the copy)")
    g = parser.add_argument_group("prepare")
    g.add_argument("--out", default=None, help="folder of the prepared copy (outside --data)")
    g.add_argument("--gop", type=int, default=PREPARE_FLAGS["gop"],
                   help="a keyframe every GOP frames (closed GOPs): a clip's decoding starts at most GOP-1 frames "
                        "before it")
    g.add_argument("--short-side", type=int, default=PREPARE_FLAGS["short_side"],
                   help="short side of the copy's frames, smaller ones keep theirs (default: the smallest at which "
                        "no training crop of --crop and --crop-scale is upsampled, training_short_side: 251 px for "
                        "4:3 frames, 217 for 16:9 at --crop 112)")
    g.add_argument("--crf", type=int, default=PREPARE_FLAGS["crf"],
                   help="x264 constant rate factor (lower: larger files closer to the source)")
    g.add_argument("--fastdecode", action=argparse.BooleanOptionalAction, default=PREPARE_FLAGS["fastdecode"],
                   help="x264 tune=fastdecode (no CABAC, no deblocking): faster decoding, somewhat larger files")
    return parser


REPORT_HEADER = "# data.py --scan report: unreadable and missing videos"
SHOWN_UNREADABLE = 5  # unreadable files printed by --scan (all are in the report)


def main(args):
    if args.dataset is None:
        raise utils.UsageError("--dataset is required (" + ", ".join(DATASETS) + ")")
    if args.prepare:
        if args.out is None:
            raise utils.UsageError("--prepare needs --out, the folder of the copy")
        if args.gop < 1 or not 0 <= args.crf <= 51 or (args.short_side is not None and args.short_side < 2):
            raise utils.UsageError("--gop must be positive, --crf in [0, 51] and --short-side at least 2")
        return prepare(args)
    given = [f"--{k.replace('_', '-')}" for k, v in PREPARE_FLAGS.items() if getattr(args, k) != v]
    if given:
        raise utils.UsageError(f"given without --prepare, which alone uses them: {', '.join(given)}")
    check_data_args(args)
    report = args.report or os.path.join(cache_dir(), f"unreadable_{args.dataset}.txt")
    check_report_path(report)
    lines, total, bad = [REPORT_HEADER], 0, []
    root = synthetic_root(args) if args.dataset == "synthetic" else args.data
    splits = ("train", "test") if has_test_split(args.dataset, root) else ("train",)
    if len(splits) == 1:
        print(f"{args.dataset}: no test split: both splits list every video (pretraining reads them all; "
              f"evaluation refuses this dataset)")
    for split in splits:
        root, rel, _, _, _, infos = index_split(args, split, progress=f"probing {args.dataset}/{split}")
        failed = [(r, why) for r, why in zip(rel, infos) if not isinstance(why, dict)]
        missing = sum(why == "file not found" for _, why in failed)
        total, bad = total + len(rel), bad + failed
        print(f"{args.dataset}/{split}: {len(rel)} videos, {len(rel) - len(failed)} readable, "
              f"{len(failed) - missing} unreadable, {missing} missing")
        lines += [f"# {split}: {len(failed) - missing} unreadable, {missing} missing of {len(rel)} under {root}"]
        lines += [f"{r}\t{why}" for r, why in failed]
    utils.atomic_write(report, lambda f: f.write("\n".join(lines) + "\n"), mode="w")
    for r, why in bad[:SHOWN_UNREADABLE]:
        print(f"  {r}: {why}")
    more = f" (the first {SHOWN_UNREADABLE} above)" if len(bad) > SHOWN_UNREADABLE else ""
    print(f"{len(bad)} of {total} videos cannot be read (training leaves them out): listed in {report}{more}")


def check_report_path(path):
    """Refuses a --report path that holds anything but an earlier report (e.g. a dataset's split list)."""
    if os.path.isdir(path):
        raise utils.UsageError(f"--report {path} is a folder; give a file name")
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            first = f.readline().rstrip("\n")
        if first != REPORT_HEADER and not first.startswith("# train: "):  # "# train:": reports before the header
            raise utils.UsageError(f"--report {path} exists and is not an earlier scan report: refusing to "
                                   f"overwrite it; give another path")


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
