"""Foreground-background Merging (FAME), paper Sec. 3.2, as a batched PyTorch augmentation without parameters.

FAME keeps the moving foreground of each clip and pastes it onto the background of another clip of the batch:

    from fame import FAME
    merged = FAME(beta=0.5)(clips)   # clips (B, 3, T, H, W): uint8, or float in [0, 1]; returned in that dtype

The steps, in the paper's order (each a function below):
    seed_region     Eq. (2)  S: absolute frame differences summed over colours, averaged over time
                             (clip_statistics computes it together with the mean image of the clip)
    smooth                   Gaussian smoothing of S (and of M): size int(0.1 H) // 2 * 2 + 1, sigma size / 3
    colour_mask              M = P(F | x): colour statistics of the top 50% (F) and bottom 10% (B) of S
    binarize        Eq. (3)  the mask: the [beta H W] pixels with the largest M
    merge           Eq. (4)  X * mask + Y * (1 - mask)
    derangement              Y: another clip of the batch, never the clip itself
The mask variants of the paper's Table 4 ("seed", "grid", "gauss") replace M; see foreground_mask().

A uint8 batch gives exactly the masks of the same batch as float32 / 255 (the statistics are computed in
float32 from the same values), and the merge of a 0/1 mask is a selection, so the merged uint8 clips equal the
merged float clips times 255. Float clips outside [0, 1] (e.g. already normalized) are refused: their colours
would fall outside the colour bins.

This file needs torch only and can be copied into another project as it is.
"""
import math
import numbers

import torch

METHODS = ("fame", "seed", "grid", "gauss")
FOREGROUND_SHARE = 0.5  # N^(F) = [0.5 H W] pixels with the largest S
BACKGROUND_SHARE = 0.1  # N^(B) = [0.1 H W] pixels with the smallest S
LEVELS = 10  # levels per colour coordinate, 10^3 colours: the authors' moco/loader.py, FAME.getSeg (dimH, dimS, dimV)
GRID = 4  # the "grid" variant splits the frame into GRID x GRID cells


# ---------------------------------------------------------------------------------------------------------
# Eq. (2): the seed region


def seed_region(clips):
    """Eq. (2): the seed region S = 1/(T-1) sum_c sum_t |X_{c,t+1} - X_{c,t}|, the absolute frame differences
    summed over colours and averaged over time. clips (B, C, T, H, W) -> S (B, H, W) float32."""
    return clip_statistics(clips)[0]


# clip_statistics converts this many bytes of clips to float32 at a time. On CPU a small chunk is still in the
# cache when it is read again (frame differences, then the mean): several times faster than converting a large
# batch at once. Elsewhere the chunk only bounds the memory of the float copy.
CPU_CHUNK_BYTES = 4 << 20
CHUNK_BYTES = 1 << 30


def clip_statistics(clips):
    """Eq. (2) and the mean image, from one float conversion of the clips.

    clips: (B, C, T, H, W), uint8 or float in [0, 1], read as X in [0, 1] ->
        S = 1/(T-1) sum_c sum_t |X_{c,t+1} - X_{c,t}|    (B, H, W)     Eq. (2)
        X~ = 1/T sum_t X_t                                (B, C, H, W)  the clip as one image, for colour_mask
    both float32.
    """
    B, C, T, H, W = clips.shape
    S = torch.empty(B, H, W, device=clips.device)
    image = torch.empty(B, C, H, W, device=clips.device)
    chunk = CPU_CHUNK_BYTES if clips.device.type == "cpu" else CHUNK_BYTES
    n = max(1, chunk // (clips[0].numel() * 4))  # clips per chunk
    for i in range(0, B, n):
        x = clips[i:i + n]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()  # (n, C, T, H, W) in [0, 1]
        torch.sum((x[:, :, 1:] - x[:, :, :-1]).abs_(), dim=(1, 2), out=S[i:i + n])  # sum over c and t
        torch.mean(x, dim=2, out=image[i:i + n])
    return S.div_(T - 1), image


# ---------------------------------------------------------------------------------------------------------
# Smoothing


def gaussian_kernel_size(H):
    """Odd Gaussian size for frames of height H: 11 at 112, 23 at 224. The paper gives none; this is the authors'
    moco/loader.py, FAME.__init__: gauss_size = int(0.1 * crop_size) // 2 * 2 + 1."""
    return int(0.1 * H) // 2 * 2 + 1


def smooth(maps):
    """Gaussian smoothing of (B, H, W) maps: size gaussian_kernel_size(H) in both directions, sigma size / 3 and a
    reflected border, as the authors' kornia.filters.GaussianBlur2d((size, size), (size / 3, size / 3)), which
    their FAME.getmask applies to S and FAME.getSeg to M (the paper smooths neither). -> (B, H, W)

    A separable convolution of the reflect-padded maps, written as two matrix products A_H @ maps @ A_W^T, whose
    (n, n) matrices hold the Gaussian around their diagonal: several times faster on CPU than a one-channel conv2d.
    """
    B, H, W = maps.shape
    k = gaussian_kernel_size(H)
    if k == 1:
        return maps
    if k // 2 >= min(H, W):
        raise ValueError(f"frames of {H}x{W} are too narrow for the {k}-pixel Gaussian")
    return _gaussian_matrix(H, k, maps.device) @ maps @ _gaussian_matrix(W, k, maps.device).T


def _gaussian_matrix(n, k, device):
    """(n, n) matrix whose row i holds the size-k Gaussian centred on i, its taps past either border reflected
    back inside (the border pixel itself is not repeated)."""
    x = torch.arange(k, dtype=torch.float32, device=device) - k // 2
    g = torch.exp(-x ** 2 / (2 * (k / 3) ** 2))
    g = g / g.sum()  # (k,)
    src = (torch.arange(n, device=device).view(-1, 1) + x.long()).abs()  # (n, k), reflected at 0
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)  # reflected at n - 1
    return torch.zeros(n, n, device=device).scatter_add_(1, src, g.expand(n, k))


