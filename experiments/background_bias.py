"""The background-bias experiment on the synthetic benchmark (version 2 or 3), end to end and resumable.

  python experiments/background_bias.py --steps a      # random init (3 seeds: the floor), supervised ceiling
  python experiments/background_bias.py --steps b      # vanilla MoCo (beta 1.0) vs FAME (beta 0.5), --seeds each
  python experiments/background_bias.py --steps c      # ablations, one seed each
  python experiments/background_bias.py --steps d      # FAME at beta 0.2, where the mask keeps little own scene
  python experiments/background_bias.py --steps e      # the scene-free twin: can motion alone be learned? (MoCo,
                                                       # and FAME at beta 0.2, whose backgrounds then hold only
                                                       # the donors' objects)
  python experiments/background_bias.py --masks        # FAME's masks against the true object masks
  python experiments/background_bias.py --crops        # share of training crops that keep the object in view
  python experiments/background_bias.py --findable     # is the positive findable among a batch's keys?
  python experiments/background_bias.py --composites   # does an embedding follow the motion or the scene?
  python experiments/background_bias.py --learnability # can MoCo with the backbone learn trivially distinct videos?
  python experiments/background_bias.py --pictures     # README pictures via visualize.py (moco_s0, fame_s0)
  python experiments/background_bias.py --table        # README tables, rendered from experiments/results.json
  python experiments/background_bias.py --checkpoint NAME=PATH  # the evaluations of any pretrained checkpoint
  python experiments/background_bias.py --collapse-check # pretrain.py's collapse warning on every stored run

--synthetic-version 3 runs the same commands on version 3 of the benchmark, with its protocol's settings
(PROTOCOLS) as defaults, experiments/results_v3.json and runs/background_bias_v3.

Every model is measured three ways with cached-feature linear probes (linear_probe.py --cache-features), plus
retrieval (retrieve.py):
  bias trap  - probe trained on `train` (scene family = class for 90% of videos), tested on test and test_swapped;
               the difference is the background-bias gap;
  motion     - probe trained on `balanced_train` (scene independent of class), tested on test_swapped;
  background - the same balanced probe predicting the scene family (--target scene), tested on balanced_test;
               lower = less background in the representation.
The floor is random initialisation; the ceiling a supervised model (finetune.py from scratch on balanced_train).
--findable, --composites and --pictures use the checkpoints under --runs-dir (not committed: rerun the steps).
Each stage runs as a subprocess of a stage script with explicit flags and is timed; a finished stage is recorded
in the JSON and skipped on a rerun (an interrupted pretrain.py resumes from its own checkpoint, inside an epoch
too), so the protocol can be run in parts. The shared settings are stored in the JSON, and a rerun with other
settings is refused: use another --results file for another regime. --device cuda runs every stage on a GPU.
experiments/results_v1.json holds the earlier protocol on version 1 of the benchmark (another backbone, 32 px).
"""
import argparse
import fcntl
import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the stage scripts' modules
import augment  # noqa: E402
import data  # noqa: E402
import fame  # noqa: E402
import models  # noqa: E402
import pretrain  # noqa: E402
import synthetic  # noqa: E402

# name: (protocol step, table label, pretrain.py flags); beta 1.0 is vanilla MoCo
METHODS = {
    "moco": ("b", "vanilla MoCo (beta 1.0)", ["--beta", "1.0"]),
    "fame": ("b", "FAME (beta 0.5)", ["--beta", "0.5"]),
    "beta0.3": ("c", "FAME beta 0.3", ["--beta", "0.3"]),
    "beta0.7": ("c", "FAME beta 0.7", ["--beta", "0.7"]),
    "seed": ("c", "FAME, seed mask", ["--beta", "0.5", "--fame-method", "seed"]),
    "grid": ("c", "FAME, grid mask", ["--beta", "0.5", "--fame-method", "grid"]),
    "gauss": ("c", "FAME, gauss mask", ["--beta", "0.5", "--fame-method", "gauss"]),
    "intra": ("c", "FAME, intra-video background", ["--beta", "0.5", "--background", "intra"]),
    "both": ("c", "FAME on both branches", ["--beta", "0.5", "--fame-branches", "both"]),
    "beta0.2": ("d", "FAME beta 0.2", ["--beta", "0.2"]),
    "flat": ("e", "MoCo on the scene-free twin", ["--beta", "1.0", "--synthetic-backdrop", "flat"]),
    "flat_beta0.2": ("e", "FAME beta 0.2 on the scene-free twin", ["--beta", "0.2", "--synthetic-backdrop", "flat"]),
}
LABELS = {"random": "random init (floor)", "supervised": "supervised on balanced_train (ceiling)",
          **{k: v[1] for k, v in METHODS.items()}}
TABLE_ORDER = ["random", "moco", "fame", "beta0.2", "beta0.3", "beta0.7", "seed", "grid", "gauss", "intra", "both",
               "flat", "flat_beta0.2", "supervised"]
