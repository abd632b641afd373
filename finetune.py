"""Finetune a pretrained backbone end to end for action recognition (paper Sec. 4.2 and appendix A.3).

Reproduces the paper's finetune protocol (Table 5, "Freeze" unticked) on UCF101 split 1:

    torchrun --nproc_per_node=4 finetune.py --dataset ucf101 --data PATH/ucf101 --split 1 \
        --pretrained runs/pretrain_k400_r2plus1d_18_beta0.5_seed0/checkpoint.pth

with the paper's defaults: R(2+1)D-18, batch 128, 150 epochs, SGD lr 0.025 (x0.1 at epochs 60 and 120),
momentum 0.9, weight decay 1e-4, dropout 0.7 before the classifier (UCF101; 0.5 on HMDB51 and the others).
Training clips get a random crop and flip (loader) and the basic colour augmentation
(augment.augment_and_normalize); a test video is scored by the softmax averaged over --clips 10 uniformly spaced
clips. Reports video-level top-1, top-5 and per-class accuracy in <output-dir>/results.json; checkpoint.pth (atomic,
resumable inside an epoch) and best.pth (the best --test-split top-1) are kept there too.

Without --data the synthetic benchmark is used with the CPU preset that --help lists:

    python finetune.py --pretrained runs/pretrain_synthetic_cnn3d_beta0.5_seed0/checkpoint.pth
"""
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import augment
import data
import models
import utils

PRESETS = {
    "synthetic": dict(arch="cnn3d", frames=8, crop=32, batch_size=16, epochs=15, lr=0.05, cos=True, dropout=0.0,
                      crop_scale=[0.5, 1.0], flip=False),  # version 3's protocol, as pretrain.py's preset
    "ucf101": dict(dropout=0.7),  # A.3: 0.7 for UCF101, 0.5 for HMDB51
}
RESUMABLE = (*utils.RESUMABLE,  # the settings a resume may change; any other change is refused (utils.load_resume)
             "eval_every",  # how often --test-split is evaluated for best.pth; the training does not depend on it
             "unsafe_unpickle")  # how --pretrained is read: the weights themselves are checked (their sha1)


def get_args_parser():
    parser = utils.Parser("Finetune a pretrained backbone, all layers trained (paper A.3).", PRESETS,
                          paper_schedule=(150, (60, 120)), resumable=RESUMABLE)
    data.add_data_args(parser)
    utils.add_run_args(parser, batch_size=128)
    utils.add_eval_args(parser)
    utils.add_training_args(parser, epochs=150, milestones=(60, 120), lr=0.025, momentum=0.9, wd=1e-4)
    parser.add_argument("--dropout", type=utils.SHARE, default=0.5,
                        help="dropout before the classifier, in [0, 1)")
    parser.add_argument("--eval-every", type=utils.POSITIVE_INT, default=5, metavar="N",
                        help="evaluate on --test-split every N epochs (and after the last) to keep best.pth")
    return parser