# ---------------------------------------------------------------------------------------------------------
# Colour statistics: the soft mask M


def colour_bins(image):
    """Quantized colour of every pixel. image (B, 3, H, W) RGB in [0, 1] -> (B, H, W) long in [0, 1000).

    HSV with the hue h as an angle, then the colour cone a = (s cos h + 1) / 2, b = (s sin h + 1) / 2 and v,
    each rounded to one of LEVELS levels (the authors' coordinates). Their code multiplies kornia's hue, which
    is already in radians, by another 2 pi; here h is the angle itself. Inputs outside [0, 1] would give bins
    outside [0, 1000): foreground_mask and FAME refuse them.
    """
    red, green, blue = image.unbind(1)  # (B, H, W) each
    v = image.amax(1)
    delta = v - image.amin(1)
    s = delta / (v + 1e-8)
    # hue in sextants: the first maximal channel picks the formula; grey pixels get 0 (and s = 0)
    h = torch.where(red == v, green - blue, torch.where(green == v, blue - red + 2 * delta, red - green + 4 * delta))
    h = h / delta.clamp_min(1e-12) * (math.pi / 3)  # radians
    a, b = (s * torch.cos(h) + 1) / 2, (s * torch.sin(h) + 1) / 2
    q_a, q_b, q_v = (torch.round(c * (LEVELS - 1)) for c in (a, b, v))  # 0 .. 9 each
    return ((q_a * LEVELS + q_b) * LEVELS + q_v).long()


def colour_mask(S, image):
    """M = P(F | x) per pixel from colour statistics (Sec. 3.2), before smoothing.

    S: (B, H, W) smoothed seed region; image: (B, 3, H, W) mean image -> M: (B, H, W) in [0, 1].
    P(x | F) counts the colours of the [0.5 H W] pixels with the largest S, P(x | B) those of the [0.1 H W]
    with the smallest; P(x | B) is add-one smoothed (the authors' FAME.getSeg: dict_bg + 1), so that M is
    defined everywhere.
    """
    B, H, W = S.shape
    x = colour_bins(image).flatten(1)  # (B, HW): the colour of each pixel
    fg = S.flatten(1).topk(int(FOREGROUND_SHARE * H * W), dim=1, sorted=False).indices  # (B, N_F)
    bg = S.flatten(1).topk(int(BACKGROUND_SHARE * H * W), dim=1, largest=False, sorted=False).indices  # (B, N_B)
    N_F = _count(x.gather(1, fg))  # (B, 1000): N_x^(F)
    N_B = _count(x.gather(1, bg))  # (B, 1000): N_x^(B)
    P_F = N_F / fg.shape[1]  # P(x | F)
    P_B = (N_B + 1) / (bg.shape[1] + LEVELS ** 3)  # P(x | B)
    return (P_F / (P_F + P_B)).gather(1, x).view(B, H, W)  # [M]_ij = P(F | x_ij)


