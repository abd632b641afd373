"""Video data: dataset listings, probing and the index cache, PyAV decoding, clip sampling with the random crop and
flip (paper Sec. 4.2 and appendix A.2), VideoDataset, the sharded sampler and loaders. The colour augmentation
runs on the device, in augment.py.

Layouts (`--data` is the root):
    ucf101    UCF-101/<Class>/v_*.avi, ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt
    hmdb51    <class>/*.avi, testTrainMulti_7030_splits/<class>_test_splitN.txt (1 train, 2 test, 0 unused)
    k400      train/<class>/*.mp4 and val/<class>/*.mp4 (classes sorted by name), or the common download:
              train/*.mp4 and val/*.mp4 named <youtube_id>_<start>_<end>.mp4 with annotations/{train,val}.csv
    diving48  rgb/<vid_name>.mp4, Diving48_V2_train.json, Diving48_V2_test.json (48 classes, V2 labels)
    folder    <class>/<video>; splits from train.txt/test.txt ("<class>/<video>" lines, or "<path> <label>" lines
              whose integer label column gives the class) or train/ and test/ subfolders, else every video is in
              both splits (pretraining; the evaluations refuse this)
    synthetic generated on first use (synthetic.py) under --data, else $FAME_CACHE or ~/.cache/fame

In list files, a line's fields are separated by tabs if it has any; otherwise its numbers (labels) are read from the
end of the line, so that paths may hold spaces. Lists may be UTF-8 (with or without a byte-order mark) or UTF-16
with one, with LF or CRLF line ends. Each layout has one strict parser: a line or entry it cannot read, a path that
is absolute or leaves --data, or a label outside the class list is refused naming the file and line. Every listed
video is then used or left out for a reason that is said (split_manifest): listed twice, missing file, in the
training split (an evaluation's test videos, compared by file identity), unreadable at indexing.

The dataset tools, a scan (--scan) and a prepared training copy (--prepare), are in dataset_tools.py.

Videos shorter than a clip's span ((frames-1)*stride+1) are read with a reduced stride (down to 1); if they
have fewer frames than the clip, the last frame is repeated. Frame k of a video is the one shown at the k-th tick
of its frame rate (a tick without a frame repeats the one before), or the k-th frame shown where its timestamps
cannot be trusted; decoding gives the frames that sequential decoding gives, seeking only in files where seeks
land exactly, turned as the file's display matrix says. dataset_tools.py --scan names every file read otherwise
(probe_video).
"""
import argparse
import bisect
import codecs
import csv
import functools
import hashlib
import io
import json
import math
import os
import posixpath
import re
import struct
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
META_EXTS = (".txt", ".csv", ".json")  # split lists, Kinetics annotations, Diving48 and synthetic metadata
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
INDEX_VERSION = 2  # 2: the seek, orient and note fields
MAX_RETRIES = 10
MIN_CROP_SCALE = 0.2  # RandomResizedCrop's area share is in [0.2, 1] (A.2)
DECODE_THREADS_MIN_PIXELS = 640 * 480  # below this, frame threading costs more than it gains
SYNTHETIC_FLAGS = {"synthetic_version": 3, "synthetic_videos": 800, "synthetic_size": 64, "synthetic_length": 48,
                   "synthetic_seed": 0, "synthetic_sprite": "video", "synthetic_backdrop": "pattern"}


# Below 1% of the frame, a crop box is a few pixels wide, and one that rounds to nothing is replaced by the whole
# frame (random_resized_crop_box)
CROP_SCALE = utils.Number(float, 0.01, 1)
SYNTHETIC_VIDEOS = utils.Number(int, 8)  # one video per motion class at least
SYNTHETIC_SIZE = utils.Number(int, 16, 1024, even=True)  # H.264 halves the colour planes; larger is not a toy
SYNTHETIC_LENGTH = utils.Number(int, 2)  # motion needs two frames