CHECKPOINT = "checkpoint:"  # method of a run that evaluates a given checkpoint (--checkpoint NAME=PATH)
EVAL_STAGES = ("probe_bias", "probe_motion", "probe_scene", "retrieve")
PROTOCOLS = {  # per benchmark version: the defaults of the settings below that differ, the results and runs folder
    2: dict(crop_scale=[data.MIN_CROP_SCALE, 1.0], flip=True, results="results.json", runs="background_bias_v2"),
    # version 3: milder crops and no flips, under which motion alone is learnable (README, "Version 3")
    3: dict(crop_scale=[0.5, 1.0], flip=False, results="results_v3.json", runs="background_bias_v3"),
}
SETTINGS = ("synthetic_version", "synthetic_videos", "arch", "frames", "crop", "crop_scale", "flip", "epochs",
            "batch_size", "lr", "cos", "moco_k", "moco_m", "moco_t", "probe_epochs", "finetune_epochs", "finetune_lr",
            "eval_clips")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--steps", nargs="*", default=[], choices=["a", "b", "c", "d", "e"],
                        help="protocol steps to run")
    parser.add_argument("--only", nargs="*", default=None, metavar="RUN",
                        help="of the planned runs, only these (e.g. moco_s0 fame_s0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of steps a (random) and b")
    parser.add_argument("--table", action="store_true", help="print the README tables from the JSON and exit")
    parser.add_argument("--masks", action="store_true", help="measure FAME masks against the true object masks")
    parser.add_argument("--mask-videos", type=int, default=200, help="test videos measured by --masks")
    parser.add_argument("--crops", action="store_true",
                        help="share of the loader's random crops that keep at least half of the object in view")
    parser.add_argument("--learnability", action="store_true",
                        help="the learnability check (test_fame.py) for the backbone and for r2plus1d_tiny")
    parser.add_argument("--findable", action="store_true",
                        help="instance top-1 of query clips (plain or FAME-merged) among a batch's keys, with the "
                             "features of random init, the supervised ceiling, MoCo and FAME (seed 0)")
    parser.add_argument("--composites", action="store_true",
                        help="motion preference: is the clip of one video's object moving over another video's scene "
                             "nearer the first video (motion) or the second (scene)? With every seed-0 model present")
    parser.add_argument("--pictures", action="store_true",
                        help="write experiments/masks.png and experiments/caam.png (needs moco_s0 and fame_s0)")
    parser.add_argument("--checkpoint", nargs="*", default=[], metavar="NAME=PATH",
                        help="also evaluate these pretrained checkpoints (the bias, motion and background probes and "
                             "retrieval; --composites and --findable include them), recorded as runs NAME")
    parser.add_argument("--collapse-check", action="store_true",
                        help="print when pretrain.py's collapse warning fires on the key similarity histories of "
                             "every run in experiments/results*.json, beside its final loss, and exit")
    parser.add_argument("--results", default=None,
                        help="JSON of results (read, then updated after every stage); default: experiments/"
                             "results.json (version 2) or experiments/results_v3.json (version 3)")
    parser.add_argument("--runs-dir", default=None,
                        help="the benchmark's videos (<runs-dir>/data) and every stage's --output-dir; default: "
                             "runs/background_bias_v<version>")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each stage (default: cpu_count / jobs; use 1 while other jobs share "
                             "the cores, as several threads then wait on each other)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: the stage scripts' choice (CUDA when available); cpu: hide the GPUs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    g = parser.add_argument_group("settings shared by every run (recorded in the JSON)")
    g.add_argument("--synthetic-version", type=int, default=2, choices=sorted(PROTOCOLS),
                   help="benchmark version; sets the defaults of --crop-scale, --flip, --results and --runs-dir")
    g.add_argument("--synthetic-videos", type=int, default=800, help="training videos of the generator")
    g.add_argument("--arch", default=pretrain.PRESETS["synthetic"]["arch"], help="backbone of every run")
    g.add_argument("--frames", type=int, default=pretrain.PRESETS["synthetic"]["frames"], help="frames per clip")
    g.add_argument("--crop", type=int, default=pretrain.PRESETS["synthetic"]["crop"], help="crop size")
    g.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="area share of the training crops (pretraining and the supervised ceiling); default: "
                        "0.2 1.0 (version 2), 0.5 1.0 (version 3)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips of the training clips; default: on (version 2), off (version 3)")
    g.add_argument("--epochs", type=int, default=48,
                   help="pretraining epochs (twice the quick start's, which must stay within 10 minutes)")
    g.add_argument("--batch-size", type=int, default=pretrain.PRESETS["synthetic"]["batch_size"],
                   help="pretraining batch")
    g.add_argument("--lr", type=float, default=pretrain.PRESETS["synthetic"].get("lr", 0.01),
                   help="pretraining learning rate")
    g.add_argument("--cos", action=argparse.BooleanOptionalAction,
                   default=pretrain.PRESETS["synthetic"].get("cos", False),
                   help="cosine pretraining schedule (else the paper's steps, scaled)")
    g.add_argument("--moco-k", type=int, default=pretrain.PRESETS["synthetic"]["moco_k"], help="MoCo queue size K")
    g.add_argument("--moco-m", type=float, default=pretrain.PRESETS["synthetic"]["moco_m"], help="key-encoder momentum")
    g.add_argument("--moco-t", type=float, default=0.1, help="MoCo temperature T")
    g.add_argument("--probe-epochs", type=int, default=30, help="linear-probe epochs (cached features)")
    g.add_argument("--finetune-epochs", type=int, default=15, help="epochs of the supervised ceiling")
    g.add_argument("--finetune-lr", type=float, default=0.05, help="lr of the supervised ceiling (cosine, no dropout)")
    g.add_argument("--eval-clips", type=int, default=2, help="uniform clips per video in every evaluation")
    return parser


def protocol_defaults(args):
    """Fills the flags left unset with the defaults of the benchmark version's protocol (PROTOCOLS)."""
    protocol = PROTOCOLS[args.synthetic_version]
    if args.crop_scale is None:
        args.crop_scale = list(protocol["crop_scale"])
    if args.flip is None:
        args.flip = protocol["flip"]
    if args.results is None:
        args.results = str(REPO / "experiments" / protocol["results"])
    if args.runs_dir is None:
        args.runs_dir = str(REPO / "runs" / protocol["runs"])
    return args


def given_checkpoints(args):
    """{NAME: PATH} of --checkpoint; refuses a malformed entry or a missing file before any work."""
    out = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            sys.exit(f"--checkpoint {item}: expected NAME=PATH of an existing checkpoint file")
        out[name] = str(Path(path).resolve())
    return out


def label(method):
    """A model's name in the tables."""
    return f"checkpoint {method[len(CHECKPOINT):]}" if method.startswith(CHECKPOINT) else LABELS[method]


def table_position(method):
    """Where a model's rows go in the tables: TABLE_ORDER, then the given checkpoints by name."""
    return (len(TABLE_ORDER), method) if method.startswith(CHECKPOINT) else (TABLE_ORDER.index(method), "")


