"""Dataset tools: check a dataset before training (--scan), or write a prepared training copy of it (--prepare).

Check a dataset before training: every video is probed once (the index is cached under $FAME_CACHE or
~/.cache/fame and reused while the files are unchanged) and the unreadable or missing ones are listed:

    python dataset_tools.py --scan --dataset k400 --data /datasets/kinetics400

Write a training copy that a loader worker reads 2-5x faster (bench.py loader on Kinetics-like sources: a keyframe
every 16 frames, frames no larger than the crops need, x264's fast-decode tuning; the same layout, frame rate and
frame count), then pass it as --data to any stage. It is resumable, never writes into the source, and lists the
unreadable videos it leaves out:

    python dataset_tools.py --prepare --dataset k400 --data /datasets/kinetics400 --out /datasets/kinetics400_prepared

The layouts, flags and index are data.py's (see its docstring).
"""
import argparse
import json
import math
import os
import re
import shutil
import time
from fractions import Fraction

import av
import numpy as np

import data
import utils

PREPARE_CRF = 20
PREPARE_FLAGS = {"out": None, "gop": 16, "short_side": None, "crf": PREPARE_CRF, "fastdecode": True}
REPORT_HEADER = "# dataset_tools.py --scan report: unreadable and missing videos"
PREPARE_REPORT_HEADER = "# dataset_tools.py --prepare report: videos left out of the copy"
# the same reports as written by data.py, which ran these tools before dataset_tools.py
DATA_PY_HEADERS = ("# data.py --scan report: unreadable and missing videos",
                   "# data.py --prepare report: videos left out of the copy")
SHOWN_UNREADABLE = 5  # unreadable files printed by --scan (all are in the report)