def add_data_args(parser):
    """The data flags of every stage script."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="dataset root (synthetic: the folder the benchmark is generated in; default $FAME_CACHE or "
                        "~/.cache/fame)")
    g.add_argument("--dataset", default=None, choices=DATASETS,
                   help="layout of --data (required with --data; without it, the synthetic benchmark)")
    g.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="official split (ucf101, hmdb51)")
    g.add_argument("--frames", type=utils.POSITIVE_INT, default=16, help="frames per clip T")
    g.add_argument("--stride", type=utils.POSITIVE_INT, default=2, help="temporal stride between the frames of a clip")
    g.add_argument("--crop", type=utils.POSITIVE_INT, default=112, help="crop size S (S x S pixels)")
    g.add_argument("--crop-scale", type=CROP_SCALE, nargs=2, default=[MIN_CROP_SCALE, 1.0], metavar=("MIN", "MAX"),
                   help="area share of the frame that a training RandomResizedCrop takes, MIN <= MAX in [0.01, 1] "
                        "(A.2: 0.2 1)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flip of training clips, probability 0.5 (A.2)")
    g.add_argument("--workers", type=utils.NON_NEGATIVE_INT, default=utils.default_workers(),
                   help="loader worker processes per process (and index probing and --prepare encoding processes); "
                        "default: this process's CPU cores shared among the processes on this machine, at most 8")
    g.add_argument("--synthetic-version", type=int, default=SYNTHETIC_FLAGS["synthetic_version"], choices=(1, 2, 3),
                   help="synthetic: benchmark version; 2: one object look in every video, per-video motion parameters; "
                        "3: version 2 with the object at a quarter of the frame "
                        "(synthetic.render)")
    g.add_argument("--synthetic-videos", type=SYNTHETIC_VIDEOS, default=SYNTHETIC_FLAGS["synthetic_videos"],
                   help="synthetic: training videos per training split (test splits get half as many)")
    g.add_argument("--synthetic-size", type=SYNTHETIC_SIZE, default=SYNTHETIC_FLAGS["synthetic_size"],
                   help="synthetic: frame size (square, even, at least 16)")
    g.add_argument("--synthetic-length", type=SYNTHETIC_LENGTH, default=SYNTHETIC_FLAGS["synthetic_length"],
                   help="synthetic: frames per video")
    g.add_argument("--synthetic-seed", type=utils.SEED, default=SYNTHETIC_FLAGS["synthetic_seed"],
                   help="synthetic: generator seed")
    g.add_argument("--synthetic-sprite", default=SYNTHETIC_FLAGS["synthetic_sprite"], choices=("video", "shared"),
                   help="synthetic version 1: video: each video draws its object's shape, colour and size; shared: one "
                        "white disc of one size in every video (texture still per video)")
    g.add_argument("--synthetic-backdrop", default=SYNTHETIC_FLAGS["synthetic_backdrop"], choices=("pattern", "flat"),
                   help="synthetic: the scene family's pattern, or a flat grey frame under the same motions (the "
                        "scene-free twin of the benchmark: only the motion tells videos apart)")
    return parser


def check_data_args(args):
    """Refuses bad or ineffective data flags before any work (utils.UsageError), and checks the dataset layout. (The
    flags' types refuse values out of their range.)"""
    if args.crop_scale[0] > args.crop_scale[1]:
        raise utils.UsageError(f"--crop-scale needs MIN <= MAX, got {args.crop_scale[0]} {args.crop_scale[1]}")
    if args.frames == 3:  # fame.py and augment.py refuse (B, 3, 3, H, W): frames and colours cannot be told apart
        raise utils.UsageError("--frames 3: clips of 3 frames cannot be told from frames-first (B, T, 3, H, W) clips "
                               "by their shape, and FAME and the augmentation refuse them; use 2, or 4 or more")
    if args.split != 1 and args.dataset not in SPLIT_DATASETS:
        raise utils.UsageError(f"--split has no effect for {args.dataset} (only {' and '.join(SPLIT_DATASETS)} have "
                               f"splits)")
    if args.data is not None and os.path.exists(args.data) and not os.path.isdir(args.data):
        raise utils.UsageError(f"--data {args.data} is a file; give the dataset's root folder")
    if args.dataset == "synthetic":
        if args.data is not None:
            check_synthetic_base(args.data)
        if getattr(args, "target", "action") == "scene" and args.synthetic_backdrop == "flat":
            raise utils.UsageError("--target scene with --synthetic-backdrop flat: the flat backdrop shows no scene, "
                                   "so its scene labels cannot be told from the frames")
        # a generated video shorter than one clip repeats its frames (dataset_tools.py, with --scan, cuts no clips)
        if args.synthetic_length < args.frames and "scan" not in vars(args):
            raise utils.UsageError(f"--synthetic-length {args.synthetic_length} is shorter than a clip of --frames "
                                   f"{args.frames}: generate videos of at least {args.frames} frames")
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


def check_synthetic_base(base):
    """Refuses a --data for the synthetic benchmark that holds a dataset (folders other than generated benchmarks,
    videos, split lists or annotations), which the benchmark's folders would join as an empty class."""
    if not os.path.isdir(base):
        return
    own = re.compile(r"synthetic_[0-9a-f]{10}(\.lock|\.inprogress-\d+)?$")
    others = sorted(name for name in os.listdir(base) if not own.match(name) and (
        os.path.isdir(os.path.join(base, name)) or name.lower().endswith(VIDEO_EXTS + META_EXTS)))
    if others:
        raise utils.UsageError(f"--data {base} holds a dataset ({', '.join(others[:3])}{', ...' * (len(others) > 3)})"
                               f": with --dataset synthetic, --data is the folder the benchmark is generated in; give "
                               f"another folder, or the --dataset of the data there")


def check_held_out(args):
    """Refuses an evaluation whose test videos would be its training videos, or whose labels cannot tell a backbone
    from another: a folder dataset without split lists or split folders lists every video in both splits (fine for
    pretraining, which only reads train; a split made up here is no way out: clips cut from one source video
    usually share a class folder, and a random split puts such near-duplicates on both sides); a --test-split that
    is the --train-split; a training split of one class (every prediction right). Training videos listed in the
    test split under any name are left out of it (split_manifest)."""
    if args.dataset == "folder" and not has_test_split(args.dataset, args.data) and args.test_split == "test":
        raise utils.DataError(f"--data {args.data}: {FOLDER_NO_TEST}")
    if args.train_split in utils.eval_splits(args):
        raise utils.UsageError(f"--train-split {args.train_split} is a split this evaluation scores (--test-split "
                               f"{args.test_split}): its scores would be on the videos it trains on (retrieval: "
                               f"queries found in their own gallery)")
    if getattr(args, "target", "action") == "action" and args.dataset != "synthetic":
        _, labels, classes, _ = list_videos(args.dataset, args.data, args.train_split, args.split)
        if len(set(labels)) < 2:
            raise utils.DataError(f"{args.dataset}/{args.train_split}: every video is in the class "
                                  f"{classes[labels[0]]!r}, so every prediction would be right: give each video its "
                                  f"class ('<class>/<video>' lines, or '<path> <label>' lines)")


# ----------------------------------------------------------------------------------------------------------
# Listings: (relative paths, labels, class names, scene labels or None) of a split, one function per layout


class LayoutError(utils.DataError, FileNotFoundError):
    """A dataset root whose files do not fit the layout of --dataset, or a list file that cannot be read."""


class _LayoutError(Exception):
    pass


class _ListError(_LayoutError):
    """A list file's content that cannot be read: the message names the file (and line or entry)."""


def _read_text(path, what="split file"):
    """The text of a list file: UTF-8 with or without a byte-order mark, or UTF-16 with one; the byte-order mark
    is never part of the first name. Bytes that are not UTF-8 stay as they are on disk (surrogate escapes), so that
    a name in another encoding still finds its file."""
    if not os.path.isfile(path):
        raise _LayoutError(f"missing {what} {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as e:
            raise _ListError(f"{path}: starts with a UTF-16 byte-order mark but is not UTF-16 ({e.reason} at byte "
                             f"{e.start}): save it as UTF-8") from None
    if b"\0" in raw:
        raise _ListError(f"{path}: holds NUL bytes (UTF-16 or UTF-32 without a byte-order mark?): save it as UTF-8")
    return raw.removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")


def _read_lines(path):
    """[(where "file:line", line)] of a list file's non-blank lines, stripped (CRLF and LF ends alike)."""
    return [(f"{path}:{n}", line.strip()) for n, line in enumerate(_read_text(path).splitlines(), 1)
            if line.strip()]


def _path_and_numbers(line):
    """A list line "<path> [<number> ...]" -> (path, [numbers as str]): the fields are split at tabs if the line
    has any, else the numbers are the whitespace-separated integers at the end, so that a path may hold spaces
    ("walk/my clip.mp4 1" -> ("walk/my clip.mp4", ["1"]))."""
    if "\t" in line:
        path, *fields = [f.strip() for f in line.split("\t")]
        return path, [f for f in fields if f]
    path, numbers = re.fullmatch(r"(.+?)((?:\s+-?\d+)*)\s*", line).groups()
    return path, numbers.split()


def _list_line(where, line, numbers=(0, 1), ext=True):
    """(relative path, [numbers]) of a list line with between numbers[0] and numbers[1] integer columns after the
    path; refuses, naming `where`, a line it cannot read: another column count, a column that is not an integer,
    a path that is absolute or leaves --data, a name that is not a video's (ext)."""
    path, fields = _path_and_numbers(line)
    if not numbers[0] <= len(fields) <= numbers[1]:
        want = " or ".join(f"{n} integer column{'s' * (n != 1)}" for n in range(numbers[0], numbers[1] + 1))
        raise _ListError(f"{where}: expected a video path and {want} after it, got {line!r}")
    head, _, tail = path.rpartition(" ")
    if ext and not _is_video(path):
        if head and _is_video(head):
            raise _ListError(f"{where}: {tail!r} after the path is not an integer label")
        first, _, rest = path.partition(" ")
        if re.fullmatch(r"-?\d+", first) and _is_video(rest):
            raise _ListError(f"{where}: the label comes before the path; write '<path> <label>'")
        raise _ListError(f"{where}: {path!r} is not a video file name (extensions {' '.join(VIDEO_EXTS)})")
    return _relative(path, where), fields


def _relative(path, where):
    """`path` normalized; refuses a path that is absolute, leaves the folder it is relative to, or holds control
    characters or a byte-order mark (an invisible character that would make the name another file's)."""
    if path.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", path):
        raise _ListError(f"{where}: absolute path {path!r}: list paths relative to the dataset root")
    if "\\" in path and "/" not in path:
        raise _ListError(f"{where}: {path!r} separates folders with '\\': use '/'")
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../"):
        raise _ListError(f"{where}: {path!r} leaves the dataset root")
    if any(ord(c) < 32 or c in "\x7f\ufeff" for c in norm):
        raise _ListError(f"{where}: {path!r} holds a control character or a byte-order mark")
    return norm


def _label_of(lookup, name, where):
    """The label of class `name` listed in `where`; a class unknown to the training split is named."""
    try:
        return lookup[name]
    except KeyError:
        raise _ListError(f"{where} lists class {name!r}, which the training split does not have (classes: "
                         f"{', '.join(map(str, list(lookup)[:10]))}{' ...' if len(lookup) > 10 else ''})") from None


def _integer_label(value, where, count):
    """An integer label in [0, count) read from a list (a str or JSON value); refused naming `where`."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ListError(f"{where}: label {value!r} is not an integer")
    if not 0 <= value < count:
        raise _ListError(f"{where}: label {value} is outside the {count} classes (0 to {count - 1})")
    return value


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
    """The entries (None, path, label) of the videos in class folders; refuses a class folder the training split
    lacks, warns about empty class folders and counts files that are not taken as videos (another extension). A
    symbolic link named as a video is listed even when it is dangling, so that it is counted as missing."""
    unknown = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name not in classes)
    if unknown:
        raise _LayoutError(f"{folder} has class folders that the training split does not have: "
                           f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
    entries, empty, others = [], [], []
    for label, name in enumerate(classes):
        d = os.path.join(folder, name)
        if os.path.isdir(d):
            files = [f for f in sorted(os.listdir(d))
                     if os.path.isfile(os.path.join(d, f)) or os.path.islink(os.path.join(d, f))]
            videos = [f for f in files if _is_video(f)]
            others += [os.path.join(name, f) for f in files if not _is_video(f)]
            if not videos:
                empty.append(name)
            entries += [(None, os.path.join(prefix, name, f), label) for f in videos]
    if empty:
        warnings.warn(f"{folder}: {len(empty)} class folders hold no videos: {', '.join(empty[:10])}"
                      f"{' ...' if len(empty) > 10 else ''}", RuntimeWarning)
    if others:
        warnings.warn(f"{folder}: {len(others)} files are not taken as videos (extensions other than "
                      f"{' '.join(VIDEO_EXTS)}), e.g. {', '.join(others[:3])}", RuntimeWarning)
    return entries


# Each layout's listing: (entries [(where "file:line" or None, relative path, label)], class names, scenes or None)


def _list_ucf101(root, split, fold):
    lists = os.path.join(root, "ucfTrainTestlist")
    index = os.path.join(lists, "classInd.txt")
    classes = []
    for where, line in _read_lines(index):
        number, name = (line.split(None, 1) + [""])[:2]
        if number != str(len(classes) + 1) or not name.strip():
            raise _ListError(f"{where}: expected '{len(classes) + 1} <ClassName>' (classes numbered from 1 in "
                             f"order), got {line!r}")
        classes.append(name.strip())
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    if len(lookup) < len(classes):
        raise _ListError(f"{index}: a class is listed twice")
    listed = os.path.join(lists, f"{split}list0{fold}.txt")
    entries = []
    for where, line in _read_lines(listed):
        rel, numbers = _list_line(where, line)
        folder = rel.split("/")[0] if "/" in rel else None
        if folder is None:
            raise _ListError(f"{where}: {rel!r} is not in a class folder ('<Class>/<video>.avi')")
        label = _label_of(lookup, folder.lower(), where)  # UCF101's folders differ from classInd in case only
        if numbers and not 1 <= int(numbers[0]) <= len(classes):
            raise _ListError(f"{where}: label {numbers[0]} is outside classInd.txt's 1 to {len(classes)}")
        if numbers and int(numbers[0]) - 1 != label:
            raise _ListError(f"{where}: label {numbers[0]} is {classes[int(numbers[0]) - 1]!r} in classInd.txt, "
                             f"but the video is in the folder {folder!r}")
        entries.append((where, os.path.join("UCF-101", rel), label))
    _require_dir(os.path.join(root, "UCF-101"))
    return entries, classes, None


HMDB51_TAGS = {"0": None, "1": "train", "2": "test"}  # 0: in neither split


def _list_hmdb51(root, split, fold):
    lists = os.path.join(root, "testTrainMulti_7030_splits")
    suffix = f"_test_split{fold}.txt"
    files = sorted(f for f in os.listdir(lists) if f.endswith(suffix)) if os.path.isdir(lists) else []
    if not files:
        raise _LayoutError(f"no *{suffix} files in {lists}")
    classes = [f[: -len(suffix)] for f in files]
    folders = [e.name for e in os.scandir(root) if e.is_dir() and e.path != lists]
    # a class folder without its split file (or one named otherwise, e.g. in another case) would go without a word;
    # a split file without its folder lists missing files, which the manifest counts
    unlisted = sorted(set(folders) - set(classes))
    if unlisted:
        raise _LayoutError(f"the class folders {', '.join(unlisted[:5])} have no <class>{suffix} in {lists} "
                           f"(split files are named after their class folder, in the same case)")
    entries = []
    for label, (name, f) in enumerate(zip(classes, files)):
        for where, line in _read_lines(os.path.join(lists, f)):
            video, numbers = _list_line(where, line, numbers=(1, 1))
            if numbers[0] not in HMDB51_TAGS:
                raise _ListError(f"{where}: tag {numbers[0]} is not 0 (unused), 1 (train) or 2 (test)")
            if "/" in video:
                raise _ListError(f"{where}: {video!r}: list the file name only (the class folder is {name})")
            if HMDB51_TAGS[numbers[0]] == split:
                entries.append((where, os.path.join(name, video), label))
    return entries, classes, None


KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


def _list_k400(root, split, fold):
    sub = "train" if split == "train" else "val"
    if os.path.isfile(os.path.join(root, "annotations", "train.csv")):  # the common download: flat folders + csv
        rows = {s: _kinetics_rows(os.path.join(root, "annotations", f"{s}.csv")) for s in ("train", sub)}
        classes = sorted({label for _, label, _ in rows["train"]})
        lookup = {c: i for i, c in enumerate(classes)}
        _require_dir(os.path.join(root, sub))
        return [(where, os.path.join(sub, name), _label_of(lookup, label, where))
                for where, label, name in rows[sub]], classes, None
    if not os.path.isdir(os.path.join(root, "train")):
        raise _LayoutError("neither annotations/train.csv nor a train/ folder")
    classes = _class_dirs(os.path.join(root, "train"))
    _require_dir(os.path.join(root, sub))
    return _scan_classes(os.path.join(root, sub), classes, sub), classes, None


def _kinetics_rows(path):
    """[(where, label, file name)] of a Kinetics annotation CSV (columns in any order, more allowed): every row
    has a label, a YouTube id and whole-second times, the file name being <youtube_id>_<start>_<end>.mp4."""
    reader = csv.reader(io.StringIO(_read_text(path, "annotation file"), newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in KINETICS_COLUMNS if c not in header]
        if missing:
            raise _ListError(f"{path}: the header {','.join(header)!r} lacks the columns {missing} (expected "
                             f"{','.join(KINETICS_COLUMNS)},...)")
        col = {c: header.index(c) for c in KINETICS_COLUMNS}
        rows = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not any(field.strip() for field in row):
                continue
            if len(row) != len(header):
                raise _ListError(f"{where}: {len(row)} fields where the header has {len(header)}")
            label, youtube_id, *times = (row[col[c]].strip() for c in KINETICS_COLUMNS)
            if not label or not youtube_id:
                raise _ListError(f"{where}: empty label or youtube_id")
            if not all(re.fullmatch(r"\d+", t) for t in times):
                raise _ListError(f"{where}: time_start {times[0]!r} and time_end {times[1]!r} must be whole "
                                 f"seconds (the files are named <youtube_id>_<start>_<end>.mp4)")
            name = f"{youtube_id}_{int(times[0]):06d}_{int(times[1]):06d}.mp4"
            rows.append((where, label, _relative(name, where)))
    except csv.Error as e:
        raise _ListError(f"{path}:{reader.line_num}: {e}") from None
    if not rows:
        raise _ListError(f"{path}: no rows after the header")
    return rows


def _read_json(path, what):
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as e:
        raise _ListError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


DIVING48_CLASSES = 48


def _list_diving48(root, split, fold):
    path = os.path.join(root, f"Diving48_V2_{split}.json")
    entries = _read_json(path, "split file")
    _require_dir(os.path.join(root, "rgb"))
    vocab = os.path.join(root, "Diving48_vocab.json")
    if os.path.isfile(vocab):
        names = _read_json(vocab, "class list")
        if not isinstance(names, list) or not names or not all(isinstance(v, (list, str)) for v in names):
            raise _ListError(f"{vocab}: expected a list of class descriptions (lists of words), got "
                             f"{type(names).__name__}")
        classes = [v if isinstance(v, str) else "_".join(map(str, v)) for v in names]
    else:
        classes = [f"class_{i:02d}" for i in range(DIVING48_CLASSES)]
    if not isinstance(entries, list):
        raise _ListError(f"{path}: expected a list of {{\"vid_name\": ..., \"label\": ...}} entries, got a JSON "
                         f"{type(entries).__name__}")
    out = []
    for k, e in enumerate(entries):
        where = f"{path}: entry {k}"
        if not isinstance(e, dict) or not isinstance(e.get("vid_name"), str) or not e["vid_name"] or "label" not in e:
            raise _ListError(f"{where}: expected {{\"vid_name\": <name>, \"label\": <integer>, ...}}, got "
                             f"{json.dumps(e)[:80]}")
        rel = os.path.join("rgb", _relative(e["vid_name"] + ".mp4", where))
        out.append((where, rel, _integer_label(e["label"], where, len(classes))))
    return out, classes, None


FOLDER_NO_TEST = ("this folder dataset has no test split (no train.txt and test.txt, no train/ and test/ folders), "
                  "so its test videos would be its training videos and every score would be overstated: list the "
                  "held-out videos in train.txt and test.txt (README, 'Errors and bad input')")


def has_test_split(dataset, root):
    """False only for a folder dataset without split lists or split folders: both its splits list every video."""
    return dataset != "folder" or os.path.isfile(os.path.join(root, "train.txt")) or (
        os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")))


def _folder_list(root, name):
    """[(where, path, label str or None)] of a folder dataset's split list: '<class>/<video>' lines, or
    '<path> <label>' lines (the label column gives the class, the path any folder under the root)."""
    return [(where, *_folder_line(root, where, line)) for where, line in _read_lines(os.path.join(root, name))]


def _folder_line(root, where, line):
    rel, numbers = _list_line(where, line)
    if not numbers and re.match(r"-?\d+\s", rel) and not os.path.lexists(os.path.join(root, rel)):
        raise _ListError(f"{where}: the label comes before the path; write '<path> <label>'")
    if not numbers and "/" not in rel:
        raise _ListError(f"{where}: {rel!r} is neither in a class folder ('<class>/<video>') nor followed by a "
                         f"label ('<path> <label>')")
    return rel, numbers[0] if numbers else None


def _list_folder(root, split, fold):
    for name in ("train.txt", "test.txt"):
        if os.path.isdir(os.path.join(root, name)):
            raise _LayoutError(f"{os.path.join(root, name)} is a folder, not a split list")
    if os.path.isfile(os.path.join(root, "train.txt")):
        train = _folder_list(root, "train.txt")
        lines = train if split == "train" else _folder_list(root, f"{split}.txt")
        if not train:
            raise _ListError(f"{os.path.join(root, 'train.txt')}: lists no videos")
        labelled = train[0][2] is not None
        for where, rel, label in train + lines:  # one format for both lists
            if (label is not None) != labelled:
                raise _ListError(f"{where}: {'no' if labelled else 'a'} label column, unlike {train[0][0]}: give "
                                 f"every line of train.txt and test.txt a label, or none")
        if not labelled:  # the class is the first folder of the path
            classes = sorted({rel.split("/")[0] for _, rel, _ in train})
            lookup = {c: i for i, c in enumerate(classes)}
            return [(where, rel, _label_of(lookup, rel.split("/")[0], where)) for where, rel, _ in lines], classes, None
        values = sorted({int(label) for _, _, label in train})
        if values[0] < 0:
            raise _ListError(f"{os.path.join(root, 'train.txt')}: label {values[0]}: labels are integers >= 0")
        lookup = {v: i for i, v in enumerate(values)}
        folders = {v: {rel.rpartition("/")[0] for _, rel, label in train if int(label) == v} for v in values}
        named = all(len(f) == 1 and "" not in f for f in folders.values()) and \
            len({next(iter(f)) for f in folders.values()}) == len(values)  # one folder per label: its name
        classes = [next(iter(folders[v])) if named else str(v) for v in values]
        entries = []
        for where, rel, label in lines:
            if int(label) not in lookup:
                raise _ListError(f"{where}: label {label}, which the training split does not have (labels: "
                                 f"{', '.join(map(str, values[:10]))}{' ...' if len(values) > 10 else ''})")
            folder = rel.rpartition("/")[0]
            if named and folder in classes and folder != classes[lookup[int(label)]]:  # a folder and a label disagree
                raise _ListError(f"{where}: label {label} is the class of {classes[lookup[int(label)]]}/ in "
                                 f"train.txt, but the video is in {folder}/")
            entries.append((where, rel, lookup[int(label)]))
        return entries, classes, None
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
        classes = _class_dirs(os.path.join(root, "train"))
        return _scan_classes(os.path.join(root, split), classes, split), classes, None
    classes = _class_dirs(root)
    entries = _scan_classes(root, classes)
    if not entries:
        raise _LayoutError("no video files in the class folders")
    return entries, classes, None


def _list_synthetic(root, split, fold):
    import synthetic

    if split not in synthetic.SPLITS:
        raise utils.UsageError(f"synthetic split must be one of {synthetic.SPLITS}, got {split!r}")
    entries, scenes = [], []
    for where, line in _read_lines(os.path.join(root, "splits", f"{split}.txt")):
        rel, (label, scene) = _list_line(where, line, numbers=(2, 2))
        entries.append((where, rel, _integer_label(label, where, len(synthetic.MOTIONS))))
        scenes.append(_integer_label(scene, where, len(synthetic.SCENES)))
    return entries, list(synthetic.MOTIONS), scenes


LISTINGS = {"ucf101": _list_ucf101, "hmdb51": _list_hmdb51, "k400": _list_k400, "diving48": _list_diving48,
            "folder": _list_folder, "synthetic": _list_synthetic}


def list_split(dataset, root, split, fold=1):
    """The listing of `split` ("train" or "test"; synthetic has more) of the dataset at `root`: a dict with "rel"
    (relative paths), "labels", "classes", "scenes" (or None) and "duplicates", the entries [(path, why)] that
    repeat an earlier one (left out: each video is listed once). One strict parser per layout reads its lists:
    a line or entry it cannot read (a path that is absolute or leaves the root, a label outside the class list,
    a malformed row) is refused naming its file and line. Raises LayoutError (a DataError)."""
    if dataset not in LISTINGS:
        raise utils.UsageError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if dataset != "synthetic" and split not in ("train", "test"):
        raise utils.UsageError(f"split must be 'train' or 'test' for {dataset}, got {split!r}")
    try:
        if root is None or not os.path.isdir(root):
            raise _LayoutError("root folder not found")
        entries, classes, scenes = LISTINGS[dataset](root, split, fold)
        if not entries:
            raise _LayoutError(f"the {split} split lists no videos")
    except _ListError as e:
        raise LayoutError(f"{dataset} dataset: {e}") from None
    except _LayoutError as e:
        raise LayoutError(f"{dataset} dataset at {root!r}: {e}. Expected layout: {LAYOUTS[dataset]}") from None
    first, keep, duplicates = {}, [], []
    for k, (where, rel, label) in enumerate(entries):
        if rel not in first:
            first[rel] = k
            keep.append(k)
            continue
        where0, _, label0 = entries[first[rel]]
        if label != label0:
            raise LayoutError(f"{dataset} dataset: {where or rel}: {rel} is listed again with another class "
                              f"({classes[label]!r}; {classes[label0]!r} at {where0})")
        duplicates.append((rel, f"first listed at {where0}"))
    return {"rel": [entries[k][1] for k in keep], "labels": [entries[k][2] for k in keep], "classes": classes,
            "scenes": None if scenes is None else [scenes[k] for k in keep], "duplicates": duplicates}


def list_videos(dataset, root, split, fold=1):
    """(relative paths, labels, class names, scene labels or None) of `split` (list_split, each video once)."""
    listing = list_split(dataset, root, split, fold)
    return listing["rel"], listing["labels"], listing["classes"], listing["scenes"]


# ----------------------------------------------------------------------------------------------------------
# File identity: the same video under two names (a hard or symbolic link, a copy) is one video


FINGERPRINT_BYTES = 64 * 1024


def _fingerprint(path):
    """A cheap content fingerprint: the size and a hash of the first and last FINGERPRINT_BYTES."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return size, h.hexdigest()


def file_identities(paths):
    """One key per path (None where the file cannot be read) such that two paths with the same key hold the same
    video: the device and inode (hard and symbolic links), and where two files of different inodes have the same
    size, a content fingerprint (copies). Only files that share a size are read."""
    stats = []
    for p in paths:
        try:
            st = os.stat(p)
            stats.append((st.st_dev, st.st_ino, st.st_size))
        except OSError:
            stats.append(None)
    inodes = {}
    for st in filter(None, stats):
        inodes.setdefault(st[2], set()).add(st[:2])
    keys = []
    for p, st in zip(paths, stats):
        if st is None or len(inodes[st[2]]) == 1:
            keys.append(None if st is None else ("inode", *st[:2]))
            continue
        try:
            keys.append(("content", *_fingerprint(p)))
        except OSError:
            keys.append(None)
    return keys


# ----------------------------------------------------------------------------------------------------------
# Probing and the cached index


UNINDEXED_FORMAT = 0x100 | 0x200  # AVFMT_GENERIC_INDEX | AVFMT_TS_DISCONT: no index of its own, or jumping times
MAX_TICKS_PER_FRAME = 4  # timestamps spanning more fps ticks per frame than this are not a timeline (a jump)


def probe_video(path):
    """Reads a video's packets (no decoding beyond the first frame) and returns its index entry
    {frames, fps, tb: [num, den], start, keys: keyframe pts, pts, seek, orient, note}; raises ValueError if the
    file is unreadable or not a video (a still picture, a single frame). Counting demuxed packets is exact where
    container headers lie (truncated files, missing frame counts).

    pts: frame k is the frame shown at the k-th tick of the fps grid since the first shown timestamp (a tick without
    a frame repeats the one before); without timestamps, where they span far more ticks than the stream holds
    frames (a jump of hours in a 200-frame file), or where two frames fall on one tick, frame k is the k-th frame
    in display order instead. seek: whether decode_frames may seek. A seek lands by
    the container's own index only where it keeps one: MPEG program and transport streams, Ogg and raw streams are
    searched by guessed timestamps and land on later or undecodable frames, and some indexed files (B-frames behind
    very short GOPs) land past their keyframe too; such files are read from their start, correctly but slower, and
    `note` says why (so does any other departure from the file's own timeline). orient: the display matrix as
    [a, b, c, d] signs (see orient_frame), applied by decode_frames as a player applies it."""
    if os.path.getsize(path) == 0:
        raise ValueError("zero-byte file")
    try:
        with av.open(path, metadata_errors="ignore") as c:
            s = video_stream(c)
            if s is None:
                raise ValueError("no video stream" + (" (only a cover picture)" if c.streams.video else ""))
            s.codec_context.thread_count = 1  # one probing process per core
            tb = s.time_base or Fraction(1, 1000000)
            stamps, keys, hidden_key, first = [], [], False, None
            try:
                for packet in c.demux(s):
                    if packet.size == 0:
                        continue
                    ts = packet.pts if packet.pts is not None else packet.dts
                    if packet.is_discard:  # before the start of an edit list: decoded, never shown
                        hidden_key |= packet.is_keyframe
                    else:
                        stamps.append(ts)
                        if packet.is_keyframe:
                            keys.append(ts)
                    if first is None:
                        first = next(iter(s.codec_context.decode(packet)), None)
            except av.error.FFmpegError:
                if not stamps:
                    raise
            if first is None:
                first = next(iter(s.codec_context.decode(None)), None)
            if first is None:
                raise ValueError("no decodable frame")
            if hidden_key and None not in stamps and stamps:  # a seek to the first shown frame lands on it
                keys.append(min(stamps))
            if len(stamps) < 2:
                raise ValueError(f"a single {s.codec_context.name} frame in a {c.format.name} file: a still "
                                 f"picture, not a video")
            rate = s.average_rate
            if not rate and None not in stamps and max(stamps) > min(stamps):  # the mean rate of the timestamps
                rate = Fraction(len(stamps) - 1) / ((max(stamps) - min(stamps)) * tb)
            rates = [float(r) for r in (rate or s.guessed_rate or s.base_rate, s.guessed_rate) if r] or [25.0]
            unindexed = c.format.flags & UNINDEXED_FORMAT
            info = _timeline(stamps, keys, rates, tb,
                             f"{c.format.name} files have no index to seek by, and their timestamps can jump"
                             if unindexed else None)
            info["orient"] = _display_matrix(first)
            if info["seek"] and not _seek_lands(c, s, info):
                info["seek"], info["note"] = False, "read from the start: a seek lands past its keyframe"
            if info["orient"] != [1, 0, 0, 1]:
                turned = "frames turned as its display matrix says (as a player shows them)"
                info["note"] = f"{info['note']}; {turned}" if info["note"] else turned
    except av.error.FFmpegError as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    return info


def video_stream(c):
    """The video stream of an open container that the index and decoding read: its first one that is not a cover
    picture (an MP4's embedded thumbnail); None if there is none."""
    return next((s for s in c.streams.video if not s.disposition & av.stream.Disposition.attached_pic), None)


def _timeline(stamps, keys, rates, tb, unindexed=None):
    """The timing fields of probe_video's entry, from the packets' timestamps (in time base tb) and keyframes, on
    the grid of the first frame rate in `rates` (the mean rate, then FFmpeg's guess of the base rate, which a
    variable frame rate needs) on which no two frames meet; unindexed: why the container's timestamps cannot be
    trusted, if they cannot."""
    fps = rates[0]
    if unindexed:
        note = f"read in display order from the start: {unindexed}"
    elif None not in stamps:
        start = min(stamps)
        for fps in rates:
            scale = float(tb) * fps  # as frame_index() counts
            ticks = {round((t - start) * scale) for t in stamps}
            frames = max(ticks) + 1
            if len(ticks) == len(stamps):
                break
        if len(ticks) == len(stamps) and frames <= MAX_TICKS_PER_FRAME * len(stamps):
            return {"frames": int(frames), "fps": fps, "tb": [tb.numerator, tb.denominator], "start": int(start),
                    "keys": sorted({int(k) for k in keys}) or [int(start)], "pts": True, "seek": True, "note": ""}
        if len(ticks) < len(stamps):
            note = (f"read in display order: {len(stamps) - len(ticks):,} of its {len(stamps):,} frames share a "
                    f"frame time at {fps:g} fps with another")
        else:
            note = (f"read in display order: its timestamps span {frames:,} frames at {fps:g} fps, but it holds "
                    f"{len(stamps):,}")
    else:
        missing = sum(t is None for t in stamps)
        note = ("read in display order: it has no timestamps" if missing == len(stamps) else
                f"read in display order: {missing:,} of its {len(stamps):,} frames have no timestamp")
    return {"frames": len(stamps), "fps": fps, "tb": [1, 1], "start": 0, "keys": [0], "pts": False, "seek": False,
            "note": note}


def _seek_lands(c, s, info):
    """Whether a seek to the middle keyframe, as decode_frames makes it, lands on a keyframe at or before it (read
    from the packets alone: decoding starts at the packet a seek lands on)."""
    index_of = frame_index(info)
    key = index_of(info["keys"][len(info["keys"]) // 2])
    if key == 0:
        return True
    try:
        c.seek(info["start"] + int(round(key / (float(Fraction(*info["tb"])) * info["fps"]))), stream=s,
               backward=True, any_frame=False)
        for packet in c.demux(s):
            if packet.size:
                ts = packet.pts if packet.pts is not None else packet.dts
                return packet.is_keyframe and ts is not None and index_of(ts) <= key
    except av.error.FFmpegError:
        pass
    return False


def _display_matrix(frame):
    """The display matrix of a decoded frame as the signs [a, b, c, d] of its 2x2 part ([1, 0, 0, 1]: none): a
    player shows the pixel at column x, row y at column a*x + c*y, row b*x + d*y (modulo the size). A matrix that
    is no multiple of 90 degrees is refused."""
    for side in frame.side_data:
        if side.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            a, b, _, c, d = struct.unpack("=5i", bytes(side)[:20])  # 16.16 fixed point
            signs = [int(np.sign(v)) if abs(v) >= 2 ** 15 else 0 for v in (a, b, c, d)]
            if abs(signs[0]) + abs(signs[1]) != 1 or abs(signs[0]) != abs(signs[3]) or abs(signs[1]) != abs(signs[2]):
                raise ValueError(f"a display matrix that turns by a fraction of a right angle ({a, b, c, d}): not "
                                 f"supported")
            return signs
    return [1, 0, 0, 1]


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
    a description to show a progress bar with. A cache file that is not an index of this version is rebuilt (with
    a warning where it is damaged or foreign), and so is any entry of it that lacks a field."""
    folder = os.path.dirname(os.path.abspath(cache_file))
    utils.check_writable(folder, cache_name() if folder == os.path.abspath(cache_dir()) else "the index cache")
    if os.path.isdir(cache_file):
        raise utils.DataError(f"the index cache {cache_file} is a folder: remove it, or set FAME_CACHE to another "
                              f"folder")
    # the readers of a complete index share the lock (the processes of a run check it at once); a process that must
    # probe files and write the index holds it alone
    for shared in (True, False) if os.path.isfile(cache_file) else (False,):
        with utils.file_lock(cache_file + ".lock", shared=shared,
                             waiting="another run is indexing the same videos; this one goes on when it is done"):
            cached = _read_index(cache_file)
            stats, todo, entries = {}, [], {}
            for rel in rel_paths:
                try:
                    st = os.stat(os.path.join(root, rel))
                    stats[rel] = [st.st_size, st.st_mtime_ns]
                except OSError:
                    entries[rel] = "file not found"
                    continue
                old = _cached_entry(cached.get(rel), stats[rel])
                if old is not None:
                    entries[rel] = old
                elif rel not in entries:
                    entries[rel] = None
                    todo.append(rel)
            if todo and shared:
                continue  # files to probe: again, holding the lock alone
            if todo:
                workers = workers if len(todo) >= 32 else 1  # a pool costs more than probing a few files
                paths = [os.path.join(root, r) for r in todo]
                for rel, result in zip(todo, utils.parallel_map(_probe_safe, paths, workers, progress)):
                    entries[rel] = result
                index = {"version": INDEX_VERSION, "root": os.path.abspath(root),
                         "entries": {**cached, **{r: [stats[r], entries[r]] for r in stats}}}
                utils.atomic_write(cache_file, lambda f: json.dump(index, f, separators=(",", ":")), mode="w")
            return [entries[rel] for rel in rel_paths]


ENTRY_FIELDS = {"frames": int, "fps": float, "tb": list, "start": int, "keys": list, "pts": bool, "seek": bool,
                "orient": list, "note": str}  # probe_video's entry


def _read_index(cache_file):
    """The entries of an index cache file, {} where there is none of this version; a damaged or foreign file is
    warned about (load_index then writes a new one)."""
    try:
        with open(cache_file) as f:
            index = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        index, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "not an index of data.py"
    if isinstance(index, dict) and index.get("version") != INDEX_VERSION and isinstance(index.get("version"), int):
        return {}  # another version's index: built anew
    if isinstance(index, dict) and isinstance(index.get("entries"), dict):
        return index["entries"]
    warnings.warn(f"the index cache {cache_file} is unreadable ({why}): it is built anew", RuntimeWarning)
    return {}


def _cached_entry(old, stat):
    """The probe result cached as `old` ([[size, mtime], entry]) for a file of `stat` ([size, mtime]); None where
    it is stale or malformed (probed again)."""
    if not (isinstance(old, list) and len(old) == 2 and old[0] == stat):
        return None
    info = old[1]
    if isinstance(info, str) or (isinstance(info, dict) and all(
            isinstance(info.get(k), t) and not (t is int and isinstance(info[k], bool))
            for k, t in ENTRY_FIELDS.items())):
        return info
    return None


def cache_name():
    """The cache folder as a message names it (utils.check_writable adds its path)."""
    return "FAME_CACHE" if os.environ.get("FAME_CACHE") else "the cache folder (FAME_CACHE unset)"


def _indexed(args, split, progress=None):
    """(root, list_split's listing, index entries) of `split`."""
    root = synthetic_root(args) if args.dataset == "synthetic" else args.data
    listing = list_split(args.dataset, root, split, args.split)
    key = hashlib.sha1(f"{args.dataset}|{os.path.abspath(root)}|{split}|{args.split}".encode()).hexdigest()[:12]
    cache_file = os.path.join(cache_dir(), f"index_{args.dataset}_{split}_{key}.json")
    infos = load_index(root, listing["rel"], cache_file, max(1, args.workers), progress)
    return root, listing, infos


def index_split(args, split, progress=None):
    """The listing of `split` and the index entries of its videos: (root, rel, labels, classes, scenes, infos)."""
    root, listing, infos = _indexed(args, split, progress)
    return root, listing["rel"], listing["labels"], listing["classes"], listing["scenes"], infos


# Why a listed video is not used, in the order they are checked; an evaluation adds "failed to decode" (at test time)
LEFT_OUT_REASONS = ("listed twice", "missing file", "in the training split", "unreadable at indexing")


def split_manifest(args, split, scored=False, held_out_from=None, progress=None):
    """Accounts for every listed video of `split`: (root, listing, infos, used, manifest), `used` the indices of
    the listing's videos to use and manifest {"listed": entries listed, "used": count, "left_out": [[path, reason,
    detail]]} with the reasons of LEFT_OUT_REASONS. scored: the split is scored (an evaluation's test split, or
    retrieval's gallery), so a file listed twice under two names (a link, a copy) counts once. held_out_from: the
    training split, whose videos (by file identity, file_identities) are left out of this one; refused when that
    leaves none."""
    root, listing, infos = _indexed(args, split, progress)
    rel, name = listing["rel"], f"{args.dataset}/{split}"
    paths = [os.path.join(root, r) for r in rel]
    why = {}  # index in the listing: (reason, detail)
    for k, (path, info) in enumerate(zip(paths, infos)):
        if isinstance(info, dict):
            continue
        if os.path.exists(path):
            why[k] = ("unreadable at indexing", info)
        elif os.path.islink(path):
            why[k] = ("missing file", f"dangling symbolic link to {os.readlink(path)}")
        else:
            why[k] = ("missing file", "file not found")
    if scored or held_out_from not in (None, split):
        train = [] if held_out_from in (None, split) else list_split(args.dataset, root, held_out_from,
                                                                       args.split)["rel"]
        keys = file_identities([os.path.join(root, r) for r in train] + paths)
        training = {key: r for key, r in zip(keys, train) if key is not None}
        first = {}
        for k, key in enumerate(keys[len(train):]):
            if key is None or k in why:
                continue
            if key in training:
                same = training[key]
                why[k] = ("in the training split", f"the {held_out_from} video {same}" if same != rel[k]
                          else f"also listed in the {held_out_from} split")
            elif key in first:
                why[k] = ("listed twice", f"the same file as {rel[first[key]]}")
            else:
                first[key] = k
        overlap = [k for k, (reason, _) in why.items() if reason == "in the training split"]
        if overlap and not first:
            raise utils.DataError(f"{name}: every readable video of it is also a video of the {held_out_from} split "
                                  f"(the same file under any name; e.g. {rel[overlap[0]]}: {why[overlap[0]][1]}), so "
                                  f"its scores would be on training videos: list held-out videos")
    left_out = [[r, "listed twice", detail] for r, detail in listing["duplicates"]]
    left_out += [[rel[k], *why[k]] for k in sorted(why)]
    used = [k for k in range(len(rel)) if k not in why]
    manifest = {"listed": len(rel) + len(listing["duplicates"]), "used": len(used),
                "left_out_by_reason": {reason: sum(r == reason for _, r, _ in left_out) for reason in LEFT_OUT_REASONS},
                "left_out": left_out}
    return root, listing, infos, used, manifest


def describe_manifest(name, manifest):
    """One line: "<name>: N listed, M used; left out: a missing file, b unreadable at indexing"."""
    said = ", ".join(f"{n} {reason}" for reason, n in manifest["left_out_by_reason"].items() if n)
    return f"{name}: {manifest['listed']} listed, {manifest['used']} used" + (f"; left out: {said}" if said else "")


def dataset_tag(args):
    """The dataset of a run as a folder-name part: the --dataset name, with --split N where the dataset has
    official splits, the folder's name for a folder dataset, and a hash of the --synthetic-* flags that differ from
    the defaults (so that the runs on two datasets never share a default output folder)."""
    tag = args.dataset
    if args.dataset in SPLIT_DATASETS:
        tag += f"_split{args.split}"
    elif args.dataset == "folder":
        tag += "-" + (os.path.basename(os.path.abspath(args.data)) or "root")
    elif args.dataset == "synthetic":
        changed = {k: getattr(args, k) for k, v in SYNTHETIC_FLAGS.items() if getattr(args, k) != v}
        if changed:
            tag += "-" + hashlib.sha1(repr(sorted(changed.items())).encode()).hexdigest()[:8]
    return tag


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
    """RGB uint8 frames (len(indices), H, W, 3) at the given frame indices (any order, repeats allowed), turned
    as the file's display matrix says (as a player shows them); with stacked=False a list of (H, W, 3) arrays
    instead, a repeated index sharing one array (no copy).
    Seeks to the keyframe before each needed run only when that skips frames, in the files whose index entry
    allows seeks (probe_video); a seek that lands past the frame it was made for has the file read from its start
    instead, so that the frames are always those of sequential decoding. Converts only the frames that are used.
    short_side: a number, or a function of the frame's (width, height); frames whose short side exceeds twice it
    are downscaled to it right away (bounded memory for HD/4K sources), smaller ones keep their size, as scaling
    in swscale costs about 3x the colour conversion and the loader's one crop and resize does it anyway.
    counter["decoded"] counts decoded frames.

    threads: decoding and colour conversion threads; None: one in a loader worker (the workers are the
    parallelism), else FFmpeg's choice."""
    if not isinstance(info, dict) or not all(key in info for key in ENTRY_FIELDS):
        raise TypeError(f"decode_frames needs the index entry of {path} (probe_video's dict), got "
                        f"{type(info).__name__}")
    indices = [int(j) for j in indices]
    if not indices or min(indices) < 0 or max(indices) >= info["frames"]:
        raise ValueError(f"frame indices must be in [0, {info['frames']}) for {path} (its index entry), got "
                         f"{indices[:8]}{'...' if len(indices) > 8 else ''}" if indices else
                         f"no frame indices given for {path}")
    if threads is None:
        threads = 1 if torch.utils.data.get_worker_info() is not None else 0  # 0: FFmpeg's choice
    want, decoded = sorted(set(indices)), [0]
    out = _decode_wanted(path, want, info, short_side, threads, info["seek"], decoded)
    if out is None:  # a seek missed: read from the start
        out = _decode_wanted(path, want, info, short_side, threads, False, decoded)
    if counter is not None:
        counter["decoded"] = counter.get("decoded", 0) + decoded[0]
    if not out:
        raise RuntimeError(f"no frames decoded from {path}")
    have = sorted(out)
    # frames missing at the end (truncated stream) or at pts gaps: nearest earlier decoded frame
    frames = [out[have[max(0, bisect.bisect_right(have, j) - 1)]] for j in indices]
    return np.stack(frames) if stacked else frames


def _decode_wanted(path, want, info, short_side, threads, seek, decoded):
    """{index: frame} of the sorted frame indices `want` that the stream holds (decode_frames), seeking only if
    `seek`; None if a seek landed past the frame it was made for. decoded[0] counts decoded frames."""
    index_of, scale = frame_index(info), float(Fraction(*info["tb"])) * info["fps"]
    seek = seek and info["pts"]  # without timestamps, a frame is known by its count from the start
    key_idx = [index_of(k) for k in info["keys"]] if seek else [0]
    out = {}
    with av.open(path) as c:
        s = video_stream(c)
        s.codec_context.thread_count = threads
        if threads != 1 and s.codec_context.width * s.codec_context.height >= DECODE_THREADS_MIN_PIXELS:
            s.thread_type = "AUTO"  # frame threading pays off only on large frames
        size, reformatter = None, VideoReformatter()  # one reformatter: reuses its swscale context
        gen, pos, sought, i = None, -1, None, 0
        while i < len(want):
            key = key_idx[max(0, bisect.bisect_right(key_idx, want[i]) - 1)]
            if gen is None or (key > pos and key != sought):
                if seek:
                    c.seek(info["start"] + int(round(key / scale)), stream=s, backward=True, any_frame=False)
                gen, sought, count, landed = c.decode(s), key, key - 1, not seek
            needs_seek = False
            for frame in gen:
                decoded[0] += 1
                count += 1
                idx = index_of(frame.pts) if (info["pts"] and frame.pts is not None) else count
                if not landed:
                    if idx > want[i]:
                        return None
                    landed = True
                count = pos = idx
                while i < len(want) and want[i] < idx:  # frames missing at a gap: filled by decode_frames
                    i += 1
                if i < len(want) and idx == want[i]:
                    if size is None:
                        size = _target_size(frame.width, frame.height, short_side)
                    image = reformatter.reformat(frame, width=size[0], height=size[1], format="rgb24",
                                                 interpolation="AREA", threads=threads).to_ndarray()
                    out[idx] = orient_frame(image, info["orient"])
                    i += 1
                if i == len(want):
                    break
                nxt = key_idx[max(0, bisect.bisect_right(key_idx, want[i]) - 1)]
                if nxt > idx + 1 and nxt != sought:
                    needs_seek = True
                    break
            else:
                break  # end of stream: missing frames are filled by decode_frames
            if not needs_seek and i == len(want):
                break
    return out


def orient_frame(image, orient):
    """An (H, W, C) array as a player shows it under the display matrix signs [a, b, c, d] (probe_video): a view,
    no copy."""
    a, b, c, d = orient
    if b:  # a quarter turn: the stored columns become the rows
        return image.transpose(1, 0, 2)[::b, ::c]
    return image[::d, ::a]


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


def build_dataset(args, split, mode, background_clip=False, held_out_from=None):
    """VideoDataset of `split` ("train" / "test"; synthetic also "test_swapped", "balanced_train",
    "balanced_test") in `mode` (MODES), with the videos split_manifest keeps (held_out_from: the training split of
    an evaluation, whose videos are left out of this one). Prints the manifest's line and warns about the videos
    left out; the dataset's `manifest` holds them (a test-mode dataset counts a video listed under two names once).
    In test mode, refuses fewer videos than processes, before any process waits for the others."""
    root, listing, infos, used, manifest = split_manifest(args, split, mode == "test", held_out_from)
    name = f"{args.dataset}/{split}"
    if utils.is_main_process():
        print(describe_manifest(name, manifest))
        if manifest["left_out"]:
            shown = "; ".join(f"{r} ({reason}: {detail})" for r, reason, detail in manifest["left_out"][:20])
            warnings.warn(f"{name}: leaving out {len(manifest['left_out'])} of {manifest['listed']} listed videos: "
                          f"{shown}{' ...' if len(manifest['left_out']) > 20 else ''}", RuntimeWarning)
    if not used:
        raise utils.DataError(f"{name} at {root!r}: no readable videos (layout: {LAYOUTS[args.dataset]})")
    if mode == "test" and len(used) < utils.get_world_size():
        raise utils.DataError(f"{name} has {len(used)} video{'s' * (len(used) != 1)} to evaluate for "
                              f"{utils.get_world_size()} processes: "
                              f"run with at most {len(used)} (torchrun --nproc_per_node)")
    labels, classes, scenes = listing["labels"], listing["classes"], listing["scenes"]
    if getattr(args, "target", "action") == "scene":
        import synthetic

        labels, classes = scenes, list(synthetic.SCENES)
    dataset = VideoDataset(root, [listing["rel"][k] for k in used], [labels[k] for k in used], classes,
                           [infos[k] for k in used], mode, args.frames, args.stride, args.crop,
                           getattr(args, "clips", 1), None if scenes is None else [scenes[k] for k in used],
                           name=name, test_crop=getattr(args, "test_crop", "resize"), background_clip=background_clip,
                           crop_scale=args.crop_scale, flip=args.flip)
    dataset.manifest = manifest
    return dataset


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


if __name__ == "__main__":  # the dataset tools' command line moved to dataset_tools.py: say so instead of nothing
    import shlex
    import sys

    print(f"data.py: error: data.py has no command line; the dataset tools are python dataset_tools.py "
          f"{shlex.join(sys.argv[1:])}".rstrip(), file=sys.stderr)
    sys.exit(2)
