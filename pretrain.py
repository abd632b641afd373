"""MoCo + FAME self-supervised pretraining (paper Sec. 3, 4.2 and appendix A.1).

Reproduces the paper's Kinetics-400 pretraining of R(2+1)D-18 (16x112x112 clips, global batch 64 on 8 GPUs,
200 epochs, SGD lr 0.01 with x0.1 at epochs 120 and 180, K 65536, m 0.999, T 0.1):

    torchrun --nproc_per_node=8 pretrain.py --beta 0.5 --dataset k400 --data /datasets/kinetics400

Without --data it trains on the synthetic background-bias benchmark with the CPU preset that --help lists:

    python pretrain.py --beta 0.5

A step: two clips of each video at different times (random crop and flip in the loader, uint8) -> FAME on the
query clip (--fame-branches both: on both), the backgrounds from the other clips of this process's batch ->
colour augmentation on the device -> MoCo's symmetric InfoNCE, Eq. (1) -> SGD. --beta 1.0 is vanilla MoCo.

Outputs in --output-dir: checkpoint.pth (written atomically at every epoch end, every --save-every-minutes,
and after SIGTERM/SIGUSR1; rerunning the same command resumes from it, inside an epoch too), checkpoint_NNNN.pth
every --save-every epochs, log.jsonl (one line per epoch), args.json.
"""
import argparse
import copy
import functools
import math
import os
import shlex

import torch
import torch.nn.functional as F
from tqdm import tqdm

import augment
import data
import fame
import models
import utils

PRESETS = {  # defaults that depend on --dataset; the paper's A.1 values are the parser's own defaults
    # synthetic: version 3's protocol (README, "Version 3"): crops of area 0.5-1 and no flips, under which motion
    # alone is learnable there
    "synthetic": dict(arch="cnn3d", frames=8, crop=32, batch_size=32, epochs=24, lr=0.03, cos=True, moco_k=512,
                      moco_m=0.99, knn_every=4, crop_scale=[0.5, 1.0], flip=False),
    **{name: dict(moco_k=2048) for name in ("ucf101", "hmdb51", "diving48", "folder")},  # A.1: 2048 for UCF101
}
MOCO_T = utils.Number(float, 1e-3, 10)  # logits of |cosine / T| <= 1000 and >= 0.1
RESUMABLE = (*utils.RESUMABLE,  # the settings a resume may change; any other change is refused (utils.load_resume)
             "save_every",  # how often a checkpoint_NNNN.pth is kept
             # the kNN monitor: it reads the encoder in eval mode, changing nothing
             "knn_every", "knn_split", "knn_k", "knn_gallery")


def get_args_parser():
    parser = utils.Parser("MoCo + FAME self-supervised video pretraining (paper Sec. 4.2, A.1).", PRESETS,
                          paper_schedule=(200, (120, 180)), resumable=RESUMABLE)
    data.add_data_args(parser)
    utils.add_run_args(parser, batch_size=64)
    utils.add_training_args(parser, epochs=200, milestones=(120, 180), lr=0.01, momentum=0.9, wd=1e-4)
    parser.add_argument("--save-every", type=utils.NON_NEGATIVE_INT, default=50, metavar="N",
                        help="also keep checkpoint_NNNN.pth every N epochs (0: never)")
    g = parser.add_argument_group("FAME")
    g.add_argument("--beta", type=utils.Number(float, 0, 1, open_low=True), default=0.5,
                   help="foreground share of the frame, Eq. (3), in (0, 1], at least one pixel of the crop; 1.0: "
                        "vanilla MoCo, FAME skipped")
    g.add_argument("--fame-method", default="fame", choices=fame.METHODS,
                   help="foreground mask: the paper's, or the variants of Table 4")
    g.add_argument("--background", default="inter", choices=("inter", "intra"),
                   help="inter: the background of another video of the batch; intra: of a third clip of the same "
                        "video, at another time (Table 3)")
    g.add_argument("--fame-branches", default="one", choices=("one", "both"),
                   help="FAME on the query clip only, or on both clips (Table 1)")
    g = parser.add_argument_group("MoCo")
    g.add_argument("--moco-dim", type=utils.POSITIVE_INT, default=128,
                   help="embedding dimension of the projection head")
    g.add_argument("--moco-k", type=utils.POSITIVE_INT, default=65536,
                   help="queue size K; rounded down to a multiple of the 2 x batch keys of a step and capped at one "
                        "epoch's videos, with a printed note")
    g.add_argument("--moco-m", type=utils.SHARE, default=0.999, help="momentum m of the key encoder, in [0, 1)")
    g.add_argument("--moco-t", type=MOCO_T, default=0.1,
                   help=f"temperature T of the InfoNCE loss, Eq. (1), {MOCO_T.range}: the logits are cosines / T, "
                        f"so a smaller T overflows them and a larger one leaves every key alike")
    g = parser.add_argument_group("kNN monitor")
    g.add_argument("--knn-every", type=utils.NON_NEGATIVE_INT, default=0, metavar="N",
                   help="every N epochs and after the last: kNN top-1 of the query encoder's features, one centre "
                        "clip per video, queries from test (synthetic: test and test_swapped, whose difference shows "
                        "how much the representation leans on the scene), neighbours from --knn-split; in log.jsonl "
                        "(knn_<split>) and the progress line (0: off)")
    g.add_argument("--knn-split", default="train", help="labelled split whose videos are the kNN neighbours")
    g.add_argument("--knn-k", type=utils.POSITIVE_INT, default=20,
                   help="neighbours that vote (weighted by exp(cosine / 0.07))")
    g.add_argument("--knn-gallery", type=utils.NON_NEGATIVE_INT, default=0, metavar="N",
                   help="at most N videos of --knn-split as the neighbours, a fixed random subset (0: all of them)")
    return parser


