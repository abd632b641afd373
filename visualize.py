"""See what FAME keeps and what a pretrained backbone attends to (paper Fig. 1 and Fig. 6).

Two subcommands, each writing one PNG grid (one block of rows per video, one column per shown frame):

  # FAME's foreground masks and merged clips (rows per video: frames, mask overlay, merged clip)
  python visualize.py masks --beta 0.5 --output masks.png VIDEO [VIDEO ...]    # video i on the background of i-1

  # class-agnostic activation maps (CAAM): the channel-summed last conv feature map, upsampled and overlaid
  # on the frames; give several checkpoints to compare them side by side (rows per video: frames, one per CKPT)
  python visualize.py caam --arch cnn3d --pretrained moco/checkpoint.pth fame/checkpoint.pth \
      --output caam.png VIDEO [VIDEO ...]

The pictures in README.md were made on the synthetic benchmark with experiments/background_bias.py --pictures,
which runs these two commands (--frames 8 --stride 2 --crop 64).
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

import augment
import data
import fame
import models
import utils


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_common(p):
        p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (any container PyAV reads)")
        p.add_argument("--frames", type=utils.POSITIVE_INT, default=8, help="frames per clip (T)")
        p.add_argument("--stride", type=utils.POSITIVE_INT, default=2, help="temporal stride between clip frames")
        p.add_argument("--crop", type=utils.POSITIVE_INT, default=112,
                       help="the largest centred square of the frames, resized to CROP x CROP")
        p.add_argument("--show", type=utils.POSITIVE_INT, default=4, help="frames shown per clip (evenly spaced)")
        p.add_argument("--output", default=None,
                       help="picture to write, .png (or another format Pillow writes, by its extension; default: "
                            "<command>.png)")

    p = sub.add_parser("masks", help="FAME foreground masks and merged clips",
                       description="Rows per video: frames, foreground mask over the frames, merged clip.")
    add_common(p)
    p.add_argument("--beta", type=utils.Number(float, 0, 1, open_low=True), default=0.5,
                   help="foreground portion of the frame, Eq. (3), in (0, 1]")
    p.add_argument("--fame-method", default="fame", choices=fame.METHODS,
                   help="mask variant (paper Table 4)")

    p = sub.add_parser("caam", help="class-agnostic activation maps of pretrained checkpoints",
                       description="Rows per video: frames, then one heat-map overlay per checkpoint.")
    add_common(p)
    p.add_argument("--pretrained", nargs="+", required=True, metavar="CKPT",
                   help="checkpoints (ours, the authors' MoCo format or a backbone state dict); none: a randomly "
                        "initialised backbone")
    p.add_argument("--arch", default="cnn3d", choices=sorted(models.ARCHS), help="backbone of CKPT")
    p.add_argument("--alpha", type=utils.FRACTION, default=0.5, help="heat-map opacity, in [0, 1]")
    p.add_argument("--device", type=utils.device, default="cpu")
    utils.add_unsafe_arg(p)
    return parser


def main(args):
    if args.command == "masks":
        problems = utils.fame_problems(args.beta, args.frames, args.crop)
        if args.frames < 2 and not problems:  # --beta 1: the mask is the whole frame, still from frame differences
            problems = [f"the masks need --frames of at least 2 (they come from frame differences), got {args.frames}"]
    else:
        problems = utils.backbone_problems(args.arch, args.frames, args.crop)
    if problems:
        raise utils.UsageError("; ".join(problems))
    if args.output is None:
        args.output = f"{args.command}.png"
    check_output(args.output)
    for path in args.videos:
        if os.path.isdir(path):
            raise utils.UsageError(f"{path} is a folder; give video files")
        if not os.path.isfile(path):
            raise utils.UsageError(f"video not found: {path}")
    clips = torch.stack([read_clip(v, args.frames, args.stride, args.crop) for v in args.videos])  # (B,3,T,S,S)
    clips = clips.float().div_(255)
    if args.command == "masks":
        rows = mask_rows(clips, args.beta, args.fame_method)
    else:
        rows = caam_rows(clips, args.pretrained, args.arch, args.alpha, torch.device(args.device),
                         args.unsafe_unpickle)
    # keep --show evenly spaced frames of every row: (B, R, 3, T, S, S) -> (B*R*show, 3, S, S)
    t = torch.linspace(0, clips.shape[2] - 1, min(args.show, clips.shape[2])).round().long()
    tiles = rows[:, :, :, t].permute(0, 1, 3, 2, 4, 5).flatten(0, 2)
    save_image(make_grid(tiles, nrow=len(t), padding=2, pad_value=1.0), args.output)
    print(f"wrote {args.output} ({len(args.videos)} videos x {rows.shape[1]} rows x {len(t)} frames)")


def check_output(path):
    """Refuses an --output that Pillow cannot write (an unknown extension) or that is a folder, and creates its
    folder, refusing one that cannot be written (utils.make_output_dir), before any work."""
    from PIL import Image  # Pillow comes with torchvision

    if os.path.isdir(path):
        raise utils.UsageError(f"--output {path} is a folder; give a picture file, e.g. {path.rstrip('/')}/out.png")
    ext = os.path.splitext(path)[1].lower()
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        raise utils.UsageError(f"--output {path}: {ext or 'no extension'} is no picture format Pillow writes; use "
                               f".png")
    utils.make_output_dir(os.path.dirname(path) or ".", lock=False, flag="--output")


def read_clip(path, frames, stride, size, start=None):
    """A clip of a video as uint8 (3, T, size, size), the middle one unless `start` (a frame index) is given: the
    largest centred square of the frames, resized to size."""
    if not os.path.isfile(path):
        raise utils.UsageError(f"video not found: {path}")
    try:
        info = data.probe_video(path)
    except ValueError as e:  # it names the problem of an unreadable file
        raise utils.DataError(f"{path}: {e}") from None
    n = info["frames"]
    stride, span = data.clip_layout(n, frames, stride)  # short videos: smaller stride, then repeated last frame
    idx = data.clip_indices(max(0, (n - span) // 2) if start is None else start, n, frames, stride)
    video = data.decode_frames(path, idx, info, short_side=size)  # uint8 (T, h, w, 3)
    h, w = video.shape[1:3]
    side = min(h, w)
    return data.crop_resize(video, ((h - side) // 2, (w - side) // 2, side, side), size)


def mask_rows(clips, beta, method):
    """(B, 3, T, S, S) in [0,1] -> (B, 3 rows, 3, T, S, S): frames, mask overlay, merged clip."""
    mask = fame.foreground_mask(clips, beta=beta, method=method)  # (B, S, S), constant over time
    # background of video i = clip of video i-1 (a grey clip when there is a single video)
    background = clips.roll(1, dims=0) if clips.shape[0] > 1 else torch.full_like(clips, 0.5)
    merged = fame.merge(clips, mask, background)  # Eq. (4)
    m = mask[:, None, None].expand_as(clips)  # (B, 3, T, S, S)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1, 1)
    overlay = clips * (1 - 0.5 * m) + 0.5 * m * red  # foreground tinted red
    return torch.stack([clips, overlay, merged], dim=1)


@torch.no_grad()
def caam_rows(clips, checkpoints, arch, alpha, device, unsafe=False):
    """(B, 3, T, S, S) in [0,1] -> (B, 1 + len(checkpoints), 3, T, S, S): frames, then one CAAM overlay each
    (unsafe: models.load_checkpoint)."""
    rows = [clips]
    for path in checkpoints:
        torch.manual_seed(0)  # none: the same random backbone as the evaluation scripts' at --seed 0
        model = models.build_backbone(arch)
        if path != "none":
            models.load_backbone(model, path, unsafe)
        model.to(device).eval()
        rows.append(overlay_heatmap(clips, caam(model, clips.to(device)).cpu(), alpha))
    return torch.stack(rows, dim=1)


def caam(model, clips):
    """Class-agnostic activation map: (B, 3, T, H, W) in [0,1] -> (B, T, H, W) in [0,1], per clip min-max scaled."""
    fmap = model.last_conv_features(augment.normalize(clips))  # (B, C, T', H', W')
    amap = fmap.sum(1, keepdim=True)  # (B, 1, T', H', W'): channel sum
    amap = F.interpolate(amap, size=clips.shape[2:], mode="trilinear", align_corners=False)[:, 0]  # (B, T, H, W)
    lo = amap.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = amap.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return (amap - lo) / (hi - lo).clamp_min(1e-8)


def overlay_heatmap(clips, amap, alpha):
    """Blend a jet-coloured map (B, T, H, W) in [0,1] over clips (B, 3, T, H, W)."""
    x = amap.unsqueeze(1)  # (B, 1, T, H, W)
    jet = torch.cat([(1.5 - (4 * x - c).abs()).clamp(0, 1) for c in (3, 2, 1)], dim=1)  # (B, 3, T, H, W): r, g, b
    return (1 - alpha) * clips + alpha * jet


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