def _count(colours):
    """Histogram of each row: (B, n) colour indices -> (B, 1000) float32 counts."""
    counts = torch.zeros(colours.shape[0], LEVELS ** 3, device=colours.device)
    return counts.scatter_add_(1, colours, torch.ones(colours.shape, device=colours.device))


# ---------------------------------------------------------------------------------------------------------
# Eq. (3): the binary mask, and the variants of Table 4


def binarize(M, beta):
    """Eq. (3): 1 at the [beta H W] largest values of each map, 0 elsewhere. M (B, H, W) -> (B, H, W) bool.

    topk rather than a threshold, so that ties cannot change the count.
    """
    B, H, W = M.shape
    top = M.flatten(1).topk(int(beta * H * W), dim=1, sorted=False).indices  # (B, [beta H W])
    return torch.zeros(B, H * W, dtype=torch.bool, device=M.device).scatter_(1, top, True).view(B, H, W)


def grid_mask(S, beta):
    """"Grid" variant: the round(16 beta) of the 4 x 4 cells with the largest sum of S. S (B, H, W) -> bool."""
    B, H, W = S.shape
    rows = torch.arange(H, device=S.device) * GRID // H  # (H,): the cell row of each pixel row
    cols = torch.arange(W, device=S.device) * GRID // W  # (W,)
    cell = (rows.view(-1, 1) * GRID + cols.view(1, -1)).flatten()  # (HW,): the cell of each pixel
    sums = torch.zeros(B, GRID * GRID, device=S.device).index_add_(1, cell, S.flatten(1))  # (B, 16)
    top = sums.topk(round(GRID * GRID * beta), dim=1, sorted=False).indices
    chosen = torch.zeros(B, GRID * GRID, dtype=torch.bool, device=S.device).scatter_(1, top, True)
    return chosen[:, cell].view(B, H, W)


def centred_gaussian(B, H, W, device=None):
    """"Gauss" variant's scores: a 2-D Gaussian at the frame centre (sigma a quarter of each side; only its
    ranking matters). -> (B, H, W)"""
    y = (torch.arange(H, dtype=torch.float32, device=device) - (H - 1) / 2) / (H / 4)
    x = (torch.arange(W, dtype=torch.float32, device=device) - (W - 1) / 2) / (W / 4)
    return torch.exp(-(y.view(-1, 1) ** 2 + x.view(1, -1) ** 2) / 2).expand(B, H, W)


def _scores(clips, method):
    """The per-pixel scores whose top [beta H W] form the mask ("fame", "seed", "gauss"). -> (B, H, W)"""
    B, _, T, H, W = clips.shape
    if method == "gauss":
        return centred_gaussian(B, H, W, clips.device)
    S, image = clip_statistics(clips)  # Eq. (2) and X~
    S = smooth(S)
    if method == "seed":
        return S
    return smooth(colour_mask(S, image))  # M, smoothed


@torch.no_grad()
def foreground_mask(clips, beta=0.5, method="fame"):
    """The binary foreground mask of each clip, constant over time.

    clips: (B, 3, T, H, W), uint8 or float in [0, 1]. Returns (B, H, W) 0/1 in clips' dtype with exactly
    [beta H W] ones per clip ("grid": round(16 beta) whole cells).
    method: "fame" (the paper's mask), "seed" (the smoothed S), "grid" (4 x 4 cells ranked by S) or "gauss"
    (a centred Gaussian), the variants of Table 4.
    """
    beta = _check_beta(beta)
    _check_method(method)
    _check_clips(clips, min_frames=1 if method == "gauss" else 2)
    _check_pixels(beta, method, *clips.shape[-2:])
    if method == "grid":
        return grid_mask(seed_region(clips), beta).to(clips.dtype)
    return binarize(_scores(clips, method), beta).to(clips.dtype)  # Eq. (3)


@torch.no_grad()
def soft_mask(clips, method="fame"):
    """The scores before Eq. (3), min-max scaled per clip for display: (B, 3, T, H, W) -> (B, H, W) in [0, 1]."""
    if method not in ("fame", "seed", "gauss"):
        raise ValueError(f"soft_mask supports 'fame', 'seed' and 'gauss' ('grid' ranks whole cells), got {method!r}")
    _check_clips(clips, min_frames=1 if method == "gauss" else 2)
    scores = _scores(clips, method)
    lo, hi = scores.flatten(1).aminmax(dim=1)  # (B,) each
    return (scores - lo.view(-1, 1, 1)) / (hi - lo + 1e-8).view(-1, 1, 1)