def main(args):
    protocol_defaults(args)
    if args.collapse_check:
        print(render_collapse_check())
        return
    results = load_results(args.results)
    if args.table:
        print(render_gates(results))
        print()
        print(render_table(results))
        print()
        print(render_crop_line(results))
        print()
        print(render_mask_table(results))
        print(render_findable_table(results))
        print()
        print(render_composites_table(results))
        print()
        print(render_targets(results))
        print()
        print(render_learnability(results))
        return
    settings = {k: getattr(args, k) for k in SETTINGS}
    if results.get("settings", settings) != settings:
        sys.exit(f"{args.results} holds runs made with the settings {results['settings']}; pass the same flags, "
                 f"or another --results file for another regime")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is visible")
    if not args.dry_run:
        results = update_results(args.results, lambda r: r.update(settings=settings))
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    for flag, measure, key in (("masks", measure_masks, "mask_iou"), ("crops", measure_crops, "crops"),
                               ("findable", measure_findable, "findable"),
                               ("composites", measure_composites, "composites"),
                               ("learnability", measure_learnability, "learnability")):
        if getattr(args, flag) and not args.dry_run:
            t0 = time.time()
            out = measure(args, device)
            out["wall_s"] = round(time.time() - t0, 1)
            results = update_results(args.results, lambda r: r.update({key: out}))
    runs = plan_runs(args)
    if args.only is not None:
        runs = [r for r in runs if r["name"] in args.only]
    Runner(args, results).run_all(runs)
    if args.pictures:
        make_pictures(args)


def plan_runs(args):
    """One run = one model and its stages (pretrain or finetune, then the evaluations)."""
    runs = []
    if "a" in args.steps:
        runs += [{"name": f"random_s{s}", "method": "random", "seed": s} for s in args.seeds]
        runs.append({"name": "supervised_s0", "method": "supervised", "seed": 0})
    if "b" in args.steps:
        runs += [{"name": f"{m}_s{s}", "method": m, "seed": s} for s in args.seeds for m in ("moco", "fame")]
    for step in ("c", "d", "e"):
        if step in args.steps:
            runs += [{"name": f"{m}_s0", "method": m, "seed": 0} for m, v in METHODS.items() if v[0] == step]
    runs += [{"name": name, "method": CHECKPOINT + name, "seed": 0, "checkpoint": path}
             for name, path in given_checkpoints(args).items()]
    return runs


def data_flags(args):
    return ["--dataset", "synthetic", "--data", str(Path(args.runs_dir) / "data"), "--synthetic-version",
            str(args.synthetic_version), "--synthetic-videos", str(args.synthetic_videos), "--workers", "1",
            "--arch", args.arch, "--frames", str(args.frames), "--crop", str(args.crop),
            "--crop-scale", *map(str, args.crop_scale), "--flip" if args.flip else "--no-flip"]


def stages(args, run):
    """[(stage, argv)] of one run, in order. Each stage writes <output-dir>/results.json (pretrain: log.jsonl)."""
    out = Path(args.runs_dir) / run["name"]
    py, seed = [sys.executable], ["--seed", str(run["seed"])]
    todo, ckpt = [], []  # no --pretrained: random initialisation, seeded by --seed
    if run["method"] == "supervised":
        todo.append(("finetune", py + ["finetune.py", *data_flags(args), *seed, "--train-split", "balanced_train",
                                       "--test-split", "test_swapped", "--epochs", str(args.finetune_epochs),
                                       "--lr", str(args.finetune_lr), "--cos", "--dropout", "0",
                                       "--clips", str(args.eval_clips), "--output-dir", str(out / "finetune")]))
        ckpt = ["--pretrained", str(out / "finetune" / "checkpoint.pth")]  # the final model, not best-on-test
    elif run["method"].startswith(CHECKPOINT):
        ckpt = ["--pretrained", run["checkpoint"]]
    elif run["method"] != "random":
        todo.append(("pretrain", py + ["pretrain.py", *data_flags(args), *seed,
                                       "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                                       "--lr", str(args.lr), *(["--cos"] if args.cos else []),
                                       "--moco-k", str(args.moco_k), "--moco-m", str(args.moco_m),
                                       "--moco-t", str(args.moco_t), *METHODS[run["method"]][2],
                                       "--output-dir", str(out / "pretrain")]))
        ckpt = ["--pretrained", str(out / "pretrain" / "checkpoint.pth")]
    evals = [*data_flags(args), *seed, *ckpt, "--clips", str(args.eval_clips)]
    probe = py + ["linear_probe.py", *evals, "--cache-features", "--epochs", str(args.probe_epochs)]
    return todo + [
        ("probe_bias", probe + ["--output-dir", str(out / "probe_bias")]),
        ("probe_motion", probe + ["--train-split", "balanced_train", "--test-split", "test_swapped",
                                  "--output-dir", str(out / "probe_motion")]),
        ("probe_scene", probe + ["--train-split", "balanced_train", "--test-split", "balanced_test",
                                 "--target", "scene", "--output-dir", str(out / "probe_scene")]),
        ("retrieve", py + ["retrieve.py", *evals, "--output-dir", str(out / "retrieve")]),
    ]


def metrics_of(stage, out_dir):
    """The numbers the tables need from one finished stage (accuracies in %)."""
    out_dir = Path(out_dir)
    if stage == "pretrain":
        log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
        return {"epochs": log[-1]["epoch"], "loss": [round(e["loss"], 4) for e in log],
                "acc": [round(e["acc"], 2) for e in log], "key_sim": [e["key_sim"] for e in log],
                "key_sim_final": log[-1]["key_sim"]}
    res = json.loads((out_dir / "results.json").read_text())
    splits = res["splits"]
    if stage == "finetune":
        log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
        return {"epochs": log[-1]["epoch"], "test_swapped": splits["test_swapped"]["top1"],
                "test": splits["test"]["top1"]}
    if stage == "retrieve":
        return {"R@1_test": splits["test"]["R@1"], "R@1_test_swapped": splits["test_swapped"]["R@1"]}
    if stage == "probe_scene":
        return {"scene_balanced_test": splits["balanced_test"]["top1"]}
    return {"test": splits["test"]["top1"], "test_swapped": splits["test_swapped"]["top1"], "gap": res["bias_gap"]}


