"""Linear probe: one fc layer on L2-normalized features of a frozen backbone (paper Sec. 4.2 and appendix A.3).

Reproduces the paper's linear-probe protocol (Table 5, "Freeze" ticked) on UCF101 split 1:

    torchrun --nproc_per_node=4 linear_probe.py --dataset ucf101 --data PATH/ucf101 --split 1 \
        --pretrained runs/pretrain_k400_r2plus1d_18_beta0.5_seed0/checkpoint.pth

with the paper's defaults: R(2+1)D-18, batch 128, 100 epochs, SGD lr 5 (x0.1 at epochs 60 and 80), momentum
0.9, no weight decay. The backbone stays in eval mode with its weights and BatchNorm statistics untouched
(checked bit for bit at the end); training clips get a random crop and flip only (A.2). A test video is scored
by the softmax averaged over --clips 10 uniformly spaced clips; test features are extracted once, since the
frozen backbone gives the same features every epoch.

Beyond the paper, --cache-features also extracts the training features once, from --clips centre-cropped
clips per video without augmentation, and trains the fc on them (each epoch draws one cached clip per video,
so an epoch has as many steps as without the cache): seconds instead of hours.

Without --data the synthetic benchmark is used with the CPU preset that --help lists, and the probe is tested
on both test and test_swapped (the background-bias gap):

    python linear_probe.py --cache-features \
        --pretrained runs/pretrain_synthetic_cnn3d_beta0.5_seed0/checkpoint.pth
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import augment
import data
import models
import utils

PRESETS = {"synthetic": dict(arch="cnn3d", frames=8, crop=32, batch_size=32, epochs=30)}
RESUMABLE = (*utils.RESUMABLE,  # the settings a resume may change; any other change is refused (utils.load_resume)
             "eval_every",  # how often --test-split is evaluated for best.pth; the training does not depend on it
             "unsafe_unpickle")  # how --pretrained is read: the weights themselves are checked (their sha1)


def get_args_parser():
    parser = utils.Parser("Linear probe on a frozen backbone's L2-normalized features (paper A.3).", PRESETS,
                          paper_schedule=(100, (60, 80)), resumable=RESUMABLE)
    data.add_data_args(parser)
    utils.add_run_args(parser, batch_size=128)
    utils.add_eval_args(parser)
    utils.add_training_args(parser, epochs=100, milestones=(60, 80), lr=5.0, momentum=0.9, wd=0.0)
    parser.add_argument("--cache-features", action="store_true",
                        help="extract the training features once (--clips centre crops per video, no augmentation) "
                             "and train the fc on them")
    parser.add_argument("--eval-every", type=utils.POSITIVE_INT, default=1, metavar="N",
                        help="evaluate on --test-split every N epochs (and after the last) to keep best.pth")
    return parser


def main(args):
    utils.check_training_args(args)
    utils.check_eval_args(args)
    data.check_data_args(args)
    data.check_held_out(args)
    device = utils.init_distributed(args.dist_timeout)
    world = utils.get_world_size()
    out = utils.eval_output_dir(args, "linear_probe", data.dataset_tag(args))
    if args.cache_features and (list(args.crop_scale) != [data.MIN_CROP_SCALE, 1.0] or not args.flip) and \
            utils.is_main_process():
        unused = f"--crop-scale {args.crop_scale[0]:g} {args.crop_scale[1]:g}" + ("" if args.flip else " and --no-flip")
        print(f"note: --cache-features trains the fc on each video's centre-crop features, so {unused} "
              f"change{'s' if args.flip else ''} nothing")
    amp = utils.amp_dtype(args.amp, device)
    train_set = data.build_dataset(args, args.train_split, "test" if args.cache_features else "train")

    torch.manual_seed(args.seed)  # the same random backbone as the other scripts' when there is no --pretrained
    backbone = models.build_backbone(args.arch)  # its own fc is unused
    utils.load_pretrained(backbone, args)
    args.pretrained_sha1 = utils.weights_sha1(backbone)  # a resume must probe these weights, not the path's
    backbone.to(device).eval().requires_grad_(False)  # eval mode for good: the BatchNorm statistics stay put
    layout = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    backbone.to(memory_format=layout)
    # compiled as a function: the backbone's own modules and state_dict stay as they are
    forward_features = torch.compile(backbone.forward_features) if args.compile else backbone.forward_features
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    fc = nn.Linear(backbone.feature_dim, train_set.num_classes).to(device)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    optimizer = torch.optim.SGD(fc.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    best, metrics = {"top1": -1.0, "epoch": None}, None  # best: the best --test-split top-1 so far (best.pth)
    checkpointing = utils.Checkpointing(args, amp, model=fc, optimizer=optimizer, best=best)
    start_epoch = checkpointing.resume(get_args_parser())  # before the feature extraction: a refusal stops at once
    if utils.is_main_process():
        print(f"linear_probe.py at git {utils.git_commit()}, {world} process(es) on {device}, {args.workers} loader "
              f"workers each")

    def features(clips):  # (n, 3, T, S, S) uint8 -> (n, D), unit length (A.3)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return F.normalize(forward_features(augment.normalize(clips).contiguous(memory_format=layout)).float(),
                               dim=1)

    start = time.perf_counter()
    test_sets = {split: data.build_dataset(args, split, "test", held_out_from=args.train_split)
                 for split in utils.eval_splits(args)}
    test_feats = {split: utils.clip_outputs(features, data.build_test_loader(dataset, args), device)
                  for split, dataset in test_sets.items()}  # (V, N, D) and the (V,) mask of decoded videos each
    timing = {"extract_test_s": time.perf_counter() - start}
    start = time.perf_counter()
    if args.cache_features:  # every process trains the same fc on all features: nothing to synchronize
        train_feats, ok = utils.clip_outputs(features, data.build_test_loader(train_set, args), device)  # (V, N, D)
        timing["extract_train_s"] = time.perf_counter() - start
        batches, model = CachedBatches(train_feats[ok], train_set.labels[ok], args.batch_size, args.seed), fc
    else:
        batches = data.build_loader(train_set, args.batch_size // world, args, train=True, seed=args.seed)
        model = utils.wrap_ddp(fc, device) if world > 1 else fc
    log = utils.Log(out / "log.jsonl", start_epoch)

    with checkpointing:
        for epoch in range(start_epoch, args.epochs):
            lr = utils.adjust_learning_rate(optimizer, epoch, args)
            stats = train_one_epoch(model, features, batches, optimizer, args, checkpointing)
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                metrics = evaluate(fc, test_feats[args.test_split], test_sets[args.test_split])
                stats.update(test_top1=metrics["top1"], test_top5=metrics["top5"])
                if metrics["top1"] > best["top1"]:
                    best.update(top1=metrics["top1"], epoch=epoch + 1)
                    checkpointing.save(out / "best.pth")
            log.write({"epoch": epoch + 1, "lr": lr, **stats})
            checkpointing.save(out / "checkpoint.pth")
    timing["train_s"] = time.perf_counter() - start  # with the training-feature extraction when cached

    results = {split: evaluate(fc, test_feats[split], test_sets[split]) for split in test_sets}
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, frozen[k])]
    if changed:
        raise RuntimeError(f"the frozen backbone changed during the probe: {changed[:5]}")
    utils.write_results(args, results, best=best, timing=timing, backbone_unchanged=True,
                        train={"split": args.train_split, **train_set.manifest})
    utils.finish_distributed()


class CachedBatches:
    """The batches of an epoch on cached features (V, N, D): one random clip per video, videos shuffled, seeded by
    (seed, epoch); set_epoch(epoch, skip) starts after `skip` batches."""

    def __init__(self, feats, labels, batch_size, seed):
        self.feats, self.labels, self.batch_size, self.seed = feats, labels, batch_size, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return -(-len(self.feats) // self.batch_size) - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(utils.derive_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.feats), generator=g)
        clip = torch.randint(self.feats.shape[1], (len(self.feats),), generator=g)
        for i in range((self.skip * self.batch_size), len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield {"feats": self.feats[idx, clip[idx]], "label": self.labels[idx], "failed": torch.zeros(1)}


def train_one_epoch(fc, features, batches, optimizer, args, checkpointing):
    """One epoch of the fc, on cached features or on the frozen backbone's features of augmented clips: the one
    `checkpointing` is at, from its step on (a resume may start inside it); checkpointing.check saves
    checkpoint.pth inside the epoch when due. Returns the epoch's log entry."""
    fc.train()
    device = next(fc.parameters()).device
    epoch, start = checkpointing.begin_epoch()
    sampler = batches if args.cache_features else batches.sampler
    sampler.set_epoch(epoch, skip=start if args.cache_features else start * batches.batch_size)
    bar = tqdm(batches, initial=start, total=start + len(batches), desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=not utils.is_main_process(), leave=False)
    for step, batch in enumerate(bar, start):
        utils.seed_everything(args.seed, epoch, step)
        x = batch["feats"].to(device) if args.cache_features else features(batch["clip"].to(device, non_blocking=True))
        y = batch["label"].to(device, non_blocking=True)
        logits = fc(x)  # (B, num_classes)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # cached features: every process trained on the same batches, so there is nothing to add up
        checkpointing.add({"loss": loss.detach() * len(y), "correct": (logits.argmax(1) == y).sum(), "clips": len(y),
                           "failed_videos": batch["failed"].sum()}, reduce=not args.cache_features)
        read = checkpointing.check()  # every --log-every steps, summed over the processes; stops on a non-finite loss
        if read:
            bar.set_postfix(loss=f"{read['loss'] / read['clips']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}",
                            refresh=False)
    sums = checkpointing.end_epoch()
    clips, seconds = sums["clips"], sums["seconds"]
    return {"loss": sums["loss"] / clips, "acc": 100.0 * sums["correct"] / clips, "time": round(seconds, 2),
            "clips_per_s": round(clips / seconds, 2), "failed_videos": int(sums["failed_videos"])}


@torch.no_grad()
def evaluate(fc, feats, dataset):
    """Video-level accuracy from the test features (clip_outputs: (V, N, D) and the (V,) mask of decoded videos):
    the softmax averaged over the N clips; and the account of every listed test video (utils.video_accounting)."""
    fc.eval()
    feats, ok = feats
    scores = fc(feats.to(fc.weight.device)).softmax(-1).mean(1)  # (V, num_classes)
    return {**utils.classification_metrics(scores, dataset.labels, dataset.classes, ok),
            **utils.video_accounting(dataset, ok)}


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