# ---------------------------------------------------------------------------------------------------------
# Eq. (4): the merge


def merge(X, mask, Y, out=None):
    """Eq. (4): X_merge = X * mask + Y * (1 - mask).

    X (foreground source), Y (background source): (B, C, T, H, W); mask: (B, H, W), or (B, T, H, W) per frame.
    A 0/1 mask selects pixels exactly, in any dtype; a soft mask blends float clips (integer clips take any
    nonzero value of the mask in their dtype as 1). Float clips and float masks take weights in [0, 1] only.
    Returns the merged clips (B, C, T, H, W) in X's dtype (into `out` if given).
    """
    if X.dim() != 5:
        raise ValueError(f"expected clips X of shape (B, C, T, H, W), got {tuple(X.shape)}")
    _check_background(X, Y)
    B, _, T, H, W = X.shape
    if tuple(mask.shape) not in ((B, H, W), (B, T, H, W)):
        raise ValueError(f"mask {tuple(mask.shape)} must be (B, H, W) = {(B, H, W)} or (B, T, H, W) = "
                         f"{(B, T, H, W)} for clips {tuple(X.shape)}")
    weights = mask.is_floating_point() or (X.is_floating_point() and mask.dtype != torch.bool)  # e.g. 0/255 uint8
    if weights and mask.numel():  # a weight outside [0, 1] extrapolates past X or Y
        lo, hi = mask.aminmax()
        message = "the mask's weights must lie in [0, 1] (0: background, 1: foreground)"
        if mask.device.type != "cpu":
            torch._assert_async((lo >= 0) & (hi <= 1), message)  # no host sync (see _check_clips)
        elif not (lo >= 0 and hi <= 1):
            raise ValueError(f"{message}; this mask ranges over [{float(lo):.3g}, {float(hi):.3g}]")
    M = (mask[:, None, None] if mask.dim() == 3 else mask[:, None]).to(X.dtype)  # (B, 1, 1 or T, H, W)
    if X.is_floating_point():
        return torch.lerp(Y, X, M, out=out)  # Y + M (X - Y), computed so that it is exact at M = 0 and M = 1
    # Integers: the selection torch.where(M != 0, X, Y), computed as Y + (X - Y) * [M != 0]. In uint8 X - Y wraps
    # around and adding it to Y wraps back, so the result is exactly X or Y; on CPU 1.5-2x faster than where().
    return torch.add(Y, (X - Y) * (M != 0), out=out)