class Runner:
    """Runs the stages of each run in order, --jobs runs at a time, saving the JSON after every stage."""

    def __init__(self, args, results):
        self.args, self.results, self.lock = args, results, threading.Lock()
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
        if args.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""

    def run_all(self, runs):
        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            for future in [pool.submit(self.run_one, r) for r in runs]:
                future.result()

    def run_one(self, run):
        for stage, argv in stages(self.args, run):
            with self.lock:
                entry = self.results.setdefault("runs", {}).setdefault(run["name"], dict(run, stages={}))
                if stage in entry["stages"]:
                    continue
            out_dir = Path(argv[argv.index("--output-dir") + 1])
            command = shown(argv)
            print(f"[{run['name']}/{stage}] {command}", flush=True)
            if self.args.dry_run:
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            with open(out_dir / "stdout.log", "a") as log:
                rc = subprocess.run(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT).returncode
            wall = time.time() - t0
            if rc != 0:  # later stages of this run need this one; other runs go on
                print(f"[{run['name']}/{stage}] FAILED (exit {rc}) after {wall:.0f} s: see {out_dir}/stdout.log",
                      flush=True)
                return
            record = {"command": command, "wall_s": round(wall, 1), **metrics_of(stage, out_dir)}
            with self.lock:
                entry["stages"][stage] = record
                update_results(self.args.results, lambda r: r.setdefault("runs", {}).setdefault(
                    run["name"], dict(run, stages={}))["stages"].__setitem__(stage, record))
            print(f"[{run['name']}/{stage}] done in {wall:.0f} s", flush=True)


def shown(argv):
    """A command as the README shows it: `python`, paths relative to the repository."""
    return " ".join(["python"] + [os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a for a in argv[1:]])