def main(args):
    """Pretrains; returns the MoCo model (unwrapped)."""
    check_args(args)
    data.check_data_args(args)
    device = utils.init_distributed(args.dist_timeout)
    world = utils.get_world_size()
    if args.output_dir is None:
        variant = "".join(f"_{getattr(args, k)}" for k, default in
                          (("fame_method", "fame"), ("background", "inter"), ("fame_branches", "one"))
                          if getattr(args, k) != default)
        args.output_dir = (f"runs/pretrain_{data.dataset_tag(args)}_{args.arch}_beta{args.beta:g}{variant}"
                           f"_seed{args.seed}")
    out = utils.make_output_dir(args.output_dir, data=args.data)
    commit = utils.git_commit()

    intra = args.background == "intra" and args.beta < 1  # a third clip per video for the intra background
    dataset = data.build_dataset(args, "train", "pretrain", background_clip=intra)
    loader = data.build_loader(dataset, args.batch_size // world, args, train=True, seed=args.seed)
    K = queue_size(args.moco_k, args.batch_size, len(loader) * args.batch_size)
    if K != args.moco_k and utils.is_main_process():
        print(f"note: --moco-k {args.moco_k} -> {K}: K is a multiple of the {2 * args.batch_size} keys enqueued per "
              f"step and at most the {len(loader) * args.batch_size} videos of an epoch, so that a query rarely meets "
              f"a key of its own video among the negatives")
    given_k, args.moco_k = args.moco_k, K
    if utils.is_main_process():
        print(f"pretrain.py at git {commit}, {world} process(es) on {device}, {args.workers} loader workers each; "
              f"effective settings:")
        print("\n".join(f"  {k}: {v}" for k, v in sorted(vars(args).items())))

    torch.manual_seed(args.seed)  # the same initial weights and queue on every process
    model = models.MoCo(functools.partial(models.build_backbone, args.arch), dim=args.moco_dim, K=K, m=args.moco_m,
                        T=args.moco_t).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    if args.compile:  # in place: the state_dict keys stay those of the plain modules
        model.encoder_q.compile()
        model.encoder_k.compile()
    ddp_model = model
    if world > 1:  # the queue agrees on every process by construction (all-gathered keys): no buffer broadcasts
        ddp_model = utils.wrap_ddp(model, device, sync_buffers=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.wd)
    amp = utils.amp_dtype(args.amp, device)
    scaler = utils.grad_scaler(amp, device)
    cudnn_warning = utils.conv3d_cudnn_warning(device, amp)
    if cudnn_warning and utils.is_main_process():
        print(f"warning: {cudnn_warning}")
    fame_op = fame.FAME(beta=args.beta, method=args.fame_method) if args.beta < 1 else None

    # encoder_q: what the evaluation scripts load from a checkpoint
    checkpointing = utils.Checkpointing(args, amp, encoder_q=model.encoder_q, model=model, optimizer=optimizer,
                                        scaler=scaler)
    parser = get_args_parser()
    parser.given = {"moco_k": given_k}  # a resume's refusal names the flag as given too
    start_epoch = checkpointing.resume(parser)
    if utils.is_main_process():
        utils.write_json(out / "args.json", {**vars(args), "git_commit": commit, "world_size": world,
                                              "environment": utils.environment()})
    knn_sets = knn_monitor_sets(args) if args.knn_every else None
    log = utils.Log(out / "log.jsonl", start_epoch)
    key_sims = [e["key_sim"] for e in log.entries()]  # the collapse monitor's history, over resumes too
    warned = collapse_warning(key_sims, args.epochs) is not None

    with checkpointing:
        for epoch in range(start_epoch, args.epochs):
            lr = utils.adjust_learning_rate(optimizer, epoch, args)
            stats = train_one_epoch(ddp_model, fame_op, loader, optimizer, scaler, args, checkpointing)
            key_sim = model.key_similarity()  # collapse monitor: 1.0 = every video embedded alike
            knn = {}
            if knn_sets and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
                utils.broadcast_buffers(model.encoder_q)  # every process scores its videos as rank 0 would
                knn = knn_monitor(model.encoder_q, knn_sets, args, device)
            log.write({"epoch": epoch + 1, "lr": lr, **stats, "key_sim": round(key_sim, 4), **knn})
            if utils.is_main_process():
                tqdm.write(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.3f}, key_sim {key_sim:.2f}"
                           + "".join(f", kNN top-1 {k[4:]} {v:.1f}" for k, v in knn.items()))
            key_sims.append(key_sim)
            warning = collapse_warning(key_sims, args.epochs)
            if warning and not warned and utils.is_main_process():
                print(warning, flush=True)
                warned = True
            checkpointing.save(out / "checkpoint.pth")
            if args.save_every and (epoch + 1) % args.save_every == 0:
                checkpointing.save(out / f"checkpoint_{epoch + 1:04d}.pth")

    if utils.is_main_process():
        if start_epoch >= args.epochs:
            print(f"the checkpoint already holds {start_epoch} epochs (--epochs {args.epochs}): nothing to train")
        print(f"checkpoint: {out / 'checkpoint.pth'}")
        print("next, evaluate it:\n" + "\n".join(f"  {cmd}" for cmd in next_commands(args, out / "checkpoint.pth")))
    utils.finish_distributed()
    return model


