"""Foreground-background Merging (FAME), paper Sec. 3.2, as a batched PyTorch augmentation.

FAME keeps the moving foreground of each clip and pastes it onto the background of another clip:
frame differences give a seed region S (Eq. 2), colour statistics grow it into a soft mask M, the top
beta*H*W pixels of M form the binary mask (Eq. 3), and the clips are merged (Eq. 4).

    from fame import FAME
    x = FAME(beta=0.5)(clips)        # clips: (B, 3, T, H, W) in [0, 1], before mean/std normalization

Show what it does on a video (frames / mask / merged rows, written as a PNG):

    python fame.py VIDEO [VIDEO2] --beta 0.5 --out fame.png

Measure its cost against one clone() of the same batch (B=64, 3x16x112x112 and 3x16x224x224):

    python fame.py --benchmark --threads 2
"""
import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

METHODS = ("fame", "seed", "grid", "gauss")
NUM_LEVELS = 10          # quantization levels per colour-cone coordinate (a, b, v): 10**3 = 1000 bins
NUM_BINS = NUM_LEVELS ** 3
FOREGROUND_FRACTION = 0.5  # N^(F) = int(0.5 * H * W) pixels with the largest S
BACKGROUND_FRACTION = 0.1  # N^(B) = int(0.1 * H * W) pixels with the smallest S
GRID = 4                   # "grid" variant: GRID x GRID cells
# The statistics pass over the full clips runs over chunks of about this many bytes of float32, so that
# each chunk's difference buffer stays in cache: on the 2-core reference machine one 112 px clip at a time
# (4 MiB) is about 1.3x faster than 16 MiB chunks and several times faster than one pass over a B=64 batch.
# On GPU the chunks only bound the temporaries.
CHUNK_BYTES = {"cpu": 4 << 20}
DEFAULT_CHUNK_BYTES = 256 << 20


def _check_beta(beta):
    if not isinstance(beta, (int, float)) or not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be a number in (0, 1], got {beta!r}")


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown FAME mask method {method!r}; valid: {', '.join(METHODS)}")


def _check_clips(clips, min_frames=2):
    if clips.dim() != 5 or clips.shape[1] != 3:
        raise ValueError(f"expected clips of shape (B, 3, T, H, W), got {tuple(clips.shape)}")
    if clips.shape[2] < min_frames:
        raise ValueError(f"frame differences need T >= {min_frames} frames, got T={clips.shape[2]}")
    if not clips.is_floating_point():
        raise TypeError(f"expected float clips in [0, 1], got {clips.dtype} (divide uint8 clips by 255)")


def _seed_and_mean(clips):
    """One fused pass over the clips.

    clips: (B, 3, T, H, W) -> S: (B, H, W) float32 (Eq. 2), mean image: (B, 3, H, W) float32.
    """
    B, C, T, H, W = clips.shape
    S = torch.empty(B, H, W, dtype=torch.float32, device=clips.device)
    total = torch.empty(B, C, H, W, dtype=torch.float32, device=clips.device)
    chunk = _chunk_size(clips)
    buffer = torch.empty(min(chunk, B), C, T - 1, H, W, dtype=torch.float32, device=clips.device)
    for i in range(0, B, chunk):
        x = clips[i:i + chunk].float()                                   # (b, 3, T, H, W)
        d = torch.sub(x[:, :, 1:], x[:, :, :-1], out=buffer[:len(x)])    # (b, 3, T-1, H, W)
        torch.sum(d.abs_(), dim=(1, 2), out=S[i:i + chunk])              # Eq. (2), sum over c and t
        torch.sum(x, dim=2, out=total[i:i + chunk])                      # (b, 3, H, W)
    return S.div_(T - 1), total.div_(T)


def seed_region(clips):
    """Eq. (2): mean absolute frame difference summed over channels. (B, 3, T, H, W) -> (B, H, W) float32."""
    _check_clips(clips)
    return _seed_and_mean(clips)[0]


def gaussian_kernel_size(H):
    """Odd Gaussian window used to smooth S and M: 11 at H=112, 23 at H=224 (sigma = size / 3)."""
    return int(0.1 * H) // 2 * 2 + 1


