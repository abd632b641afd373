"""Linear probe: a single fc on L2-normalized features of a frozen backbone (paper Sec. 4.2, appendix A.3).

Reproduces the paper's linear-probe protocol (Table 5, "Freeze" ticked) on UCF101 split 1:

    torchrun --nproc_per_node=4 linear_probe.py --dataset ucf101 --data PATH/ucf101 --split 1 \
        --arch r2plus1d_18 --pretrained runs/pretrain_k400_r2plus1d_18_beta0.5_seed0/checkpoint.pth \
        --batch-size 128 --epochs 100 --lr 5 --momentum 0.9 --wd 0 --schedule 60 80

(HMDB51: `--dataset hmdb51 --data PATH/hmdb51`; the flags after --pretrained are the defaults.) The backbone
stays in eval mode with its weights and BatchNorm statistics untouched (checked bit for bit at the end);
training clips get random crop and flip only (loader; data.augment preset "probe"). Test: softmax averaged
over `--clips 10` uniformly sampled centre-cropped clips per video.

Beyond the paper, `--cache-features` extracts the features of --clips centre-cropped clips per training video
once, without augmentation, and trains the fc on the cached tensors (each epoch draws one cached clip per
video, so the number of steps matches the uncached probe): seconds instead of hours. Test features are always
extracted once, since the frozen backbone gives the same test features every epoch.

Without --data the embedded synthetic benchmark is used with CPU-sized defaults for the flags left unset, and
the probe is tested on both `test` and `test_swapped` (the background-bias gap):
    python linear_probe.py --cache-features \
        --pretrained runs/pretrain_synthetic_r2plus1d_tiny_beta0.5_seed0/checkpoint.pth
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import models
from data import build_test_loader, clip_averaged, eval_splits
from models import check_finite, classification_metrics, epoch_summary, eval_parser, finish, fit, load_pretrained, setup

PAPER = dict(arch="r2plus1d_18", batch_size=128, epochs=100, schedule=(60, 80), lr=5.0, momentum=0.9,
             wd=0.0)  # paper A.3
SYNTHETIC = dict(arch="r2plus1d_tiny", batch_size=32, epochs=30)  # CPU-sized, this machine


def get_args_parser():
    parser = eval_parser("FAME linear probe (frozen backbone, L2-normalized features)", "linear_probe", PAPER,
                         SYNTHETIC)
    parser.add_argument("--cache-features", action="store_true",
                        help="extract training features once (no augmentation) and train the fc on them")
    parser.set_defaults(eval_every=1)  # test features are cached, so evaluating costs one matmul
    return parser


def main(args):
    world, device, is_main = setup(args, "linear_probe", PAPER, SYNTHETIC)
    train_set = data.build_dataset(args, args.train_split, "features" if args.cache_features else "train")
    torch.manual_seed(args.seed)  # same init on every rank, and the same random backbone in every script
    backbone = models.build_backbone(args.arch)  # its own fc is unused; default size = retrieve.py's random init
    load_pretrained(backbone, args.pretrained, is_main)
    backbone.to(device).eval().requires_grad_(False)  # eval mode for good: BatchNorm statistics stay put
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    fc = nn.Linear(backbone.feature_dim, train_set.num_classes).to(device)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    optimizer = torch.optim.SGD(fc.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)

    def embed(x, preset):  # (n, 3, T, S, S) in [0, 1] -> (n, D), unit norm
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            return F.normalize(backbone.forward_features(data.augment(x, preset)).float(), dim=1)

    def clip_features(dataset):  # every clip of every video, centre crop, no augmentation: (V, N, D), clips/s
        return clip_averaged(lambda x: embed(x, "test"), build_test_loader(dataset, args, world), device,
                             average=False)

    start = time.time()
    test_sets = {split: data.build_dataset(args, split, "test") for split in eval_splits(args)}
    test_feats = {split: clip_features(dataset)[0] for split, dataset in test_sets.items()}
    timing = {"extract_test_s": time.time() - start}

    start = time.time()
    if args.cache_features:
        train_feats, clips_per_s = clip_features(train_set)  # (V, N, D)
        timing.update(extract_train_s=time.time() - start, extract_clips_per_s=clips_per_s)

        def batches(epoch):  # identical on every rank (same seed, all features), so no gradient exchange
            return cached_batches(train_feats, train_set.labels, args.batch_size, args.seed, epoch, device)
        model = fc
    else:
        loader = data.build_loader(train_set, args.batch_size // world, args, train=True, seed=args.seed)

        def batches(epoch):
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                x = batch["clip"].to(device).float().div_(255)  # (B, 3, T, S, S)
                yield embed(x, "probe"), batch["label"].to(device), batch["failed"].sum().item()
        model = DistributedDataParallel(fc) if world > 1 else fc

    best, _ = fit(args, fc, optimizer,
                  lambda epoch: train_one_epoch(model, batches(epoch), optimizer, epoch, args, device, is_main),
                  lambda: evaluate(fc, test_feats[args.test_split], test_sets[args.test_split]), is_main)
    timing["train_s"] = time.time() - start  # includes the training-feature extraction when cached
    results = {split: evaluate(fc, test_feats[split], test_sets[split]) for split in test_sets}

    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, frozen[k])]
    if changed:
        raise RuntimeError(f"the frozen backbone changed during the probe: {changed[:5]}")
    finish(args, results, is_main, best=best, timing=timing, backbone_unchanged=True)


def train_one_epoch(fc, batches, optimizer, epoch, args, device, is_main):
    """One epoch of the fc on (features, labels, failed videos) batches."""
    fc.train()
    stats = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, clips, failed videos
    start = time.time()
    bar = tqdm(batches, desc=f"epoch {epoch}", disable=not is_main, leave=False)
    for feats, y, failed in bar:
        logits = fc(feats)  # (B, num_classes)
        loss = F.cross_entropy(logits, y)
        check_finite(loss, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y), failed],
                              dtype=torch.float64)
    # cached: every rank trained the same fc on all features, so there is nothing to sum
    return epoch_summary(stats, time.time() - start, device, reduce=not args.cache_features)


@torch.no_grad()
def evaluate(fc, feats, dataset):
    """Video-level accuracy from cached (V, N, D) test features: softmax averaged over the N clips."""
    fc.eval()
    scores = fc(feats.to(fc.weight.device)).softmax(-1).mean(1)  # (V, num_classes)
    return classification_metrics(scores, dataset.labels, dataset.classes)


def cached_batches(feats, labels, batch_size, seed, epoch, device):
    """One random cached clip per video, videos shuffled, batches of batch_size (seeded by seed and epoch)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(feats.shape[0], generator=g)
    clip = torch.randint(feats.shape[1], (feats.shape[0],), generator=g)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield feats[idx, clip[idx]].to(device), labels[idx].to(device), 0


if __name__ == "__main__":
    main(get_args_parser().parse_args())