def train_one_epoch(model, fame_op, loader, optimizer, scaler, args, checkpointing):
    """One epoch: the one `checkpointing` is at, from its step on (a resume may start inside it); checkpointing.check
    saves checkpoint.pth inside the epoch when due. Returns the epoch's log entry."""
    model.train()
    device = next(model.parameters()).device
    amp = utils.amp_dtype(args.amp, device)
    world = utils.get_world_size()
    epoch, start = checkpointing.begin_epoch()
    loader.sampler.set_epoch(epoch, skip=start * loader.batch_size)
    bar = tqdm(loader, initial=start, total=start + len(loader), desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=not utils.is_main_process(), dynamic_ncols=True, mininterval=1.0)
    for step, batch in enumerate(bar, start):
        utils.seed_everything(args.seed, epoch, step)  # this step's augmentation, backgrounds and key shuffle
        q, k = query_and_key_views(batch, fame_op, args, device)
        loss, acc = train_step(model, q, k, optimizer, scaler, amp)
        # loss and accuracy: the mean over the processes, read back every --log-every steps
        checkpointing.add({"loss": loss.double() / world, "acc": acc.double() / world,
                           "failed_videos": batch["failed"].sum()})
        read = checkpointing.check()  # also stops the run on a non-finite loss
        if read:
            bar.set_postfix(loss=f"{read['loss'] / read['steps']:.3f}", acc=f"{read['acc'] / read['steps']:.1f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.3g}", refresh=False)
    bar.close()
    sums = checkpointing.end_epoch()
    steps, seconds = sums["steps"], sums["seconds"]
    return {"loss": sums["loss"] / steps, "acc": sums["acc"] / steps, "time": round(seconds, 2),
            "clips_per_s": round(2 * args.batch_size * steps / seconds, 2), "failed_videos": int(sums["failed_videos"])}


