"""Backbones (R(2+1)D-18, I3D), the MoCo head the paper trains them with, checkpoint I/O, and the training- and
evaluation-run helpers the stage scripts share (torchrun setup, seeding, lr schedule, epoch loop, metrics).

Speed of every backbone (forward and forward+backward clips/s; CPU, and CUDA when present):

  python models.py --benchmark
  python models.py --benchmark --bf16 --channels-last   # on a GPU: bf16 autocast, channels_last_3d

Clips are (B, 3, T, H, W), normalized with the Kinetics mean/std (data.normalize).
"""
import argparse
import functools
import json
import math
import os
import pickle
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data


# ----------------------------------------------------------------------------------------------------------------
# R(2+1)D (Tran et al. 2018), laid out so that its state_dict matches torchvision.models.video.r2plus1d_18
# ----------------------------------------------------------------------------------------------------------------

def _conv2plus1d(in_planes, out_planes, mid_planes, stride=1):
    """A 3x3x3 convolution factored into a spatial 1x3x3 and a temporal 3x1x1 one."""
    return nn.Sequential(
        nn.Conv3d(in_planes, mid_planes, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(mid_planes),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid_planes, out_planes, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0), bias=False),
    )


class _BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        # Parameter-matched mid channels (Tran et al. Sec. 3.5). As in torchvision, both convs of the block use
        # the value computed from the block's input width, so the pretrained weights fit.
        mid_planes = (in_planes * planes * 27) // (in_planes * 9 + 3 * planes)
        self.conv1 = nn.Sequential(_conv2plus1d(in_planes, planes, mid_planes, stride),
                                   nn.BatchNorm3d(planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(_conv2plus1d(planes, planes, mid_planes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv3d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm3d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class R2Plus1D(nn.Module):
    """R(2+1)D with BasicBlocks; `width` is the channel count of the first stage (64 in the paper)."""

    def __init__(self, num_classes=400, width=64, layers=(2, 2, 2, 2), dropout=0.0):
        super().__init__()
        stem_mid = max(1, (45 * width + 32) // 64)  # torchvision's 45 mid channels at width 64, scaled
        self.stem = nn.Sequential(
            nn.Conv3d(3, stem_mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(stem_mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(stem_mid, width, (3, 1, 1), stride=1, padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
        in_planes = width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stage = []
            for j in range(blocks):
                stage.append(_BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        self.feature_dim = in_planes
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def last_conv_features(self, x):
        x = self.stem(x)  # (B, 3, T, H, W) -> (B, width, T, H/2, W/2)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x  # (B, D, T/8, H/16, W/16)

    def forward_features(self, x):
        return self.avgpool(self.last_conv_features(x)).flatten(1)  # (B, D)

    def forward(self, x):
        return self.fc(self.dropout(self.forward_features(x)))  # (B, num_classes)


def r2plus1d_18(num_classes=400, width=64, layers=(2, 2, 2, 2), dropout=0.0):
    return R2Plus1D(num_classes, width, layers, dropout)


def r2plus1d_tiny(num_classes=400, dropout=0.0):
    """The CPU-sized variant used by the synthetic benchmark and the tests (width 16, one block per stage)."""
    return R2Plus1D(num_classes, width=16, layers=(1, 1, 1, 1), dropout=dropout)


def _init_weights(model):
    for mod in model.modules():
        if isinstance(mod, nn.Conv3d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm3d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, 0, 0.01)
            nn.init.zeros_(mod.bias)


# ----------------------------------------------------------------------------------------------------------------
# I3D (Carreira & Zisserman 2017): Inception-v1 inflated to 3D, with the module names of the authors' release
# ----------------------------------------------------------------------------------------------------------------

def _same_padding(kernel, stride):
    """TensorFlow 'SAME' padding as F.pad wants it (last dim first): total max(k - s, 0), the odd pixel at the end."""
    pad = []
    for k, s in zip(reversed(kernel), reversed(stride)):
        total = max(k - s, 0)
        pad += [total // 2, total - total // 2]
    return tuple(pad)


class _Unit3D(nn.Module):
    """SAME-padded bias-free conv + BatchNorm + ReLU."""

    def __init__(self, in_channels, out_channels, kernel=(1, 1, 1), stride=(1, 1, 1)):
        super().__init__()
        pad = _same_padding(kernel, stride)
        symmetric = pad[0::2] == pad[1::2]
        # Symmetric padding goes into the conv itself (same result, no extra copy); asymmetric is padded first.
        self.pad = None if symmetric else pad
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, bias=False,
                                padding=tuple(reversed(pad[0::2])) if symmetric else 0)
        self.batch3d = nn.BatchNorm3d(out_channels, eps=1e-5, momentum=0.1)

    def forward(self, x):
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return F.relu(self.batch3d(self.conv3d(x)), inplace=True)


class _MaxPool3dSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.pad = _same_padding(kernel, stride)
        self.pool = nn.MaxPool3d(kernel, stride, ceil_mode=True)

    def forward(self, x):
        # Zero padding equals TF's -inf padding here: every pooled input comes out of a ReLU (>= 0).
        return self.pool(F.pad(x, self.pad))


class _Mixed(nn.Module):
    """Inception module: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | 3x3 max-pool -> 1x1, concatenated over channels."""

    def __init__(self, in_channels, b0, b1, b2, b3):
        super().__init__()
        self.branch_0 = _Unit3D(in_channels, b0)
        self.branch_1 = nn.Sequential(_Unit3D(in_channels, b1[0]), _Unit3D(b1[0], b1[1], (3, 3, 3)))
        self.branch_2 = nn.Sequential(_Unit3D(in_channels, b2[0]), _Unit3D(b2[0], b2[1], (3, 3, 3)))
        self.branch_3 = nn.Sequential(_MaxPool3dSame((3, 3, 3), (1, 1, 1)), _Unit3D(in_channels, b3))
        self.out_channels = b0 + b1[1] + b2[1] + b3

    def forward(self, x):
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x), self.branch_3(x)], 1)


class I3D(nn.Module):
    """RGB I3D; parameter names and shapes match the authors' released checkpoints (fc is the classifier)."""

    feature_dim = 1024

    def __init__(self, num_classes=400, dropout=0.0):
        super().__init__()
        self.conv3d_1a_7x7 = _Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.maxpool3d_2a_3x3 = _MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.conv3d_2b_1x1 = _Unit3D(64, 64)
        self.conv3d_2c_3x3 = _Unit3D(64, 192, (3, 3, 3))
        self.maxpool3d_3a_3x3 = _MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.mixed_3b = _Mixed(192, 64, (96, 128), (16, 32), 32)
        self.mixed_3c = _Mixed(256, 128, (128, 192), (32, 96), 64)
        self.maxpool3d_4a_3x3 = _MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.mixed_4b = _Mixed(480, 192, (96, 208), (16, 48), 64)
        self.mixed_4c = _Mixed(512, 160, (112, 224), (24, 64), 64)
        self.mixed_4d = _Mixed(512, 128, (128, 256), (24, 64), 64)
        self.mixed_4e = _Mixed(512, 112, (144, 288), (32, 64), 64)
        self.mixed_4f = _Mixed(528, 256, (160, 320), (32, 128), 128)
        self.maxpool3d_5a_2x2 = _MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.mixed_5b = _Mixed(832, 256, (160, 320), (32, 128), 128)
        self.mixed_5c = _Mixed(832, 384, (192, 384), (48, 128), 128)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)
        _init_weights(self)

    def last_conv_features(self, x):
        for name, mod in self.named_children():
            if name == "avgpool":
                break
            x = mod(x)  # (B, 3, T, H, W) -> ... in registration order
        return x  # (B, 1024, T/8, H/32, W/32), rounded up: 2x7x7 for 16x224x224

    def forward_features(self, x):
        return self.avgpool(self.last_conv_features(x)).flatten(1)  # (B, 1024)

    def forward(self, x):
        return self.fc(self.dropout(self.forward_features(x)))  # (B, num_classes)


ARCHS = {"r2plus1d_18": r2plus1d_18, "r2plus1d_tiny": r2plus1d_tiny, "i3d": I3D}


def build_backbone(arch, num_classes=400, dropout=0.0):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch](num_classes=num_classes, dropout=dropout)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def save_checkpoint(state, path):
    """torch.save that never leaves a half-written file: temp file in the same directory, fsync, rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")  # same file system as path
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        print(f"WARNING: {path} holds more than tensors and plain containers ({str(err).splitlines()[0]}); "
              "loading it with full unpickling, which can run arbitrary code: only do this for a trusted file")
        return torch.load(path, map_location="cpu", weights_only=False)


_CLASSIFIER_PREFIX = "fc."
_MOCO_HEADS = ("fc.", "id_head.")  # projection heads inside a MoCo query encoder, never a trained classifier


def _strip(key, prefix):
    return key[len(prefix):] if key.startswith(prefix) else key


def _backbone_state(ckpt):
    """Find the query-encoder/backbone state dict in any supported checkpoint; returns (state, dropped keys)."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"expected a dict checkpoint, got {type(ckpt).__name__}")
    if isinstance(ckpt.get("encoder_q"), dict):  # ours: the query encoder's state dict
        state = ckpt["encoder_q"]
    elif isinstance(ckpt.get("model"), dict):  # ours: the whole MoCo state dict
        state = ckpt["model"]
    elif isinstance(ckpt.get("state_dict"), dict):  # the authors' release
        state = ckpt["state_dict"]
    elif ckpt and all(torch.is_tensor(v) for v in ckpt.values()):  # a plain backbone state dict
        state = ckpt
    else:
        raise ValueError("checkpoint has none of the keys 'encoder_q', 'model', 'state_dict' and is not a plain "
                         f"state dict; top-level keys: {sorted(ckpt)[:20]}")
    state = {_strip(k, "module."): v for k, v in state.items()}  # DDP-wrapped saves
    if not any(k.startswith("encoder_q.") for k in state):
        return state, []
    encoder, dropped = {}, []
    for k, v in state.items():
        if k.startswith("encoder_q."):
            k = _strip(k, "encoder_q.")
            if k.startswith(_MOCO_HEADS):
                dropped.append(k)
            else:
                encoder[k] = v
    return encoder, dropped


def load_backbone(model, path):
    """Load backbone weights into `model` from our pretrain/finetune checkpoints, the authors' MoCo release, or a
    plain state dict. Returns dict(missing, unexpected, dropped): `dropped` lists MoCo projection heads and a
    classifier of another shape, which are skipped on purpose. Raises ValueError if any non-classifier weight is
    missing or has the wrong shape (usually a checkpoint of another arch)."""
    state, dropped = _backbone_state(load_checkpoint(path))
    own = model.state_dict()
    mismatched = []
    for k in list(state):
        if k in own and state[k].shape != own[k].shape:
            if k.startswith(_CLASSIFIER_PREFIX):  # finetuned on another label set: keep our classifier
                dropped.append(k)
                del state[k]
            else:
                mismatched.append(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    fatal = [k for k in missing if not k.startswith(_CLASSIFIER_PREFIX)]
    if fatal or mismatched:
        raise ValueError(f"{path} does not fit this backbone (another arch?): "
                         f"{len(fatal)} missing keys {fatal[:10]}, {len(mismatched)} shape mismatches "
                         f"{mismatched[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}")
    model.load_state_dict(state, strict=False)
    return {"missing": missing, "unexpected": unexpected, "dropped": dropped}


# ----------------------------------------------------------------------------------------------------------------
# MoCo (He et al. 2020) with the v2 MLP head (Chen et al. 2020), symmetric as in the FAME authors' code
# ----------------------------------------------------------------------------------------------------------------

def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def _concat_all_gather(x):
    """(B, ...) on each process -> (world * B, ...), rank-major; every process must pass the same B."""
    if _world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def _projection_head(D, dim, mlp):
    """MoCo v2's 2-layer MLP (D -> D -> dim), or v1's linear projection."""
    return nn.Sequential(nn.Linear(D, D), nn.ReLU(inplace=True), nn.Linear(D, dim)) if mlp else nn.Linear(D, dim)


@torch.no_grad()
def key_similarity(queue):
    """Mean cosine similarity between two different keys of a MoCo queue (dim, K) of unit vectors: near 0 when the
    embedding is spread over the sphere, near 1 when it has collapsed to one direction (then the loss sits near
    ln(K + 1))."""
    K = queue.shape[1]
    mean_norm2 = queue.float().mean(1).square().sum()  # ||mean key||^2 = mean over all pairs, self included
    return ((K * mean_norm2 - 1) / max(K - 1, 1)).item()


class MoCo(nn.Module):
    """Query/key encoders, projection heads, and the queue of K negative keys.

    forward(im_q, im_k) -> (logits (2B, 1+K), labels (2B,) zeros): both clips of a pair act once as query and once
    as key; `F.cross_entropy(logits, labels)` is the InfoNCE loss of Eq. (1) averaged over both directions.
    """

    # Single process: the shuffled key batch goes through the key encoder in this many sub-batches, so its
    # BatchNorm statistics come from other samples than the query's (no shuffle-BN across GPUs to rely on).
    KEY_SPLITS = 2

    def __init__(self, backbone_fn, dim=128, K=65536, m=0.999, T=0.1, mlp=True):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q, self.encoder_k = backbone_fn(), backbone_fn()
        # The classifier is unused in pretraining; removing it keeps DDP free of parameters without gradients.
        self.encoder_q.fc = nn.Identity()
        self.encoder_k.fc = nn.Identity()
        D = self.encoder_q.feature_dim
        self.head_q, self.head_k = _projection_head(D, dim, mlp), _projection_head(D, dim, mlp)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.head_k.load_state_dict(self.head_q.state_dict())
        for p in self._key_params():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))  # (dim, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _query_params(self):
        return list(self.encoder_q.parameters()) + list(self.head_q.parameters())

    def _key_params(self):
        return list(self.encoder_k.parameters()) + list(self.head_k.parameters())

    @torch.no_grad()
    def _momentum_update(self):
        k_params = self._key_params()
        torch._foreach_mul_(k_params, self.m)  # theta_k <- m theta_k + (1 - m) theta_q
        torch._foreach_add_(k_params, self._query_params(), alpha=1 - self.m)

    def _embed(self, encoder, head, x):
        return F.normalize(head(encoder.forward_features(x)).float(), dim=1)  # (B, dim), unit length

    @torch.no_grad()
    def _embed_keys(self, x):
        """Keys for x (B, 3, T, H, W) with BatchNorm statistics drawn from a random other subset of the batch."""
        world = _world_size()
        if world == 1:
            perm = torch.randperm(x.shape[0], device=x.device)
            k = torch.cat([self._embed(self.encoder_k, self.head_k, part)
                           for part in x[perm].chunk(self.KEY_SPLITS)])  # (B, dim), shuffled order
            return k[torch.argsort(perm)]
        # Shuffle-BN: every process encodes a random shard of the global batch, then gets its own keys back.
        x_all = _concat_all_gather(x)  # (world * B, 3, T, H, W)
        perm = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(perm, src=0)
        rank = dist.get_rank()
        k_all = _concat_all_gather(self._embed(self.encoder_k, self.head_k, x_all[perm.view(world, -1)[rank]]))
        return k_all[torch.argsort(perm)].view(world, -1, k_all.shape[1])[rank]  # (B, dim)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        """Write keys (n, dim) into the ring buffer after the newest entry; handles wrap-around and n > K."""
        keys = _concat_all_gather(keys)  # (world * n, dim)
        n = keys.shape[0]
        start = self.queue_ptr + max(n - self.K, 0)  # only the last K keys survive when n > K
        keys = keys[-self.K:]
        idx = (start + torch.arange(keys.shape[0], device=keys.device)) % self.K
        self.queue.index_copy_(1, idx, keys.t().to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.K)

    def key_similarity(self):
        """Mean cosine between two keys of the queue (see key_similarity()): the collapse monitor."""
        return key_similarity(self.queue)

    def _logits(self, q, k, queue):
        l_pos = (q * k).sum(1, keepdim=True)  # (B, 1): cosine similarity to the positive key
        l_neg = q @ queue  # (B, K): to the negatives
        return torch.cat([l_pos, l_neg], 1) / self.T  # (B, 1+K), Eq. (1) with the positive at index 0

    def forward(self, im_q, im_k):
        q1 = self._embed(self.encoder_q, self.head_q, im_q)  # (B, dim)
        q2 = self._embed(self.encoder_q, self.head_q, im_k)  # (B, dim), the swapped direction
        self._momentum_update()  # once per step, before any key is computed
        k1 = self._embed_keys(im_k)  # (B, dim), positives of q1
        k2 = self._embed_keys(im_q)  # (B, dim), positives of q2
        queue = self.queue.clone()  # the in-place enqueue below must not touch what autograd saved
        with torch.autocast(im_q.device.type, enabled=False):  # similarities / T in float32 even under bf16
            logits = torch.cat([self._logits(q1, k1, queue), self._logits(q2, k2, queue)])  # (2B, 1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # (2B,)
        self._dequeue_and_enqueue(torch.cat([k1, k2]))
        return logits, labels


# ----------------------------------------------------------------------------------------------------------------
# Training-run helpers shared by the stage scripts (torchrun setup, seeding, lr schedule, logs, epoch loop)
# ----------------------------------------------------------------------------------------------------------------

def init_distributed():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed clip size: let cuDNN pick the fastest kernels once
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def seed_everything(seed, rank, epoch):
    """Seed all generators from (seed, rank, epoch): processes augment differently, epochs are reproducible."""
    value = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
    torch.manual_seed(value)  # also seeds CUDA; loader items draw from data.item_generator instead
    np.random.seed(value)
    random.seed(value)


def learning_rate(epoch, args):
    """The lr of an epoch: x0.1 at each --schedule milestone (paper A.1), or half-cosine with --cos."""
    if args.cos:
        return args.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    return args.lr / 10 ** sum(epoch >= milestone for milestone in args.schedule)


def git_commit():
    """The commit this code runs at ("+dirty" with uncommitted changes), or "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def plain(value):
    """JSON-safe plain types (what torch.load(weights_only=True) and json accept)."""
    return json.loads(json.dumps(value, default=str))


def write_json(path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plain(obj), indent=2) + "\n")
    os.replace(tmp, path)


def keep_log_until(path, epoch):
    """Drop log lines of epochs after `epoch` (and a line cut short by a kill), so each epoch is logged once."""
    if not path.exists():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epoch:
                lines.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def check_finite(loss, epoch):
    if not torch.isfinite(loss):
        raise SystemExit(f"non-finite loss ({loss.item()}) in epoch {epoch}: stopping; the last good "
                         f"checkpoint is kept. Lower --lr or check the input data.")


def epoch_summary(stats, seconds, device, reduce=True):
    """Sum (loss sum, correct, clips, failed) over processes (reduce) -> mean loss, accuracy %, clips/s,
    failed videos."""
    if reduce and dist.is_initialized():
        stats = stats.to(device)  # nccl reduces device tensors only
        dist.all_reduce(stats)
    loss_sum, correct, clips, failed = stats.tolist()
    return {"loss": loss_sum / max(clips, 1), "train_acc": 100.0 * correct / max(clips, 1),
            "clips_per_s": clips / max(seconds, 1e-9), "failed_videos": int(failed), "time": seconds}


def fit(args, module, optimizer, train_epoch, eval_epoch, is_main):
    """Epoch loop shared by finetune and linear probe: lr schedule, evaluation every --eval-every epochs,
    log.jsonl, atomic checkpoint.pth (auto-resume) and best.pth (highest --test-split top-1).

    module is what the checkpoint holds (the whole backbone for finetune, the fc for the probe). Returns
    (best, metrics of the last epoch's evaluation or None when nothing was left to train).
    """
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    start_epoch, best, metrics = 0, {"top1": -1.0, "epoch": None}, None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, best = ckpt["epoch"], ckpt["best"]
        if is_main:
            print(f"resumed from {args.resume} after epoch {start_epoch}")
    log_path = Path(args.output_dir) / "log.jsonl"
    if is_main:
        keep_log_until(log_path, start_epoch)  # each epoch once in the log after a resume

    for epoch in range(start_epoch, args.epochs):
        seed_everything(args.seed, dist.get_rank() if dist.is_initialized() else 0, epoch)
        lr = learning_rate(epoch, args)  # step decay x0.1 at --schedule (paper A.3), or --cos
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = {"epoch": epoch + 1, "lr": lr, **train_epoch(epoch)}  # epoch = epochs done, as pretrain.py
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            metrics = eval_epoch()
            stats.update(test_top1=metrics["top1"], test_top5=metrics["top5"])
            if metrics["top1"] > best["top1"]:
                best = {"top1": metrics["top1"], "epoch": epoch + 1}
                if is_main:
                    save_checkpoint({"model": module.state_dict(), "epoch": epoch + 1, "metrics": metrics,
                                            "pretrained": args.pretrained, "args": plain(vars(args))},
                                           os.path.join(args.output_dir, "best.pth"))
        if is_main:  # log first: a run killed between the two redoes this epoch and rewrites its line
            with open(log_path, "a") as f:
                f.write(json.dumps(stats) + "\n")
            save_checkpoint({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                                    "epoch": epoch + 1, "best": best, "pretrained": args.pretrained,
                                    "args": plain(vars(args))}, ckpt_path)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}))
    return best, metrics


# ----------------------------------------------------------------------------------------------------------------
# Evaluation-run helpers shared by finetune.py, linear_probe.py and retrieve.py (flags, settings, weights, metrics)
# ----------------------------------------------------------------------------------------------------------------

def eval_parser(description, stage, paper, synthetic):
    """Parser with the flags common to the three evaluation scripts (same names as pretrain.py); the training
    flags when `paper` has an lr."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_data_args(parser)
    parser.add_argument("--arch", default=None, choices=sorted(ARCHS),
                        help=f"backbone (default: {paper['arch']}; {synthetic['arch']} on synthetic)")
    parser.add_argument("--pretrained", default=None, metavar="PATH",
                        help="our pretrain checkpoint, the authors' MoCo checkpoint or a backbone state dict; "
                             "omitted = random initialisation")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"global batch size in clips, divided over processes "
                             f"(default: {paper['batch_size']}; {synthetic['batch_size']} on synthetic)")
    parser.add_argument("--train-split", default="train",
                        help="labelled split to train on (retrieve.py: the gallery); synthetic also has "
                             "balanced_train")
    parser.add_argument("--test-split", default="test",
                        help="split to test on (retrieve.py: the queries); synthetic also has test_swapped, "
                             "balanced_test")
    parser.add_argument("--output-dir", default=None,
                        help=f"results, logs and checkpoints (default: runs/{stage}_<dataset>_<target>_"
                             f"<train-split>_<folder of --pretrained, or random_init>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, sampling and augmentation")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on with CUDA, off on CPU)")
    if "lr" in paper:
        parser.add_argument("--lr", type=float, default=paper["lr"], help="initial learning rate (global batch)")
        parser.add_argument("--momentum", type=float, default=paper["momentum"])
        parser.add_argument("--wd", type=float, default=paper["wd"], help="weight decay")
        parser.add_argument("--epochs", type=int, default=None,
                            help=f"default: {paper['epochs']}; {synthetic['epochs']} on synthetic")
        parser.add_argument("--schedule", type=int, nargs="*", default=None,
                            help=f"epochs where lr drops x0.1 (default: {' '.join(map(str, paper['schedule']))}"
                                 f", scaled proportionally when --epochs differs)")
        parser.add_argument("--cos", action="store_true", help="cosine lr schedule instead of steps")
        parser.add_argument("--eval-every", type=int, default=5,
                            help="evaluate on --test-split every N epochs (and after the last) to keep the "
                                 "best checkpoint")
        parser.add_argument("--resume", default=None, metavar="PATH",
                            help="checkpoint to resume from (default: <output-dir>/checkpoint.pth if present)")
    return parser


def setup(args, stage, paper, synthetic):
    """torchrun setup, then fill the defaults left unset (paper values, CPU-sized on synthetic), check that a
    checkpoint to resume fits, and print the effective settings. Returns (world size, device, is_main)."""
    rank, world, device = init_distributed()
    is_main = rank == 0
    data.resolve_data_args(args)
    if args.output_dir is None:
        tag = "random_init"
        if args.pretrained:
            path = Path(args.pretrained)
            tag = path.parent.name + ("" if path.stem == "checkpoint" else f"_{path.stem}")
        args.output_dir = str(Path("runs") / f"{stage}_{args.dataset}_{args.target}_{args.train_split}_{tag}")
    os.makedirs(args.output_dir, exist_ok=True)
    defaults = synthetic if args.dataset == "synthetic" else paper
    for key in ("arch", "batch_size", "epochs"):
        if key in vars(args) and getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if "dropout" in vars(args) and args.dropout is None:  # finetune.py: per-dataset values in paper["dropout"]
        args.dropout = paper["dropout"].get(args.dataset, paper["dropout"]["other"])
    if getattr(args, "epochs", None) is not None and args.schedule is None:
        args.schedule = [round(m * args.epochs / paper["epochs"]) for m in paper["schedule"]]
    if args.amp is None:
        args.amp = device.type == "cuda"
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if "resume" in vars(args):  # fail now rather than after feature extraction
        default = os.path.join(args.output_dir, "checkpoint.pth")
        args.resume = args.resume or (default if os.path.exists(default) else None)
        if args.resume:
            old = load_checkpoint(args.resume)["args"]
            changed = [f"--{k.replace('_', '-')} {old.get(k)}" for k in RESUME_KEYS
                       if not same_value(old.get(k), getattr(args, k, None))]
            if changed:
                raise SystemExit(f"{args.resume} was trained with other settings ({', '.join(changed)}): use "
                                 f"another --output-dir, or the same settings to resume")
    if is_main:
        print(f"git commit: {git_commit()}")
        print("effective settings" + (" (CPU-sized defaults for the synthetic benchmark)"
                                      if args.dataset == "synthetic" else "") + ":")
        print(json.dumps(vars(args), indent=1, sort_keys=True))
    return world, device, is_main


RESUME_KEYS = ("pretrained", "arch", "dataset", "data", "split", "target", "train_split", "frames", "stride", "crop",
               "cache_features")  # a checkpoint trained with other values of these is not resumed


def same_value(a, b):
    """Equal settings; paths compare by where they point."""
    if isinstance(a, str) and isinstance(b, str):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def load_pretrained(model, path, is_main):
    """Load backbone weights (load_backbone raises on a different arch); say so loudly when none."""
    if path is None:
        if is_main:
            print("=" * 78 + "\nWARNING: no --pretrained given: evaluating a RANDOMLY INITIALISED backbone\n"
                  + "=" * 78)
        return
    info = load_backbone(model, path)
    if is_main:
        print(f"loaded {path}; left at init: {info['missing']}; skipped: {len(info['dropped'])} head/classifier "
              f"and {len(info['unexpected'])} other checkpoint keys")


def classification_metrics(scores, labels, classes):
    """Video-level top-1/top-5 (%) and per-class accuracy from (V, C) scores."""
    labels = labels.to(scores.device)
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (V, 5)
    correct1 = top[:, 0] == labels
    per_class = {}
    for c, name in enumerate(classes):
        sel = labels == c
        if sel.any():
            per_class[name] = 100.0 * correct1[sel].float().mean().item()
    return {"top1": 100.0 * correct1.float().mean().item(),
            "top5": 100.0 * (top == labels[:, None]).any(1).float().mean().item(),
            "mean_class_acc": sum(per_class.values()) / len(per_class),
            "per_class_acc": per_class, "videos": len(labels)}


def finish(args, results, is_main, **extra):
    """Write <output-dir>/results.json: metrics per split (final model), the synthetic bias gap, the
    checkpoint evaluated and the args; extra entries (best epoch, timings) are stored as given. Ends the
    process group."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if not is_main:
        return
    key = "R@1" if "R@1" in next(iter(results.values())) else "top1"
    out = {"pretrained": args.pretrained, "splits": results, **extra, "args": vars(args)}  # write_json: plain
    if "test" in results and "test_swapped" in results:
        out["bias_gap"] = results["test"][key] - results["test_swapped"][key]  # same metric, percentage points
    for split, metrics in results.items():
        print(f"{split}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
    if "bias_gap" in out:
        print(f"background-bias gap ({key}, test - test_swapped): {out['bias_gap']:.2f} points")
    path = Path(args.output_dir) / "results.json"
    write_json(path, out)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------------------

def get_args_parser():
    parser = argparse.ArgumentParser(description="FAME backbones: speed benchmark", epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", action="store_true", required=True,
                        help="time forward and forward+backward of every arch")
    parser.add_argument("--archs", nargs="+", default=sorted(ARCHS), choices=sorted(ARCHS))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="clips per batch at 16x112x112 (default: 2 on CPU, 16 on CUDA)")
    parser.add_argument("--demo-batch-size", type=int, default=32,
                        help="clips per batch for r2plus1d_tiny at its demo size 8x32x32")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices to time (default: cpu, plus cuda when available)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format (CUDA only)")
    return parser


def _time(fn, iters, device):
    fn()  # warm-up: allocator, cudnn autotuning
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def benchmark(arch, shape, batch_size, device, args):
    model = build_backbone(arch).to(device)
    x = torch.randn(batch_size, 3, *shape, device=device)  # (B, 3, T, H, W)
    y = torch.randint(0, 400, (batch_size,), device=device)
    fast = device.type == "cuda"
    if fast and args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=fast and args.bf16)

    def forward():
        with torch.no_grad(), autocast():
            model(x)

    def train_step():
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    t_fwd = _time(forward, args.iters, device)
    model.train()
    t_train = _time(train_step, args.iters, device)
    print(f"{arch:14s} {'x'.join(map(str, shape)):10s} batch {batch_size:3d}  {device.type:4s}  "
          f"forward {batch_size / t_fwd:8.3g} clips/s   forward+backward {batch_size / t_train:8.3g} clips/s",
          flush=True)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, iters {args.iters}, "
          f"bf16 {args.bf16}, channels_last {args.channels_last}")
    for name in devices:
        device = torch.device(name)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            print(f"cuda: {torch.cuda.get_device_name(device)}")
        batch_size = args.batch_size or (16 if device.type == "cuda" else 2)
        for arch in args.archs:
            benchmark(arch, (16, 112, 112), batch_size, device, args)
        if "r2plus1d_tiny" in args.archs:
            benchmark("r2plus1d_tiny", (8, 32, 32), args.demo_batch_size, device, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