def get_args_parser():
    parser = argparse.ArgumentParser(description="Scan a dataset (build its index and list the videos that cannot "
                                                 "be read), or write a prepared training copy of it",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_data_args(parser)
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
    g.add_argument("--gop", type=utils.POSITIVE_INT, default=PREPARE_FLAGS["gop"],
                   help="a keyframe every GOP frames (closed GOPs): a clip's decoding starts at most GOP-1 frames "
                        "before it")
    g.add_argument("--short-side", type=utils.Number(int, 2), default=PREPARE_FLAGS["short_side"],
                   help="short side of the copy's frames, rounded to an even size (x264's 4:2:0 colour planes), "
                        "smaller ones keep theirs (default: the smallest at which "
                        "no training crop of --crop and --crop-scale is upsampled, training_short_side: 251 px for "
                        "4:3 frames, 217 for 16:9 at --crop 112)")
    g.add_argument("--crf", type=utils.Number(int, 0, 51), default=PREPARE_FLAGS["crf"],
                   help="x264 constant rate factor (lower: larger files closer to the source)")
    g.add_argument("--fastdecode", action=argparse.BooleanOptionalAction, default=PREPARE_FLAGS["fastdecode"],
                   help="x264 tune=fastdecode (no CABAC, no deblocking): faster decoding, somewhat larger files")
    return parser



def main(args):
    if args.dataset is None:
        raise utils.UsageError("--dataset is required (" + ", ".join(data.DATASETS) + ")")
    if args.prepare:
        if args.out is None:
            raise utils.UsageError("--prepare needs --out, the folder of the copy")
        return prepare(args)
    given = [f"--{k.replace('_', '-')}" for k, v in PREPARE_FLAGS.items() if getattr(args, k) != v]
    if given:
        raise utils.UsageError(f"given without --prepare, which alone uses them: {', '.join(given)}")
    data.check_data_args(args)
    if args.report is None:
        utils.check_writable(data.cache_dir(), data.cache_name())
    report = args.report or os.path.join(data.cache_dir(), f"unreadable_{args.dataset}.txt")
    check_report_path(report, None if args.dataset == "synthetic" else args.data)
    lines, total, bad, notes = [REPORT_HEADER], 0, [], []
    root = data.synthetic_root(args) if args.dataset == "synthetic" else args.data
    splits = ("train", "test") if data.has_test_split(args.dataset, root) else ("train",)
    if len(splits) == 1:
        print(f"{args.dataset}: no test split: both splits list every video (pretraining reads them all; "
              f"evaluation refuses this dataset)")
    for split in splits:
        held_out_from = "train" if split != "train" else None
        root, listing, infos, _, manifest = data.split_manifest(args, split, split != "train", held_out_from,
                                                                progress=f"probing {args.dataset}/{split}")
        noted = [(r, info["note"]) for r, info in zip(listing["rel"], infos) if isinstance(info, dict) and info["note"]]
        total, bad, notes = total + manifest["listed"], bad + manifest["left_out"], notes + noted
        print(data.describe_manifest(f"{args.dataset}/{split}", manifest) +
              (f"; {len(noted)} of the readable with a note" if noted else ""))
        lines += [f"# {data.describe_manifest(split, manifest)} under {root}"]
        lines += [f"{r}\t{reason}: {detail}" for r, reason, detail in manifest["left_out"]]
        lines += [f"# {split}: {len(noted)} readable with a note"] + [f"#  {r}\t{note}" for r, note in noted]
    # names as on disk, whatever their encoding (a name that is not UTF-8 is read with surrogate escapes)
    utils.atomic_write(report, lambda f: f.write(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")))
    for r, reason, detail in bad[:SHOWN_UNREADABLE]:
        print(f"  {r}: {reason}: {detail}".encode("utf-8", "backslashreplace").decode("utf-8"))
    more = f" (the first {SHOWN_UNREADABLE} above)" if len(bad) > SHOWN_UNREADABLE else ""
    print(f"{len(bad)} of {total} listed videos are left out (training and evaluation leave them out): listed in "
          f"{report}{more}")
    for r, note in notes[:SHOWN_UNREADABLE]:
        print(f"  {r}: {note}".encode("utf-8", "backslashreplace").decode("utf-8"))
    if notes:
        more = f" (the first {SHOWN_UNREADABLE} above)" if len(notes) > SHOWN_UNREADABLE else ""
        print(f"{len(notes)} of {total} videos are read with a note (correct frames, as said): listed in "
              f"{report}{more}")


def check_report_path(path, source=None):
    """Refuses, before any work, a --report path that holds anything but an earlier report (e.g. a dataset's split
    list), that lies in the dataset folder `source` (no tool writes into a dataset), or that cannot be written."""
    if os.path.isdir(path):
        raise utils.UsageError(f"--report {path} is a folder; give a file name")
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            first = f.readline().rstrip("\n")
        # "# train:" and "# N of M videos of": reports written before the headers
        if first not in (REPORT_HEADER, PREPARE_REPORT_HEADER, *DATA_PY_HEADERS) and \
                not first.startswith("# train: ") and \
                not re.fullmatch(r"# \d+ of \d+ videos of .* left out of .*", first):
            raise utils.UsageError(f"--report {path} exists and is not an earlier scan report (nor a --prepare "
                                   f"one): refusing to overwrite it; give another path")
    if source is not None and _inside(path, source):
        raise utils.UsageError(f"--report {path} is inside the dataset {source}, which no tool writes into; give a "
                               f"path outside it")
    utils.check_writable(os.path.dirname(os.path.abspath(path)), "--report")


# ----------------------------------------------------------------------------------------------------------
# A prepared training copy: every video re-encoded for fast random access, in the source's layout


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
    of the source as decode_frames() reads it (a frame missing at a pts gap or at the end repeats the one before,
    turned as the source's display matrix says), at the source's frame rate, so that a clip covers the same seconds
    in both."""
    rate = Fraction(info["fps"]).limit_denominator(100000)
    total, index_of = info["frames"], data.frame_index(info)
    params = f"keyint={gop}:min-keyint={gop}:scenecut=0"
    options = {"crf": str(crf), "x264-params": params, **({"tune": "fastdecode"} if fastdecode else {})}
    with av.open(src) as c, av.open(f, "w", format="mp4") as out:
        s = data.video_stream(c)
        s.codec_context.thread_count = threads
        o = out.add_stream("libx264", rate=rate, options=options)
        w, h = s.codec_context.width, s.codec_context.height
        turned = info["orient"] != [1, 0, 0, 1]  # written as shown: the copy has no display matrix
        o.width, o.height = prepare_size(*((h, w) if info["orient"][1] else (w, h)), short_side)
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
            if turned:
                upright = data.orient_frame(frame.to_ndarray(format="rgb24"), info["orient"])
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(upright), format="rgb24")
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
    """`dataset_tools.py --prepare`: the prepared copy of every readable video of every split in args.out, in the
    source's layout (directories and its .txt/.csv/.json files, written last); resumable, see the module
    docstring."""
    if args.split != 1:
        raise utils.UsageError("--prepare copies the videos of every split; leave out --split")
    data.check_data_args(args)
    if args.dataset != "synthetic" and (_inside(args.out, args.data) or _inside(args.data, args.out)):
        raise utils.UsageError(f"--out {args.out} overlaps the source {args.data}: write the copy to a folder outside "
                               f"it")
    utils.check_writable(args.out, "--out")
    src = data.synthetic_root(args) if args.dataset == "synthetic" else args.data
    out = os.path.join(args.out, os.path.basename(src)) if args.dataset == "synthetic" else args.out
    if _inside(out, src) or _inside(src, out):
        raise utils.UsageError(f"--out {args.out} overlaps the source {src}: write the copy to a folder outside it")
    report = args.report or os.path.join(out, "prepare_report.txt")
    check_report_path(report, src)
    if _inside(report, out) and os.path.exists(os.path.join(src, os.path.relpath(report, out))):
        raise utils.UsageError(f"--report {report} would replace the copy of the source's "
                               f"{os.path.relpath(report, out)}; give another path")
    settings = {"source": os.path.realpath(src), "dataset": args.dataset, "gop": args.gop, "crf": args.crf,
                "fastdecode": args.fastdecode,
                "short_side": args.short_side or f"training_short_side({args.crop}, {args.crop_scale[0]})"}
    utils.check_writable(out, "--out")
    with utils.file_lock(os.path.join(out, ".prepare.lock")):
        old = os.path.join(out, "prepare.json")
        if os.path.isfile(old):
            try:
                with open(old) as f:
                    same = json.load(f) == settings
            except ValueError:
                same = False
            if not same:
                raise utils.UsageError(f"{out} holds a copy made with other settings ({old}); use another --out")
        utils.write_json(old, settings)
        return _prepare_locked(args, src, out, report)


def _inside(path, folder):
    """Whether `path` is `folder` or lies inside it (links resolved)."""
    a, b = os.path.realpath(path), os.path.realpath(folder)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _prepare_locked(args, src, out, report):
    import synthetic

    t0 = time.time()
    jobs, bad = {}, {}
    splits = synthetic.SPLITS if args.dataset == "synthetic" else ("train", "test")
    for fold in (1, 2, 3) if args.dataset in data.SPLIT_DATASETS else (1,):
        fold_args = argparse.Namespace(**{**vars(args), "split": fold})
        for split in splits:
            try:
                _, rel, _, _, _, infos = data.index_split(fold_args, split, f"probing {args.dataset}/{split}")
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
    short_side = args.short_side or data.training_short_side(args.crop, args.crop_scale[0])
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
            if name.lower().endswith(data.META_EXTS) and name not in ("prepare.json", "prepare_report.txt"):
                if not (args.dataset == "synthetic" and name == "meta.json"):
                    _copy_atomic(os.path.join(dirpath, name), os.path.join(out, rel_dir, name))
    if args.dataset == "synthetic":  # its presence marks a complete benchmark
        _copy_atomic(os.path.join(src, "meta.json"), os.path.join(out, "meta.json"))
    left_out = {**bad, **failed}
    lines = [PREPARE_REPORT_HEADER, f"# {len(left_out)} of {len(jobs) + len(bad)} videos of {src} left out of {out}"]
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


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