def query_and_key_views(batch, fame_op, args, device):
    """MoCo's query and key views of a step, from the loader's uint8 clips (B, 3, T, S, S): FAME on the query (or
    on both), then colour augmentation and normalization on the device. -> q, k float (B, 3, T, S, S), in
    channels_last_3d with --channels-last."""
    q = batch["q"].to(device, non_blocking=True)
    k = batch["k"].to(device, non_blocking=True)
    if fame_op is not None:  # on uint8, before the float conversion: a quarter of the bytes to merge
        # intra (Table 3): a third clip of the same video at another time; inter: other clips of the batch
        background = batch["bg"].to(device, non_blocking=True) if args.background == "intra" else None
        q = fame_op(q, background=background)  # Eq. (4)
        if args.fame_branches == "both":
            k = fame_op(k, background=background)
    layout = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    return (augment.augment_and_normalize(q).contiguous(memory_format=layout),
            augment.augment_and_normalize(k).contiguous(memory_format=layout))


def train_step(model, q, k, optimizer, scaler, amp):
    """One SGD step on MoCo's symmetric InfoNCE loss; returns (loss, contrastive top-1 in %) as tensors."""
    with torch.autocast(q.device.type, dtype=amp, enabled=amp is not None):
        logits, labels = model(q, k)  # (2B, 1 + K), (2B,): both clips act as query and as key
    loss = F.cross_entropy(logits.float(), labels)  # Eq. (1), averaged over both directions
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), 100.0 * (logits.detach().argmax(1) == labels).float().mean()


def knn_monitor_sets(args):
    """{split: test-mode dataset} of the kNN monitor, --knn-split first (at most --knn-gallery of its videos): one
    centre clip per video (the test crop)."""
    ns = argparse.Namespace(**{**vars(args), "clips": 1})
    if not data.has_test_split(args.dataset, args.data):  # each test video would find itself among the neighbours
        raise utils.DataError(f"--knn-every: --data {args.data}: {data.FOLDER_NO_TEST}")
    sets = {args.knn_split: data.build_dataset(ns, args.knn_split, "test")}
    for split in knn_queries(args):  # a query that is a neighbour under any name would find itself
        sets[split] = data.build_dataset(ns, split, "test", held_out_from=args.knn_split)
    if 0 < args.knn_gallery < len(sets[args.knn_split]):
        sets[args.knn_split] = video_subset(sets[args.knn_split], args.knn_gallery, args.seed)
    if args.knn_k > len(sets[args.knn_split]) and utils.is_main_process():
        print(f"note: --knn-k {args.knn_k} is more than the {len(sets[args.knn_split])} neighbour videos of "
              f"{args.knn_split}: every one of them votes")
    return sets


def video_subset(dataset, n, seed):
    """n videos of a data.VideoDataset, a random subset fixed by `seed`, in their order."""
    keep = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    subset = copy.copy(dataset)
    subset.paths, subset.infos = [dataset.paths[i] for i in keep], [dataset.infos[i] for i in keep]
    subset.num_frames, subset.labels = [dataset.num_frames[i] for i in keep], dataset.labels[keep]
    subset.scenes = None if dataset.scenes is None else dataset.scenes[keep]
    return subset


def knn_queries(args):
    """The splits the kNN monitor classifies: test, and on the synthetic benchmark test_swapped too."""
    return ["test", "test_swapped"] if args.dataset == "synthetic" else ["test"]


@torch.no_grad()
def knn_monitor(backbone, sets, args, device):
    """{"knn_<split>": kNN top-1 (%)} of each query split against --knn-split, with the backbone's pooled features in
    eval mode under --amp autocast (then it is put back in training mode), the kNN on the device. Each call builds
    its loaders and lets them go, so that their workers do not outlive it."""
    backbone.eval()
    amp = utils.amp_dtype(args.amp, device)
    ns = argparse.Namespace(**{**vars(args), "clips": 1})

    def features(clips):  # (n, 3, T, S, S) uint8 -> (n, D) float32
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return backbone(augment.normalize(clips)).float()  # encoder_q ends at the pooled feature (MoCo)

    feats = {}  # split: ((V, D) features, (V,) labels) of the videos that decoded, on the device
    for split, dataset in sets.items():
        values, ok = utils.clip_outputs(features, data.build_test_loader(dataset, ns), device)
        feats[split] = values[ok, 0].to(device), dataset.labels[ok].to(device)
    backbone.train()
    return {f"knn_{split}": round(utils.knn_top1(*feats[split], *feats[args.knn_split], k=args.knn_k), 2)
            for split in sets if split != args.knn_split}


COLLAPSE_KEY_SIM = 0.9  # mean cosine between two queue keys above which the embedding treats all videos alike


