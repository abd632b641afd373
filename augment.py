"""The paper's basic colour augmentation of video clips (appendix A.2), batched on the device, and the Kinetics
normalization that follows it.

Each augmentation is drawn once per clip and applied to all its frames, so that a clip stays consistent in time
(A.2), in the authors' order: RandomGrayscale (p 0.2), then ColorJitter (p 0.8; brightness, contrast and
saturation 0.4, hue 0.1), then GaussianBlur (p 0.5, sigma in [0.1, 2]). The random crop and flip, which A.2 lists
too, belong to the loader, before this.

    import augment
    q = augment.augment_and_normalize(clips)   # clips (B, 3, T, H, W): uint8, or float in [0, 1]
    # -> float (B, 3, T, H, W), normalized with the Kinetics mean and std, on clips' device

    x = clips.float() / 255                    # the augmentation alone, on float clips in [0, 1]:
    x = augment.apply_augmentation(x, augment.augmentation_params(len(x), device=x.device))
    test_clips = augment.normalize(clips)      # the normalization alone, for evaluation

Pass a torch.Generator for reproducible draws. With FAME (fame.py), merge the uint8 clips first, then augment.

This file needs torch only and can be copied into another project as it is.
"""
import math

import torch
import torch.nn.functional as F

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
AUGMENTATION = {"gray": 0.2, "jitter": 0.8, "blur": 0.5}  # probabilities of A.2's basic augmentation
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
BLUR_SIGMA = (0.1, 2.0)
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                        dtype=torch.float64)


def _unit_float(clips):
    return clips.float().div_(255) if clips.dtype == torch.uint8 else clips


def normalize(clips):
    """Kinetics mean/std normalization of clips (..., 3, T, H, W): uint8, or float in [0, 1]."""
    clips = _unit_float(clips)
    shape = (3, 1, 1, 1)
    mean = torch.tensor(KINETICS_MEAN, device=clips.device, dtype=clips.dtype).view(shape)
    std = torch.tensor(KINETICS_STD, device=clips.device, dtype=clips.dtype).view(shape)
    return (clips - mean) / std


def augment_and_normalize(clips, generator=None):
    """A.2's basic augmentation, the same for all frames of a clip, then normalization: (B, 3, T, H, W) uint8 or
    float in [0, 1] -> normalized float clips on the same device. RandomGrayscale (p 0.2), then ColorJitter
    (p 0.8), then GaussianBlur (p 0.5), in the authors' order. Every parameter is drawn per clip, from
    `generator` (else torch's global RNG)."""
    x = _unit_float(clips)
    return normalize(apply_augmentation(x, augmentation_params(len(x), generator, x.device)))


def augmentation_params(B, generator=None, device=None):
    """Per-clip parameters of the augmentation, (B,) each, the identity where an augmentation is not drawn, and
    the order of the four jitter operations (one random order per batch, as kornia's ColorJitter draws it)."""
    draw_device = generator.device if generator is not None else device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=draw_device).to(device)

    gray = rand(B) < AUGMENTATION["gray"]
    jitter = (rand(B) < AUGMENTATION["jitter"]).float()
    brightness, contrast, saturation = ((1 + (2 * rand(B) - 1) * f) * jitter + (1 - jitter) for f in JITTER[:3])
    hue = (2 * rand(B) - 1) * JITTER[3] * jitter
    order = torch.randperm(4, generator=generator, device=draw_device).tolist()
    blur = rand(B) < AUGMENTATION["blur"]
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * rand(B)
    return {"gray": gray, "brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue,
            "order": order, "blur": blur, "sigma": sigma}


def apply_augmentation(x, p):
    """The augmentation with given parameters (augmentation_params) on float clips (B, 3, T, H, W) in [0, 1],
    without normalization. -> float clips in [0, 1]"""
    x = torch.where(p["gray"].view(-1, 1, 1, 1, 1), _gray(x).expand_as(x), x)
    x = color_jitter(x, p["brightness"], p["contrast"], p["saturation"], p["hue"], p["order"])
    if bool(p["blur"].any()):
        x = x.clone()
        x[p["blur"]] = gaussian_blur(x[p["blur"]], p["sigma"][p["blur"]])
    return x


def _gray(x):
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1, 1)
    return (x * w).sum(1, keepdim=True)  # (B, 1, T, H, W)


def _hue_matrices(h):
    """(B, 3, 3) RGB -> RGB hue rotations by h turns: a rotation of the chroma plane of YIQ (a linear stand-in for
    kornia's HSV hue shift, so that all clips take one batched matmul)."""
    a = 2 * math.pi * h.double()
    rot = torch.zeros(len(h), 3, 3, dtype=torch.float64, device=h.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
    yiq = _RGB2YIQ.to(h.device)
    return torch.linalg.inv(yiq) @ rot @ yiq


def color_jitter(x, b, c, s, h, order=(0, 1, 2, 3)):
    """Brightness, contrast, saturation and hue, applied in `order` (0-3 in that list), with per-clip factors (B,)
    (identity: 1, 1, 1, 0); each result is clamped to [0, 1]. Contrast blends towards the clip's mean grey over
    all frames, so that it is constant in time."""
    v = (-1, 1, 1, 1, 1)

    def contrast(x):
        m = _gray(x).mean(dim=(1, 2, 3, 4), keepdim=True)
        return c.view(v) * x + (1 - c.view(v)) * m

    ops = (lambda x: x * b.view(v), contrast, lambda x: s.view(v) * x + (1 - s.view(v)) * _gray(x),
           lambda x: torch.einsum("bij,bjthw->bithw", _hue_matrices(h).to(x.dtype), x))
    for k in order:
        x = ops[k](x).clamp_(0, 1)
    return x


def gaussian_blur(x, sigma):
    """Separable Gaussian blur of (B, C, T, H, W) with a per-clip sigma (B,), by grouped convolutions with a
    reflected border. The kernel size is the authors' (moco/loader.py, Augment_GPU_pre): int(0.1 * crop) // 2 * 2
    + 1, i.e. 11 at 112 px and 23 at 224 (the paper's "radius 23")."""
    B, C, T, H, W = x.shape
    r = min(int(0.1 * min(H, W)) // 2, min(H, W) - 1)  # the radius (size - 1) / 2; FAME's smoothing uses the same size
    if r == 0:
        return x
    k = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    w = torch.exp(-(k[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B * C, 2r + 1)
    y = F.pad(x.reshape(1, B * C, T * H, W), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, w.view(B * C, 1, 1, -1), groups=B * C).view(B, C, T, H, W)  # along W
    y = F.pad(y.transpose(3, 4).reshape(1, B * C, T * W, H), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, w.view(B * C, 1, 1, -1), groups=B * C).view(B, C, T, W, H)  # along H
    return y.transpose(3, 4)