def main(args):
    utils.check_training_args(args)
    utils.check_eval_args(args)
    data.check_data_args(args)
    data.check_held_out(args)
    device = utils.init_distributed(args.dist_timeout)
    world = utils.get_world_size()
    out = utils.eval_output_dir(args, "finetune", data.dataset_tag(args))
    train_set = data.build_dataset(args, args.train_split, "train")
    test_set = data.build_dataset(args, args.test_split, "test", held_out_from=args.train_split)
    train_loader = data.build_loader(train_set, args.batch_size // world, args, train=True, seed=args.seed)
    test_loader = data.build_test_loader(test_set, args)

    torch.manual_seed(args.seed)  # the same initial classifier on every process
    model = models.build_backbone(args.arch, num_classes=train_set.num_classes, dropout=args.dropout)
    utils.load_pretrained(model, args)
    args.pretrained_sha1 = utils.weights_sha1(model)  # a resume must continue from these weights, not the path's
    model.to(device, memory_format=torch.channels_last_3d if args.channels_last else torch.contiguous_format)
    if args.compile:  # in place: the state_dict keys stay those of the plain module
        model.compile()
    ddp_model = utils.wrap_ddp(model, device) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    amp = utils.amp_dtype(args.amp, device)
    scaler = utils.grad_scaler(amp, device)

    best, metrics = {"top1": -1.0, "epoch": None}, None  # best: the best --test-split top-1 so far (best.pth)
    checkpointing = utils.Checkpointing(args, amp, model=model, optimizer=optimizer, scaler=scaler, best=best)
    start_epoch = checkpointing.resume(get_args_parser())
    if utils.is_main_process():
        print(f"finetune.py at git {utils.git_commit()}, {world} process(es) on {device}, {args.workers} loader "
              f"workers each")
    log = utils.Log(out / "log.jsonl", start_epoch)

    with checkpointing:
        for epoch in range(start_epoch, args.epochs):
            lr = utils.adjust_learning_rate(optimizer, epoch, args)
            stats = train_one_epoch(ddp_model, train_loader, optimizer, scaler, args, checkpointing)
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                metrics = evaluate(model, test_loader, device, args)
                stats.update(test_top1=metrics["top1"], test_top5=metrics["top5"])
                if metrics["top1"] > best["top1"]:
                    best.update(top1=metrics["top1"], epoch=epoch + 1)
                    checkpointing.save(out / "best.pth")
            log.write({"epoch": epoch + 1, "lr": lr, **stats})
            checkpointing.save(out / "checkpoint.pth")

    results = {args.test_split: metrics or evaluate(model, test_loader, device, args)}  # the final model
    for split in utils.eval_splits(args)[1:]:
        test_set = data.build_dataset(args, split, "test", held_out_from=args.train_split)
        results[split] = evaluate(model, data.build_test_loader(test_set, args), device, args)
    utils.write_results(args, results, best=best, train={"split": args.train_split, **train_set.manifest})
    utils.finish_distributed()


def train_one_epoch(model, loader, optimizer, scaler, args, checkpointing):
    """One epoch over the training split: the one `checkpointing` is at, from its step on (a resume may start inside
    it); checkpointing.check saves checkpoint.pth inside the epoch when due. Returns the epoch's log entry, summed
    over all processes."""
    model.train()
    device = next(model.parameters()).device
    amp = utils.amp_dtype(args.amp, device)
    epoch, start = checkpointing.begin_epoch()
    loader.sampler.set_epoch(epoch, skip=start * loader.batch_size)
    bar = tqdm(loader, initial=start, total=start + len(loader), desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=not utils.is_main_process(), leave=False)
    for step, batch in enumerate(bar, start):
        utils.seed_everything(args.seed, epoch, step)  # this step's colour augmentation and dropout
        x = augment.augment_and_normalize(batch["clip"].to(device, non_blocking=True))  # (B, 3, T, S, S)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        y = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        checkpointing.add({"loss": loss.detach() * len(y), "correct": (logits.argmax(1) == y).sum(), "clips": len(y),
                           "failed_videos": batch["failed"].sum()})
        read = checkpointing.check()  # every --log-every steps, summed over the processes; stops on a non-finite loss
        if read:
            bar.set_postfix(loss=f"{read['loss'] / read['clips']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}",
                            refresh=False)
    sums = checkpointing.end_epoch()
    clips, seconds = sums["clips"], sums["seconds"]
    return {"loss": sums["loss"] / clips, "acc": 100.0 * sums["correct"] / clips, "time": round(seconds, 2),
            "clips_per_s": round(clips / seconds, 2), "failed_videos": int(sums["failed_videos"])}


@torch.no_grad()
def evaluate(model, loader, device, args):
    """Video-level accuracy: the softmax averaged over the clips of each test video (paper Sec. 4.2), and the
    account of every listed test video (utils.video_accounting)."""
    model.eval()
    amp = utils.amp_dtype(args.amp, device)

    def scores(clips):  # (n, 3, T, S, S) uint8 -> (n, num_classes)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return model(augment.normalize(clips)).float().softmax(1)

    start = time.perf_counter()
    video_scores, ok = utils.clip_outputs(scores, loader, device)  # (V, N, num_classes), (V,)
    metrics = utils.classification_metrics(video_scores.mean(1), loader.dataset.labels, loader.dataset.classes, ok)
    return {**metrics, "clips_per_s": len(loader.dataset) * args.clips / (time.perf_counter() - start),
            **utils.video_accounting(loader.dataset, ok)}


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