def load_results(path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def update_results(path, change):
    """Read the JSON, apply change(results) and write it back atomically, under a file lock: drivers running
    at the same time (e.g. two --only lists) each add their own entries without dropping the others'."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path)
        change(results)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return results


# ---------------------------------------------------------------------------------------------------------
# README tables

COLUMNS = [  # (header, stage, metric key)
    ("bias probe: test", "probe_bias", "test"),
    ("bias probe: test_swapped ↑", "probe_bias", "test_swapped"),
    ("bias gap ↓", "probe_bias", "gap"),
    ("motion content ↑", "probe_motion", "test_swapped"),
    ("background content ↓", "probe_scene", "scene_balanced_test"),
    ("R@1 test", "retrieve", "R@1_test"),
    ("R@1 test_swapped", "retrieve", "R@1_test_swapped"),
]


def _mean_std(values, digits=1):
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def render_table(results):
    """Markdown table, mean ± sample std over the seeds present, of every model whose evaluations finished."""
    runs = list(results.get("runs", {}).values())
    lines = ["| model | seeds | " + " | ".join(c[0] for c in COLUMNS)
             + " | final pretrain loss | final key similarity | train time (min) | eval time (min) |",
             "|" + " --- |" * (len(COLUMNS) + 6)]
    for method in sorted({r["method"] for r in runs}, key=table_position):
        done = finished(runs, method)
        if not done:
            continue
        cells = [label(method), ",".join(str(r["seed"]) for r in sorted(done, key=lambda r: r["seed"]))]
        cells += [_mean_std([r["stages"][stage][key] for r in done]) for _, stage, key in COLUMNS]
        train = [r["stages"].get("pretrain") or r["stages"].get("finetune") for r in done]
        pre = [t for t in train if t and "key_sim_final" in t]
        cells.append(_mean_std([t["loss"][-1] for t in pre], digits=3))
        cells.append(_mean_std([t["key_sim_final"] for t in pre], digits=2))
        cells.append(_mean_std([t["wall_s"] / 60 for t in train if t]))
        cells.append(_mean_std([sum(r["stages"][s]["wall_s"] for s in EVAL_STAGES) / 60 for r in done]))
        lines.append("| " + " | ".join(cells) + " |")
    settings = results.get("settings", {})
    lines += ["", f"Accuracies and R@1 in %; chance is 12.5% (8 motion classes, 8 scene families), and the pretraining "
              f"loss's chance is ln(K + 1) = {math.log(settings.get('moco_k', 0) + 1):.2f}. Bias probe: trained on "
              "`train`; motion content: probe trained on `balanced_train`, tested on `test_swapped`; background "
              "content: the balanced probe predicting the scene family on `balanced_test`. Final key similarity: "
              "mean cosine between two keys of the last queue (1 = every video embedded alike). Settings: "
              f"`{json.dumps(settings, sort_keys=True)}`."]
    sup = [r for r in runs if r["method"] == "supervised" and "finetune" in r["stages"]]
    if sup:
        f = sup[0]["stages"]["finetune"]
        lines.append(f"The supervised ceiling's own classifier (trained on `balanced_train`): test_swapped "
                     f"{f['test_swapped']:.1f}%, test {f['test']:.1f}%; its row above probes its frozen features.")
    return "\n".join(lines)


def finished(runs, method):
    """The runs of `method` whose evaluations all finished."""
    return [r for r in runs if r["method"] == method and all(s in r["stages"] for s in EVAL_STAGES)]


def render_gates(results):
    """The benchmark's method-free gates, from the runs of steps a and e (MoCo on the scene-free twin) and --masks:
    G1 motion alone is learnable (the twin's final loss <= 0.85 ln(K + 1) and key_sim <= 0.6), G2 the shortcut is
    there (random init: bias gap >= 30 points, background content >= 80%), G3 the supervised ceiling reaches 85%
    on test_swapped, G4 FAME's mask at beta 0.5 keeps >= 85% of the object and <= 20% of the frame as own scene
    (at the training crop's size)."""
    runs = list(results.get("runs", {}).values())
    chance = math.log(results.get("settings", {}).get("moco_k", 0) + 1)

    def values(method, stage, key):
        return [r["stages"][stage][key] for r in runs if r["method"] == method and stage in r["stages"]]

    def row(gate, measured, met):
        return f"| {gate} | {measured} | {'–' if met is None else 'yes' if met else 'no'} |"

    lines = ["| gate | measured | met |", "| --- | --- | --- |"]
    loss, key_sim = ([v[-1] if isinstance(v, list) else v for v in values("flat", "pretrain", k)]
                     for k in ("loss", "key_sim_final"))
    motion = {m: values(m, "probe_motion", "test_swapped") for m in ("flat", "random", "supervised")}
    lines.append(row(f"G1 MoCo on the scene-free twin: final loss <= 0.85 ln(K + 1) = {0.85 * chance:.2f}, "
                     "key_sim <= 0.6",
                     f"loss {_mean_std(loss, 3)}, key_sim {_mean_std(key_sim, 2)}; motion content "
                     f"{_mean_std(motion['flat'])} (random init {_mean_std(motion['random'])}, ceiling "
                     f"{_mean_std(motion['supervised'])})",
                     (max(loss) <= 0.85 * chance and max(key_sim) <= 0.6) if loss else None))
    gap, background = values("random", "probe_bias", "gap"), values("random", "probe_scene", "scene_balanced_test")
    lines.append(row("G2 random init: bias gap >= 30 points, background content >= 80%",
                     f"gap {_mean_std(gap)}, background content {_mean_std(background)}",
                     (statistics.mean(gap) >= 30 and statistics.mean(background) >= 80) if gap and background
                     else None))
    ceiling = values("supervised", "finetune", "test_swapped")
    lines.append(row("G3 supervised ceiling: test_swapped >= 85%", _mean_std(ceiling),
                     min(ceiling) >= 85 if ceiling else None))
    masks = results.get("mask_iou", {}).get("results", {})
    size = min(masks, key=lambda k: int(k.rstrip("px")), default=None)
    f = masks[size].get("fame_beta0.5") if size else None
    lines.append(row(f"G4 FAME's mask at beta 0.5 ({size or 'training crop'}): object kept >= 85%, own scene "
                     "<= 20% of the frame",
                     f"object kept {100 * f['recall']:.1f}%, own scene {100 * f['own_background']:.1f}% (donor's "
                     f"object shown {100 * f['donor_object']:.1f}%)" if f else "–",
                     (f["recall"] >= 0.85 and f["own_background"] <= 0.2) if f else None))
    return "\n".join(lines)


def render_targets(results):
    """The benchmark's targets for FAME against vanilla MoCo, from the seed means of step b."""
    runs = list(results.get("runs", {}).values())

    def mean(method, stage, key):
        values = [r["stages"][stage][key] for r in finished(runs, method)]
        return statistics.mean(values) if values else None

    moco, fame_ = ([mean(m, "probe_motion", "test_swapped"), mean(m, "probe_scene", "scene_balanced_test"),
                    mean(m, "probe_bias", "gap")] for m in ("moco", "fame"))
    if None in moco + fame_:
        return "(targets: needs finished moco and fame runs)"
    d_motion, d_background, gap_ratio = fame_[0] - moco[0], fame_[1] - moco[1], fame_[2] / moco[2]
    checks = [("motion content at least MoCo's + 10 points", f"{d_motion:+.1f} points", d_motion >= 10),
              ("background content at most MoCo's - 20 points", f"{d_background:+.1f} points", d_background <= -20),
              ("bias gap at most half of MoCo's", f"{gap_ratio:.2f} x MoCo's", gap_ratio <= 0.5)]
    return "\n".join(["| target (FAME against vanilla MoCo, seed means) | measured | met |", "| --- | --- | --- |"]
                     + [f"| {name} | {value} | {'yes' if met else 'no'} |" for name, value, met in checks])


def render_collapse_check():
    """When pretrain.collapse_warning fires on each stored pretraining's per-epoch key_sim history, beside the run's
    final loss and key_sim (every experiments/results*.json)."""
    lines = ["| results file | run | epochs | final loss | key_sim at a quarter | final key_sim | warning at epoch |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted((REPO / "experiments").glob("results*.json")):
        for name, run in sorted(load_results(path).get("runs", {}).items()):
            history = run["stages"].get("pretrain", {}).get("key_sim")
            if not history:
                continue
            epochs = len(history)
            fired = next((e for e in range(1, epochs + 1) if pretrain.collapse_warning(history[:e], epochs)), None)
            lines.append(f"| {path.name} | {name} | {epochs} | {run['stages']['pretrain']['loss'][-1]:.2f} | "
                         f"{history[math.ceil(epochs / 4) - 1]:.2f} | {history[-1]:.2f} | {fired or '–'} |")
    return "\n".join(lines)


def render_learnability(results):
    rows = results.get("learnability")
    if not rows:
        return "(no learnability measurements: run --learnability)"
    lines = ["| backbone | clips | steps | final loss (chance) | key similarity | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for arch, r in rows.items():
        if arch == "wall_s":
            continue
        lines.append(f"| {arch} | {r['frames']}x{r['crop']}x{r['crop']} | {r['steps']} | {r['loss']:.2f} "
                     f"({r['chance']:.2f}) | {r['key_sim']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def render_crop_line(results):
    c = results.get("crops")
    if not c:
        return "(no crop measurements: run --crops)"
    return (f"Training crops that keep at least half of the object in every frame of the clip: "
            f"{100 * c['kept_half']:.1f}% ({100 * c['kept_any']:.1f}% keep some of it; {c['clips']} clips of `train`, "
            f"the loader's RandomResizedCrop at scale {'-'.join(f'{v:g}' for v in c['scale'])} on "
            f"{c['size']}x{c['size']} frames).")


def render_mask_table(results):
    """Markdown table of --masks, per beta: FAME's mask quality and the other masks' IoU (paper Table 4)."""
    m = results.get("mask_iou")
    if not m:
        return "(no mask measurements: run --masks)"
    lines = []
    for size in sorted(m["results"], key=lambda s: int(s.rstrip("px"))):
        res = m["results"][size]
        betas = sorted({float(k.split("_beta")[1]) for k in res if "_beta" in k})
        lines += [f"Masks at {size} ({m['videos']} test clips of {m['frames']} frames, stride {m['stride']}; "
                  f"the object covers {100 * res['object_area_frame']:.1f}% of a frame and "
                  f"{100 * res['object_area_union']:.1f}% of the frame over the whole clip):", "",
                  "| beta | FAME IoU | FAME precision | object kept | own background kept (% of frame) | "
                  "donor's object shown | seed IoU | grid IoU | gauss IoU |", "|" + " --- |" * 9]
        for beta in betas:
            f = res[f"fame_beta{beta}"]
            lines.append(f"| {beta} | {f['iou']:.2f} | {f['precision']:.2f} | {100 * f['recall']:.0f}% | "
                         f"{100 * f['own_background']:.1f} | {100 * f['donor_object']:.0f}% | " + " | ".join(
                             f"{res[f'{k}_beta{beta}']['iou']:.2f}" for k in ("seed", "grid", "gauss")) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Measurements and pictures


def _textures(n, size, generator, max_freq=3):
    """(n, 3, size, size) smooth random textures in [0, 1] that tile seamlessly: random Fourier series with integer
    frequencies up to max_freq per channel."""
    k = torch.arange(-max_freq, max_freq + 1, dtype=torch.float32)
    ky, kx = (f.flatten() for f in torch.meshgrid(k, k, indexing="ij"))
    keep = (kx != 0) | (ky != 0)
    ky, kx = ky[keep], kx[keep]  # (F,)
    pos = torch.arange(size, dtype=torch.float32)
    phase = 2 * math.pi * (kx.view(-1, 1, 1) * pos.view(1, 1, -1) + ky.view(-1, 1, 1) * pos.view(1, -1, 1)) / size
    amp = torch.randn(n, 3, len(kx), generator=generator) / (kx ** 2 + ky ** 2).sqrt()
    shift = 2 * math.pi * torch.rand(n, 3, len(kx), generator=generator)
    field = (amp[..., None, None] * torch.cos(phase + shift[..., None, None])).sum(2)  # (n, 3, size, size)
    return (0.5 + 0.22 * field / field.flatten(2).std(2)[..., None, None]).clamp(0, 1)


def learnability_check(arch, frames, crop, videos=64, batch=16, K=32, steps=100, seed=0):
    """Can MoCo with this backbone and clip size learn instance discrimination where it is trivial? Each video is
    a texture of its own scrolling one pixel per frame in one of four directions; the two clips of a video are
    two random cyclic shifts of it at random times (no other augmentation, Kinetics normalization). Batches visit
    the videos in a fixed cyclic order, so that no video of a batch has a key in the queue. SGD lr 0.03,
    momentum 0.9, m 0.99, T 0.1. Returns the mean loss of the last 10 steps, its chance ln(K + 1), the final key
    similarity and the seconds taken."""
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    textures = _textures(videos, crop, g)
    direction = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0]])[torch.randint(0, 4, (videos,), generator=g)]

    def clips(idx):  # (B, 3, T, S, S): each clip at its own start time and cyclic offset
        out = []
        for i in idx.tolist():
            t, dy, dx = (int(v) for v in torch.randint(0, crop, (3,), generator=g))
            out.append(torch.stack([textures[i].roll((dy + direction[i, 0] * (t + j), dx + direction[i, 1] * (t + j)),
                                                     (1, 2)) for j in range(frames)], 1))
        return augment.normalize(torch.stack(out))

    torch.manual_seed(seed)
    moco = models.MoCo(functools.partial(models.build_backbone, arch), K=K, m=0.99, T=0.1)
    optimizer = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.03, momentum=0.9,
                                weight_decay=1e-4)
    order, losses = torch.randperm(videos, generator=g), []
    for step in range(steps):
        idx = order[(step * batch) % videos:][:batch]
        logits, labels = moco(clips(idx), clips(idx))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"arch": arch, "frames": frames, "crop": crop, "steps": steps, "loss": sum(losses[-10:]) / 10,
            "chance": math.log(K + 1), "key_sim": moco.key_similarity(), "seconds": round(time.time() - t0, 1)}


def measure_learnability(args, device):
    """learnability_check for the stand-in and for r2plus1d_tiny, the CPU backbone of version 1's protocol."""
    archs = dict.fromkeys([args.arch, "r2plus1d_tiny"])
    return {arch: learnability_check(arch, args.frames, args.crop) for arch in archs}


def benchmark(args):
    """The experiment's benchmark: its data flags parsed as pretrain.py parses them, its root and meta.json, and
    the (stride, span) of a clip of its videos."""
    ns = data.check_data_args(pretrain.get_args_parser().parse_args(data_flags(args)))
    root = Path(data.synthetic_root(ns))
    meta = json.loads((root / "meta.json").read_text())
    return ns, root, meta, *data.clip_layout(meta["length"], ns.frames, ns.stride)


def split_rows(root, split):
    """(path, class, scene family) of every video of `split` of the benchmark at root, as data.py lists them."""
    paths, labels, _, scenes = data.list_videos("synthetic", str(root), split)
    return list(zip(paths, labels, scenes))


def measure_masks(args, device, betas=(0.1, 0.15, 0.2, 0.3, 0.5, 0.7), methods=("fame", "seed", "grid", "gauss")):
    """FAME's masks against the generator's object masks, on the middle clip of the first --mask-videos test
    videos, at the 64 px frame and resized to the 32 px training crop (a whole-frame crop).
    The mask is constant over the clip, so IoU and precision use the union of the clip's object masks;
    recall = share of each frame's object pixels inside the mask (what the merged clip keeps of the object);
    own_background = share of the frame that is the clip's own background and survives the merge (Eq. 4);
    donor_object = share of the background donor's object (the previous clip's) that the merged clip shows."""
    ns, root, meta, stride, span = benchmark(args)
    length = meta["length"]
    idx = data.clip_indices((length - span) // 2, length, ns.frames, stride)
    paths = [row[0] for row in split_rows(root, "test")][: args.mask_videos]
    clips, objects = [], []
    for path in paths:
        frames, masks = synthetic.clip(str(root / path), idx)  # (T, S, S, 3) uint8, (T, S, S) bool
        clips.append(torch.from_numpy(frames).permute(3, 0, 1, 2))
        objects.append(torch.from_numpy(masks))
    clips = torch.stack(clips).float().div_(255)  # (B, 3, T, S, S)
    objects = torch.stack(objects).float()  # (B, T, S, S)
    out = {"videos": len(paths), "frames": ns.frames, "stride": stride, "results": {}}
    for size in (clips.shape[-1], ns.crop):
        x, obj = clips, objects
        if size != clips.shape[-1]:
            x = F.interpolate(clips.flatten(1, 2), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False).unflatten(1, (3, -1)).clamp(0, 1)  # (B, 3, T, s, s)
            obj = (F.interpolate(objects, size=(size, size), mode="area") > 0.5).float()  # (B, T, s, s)
        union = obj.amax(1)  # (B, s, s)
        res = {"object_area_frame": obj.mean().item(), "object_area_union": union.mean().item()}
        for method in methods:
            for beta in betas:
                m = fame.foreground_mask(x, beta=beta, method=method).float()  # (B, s, s)
                inter = (m * union).flatten(1).sum(1)  # (B,)
                recall = (m[:, None] * obj).flatten(2).sum(2) / obj.flatten(2).sum(2).clamp_min(1)  # (B, T)
                res[f"{method}_beta{beta}"] = {
                    "iou": (inter / (m + union - m * union).flatten(1).sum(1)).mean().item(),
                    "precision": (inter / m.flatten(1).sum(1)).mean().item(),
                    "recall": recall.mean().item(),
                    "own_background": (m * (1 - union)).mean().item(),
                    "donor_object": donor_kept(m, obj.roll(1, 0)).mean().item()}
        out["results"][f"{size}px"] = res
    return out


def donor_kept(mask, donor_objects):
    """(B,) share of each background donor's object pixels outside the foreground mask (B, s, s), i.e. shown in
    the merged clip, over the frames of donor_objects (B, T, s, s)."""
    outside = (1 - mask[:, None]) * donor_objects  # (B, T, s, s)
    return outside.flatten(1).sum(1) / donor_objects.flatten(1).sum(1).clamp_min(1)


def measure_crops(args, device, clips=800):
    """Share of the loader's random crops (RandomResizedCrop at --crop-scale of the training frames) that keep at least
    half of the object's pixels in view in every frame of the clip, on the first `clips` training videos."""
    ns, root, meta, stride, span = benchmark(args)
    rows = split_rows(root, "train")[:clips]
    half = anything = 0
    g = torch.Generator().manual_seed(0)
    for path, _, _ in rows:
        _, masks = synthetic.clip(str(root / path))
        start = int(torch.randint(0, meta["length"] - span + 1, (), generator=g))
        m = torch.from_numpy(masks[data.clip_indices(start, meta["length"], ns.frames, stride)])  # (T, S, S)
        top, left, h, w = data.random_resized_crop_box(m.shape[1], m.shape[2], tuple(ns.crop_scale), generator=g)
        inside = m[:, top:top + h, left:left + w].flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)  # (T,)
        half += bool((inside >= 0.5).all())
        anything += bool((inside > 0).all())
    return {"clips": len(rows), "size": meta["size"], "scale": ns.crop_scale, "kept_half": half / len(rows),
            "kept_any": anything / len(rows)}


def frozen_backbones(args, device):
    """(method, seed, frozen backbone in eval mode) of every model here, in the tables' order: random init for each
    of --seeds (the weights linear_probe.py draws for that seed), then every run of steps a-e whose checkpoint
    exists, then the --checkpoint files. The global RNG is reseeded after each is built, so that every model meets
    the same random draws."""
    runs = Path(args.runs_dir)
    found = []  # (method, seed, checkpoint or None)
    for method in TABLE_ORDER:
        stage = "finetune" if method == "supervised" else "pretrain"
        if method == "random":
            found += [(method, seed, None) for seed in args.seeds]
            continue
        found += sorted((method, int(p.name.rsplit("_s", 1)[1]), p / stage / "checkpoint.pth")
                        for p in runs.glob(f"{method}_s*") if (p / stage / "checkpoint.pth").is_file())
    found += [(CHECKPOINT + name, 0, path) for name, path in given_checkpoints(args).items()]
    for method, seed, path in found:
        torch.manual_seed(seed)
        backbone = models.build_backbone(args.arch)
        if path is not None:
            models.load_backbone(backbone, path)
        torch.manual_seed(0)
        yield method, seed, backbone.to(device).eval()


FINDABLE_VIEWS = {  # column key: header
    "pretrain": "pretraining's views", "fame0.3": "FAME beta 0.3", "fame0.5": "FAME beta 0.5",
    "fame0.7": "FAME beta 0.7", "no_colour": "no colour augmentation", "whole": "whole frames, no flip",
    "whole_no_colour": "whole frames, no flip, no colour augmentation"}


@torch.no_grad()
def measure_findable(args, device, batches=4, batch_size=64):
    """How often a query clip's nearest key (cosine, frozen backbone features in eval mode) is the other clip of
    its own video, among the batch_size videos of a batch of `train`. Views: pretraining's two clips of each video
    (the loader's crop and flip) with colour augmentation on both; the same with FAME on the query as in
    pretrain.py (beta 0.3, 0.5, 0.7); the same without the colour augmentation; and the whole frames of two random
    clip spans (no crop, no flip) with and without it."""
    ns, root, meta, stride, span = benchmark(args)
    ns.seed = 0
    loader = data.build_loader(data.build_dataset(ns, "train", "pretrain"), batch_size, ns, train=True, seed=0)
    pairs = [(b["q"], b["k"]) for b in itertools.islice(loader, batches)]  # (B, 3, T, S, S) uint8 each
    rows = split_rows(root, "train")[:batches * batch_size]
    g = torch.Generator().manual_seed(0)
    whole = [[], []]
    for path, _, _ in rows:
        frames, _ = synthetic.clip(str(root / path))
        for view, start in zip(whole, torch.randperm(meta["length"] - span + 1, generator=g)[:2].tolist()):
            clip = frames[data.clip_indices(start, meta["length"], ns.frames, stride)]
            view.append(data.crop_resize(clip, (0, 0, meta["size"], meta["size"]), ns.crop))  # (3, T, s, s)
    whole = [tuple(torch.stack(view[i:i + batch_size]) for view in whole) for i in range(0, len(rows), batch_size)]
    out = {"batches": batches, "batch_size": batch_size, "models": {}}
    for method, seed, backbone in frozen_backbones(args, device):

        def top1(q, k, colour=True):  # (B,) hits of uint8 query and key clips
            views = [augment.augment_and_normalize(x) if colour else augment.normalize(x)
                     for x in (q.to(device), k.to(device))]
            q, k = (F.normalize(backbone.forward_features(x), dim=1) for x in views)  # (B, D)
            return ((q @ k.t()).argmax(1).cpu() == torch.arange(len(q))).tolist()

        hits = {view: [] for view in FINDABLE_VIEWS}
        for q, k in pairs:
            hits["pretrain"] += top1(q, k)
            for beta in (0.3, 0.5, 0.7):
                hits[f"fame{beta}"] += top1(fame.FAME(beta=beta)(q), k)  # Eq. (4), backgrounds from the batch
            hits["no_colour"] += top1(q, k, colour=False)
        for q, k in whole:
            hits["whole"] += top1(q, k)
            hits["whole_no_colour"] += top1(q, k, colour=False)
        out["models"][f"{method}_s{seed}"] = {"method": method, "seed": seed,
                                              **{view: 100 * sum(h) / len(h) for view, h in hits.items()}}
    return out


def other_video(rows, i):
    """The first row after row i (cyclically) of another class and another scene family."""
    return next(r for r in rows[i + 1:] + rows[:i] if r[1] != rows[i][1] and r[2] != rows[i][2])


@torch.no_grad()
def measure_composites(args, device, pairs=200):
    """Does an embedding follow the motion or the scene? For pairs (A, B) of test_swapped videos of other classes
    and other scene families: the composite X, A's object (its true masks) moving over B's scene alone in the
    video's last clip span, and the first clips of A and of B (no frame in common with X, so that X does not
    match A by where the object happens to be), all with the test-time centre crop. Motion preference: the share
    of pairs whose composite is nearer A (same motion, other scene) than B (same scene, other motion), in cosine
    of the frozen backbone's features centred by their mean over the three sets of clips."""
    ns, root, meta, stride, span = benchmark(args)
    first = data.clip_indices(0, meta["length"], ns.frames, stride)
    last = data.clip_indices(meta["length"] - span, meta["length"], ns.frames, stride)
    box = data.center_crop_box(meta["size"], meta["size"], ns.crop)
    rows = split_rows(root, "test_swapped")
    clips = {"A": [], "B": [], "X": []}
    for i, a in enumerate(rows[:pairs]):
        b = other_video(rows, i)
        object_a, mask_a = synthetic.clip(str(root / a[0]), last)  # (T, S, S, 3) uint8, (T, S, S) bool
        scene_b, _ = synthetic.clip(str(root / b[0]), last, scene_only=True)
        for key, frames in (("A", synthetic.clip(str(root / a[0]), first)[0]),
                            ("B", synthetic.clip(str(root / b[0]), first)[0]),
                            ("X", np.where(mask_a[..., None], object_a, scene_b))):
            clips[key].append(data.crop_resize(frames, box, ns.crop))  # (3, T, s, s) uint8
    clips = {key: augment.normalize(torch.stack(v)) for key, v in clips.items()}  # (N, 3, T, s, s)
    out = {"pairs": len(rows[:pairs]), "models": {}}
    for method, seed, backbone in frozen_backbones(args, device):
        f = {key: backbone.forward_features(x.to(device)).cpu() for key, x in clips.items()}  # (N, D) each
        mean = torch.cat(list(f.values())).mean(0)  # centred, as retrieve.py centres: else every cosine is near 1
        f = {key: F.normalize(v - mean, dim=1) for key, v in f.items()}
        to_motion, to_scene = (f["X"] * f["A"]).sum(1), (f["X"] * f["B"]).sum(1)  # (N,) cosines
        nearer = 100 * (to_motion > to_scene).float().mean().item()
        out["models"][f"{method}_s{seed}"] = {"method": method, "seed": seed, "motion_preference": nearer,
                                              "cos_motion": to_motion.mean().item(),
                                              "cos_scene": to_scene.mean().item()}
    return out


def by_method(models_):
    """{method: [entries]} of a measurement's per-model entries, in the tables' order."""
    groups = {}
    for entry in sorted(models_.values(), key=lambda e: (table_position(e["method"]), e["seed"])):
        groups.setdefault(entry["method"], []).append(entry)
    return groups


def render_findable_table(results):
    f = results.get("findable")
    if not f:
        return "(no findability measurements: run --findable)"
    lines = [f"Is the positive findable? Instance top-1 (%) of a query clip among the {f['batch_size']} keys of a "
             f"batch ({f['batches']} batches of `train`, chance {100 / f['batch_size']:.1f}%), with frozen features "
             "(mean ± std over the seeds):", "",
             "| features | seeds | " + " | ".join(FINDABLE_VIEWS.values()) + " |",
             "|" + " --- |" * (len(FINDABLE_VIEWS) + 2)]
    for method, entries in by_method(f["models"]).items():
        lines.append(f"| {label(method)} | {','.join(str(e['seed']) for e in entries)} | "
                     + " | ".join(_mean_std([e[v] for e in entries]) for v in FINDABLE_VIEWS) + " |")
    return "\n".join(lines)


def render_composites_table(results):
    c = results.get("composites")
    if not c:
        return "(no composite measurements: run --composites)"
    lines = [f"Motion or scene? {c['pairs']} composites, each one test_swapped video's object (its true masks) moving "
             "over another video's scene, compared with the first clips of the two videos, with frozen features "
             "(mean ± std over the seeds):", "",
             "| features | seeds | nearer the motion's video (%) | cosine to the motion's video | cosine to the "
             "scene's video |", "|" + " --- |" * 5]
    for method, entries in by_method(c["models"]).items():
        lines.append(f"| {label(method)} | {','.join(str(e['seed']) for e in entries)} | "
                     + " | ".join(_mean_std([e[k] for e in entries], digits)
                                  for k, digits in (("motion_preference", 1), ("cos_motion", 2), ("cos_scene", 2)))
                     + " |")
    return "\n".join(lines)


def make_pictures(args):
    """experiments/masks.png (FAME masks, merged clips) and experiments/caam.png (CAAM of vanilla MoCo, FAME and,
    when present, the supervised ceiling) on the first test_swapped video and the next one of another class and
    scene family (so that each merged clip shows the other's scene); the commands go into the JSON."""
    root = benchmark(args)[1]
    rows = split_rows(root, "test_swapped")
    paths = [str(root / rows[0][0]), str(root / other_video(rows, 0)[0])]
    runs = Path(args.runs_dir)
    ckpts = [runs / "moco_s0" / "pretrain" / "checkpoint.pth", runs / "fame_s0" / "pretrain" / "checkpoint.pth",
             runs / "supervised_s0" / "finetune" / "checkpoint.pth"]
    ckpts = [str(c) for c in ckpts if c.is_file()]
    common = ["--frames", str(args.frames), "--stride", "2", "--crop", "64", "--show", "4"]
    commands = [["masks", *common, "--beta", "0.5", "--output", str(REPO / "experiments" / "masks.png"), *paths],
                ["caam", *common, "--arch", args.arch, "--pretrained", *ckpts,
                 "--output", str(REPO / "experiments" / "caam.png"), *paths]]
    done = []
    for argv in commands:
        argv = [sys.executable, "visualize.py", *argv]
        print(shown(argv), flush=True)
        if not args.dry_run:
            subprocess.run(argv, cwd=REPO, check=True)
            done.append(shown(argv))
    if not args.dry_run:
        update_results(args.results, lambda r: r.update(pictures=done))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
