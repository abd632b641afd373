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
GRAY = (0.299, 0.587, 0.114)  # RGB weights of the luma
_RGB2YIQ = torch.tensor([GRAY, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)
_CONSTANTS = {}  # (name, device, dtype): the constants above on a device, copied there once


def _constant(name, device, dtype):
    """A constant of this module on `device`: made once per device, since copying a tensor to a GPU in every call
    would wait for the GPU to finish its queued work."""
    key = (name, torch.device(device), dtype)
    if key not in _CONSTANTS:
        values = {"mean": KINETICS_MEAN, "std": KINETICS_STD, "gray": GRAY, "rgb2yiq": _RGB2YIQ, "yiq2rgb": _YIQ2RGB}
        _CONSTANTS[key] = torch.as_tensor(values[name], dtype=dtype).to(device)
    return _CONSTANTS[key]


def _check_clips(clips):
    """Refuses what the augmentation cannot read as (B, 3, T, H, W) uint8 or float clips in [0, 1]. The value check
    reads the clips back: free on the CPU, but on a GPU it would wait for all queued work at every call, so there
    it is a device-side assertion (torch._assert_async; a bad batch stops the process at its next
    synchronization). uint8 clips, which the training scripts pass, need none."""
    if not isinstance(clips, torch.Tensor):
        raise TypeError(f"expected clips as a torch.Tensor (B, 3, T, H, W), got {type(clips).__name__}")
    if clips.dim() != 5 or clips.shape[1] != 3:
        raise ValueError(f"expected clips of shape (B, 3, T, H, W), got {tuple(clips.shape)}")
    if clips.shape[2] == 3:
        raise ValueError(f"clips of shape {tuple(clips.shape)} are ambiguous: 3 frames of (B, 3, T, H, W) clips, or "
                         f"(B, T, 3, H, W) clips of 3 frames with the colours second; pass (B, 3, T, H, W) with T "
                         f"other than 3")
    if len(clips) == 0:
        raise ValueError(f"empty batch: clips of shape {tuple(clips.shape)}")
    if not (clips.is_floating_point() or clips.dtype == torch.uint8):
        raise TypeError(f"expected uint8 clips or float clips in [0, 1], got {clips.dtype}")
    if clips.is_floating_point() and clips.numel():
        message = "expected uint8 clips or float clips in [0, 1] (before normalization)"
        lo, hi = clips.aminmax()
        if clips.device.type != "cpu":
            torch._assert_async((lo >= 0) & (hi <= 1), message)  # NaN fails too
        elif not (lo >= 0 and hi <= 1):
            raise ValueError(f"{message}; these float clips range over [{float(lo):.3g}, {float(hi):.3g}]")


def _unit_float(clips):
    return clips.float().div_(255) if clips.dtype == torch.uint8 else clips


def normalize(clips):
    """Kinetics mean/std normalization of clips (B, 3, T, H, W): uint8, or float in [0, 1]."""
    _check_clips(clips)
    return _normalize(_unit_float(clips))


def _normalize(clips):
    shape = (3, 1, 1, 1)
    mean = _constant("mean", clips.device, clips.dtype).view(shape)
    std = _constant("std", clips.device, clips.dtype).view(shape)
    return (clips - mean) / std


def augment_and_normalize(clips, generator=None):
    """A.2's basic augmentation, the same for all frames of a clip, then normalization: (B, 3, T, H, W) uint8 or
    float in [0, 1] -> normalized float clips on the same device. RandomGrayscale (p 0.2), then ColorJitter
    (p 0.8), then GaussianBlur (p 0.5), in the authors' order. Every parameter is drawn per clip, from
    `generator` (else torch's global RNG)."""
    _check_clips(clips)
    x = _unit_float(clips)
    return _normalize(apply_augmentation(x, augmentation_params(len(x), generator, x.device)))


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
    # A list for the host to loop over: drawn on the CPU unless the generator is a GPU's (reading a GPU's draw back
    # would wait for its queued work)
    order_device = draw_device if generator is not None else "cpu"
    order = torch.randperm(4, generator=generator, device=order_device).tolist()
    blur = rand(B) < AUGMENTATION["blur"]
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * rand(B)
    return {"gray": gray, "brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue,
            "order": order, "blur": blur, "sigma": sigma}


def apply_augmentation(x, p):
    """The augmentation with given parameters (augmentation_params) on float clips (B, 3, T, H, W) in [0, 1],
    without normalization. -> float clips in [0, 1]"""
    x = torch.where(p["gray"].view(-1, 1, 1, 1, 1), _gray(x).expand_as(x), x)
    x = color_jitter(x, p["brightness"], p["contrast"], p["saturation"], p["hue"], p["order"])
    return _blur_drawn(x, p["blur"], p["sigma"])


def _blur_drawn(x, blur, sigma, select=None):
    """The clips where `blur` (B,) is set, blurred with their sigma. select (default: on the CPU): blur only those
    clips, which needs the mask read back, free on the CPU; else blur all and keep the drawn ones with
    torch.where (the same values), so that a GPU never waits for the host."""
    if select is None:
        select = x.device.type == "cpu"
    if not select:
        return torch.where(blur.view(-1, 1, 1, 1, 1), gaussian_blur(x, sigma), x)
    if not bool(blur.any()):
        return x
    x = x.clone()
    x[blur] = gaussian_blur(x[blur], sigma[blur])
    return x


def _gray(x):
    w = _constant("gray", x.device, x.dtype).view(1, 3, 1, 1, 1)
    return (x * w).sum(1, keepdim=True)  # (B, 1, T, H, W)


def _hue_matrices(h):
    """(B, 3, 3) RGB -> RGB hue rotations by h turns: a rotation of the chroma plane of YIQ (a linear stand-in for
    kornia's HSV hue shift, so that all clips take one batched matmul)."""
    a = 2 * math.pi * h.double()
    rot = torch.zeros(len(h), 3, 3, dtype=torch.float64, device=h.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
    return _constant("yiq2rgb", h.device, torch.float64) @ rot @ _constant("rgb2yiq", h.device, torch.float64)


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
    w = (w / w.sum(1, keepdim=True))[:, None].expand(B, C, 2 * r + 1).reshape(B * C, -1)  # (B * C, 2r + 1)
    y = F.pad(x.reshape(1, B * C, T * H, W), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, w.view(B * C, 1, 1, -1), groups=B * C).view(B, C, T, H, W)  # along W
    y = F.pad(y.transpose(3, 4).reshape(1, B * C, T * W, H), (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, w.view(B * C, 1, 1, -1), groups=B * C).view(B, C, T, W, H)  # along H
    return y.transpose(3, 4)