def _blur_matrix(n, k, device):
    """(n, n) matrix A such that A @ v is v convolved with the normalized Gaussian of size k, sigma k / 3,
    with reflect padding (the border pixel is not repeated)."""
    r = k // 2
    x = torch.arange(k, dtype=torch.float32, device=device) - r
    g = torch.exp(-x ** 2 / (2 * (k / 3) ** 2))
    g = g / g.sum()                                                      # (k,)
    src = torch.arange(n, device=device).view(-1, 1) + torch.arange(-r, r + 1, device=device)   # (n, k)
    src = src.abs()                                                      # reflect at 0
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)               # reflect at n - 1
    return torch.zeros(n, n, device=device).scatter_add_(1, src, g.expand(n, k))


def _blur(img):
    """Separable Gaussian blur with reflect padding, as two matrix products (far faster on CPU than a
    one-channel conv2d). img: (B, H, W) float32 -> (B, H, W)."""
    B, H, W = img.shape
    k = gaussian_kernel_size(H)
    if k == 1:
        return img
    if k // 2 >= min(H, W):
        raise ValueError(f"frames of {H}x{W} are too narrow for the {k}-pixel Gaussian")
    return _blur_matrix(H, k, img.device) @ img @ _blur_matrix(W, k, img.device).T


def _minmax(img):
    """Per-clip min-max normalization to [0, 1]. img: (B, H, W) -> (B, H, W)."""
    lo, hi = img.flatten(1).aminmax(dim=1)                               # (B,), (B,)
    return (img - lo.view(-1, 1, 1)) / (hi - lo + 1e-8).view(-1, 1, 1)


def colour_bins(image):
    """Quantized colour-cone bin of every pixel. image: (B, 3, H, W) RGB in [0, 1] -> (B, H, W) long in [0, 1000).

    HSV with the hue h as an angle in radians, then the cone a = (s cos h + 1) / 2, b = (s sin h + 1) / 2
    and v, each quantized to round(value * 9). The authors' code multiplies kornia's hue, which is already
    in radians, by another 2*pi (folding about six turns of the hue circle onto one); we use the angle as is.
    """
    red, green, blue = image.unbind(1)                                   # (B, H, W) each
    v = image.amax(1)
    delta = v - image.amin(1)
    s = delta / (v + 1e-8)
    # Hue in sextants [-1, 5): the first maximal channel picks the formula; grey pixels get 0 (and s = 0).
    h = torch.where(red == v, green - blue,
                    torch.where(green == v, blue - red + 2 * delta, red - green + 4 * delta))
    h = h / delta.clamp_min(1e-12) * (math.pi / 3)                       # radians
    a = (s * torch.cos(h) + 1) / 2
    b = (s * torch.sin(h) + 1) / 2
    q_a, q_b, q_v = (torch.round(c * (NUM_LEVELS - 1)) for c in (a, b, v))   # 0 .. 9 each
    return ((q_a * NUM_LEVELS + q_b) * NUM_LEVELS + q_v).long()


def _fame_scores(S_smooth, mean):
    """Smoothed colour-statistics mask, before min-max normalization.

    S_smooth: (B, H, W), mean image: (B, 3, H, W) -> (B, H, W) float32.
    """
    B, H, W = S_smooth.shape
    n_F = int(FOREGROUND_FRACTION * H * W)
    n_B = int(BACKGROUND_FRACTION * H * W)
    bins = colour_bins(mean).flatten(1)                                  # (B, HW)
    S_flat = S_smooth.flatten(1)                                         # (B, HW)
    idx = torch.cat([S_flat.topk(n_F, dim=1, sorted=False).indices,      # the n_F pixels with the largest S
                     S_flat.topk(n_B, dim=1, largest=False, sorted=False).indices], dim=1)   # and n_B smallest
    # Both histograms in one scatter: foreground counts in bins [0, 1000), background in [1000, 2000).
    side = torch.cat([torch.zeros(n_F, dtype=torch.long, device=idx.device),
                      torch.full((n_B,), NUM_BINS, dtype=torch.long, device=idx.device)])     # (n_F + n_B,)
    hist = torch.zeros(B, 2 * NUM_BINS, device=idx.device)
    hist.scatter_add_(1, bins.gather(1, idx) + side, torch.ones(1, device=idx.device).expand(idx.shape))
    hist_F, hist_B = hist.view(B, 2, NUM_BINS).unbind(1)                 # (B, 1000) counts each
    P_F = hist_F / max(n_F, 1)                                           # P(x|F)
    P_B = (hist_B + 1) / (n_B + NUM_BINS)                                # P(x|B), Laplace smoothing: > 0
    M = (P_F / (P_F + P_B)).gather(1, bins).view(B, H, W)                # M_ij = P(F | x_ij)
    return _blur(M)


