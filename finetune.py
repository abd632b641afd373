"""Finetune a pretrained backbone end to end for action recognition (paper Sec. 4.2, appendix A.3).

Reproduces the paper's finetune protocol (Table 5, "Freeze" unticked) on UCF101 split 1:

    torchrun --nproc_per_node=4 finetune.py --dataset ucf101 --data PATH/ucf101 --split 1 \
        --arch r2plus1d_18 --pretrained runs/pretrain_k400_r2plus1d_18_beta0.5_seed0/checkpoint.pth \
        --batch-size 128 --epochs 150 --lr 0.025 --momentum 0.9 --wd 1e-4 --schedule 60 120 --dropout 0.7

(HMDB51: `--dataset hmdb51 --data PATH/hmdb51 --dropout 0.5`; these are the defaults, so the flags after
--pretrained may be left out.) All layers are trained; training clips get random crop/flip (loader) and
grayscale/colour jitter (data.augment preset "finetune"); a test video is scored by the softmax averaged over
`--clips 10` uniformly sampled centre-cropped clips. Reports video-level top-1, top-5 and per-class accuracy in
<output-dir>/results.json.

Without --data the embedded synthetic benchmark is used with CPU-sized defaults for the flags left unset:
    python finetune.py --pretrained runs/pretrain_synthetic_r2plus1d_tiny_beta0.5_seed0/checkpoint.pth

The helpers the three evaluation protocols share (10-clip evaluation, the epoch loop, flags) live in data.py
and models.py.
"""
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import models
from data import build_test_loader, clip_averaged, eval_splits
from models import check_finite, classification_metrics, epoch_summary, eval_parser, finish, fit, load_pretrained, setup

PAPER = dict(arch="r2plus1d_18", batch_size=128, epochs=150, schedule=(60, 120), lr=0.025, momentum=0.9,
             wd=1e-4, dropout={"ucf101": 0.7, "hmdb51": 0.5, "other": 0.5})  # paper A.3
SYNTHETIC = dict(arch="r2plus1d_tiny", batch_size=16, epochs=12)  # CPU-sized, this machine


def get_args_parser():
    parser = eval_parser("FAME finetune (all layers trained)", "finetune", PAPER, SYNTHETIC)
    parser.add_argument("--dropout", type=float, default=None,
                        help="dropout before the last fc (default: 0.7 ucf101, 0.5 hmdb51 and others)")
    return parser


def main(args):
    world, device, is_main = setup(args, "finetune", PAPER, SYNTHETIC)
    train_set = data.build_dataset(args, args.train_split, "train")
    test_set = data.build_dataset(args, args.test_split, "test")
    torch.manual_seed(args.seed)  # same initialisation on every rank
    model = models.build_backbone(args.arch, num_classes=train_set.num_classes, dropout=args.dropout)
    load_pretrained(model, args.pretrained, is_main)
    model.to(device)
    ddp_model = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)

    train_loader = data.build_loader(train_set, args.batch_size // world, args, train=True, seed=args.seed)
    test_loader = build_test_loader(test_set, args, world)

    def train_epoch(epoch):
        return train_one_epoch(ddp_model, train_loader, optimizer, epoch, args, device, is_main)

    def eval_epoch():
        return evaluate(model, test_loader, device, args)

    best, last = fit(args, model, optimizer, train_epoch, eval_epoch, is_main)
    final = {args.test_split: last or eval_epoch()}
    for split in eval_splits(args)[1:]:
        final[split] = evaluate(model, build_test_loader(data.build_dataset(args, split, "test"), args, world),
                                device, args)
    finish(args, final, is_main, best=best)


def train_one_epoch(model, loader, optimizer, epoch, args, device, is_main):
    """One pass over the training split; returns epoch statistics (averaged over all processes)."""
    model.train()
    loader.sampler.set_epoch(epoch)
    stats = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, clips, failed videos
    start = time.time()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not is_main, leave=False)
    for batch in bar:
        x = batch["clip"].to(device).float().div_(255)  # (B, 3, T, S, S)
        x = data.augment(x, "finetune")
        y = batch["label"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(x)  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), y)
        check_finite(loss, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y),
                               batch["failed"].sum().item()], dtype=torch.float64)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
    return epoch_summary(stats, time.time() - start, device)


@torch.no_grad()
def evaluate(model, loader, device, args):
    """Video-level accuracy: softmax scores averaged over the clips of each test video."""
    model.eval()

    def scores(x):  # (n, 3, T, S, S) in [0, 1] -> (n, num_classes)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            return model(data.augment(x, "test")).float().softmax(1)

    video_scores, clips_per_s = clip_averaged(scores, loader, device)  # (V, num_classes)
    metrics = classification_metrics(video_scores, loader.dataset.labels, loader.dataset.classes)
    metrics["clips_per_s"] = clips_per_s
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