def derangement(n, generator=None, device=None):
    """A uniformly random permutation of range(n) without fixed points (n >= 2), by rejection (about e draws).

    The authors' code uses a plain permutation, which leaves about one clip per batch merged with its own
    background, i.e. unchanged; a derangement gives every clip a foreign background.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"a derangement's size must be an int, got {type(n).__name__} {n!r}")
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    identity = torch.arange(n, device=draw_device)
    while True:
        perm = torch.randperm(n, generator=generator, device=draw_device)
        if not bool((perm == identity).any()):
            return perm.to(device) if device is not None else perm


class FAME(torch.nn.Module):
    """Foreground-background Merging: FAME(beta, method)(clips) -> the clips with foreign backgrounds.

    beta: the foreground share of the frame in (0, 1], Eq. (3); beta = 1 returns the clips as they are
    (vanilla MoCo). method: "fame" (the paper's mask) or the variants "seed", "grid", "gauss" (Table 4).
    """

    def __init__(self, beta=0.5, method="fame"):
        super().__init__()
        _check_method(method)
        self.beta, self.method = _check_beta(beta), method

    def extra_repr(self):
        return f"beta={self.beta}, method={self.method!r}"

    @torch.no_grad()
    def forward(self, clips, background=None, generator=None):
        """clips: (B, 3, T, H, W), uint8 or float in [0, 1]. background: Y of the same shape (e.g. another clip
        of the same video), or None for another clip of the batch (a random derangement; pass generator for a
        reproducible one). Returns (B, 3, T, H, W) in clips' dtype."""
        _check_clips(clips, min_frames=1 if self.method == "gauss" else 2)
        if background is not None:
            _check_background(clips, background)
        if self.beta == 1:
            return clips
        if background is None and len(clips) < 2:
            raise ValueError("FAME needs a batch of at least 2 clips to swap backgrounds, or an explicit background")
        mask = foreground_mask(clips, self.beta, self.method)  # (B, H, W), Eqs. (2)-(3)
        if background is not None:
            return merge(clips, mask, background)  # Eq. (4)
        # Eq. (4) with Y = clips[perm], perm a derangement: merge(clips, mask, clips[perm]), computed one clip at a
        # time, so that each background is read where it lies instead of from a gathered copy of the batch (on CPU
        # about 2-3x faster).
        out = torch.empty_like(clips)  # (B, 3, T, H, W)
        for i, j in enumerate(derangement(len(clips), generator).tolist()):
            merge(clips[i:i + 1], mask[i:i + 1], clips[j:j + 1], out=out[i:i + 1])
        return out


def _check_beta(beta):
    """beta as a float in (0, 1]: a Python, numpy or one-element torch number."""
    if isinstance(beta, torch.Tensor) and beta.numel() == 1 and beta.dtype != torch.bool:
        beta = beta.item()
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 < float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in (0, 1], got {beta!r}")
    return float(beta)


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown FAME mask method {method!r}; valid: {', '.join(METHODS)}")


def _check_pixels(beta, method, H, W):
    """Eq. (3) must keep at least one pixel (grid: one cell) of H x W frames; else the clip would be replaced
    wholesale by its background."""
    kept = round(GRID * GRID * beta) if method == "grid" else int(beta * H * W)
    if kept < 1:
        what = f"round({GRID * GRID} beta) = 0 of the {GRID}x{GRID} cells" if method == "grid" else \
            f"[beta H W] = 0 pixels of {H}x{W} frames"
        raise ValueError(f"beta {beta:g} keeps no foreground: {what}; use a larger beta or larger frames")


def _check_clips(clips, min_frames=2):
    """Shapes and dtypes always; values (float clips in [0, 1], no NaN) too. The value check reads the clips
    back, which on a CPU tensor is free but on a GPU would stall the host until the device has finished all its
    queued work, at every call. So off the CPU it is a device-side assertion (torch._assert_async): no
    synchronization, and a bad batch stops the process at its next synchronization with "device-side assert
    triggered" instead of a ValueError. uint8 clips, which the training scripts pass, need no value check."""
    if not isinstance(clips, torch.Tensor):
        raise TypeError(f"expected clips as a torch.Tensor (B, 3, T, H, W), got {type(clips).__name__}")
    if clips.dim() != 5 or clips.shape[1] != 3:
        raise ValueError(f"expected clips of shape (B, 3, T, H, W), got {tuple(clips.shape)}")
    if clips.shape[2] == 3:
        raise ValueError(f"clips of shape {tuple(clips.shape)} are ambiguous: 3 frames of (B, 3, T, H, W) clips, or "
                         f"(B, T, 3, H, W) clips of 3 frames with the colours second; FAME takes (B, 3, T, H, W) with "
                         f"T other than 3")
    if clips.shape[2] < min_frames:
        raise ValueError(f"frame differences need T >= {min_frames} frames, got T={clips.shape[2]}")
    if len(clips) == 0:
        raise ValueError(f"empty batch: clips of shape {tuple(clips.shape)}")
    if not (clips.is_floating_point() or clips.dtype == torch.uint8):
        raise TypeError(f"expected uint8 clips or float clips in [0, 1], got {clips.dtype}")
    if clips.is_floating_point() and clips.numel():
        message = (f"FAME expects uint8 clips or float clips in [0, 1], before normalization (normalized clips put "
                   f"colours outside the {LEVELS ** 3} colour bins)")
        lo, hi = clips.aminmax()
        if clips.device.type != "cpu":
            torch._assert_async((lo >= 0) & (hi <= 1), message)  # NaN fails too
        elif not (lo >= 0 and hi <= 1):
            raise ValueError(f"{message}; these float clips range over [{float(lo):.3g}, {float(hi):.3g}]")


def _check_background(clips, background):
    """A background Y for clips X: a tensor of the same shape and dtype (Eq. (4) mixes them pixel by pixel)."""
    if not isinstance(background, torch.Tensor):
        raise TypeError(f"expected the background as a torch.Tensor, got {type(background).__name__}")
    if background.shape != clips.shape:
        raise ValueError(f"background {tuple(background.shape)} must match clips {tuple(clips.shape)}")
    if background.dtype != clips.dtype:
        raise TypeError(f"background of {background.dtype} must have the clips' dtype {clips.dtype} (uint8 with "
                        f"uint8, float in [0, 1] with float)")