def _gauss_soft(B, H, W, device):
    """Centred 2-D Gaussian (sigma a quarter of each side; only its ranking matters). -> (B, H, W)."""
    y = (torch.arange(H, dtype=torch.float32, device=device) - (H - 1) / 2) / (H / 4)
    x = (torch.arange(W, dtype=torch.float32, device=device) - (W - 1) / 2) / (W / 4)
    g = torch.exp(-(y.view(-1, 1) ** 2 + x.view(1, -1) ** 2) / 2)       # (H, W)
    return g.expand(B, H, W)


def _grid_mask(S, beta):
    """4x4 grid: the round(16 * beta) cells with the largest sum of S are foreground. S: (B, H, W) -> (B, H, W) bool."""
    B, H, W = S.shape
    rows = torch.arange(H, device=S.device) * GRID // H                   # (H,) cell row of each pixel row
    cols = torch.arange(W, device=S.device) * GRID // W                   # (W,)
    cell = (rows.view(-1, 1) * GRID + cols.view(1, -1)).flatten()        # (HW,) cell id of each pixel
    sums = torch.zeros(B, GRID * GRID, device=S.device).index_add_(1, cell, S.flatten(1))   # (B, 16)
    top = sums.topk(round(GRID * GRID * beta), dim=1, sorted=False).indices
    chosen = torch.zeros(B, GRID * GRID, dtype=torch.bool, device=S.device).scatter_(1, top, True)
    return chosen[:, cell].view(B, H, W)


def _top_fraction(M, beta):
    """Eq. (3): exactly int(beta*H*W) ones per clip, at the largest values of M. M: (B, H, W) -> (B, H, W) bool.

    top-k + scatter rather than a threshold, so ties cannot change the count.
    """
    B, H, W = M.shape
    top = M.flatten(1).topk(int(beta * H * W), dim=1, sorted=False).indices          # (B, n)
    mask = torch.zeros(B, H * W, dtype=torch.bool, device=M.device).scatter_(1, top, True)
    return mask.view(B, H, W)


def _scores(clips, method):
    """Per-pixel foreground scores whose top beta*H*W pixels form the mask (Eq. 3). -> (B, H, W) float32."""
    _check_clips(clips, min_frames=1 if method == "gauss" else 2)
    B, _, T, H, W = clips.shape
    if method == "gauss":
        return _gauss_soft(B, H, W, clips.device)
    S, mean = _seed_and_mean(clips)                                      # Eq. (2)
    S_smooth = _blur(S)                                                  # (B, H, W)
    return S_smooth if method == "seed" else _fame_scores(S_smooth, mean)


@torch.no_grad()
def soft_mask(clips, method="fame"):
    """Soft foreground score before binarization. clips: (B, 3, T, H, W) -> (B, H, W) float32 in [0, 1].

    "fame": the colour-statistics mask M (smoothed, min-max normalized); "seed": the smoothed, normalized S;
    "gauss": a centred Gaussian. ("grid" ranks whole cells and has no per-pixel score.)
    """
    if method not in ("fame", "seed", "gauss"):
        raise ValueError(f"soft_mask supports 'fame', 'seed', 'gauss', got {method!r}")
    return _minmax(_scores(clips, method))


@torch.no_grad()
def foreground_mask(clips, beta=0.5, method="fame"):
    """Binary foreground mask, constant over time.

    clips: (B, 3, T, H, W) floats in [0, 1]. Returns (B, H, W) of 0/1 in clips' dtype with exactly
    int(beta*H*W) ones per clip ("grid": round(16*beta) whole cells).
    """
    _check_beta(beta)
    _check_method(method)
    if method == "grid":
        _check_clips(clips)
        mask = _grid_mask(_seed_and_mean(clips)[0], beta)               # Eq. (2) summed per cell
    else:
        # Min-max normalization is increasing, so Eq. (3) ranks the smoothed scores directly.
        mask = _top_fraction(_scores(clips, method), beta)              # Eq. (3)
    return mask.to(clips.dtype)


def merge(clips, mask, background):
    """Eq. (4): X_merge = X * M + Y * (1 - M).

    clips X, background Y: (B, C, T, H, W); mask M: (B, H, W) or (B, T, H, W), 0/1 (soft values blend).
    Returns a new tensor (B, C, T, H, W).
    """
    if background.shape != clips.shape:
        raise ValueError(f"background {tuple(background.shape)} must match clips {tuple(clips.shape)}")
    M = _broadcast_mask(mask, clips)                                     # (B, 1, T or 1, H, W)
    return torch.lerp(background, clips, M)                             # Eq. (4), exact for 0/1 masks