def collapse_warning(key_sims, epochs):
    """A warning when, from a quarter of the `epochs` schedule on (and not before epoch 3), the last two epochs'
    key_sim are above COLLAPSE_KEY_SIM and not falling; else None. Calibrated on the key_sim histories stored in
    experiments/results*.json (`python experiments/background_bias.py --collapse-check`): runs that start slowly
    reach 0.9-0.98 in their first epochs and then fall (so a fixed epoch-3 check fired on runs that learned),
    while the runs that stay near chance loss are still above 0.9 and flat or rising at a quarter of theirs."""
    if len(key_sims) < max(3, math.ceil(epochs / 4)):
        return None
    before, last = key_sims[-2:]
    if min(before, last) <= COLLAPSE_KEY_SIM or last < before:
        return None
    return (f"WARNING: key_sim is {last:.2f} after epoch {len(key_sims)} of {epochs} (over {COLLAPSE_KEY_SIM} and not "
            f"falling): the keys have collapsed onto one direction, so every video looks alike and the loss stays "
            f"near chance, ln(K + 1). Try a backbone that suits the clip size (README, 'The cnn3d backbone'), a lower "
            f"--lr, a larger --moco-m or --batch-size.")


def check_args(args):
    """Refuses bad settings before any work."""
    world = utils.get_world_size()
    problems = utils.fame_problems(args.beta, args.frames, args.crop)  # ranges: the flags' types
    if args.batch_size % world == 0 and args.beta < 1 and args.background == "inter" and args.batch_size // world < 2:
        problems.append(f"inter-video FAME needs at least 2 clips per process to swap backgrounds; the batch per "
                        f"process is {args.batch_size // world}: raise --batch-size or use --background intra")
    unused = [flag for flag, value, default in (("--fame-method", args.fame_method, "fame"),
                                                ("--background", args.background, "inter"),
                                                ("--fame-branches", args.fame_branches, "one")) if value != default]
    if args.beta == 1 and unused:
        problems.append(f"{', '.join(unused)} only apply to FAME, and --beta 1 skips it (vanilla MoCo): drop them, or "
                        f"give a --beta below 1")
    unused = [flag for flag, value, default in (("--knn-split", args.knn_split, "train"), ("--knn-k", args.knn_k, 20),
                                                ("--knn-gallery", args.knn_gallery, 0)) if value != default]
    if not args.knn_every and unused:
        problems.append(f"{', '.join(unused)} only apply to the kNN monitor, which is off: add --knn-every N")
    if args.knn_every and args.knn_split in knn_queries(args):
        problems.append(f"--knn-split {args.knn_split} is a split the kNN monitor classifies: give the split of the "
                        f"neighbours, e.g. train")
    if args.resume != "auto" and not os.path.isfile(args.resume):
        problems.append(f"--resume {args.resume}: {utils.not_a_file(args.resume, 'checkpoint file')}")
    utils.check_training_args(args, problems)


def queue_size(K, batch_size, videos_per_epoch):
    """The queue size used for a requested K: a multiple of the 2 x batch keys enqueued per step (symmetric loss),
    at most one epoch's videos (then the queue spans at most half an epoch of keys, and a query finds a stale key
    of its own video there with probability <= 1/8), and at least one step's keys."""
    per_step = 2 * batch_size
    return max(per_step, min(K, videos_per_epoch) // per_step * per_step)


def next_commands(args, ckpt):
    """The evaluation commands for a checkpoint (a Kinetics-400 pretraining is evaluated on UCF101, as in the
    paper); on the synthetic benchmark, with the --data and --synthetic-* flags that chose it."""
    if args.dataset == "k400":
        target = " --dataset ucf101 --data PATH/TO/UCF101"
    else:
        flags = {"dataset": args.dataset, "data": args.data, "split": args.split if args.split != 1 else None}
        if args.dataset == "synthetic":
            flags = {"dataset": "synthetic" if args.data else None, "data": args.data,
                     **{k: getattr(args, k) for k, v in data.SYNTHETIC_FLAGS.items() if getattr(args, k) != v}}
            flags["dataset"] = "synthetic" if any(flags.values()) else None
        target = "".join(f" --{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in flags.items() if v is not None)
    ckpt = shlex.quote(str(ckpt))
    common = f" --arch {args.arch} --frames {args.frames} --stride {args.stride} --crop {args.crop}{target}"
    fast = " --cache-features" if args.dataset == "synthetic" else ""  # seconds instead of minutes on a CPU
    return [f"python linear_probe.py --pretrained {ckpt}{common}{fast}",
            f"python retrieve.py --pretrained {ckpt}{common}",
            f"python finetune.py --pretrained {ckpt}{common}"]


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