def _broadcast_mask(mask, clips):
    if mask.dim() == 3:
        mask = mask[:, None]                                             # (B, 1, H, W)
    return mask[:, None].to(clips.dtype)                                 # (B, 1, T or 1, H, W)


def _chunk_size(clips):
    """Clips per chunk for the passes over the full clips (see CHUNK_BYTES)."""
    B, C, T, H, W = clips.shape
    return max(1, CHUNK_BYTES.get(clips.device.type, DEFAULT_CHUNK_BYTES) // (C * T * H * W * 4))


def _merge_permuted(clips, mask, perm):
    """Eq. (4) with Y = clips[perm], one clip at a time: each background is read in place, so the pass
    reads X and Y and writes the result once (no gathered copy of the backgrounds; ~15% faster on CPU)."""
    M = _broadcast_mask(mask, clips)                                     # (B, 1, 1, H, W)
    out = torch.empty_like(clips)                                        # (B, C, T, H, W)
    for i, j in enumerate(perm.tolist()):
        torch.lerp(clips[j], clips[i], M[i], out=out[i])                # Eq. (4), (C, T, H, W)
    return out


def derangement(n, generator=None, device=None):
    """Uniformly random permutation of range(n) without fixed points (n >= 2), by rejection (~e draws).

    The authors' code uses a plain permutation, which leaves about 1/B of the clips merged with their own
    background, i.e. unchanged; a derangement gives every clip a foreign background.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    identity = torch.arange(n, device=gen_device)
    while True:
        perm = torch.randperm(n, generator=generator, device=gen_device)
        if not bool((perm == identity).any()):
            return perm.to(device) if device is not None else perm


class FAME(torch.nn.Module):
    """Foreground-background Merging. FAME(beta, method)(clips) -> clips with foreign backgrounds.

    beta: foreground fraction in (0, 1]; beta = 1 returns the clips unchanged (vanilla MoCo).
    method: "fame" (paper), or the ablation masks "seed", "grid", "gauss" (paper Table 4).
    """

    def __init__(self, beta=0.5, method="fame"):
        super().__init__()
        _check_beta(beta)
        _check_method(method)
        self.beta = beta
        self.method = method

    def extra_repr(self):
        return f"beta={self.beta}, method={self.method!r}"

    @torch.no_grad()
    def forward(self, clips, background=None, generator=None):
        """clips: (B, 3, T, H, W) in [0, 1]; background: same shape (e.g. another clip of the same video),
        or None for the background of another clip in the batch (random derangement, reproducible with
        generator). Returns (B, 3, T, H, W)."""
        if self.beta == 1:
            return clips
        if background is None and clips.shape[0] < 2:
            raise ValueError("FAME needs a batch of at least 2 clips to swap backgrounds, or an explicit background")
        mask = foreground_mask(clips, self.beta, self.method)           # (B, H, W)
        if background is not None:
            return merge(clips, mask, background)
        return _merge_permuted(clips, mask, derangement(clips.shape[0], generator, clips.device))


# ---------------------------------------------------------------------------------------------------------
# Command line: visualization and benchmark. Only these paths import av, numpy and torchvision.


def get_args_parser():
    parser = argparse.ArgumentParser(description="Visualize or benchmark FAME (Foreground-background Merging).")
    parser.add_argument("videos", nargs="*", metavar="VIDEO",
                        help="video to show; background from a later clip of it, or from a second VIDEO")
    parser.add_argument("--beta", type=float, default=0.5, help="foreground fraction in (0, 1] (paper: 0.5)")
    parser.add_argument("--method", default="fame", choices=METHODS, help="mask method (paper Table 4)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (T)")
    parser.add_argument("--stride", type=int, default=2, help="temporal stride between sampled frames")
    parser.add_argument("--size", type=int, default=112, help="short side resize, then centre crop to size x size")
    parser.add_argument("--columns", type=int, default=8, help="frames shown per row in the PNG")
    parser.add_argument("--out", default="fame.png", help="output PNG")
    parser.add_argument("--benchmark", action="store_true",
                        help="time FAME on B random clips at 112 and 224 px against clips.clone()")
    parser.add_argument("--batch", type=int, default=64, help="benchmark batch size B")
    parser.add_argument("--repeats", type=int, default=7, help="benchmark repeats (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for the benchmark")
    return parser


def read_clips(path, frames, stride, size, count):
    """Decode `count` consecutive clips of `frames` frames from `path` with PyAV.

    Returns (count, 3, T, size, size) float32 in [0, 1]; if the video is too short for disjoint clips,
    the last clip ends at the last frame.
    """
    import av
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"no such video file: {path}")
    span = frames * stride
    decoded = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                decoded.append(frame.to_ndarray(format="rgb24"))        # (h, w, 3) uint8
                if len(decoded) == span * count:
                    break
    except av.error.FFmpegError as e:
        raise SystemExit(f"cannot decode {path}: {e}")
    if len(decoded) < span:
        raise SystemExit(f"{path} has {len(decoded)} frames; need at least frames*stride = {span}")
    video = torch.from_numpy(np.stack(decoded))                          # (N, h, w, 3) uint8
    starts = [min(i * span, len(decoded) - span) for i in range(count)]
    clips = torch.stack([video[s:s + span:stride] for s in starts])      # (count, T, h, w, 3)
    clips = clips.permute(0, 1, 4, 2, 3).flatten(0, 1).float().div_(255)  # (count*T, 3, h, w)
    h, w = clips.shape[-2:]
    scale = size / min(h, w)
    clips = F.interpolate(clips, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                          mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
    top, left = (clips.shape[-2] - size) // 2, (clips.shape[-1] - size) // 2
    clips = clips[..., top:top + size, left:left + size]
    return clips.reshape(count, frames, 3, size, size).transpose(1, 2).contiguous()


def main(args):
    """Write a PNG grid: row 1 the clip's frames; row 2 the smoothed seed S, the soft mask M, the binary mask,
    then the foreground cut-out of the remaining frames; row 3 the merged frames (Eq. 4)."""
    from torchvision.utils import save_image

    if not 1 <= len(args.videos) <= 2:
        raise SystemExit("give one or two VIDEO paths (or --benchmark)")
    _check_beta(args.beta)
    if len(args.videos) == 1:
        X, Y = read_clips(args.videos[0], args.frames, args.stride, args.size, count=2).split(1)
    else:
        X = read_clips(args.videos[0], args.frames, args.stride, args.size, count=1)
        Y = read_clips(args.videos[1], args.frames, args.stride, args.size, count=1)
    mask = foreground_mask(X, args.beta, args.method)                    # (1, H, W)
    merged = merge(X, mask, Y)                                           # (1, 3, T, H, W)
    soft = soft_mask(X, args.method) if args.method != "grid" else mask.float()
    seed = _minmax(_blur(seed_region(X)))                                # (1, H, W)
    n = min(args.columns, args.frames)
    t = torch.linspace(0, args.frames - 1, n).round().long()
    frames = X[0][:, t].transpose(0, 1)                                  # (n, 3, H, W)
    maps = [m.expand(3, -1, -1) for m in (seed[0], soft[0], mask[0].float())]
    cutouts = (frames * mask[0])[len(maps):]
    row2 = torch.cat([torch.stack(maps[:n]), cutouts])                  # (n, 3, H, W)
    row3 = merged[0][:, t].transpose(0, 1)
    save_image(torch.cat([frames, row2, row3]), args.out, nrow=n, padding=2, pad_value=1.0)
    print(f"wrote {args.out}: rows = frames | seed S, soft mask M, binary mask (beta={args.beta}, "
          f"{args.method}), foreground | merged (Eq. 4)")


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def benchmark(args):
    """Median time of FAME (mask + merge) vs one clips.clone() of the same batch, interleaved."""
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    augment = FAME(args.beta, args.method)
    generator = torch.Generator().manual_seed(0)
    print(f"FAME benchmark: B={args.batch}, beta={args.beta}, method={args.method}, "
          f"threads={torch.get_num_threads()}, median of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for device in devices:
        for size in (112, 224):
            clips = torch.rand(args.batch, 3, 16, size, size, generator=generator).to(device)
            augment(clips, generator=generator)                          # warm-up
            clips.clone()
            t_fame, t_clone = [], []
            for _ in range(args.repeats):
                t_clone.append(_timed(clips.clone, device))
                t_fame.append(_timed(lambda: augment(clips, generator=generator), device))
            f, c = statistics.median(t_fame), statistics.median(t_clone)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            print(f"{name:>24} 3x16x{size}x{size}: FAME {f * 1e3:8.1f} ms = {args.batch / f:8.0f} clips/s | "
                  f"clone {c * 1e3:7.1f} ms | FAME/clone = {f / c:.2f}x")
            del clips


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    if args.benchmark:
        benchmark(args)
    else:
        main(args)
