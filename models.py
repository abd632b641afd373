"""The networks: R(2+1)D-18 and I3D (the paper's backbones), cnn3d (a plain 3D CNN for CPU runs on the synthetic
benchmark), the MoCo model FAME is trained with, and loading backbone weights from our and the authors'
checkpoints. Torch only.

Clips are (B, 3, T, H, W), normalized with the Kinetics mean and std (augment.normalize).
"""
import argparse
import os
import pickle
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


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
    """A small R(2+1)D (width 16, one block per stage) for quick tests. It is not for CPU pretraining (cnn3d is): at
    32 px its last stage sees a 2x2 map, and it does not learn instance discrimination there (README, "The cnn3d
    backbone")."""
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
        # PyTorch's default initialization, as the authors' backbone/i3d.py (their R(2+1)D has _init_weights)

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


# ----------------------------------------------------------------------------------------------------------------
# cnn3d: a plain 3D CNN for CPU runs on the synthetic benchmark
# ----------------------------------------------------------------------------------------------------------------

class CNN3D(nn.Module):
    """The backbone "cnn3d", for CPU runs on the synthetic benchmark: a stack of 3x3x3 conv + BatchNorm + ReLU
    layers, then global average pooling; `layers` lists each layer's (channels, temporal stride, spatial stride). At
    8x32x32 its last map is 2x4x4, and it learns instance discrimination where R(2+1)D variants of its cost do not
    (README, "The cnn3d backbone")."""

    def __init__(self, num_classes=400, layers=((32, 1, 2), (64, 2, 2), (128, 2, 2), (256, 1, 1)), dropout=0.0):
        super().__init__()
        convs, width = [], 3
        for channels, t_stride, s_stride in layers:
            convs += [nn.Conv3d(width, channels, 3, stride=(t_stride, s_stride, s_stride), padding=1, bias=False),
                      nn.BatchNorm3d(channels), nn.ReLU(inplace=True)]
            width = channels
        self.features = nn.Sequential(*convs)
        self.feature_dim = width
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def last_conv_features(self, x):
        return self.features(x)  # (B, D, T/4, H/8, W/8)

    def forward_features(self, x):
        return self.avgpool(self.last_conv_features(x)).flatten(1)  # (B, D)

    def forward(self, x):
        return self.fc(self.dropout(self.forward_features(x)))  # (B, num_classes)


ARCHS = {"r2plus1d_18": r2plus1d_18, "r2plus1d_tiny": r2plus1d_tiny, "i3d": I3D, "cnn3d": CNN3D}


def build_backbone(arch, num_classes=400, dropout=0.0):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(sorted(ARCHS))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return ARCHS[arch](num_classes=num_classes, dropout=dropout)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not found, unreadable, unsafe to unpickle, or of another backbone."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    pass


UNSAFE_FLAG = "--unsafe-unpickle"  # the opt-in of every script that loads checkpoints it did not write

torch.serialization.add_safe_globals([argparse.Namespace])  # plain settings: unpickling one runs no code


def load_checkpoint(path, unsafe=False):
    """The contents of a checkpoint file, read with torch.load(weights_only=True): tensors, numbers, strings and
    plain containers only, which is all our checkpoints and the authors' release ({epoch, arch, state_dict,
    optimizer}) hold, plus argparse.Namespace (the settings that other training scripts, e.g. torchvision's
    references, store beside the weights; it runs no code). A file that holds other objects is refused unless
    `unsafe` (full unpickling, which runs whatever code the file names). Raises CheckpointError naming the problem
    (empty, truncated, not a checkpoint, weights that are NaN or infinite)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not os.path.exists(path):
        raise CheckpointNotFound(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a regular file (a device or pipe?), not a checkpoint")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is an empty file (an interrupted copy or save?): copy it again, or delete it "
                              f"to start without it")
    foreign = _foreign_format(path)
    if foreign:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {foreign}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on the pickle protocol of a non-torch file
            ckpt = torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as err:
        detail = ([line.strip() for line in str(err).splitlines() if "nsupported" in line] or [_first_line(err)])[0]
        if unsafe or "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({detail[:150]})") from None
        if "GLOBAL" in detail:
            raise CheckpointError(f"{path} holds objects other than tensors and plain containers ({detail[:150]}), "
                                  f"which only full unpickling reads, and unpickling can run any code the file "
                                  f"names: refused. If you trust the file, rerun with {UNSAFE_FLAG}") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint that can be read safely ({detail[:150]}): a "
                              f"damaged file, or a pickle that only full unpickling reads, which can run any code "
                              f"the file names. If you trust the file, rerun with {UNSAFE_FLAG}") from None
    except Exception as err:  # torch.load's reader meets garbage with whatever error the bytes lead to
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint, perhaps truncated by an interrupted "
                              f"copy or save ({_first_line(err)}): copy it again, or delete it to start without "
                              f"it") from None
    bad = _non_finite(ckpt)
    if bad:
        raise CheckpointError(f"{path} holds NaN or infinite weights ({', '.join(bad[:5])}"
                              f"{', ...' if len(bad) > 5 else ''}): the run that wrote it diverged; use an earlier "
                              f"checkpoint of it")
    return ckpt


def _foreign_format(path):
    """What a file is when its first bytes show that it is no PyTorch checkpoint (torch.save writes a zip archive
    with a data.pkl, or before torch 1.6 a pickle), else None."""
    with open(path, "rb") as f:
        head = f.read(256)
        if head.startswith(b"PK\x03\x04"):  # a zip archive: torch.save writes its data.pkl first
            if b"data.pkl" in head:
                return None  # torch's, if damaged then torch.load says how
            f.seek(max(0, os.path.getsize(path) - 2 ** 20))  # the central directory, at the end, names every file
            return None if b"data.pkl" in f.read() else "a zip archive without the data.pkl that torch.save writes"
    if head.startswith(b"\x80"):  # a pickle (protocol 2 or later): torch's own or another program's
        return None
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy array file (.npy); load it with numpy"
    if head[8:9] == b"{":
        return "a safetensors file (or another JSON-headed format); load it with the safetensors package"
    return f"neither a zip archive nor a pickle (it starts with {head[:8]!r})"


def _non_finite(obj, where=""):
    """The keys of floating-point tensors with a NaN or an infinite value anywhere in nested dicts and lists."""
    if torch.is_tensor(obj):
        return [where or "the tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [bad for k, v in items for bad in _non_finite(v, f"{where}.{k}" if where else str(k))]


def _first_line(err):
    return f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0].split(". ")[0][:200]


_CLASSIFIER_PREFIX = "fc."
_MOCO_HEADS = ("fc.", "id_head.")  # projection heads inside a MoCo query encoder, never a trained classifier


def _strip(key, prefix):
    return key[len(prefix):] if key.startswith(prefix) else key


def _backbone_state(ckpt):
    """Find the query-encoder/backbone state dict in any supported checkpoint; returns (state, dropped keys)."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"expected a dict checkpoint, got {type(ckpt).__name__}")
    if isinstance(ckpt.get("encoder_q"), dict):  # ours: the query encoder's state dict
        state = ckpt["encoder_q"]
    elif isinstance(ckpt.get("model"), dict):  # ours: the whole MoCo state dict
        state = ckpt["model"]
    elif isinstance(ckpt.get("state_dict"), dict):  # the authors' release
        state = ckpt["state_dict"]
    elif ckpt and all(torch.is_tensor(v) for v in ckpt.values()):  # a plain backbone state dict
        state = ckpt
    else:
        raise CheckpointError("checkpoint has none of the keys 'encoder_q', 'model', 'state_dict' and is not a plain "
                         f"state dict; top-level keys: {sorted(ckpt)[:20]}")
    odd = [k for k, v in state.items() if not torch.is_tensor(v)]
    if odd:
        raise CheckpointError(f"the weights of {odd[:5]} are {type(state[odd[0]]).__name__}s, not tensors: not a "
                              f"state dict that torch.save wrote")
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


def load_backbone(model, path, unsafe=False):
    """Load backbone weights into `model` from our pretrain/finetune checkpoints, the authors' MoCo release, or a
    plain state dict (unsafe: see load_checkpoint). Returns dict(missing, unexpected, dropped, args): `dropped`
    lists MoCo projection heads and a classifier of another shape, which are skipped on purpose; `args` the
    settings stored with the checkpoint (ours), else None. Raises CheckpointError if any non-classifier weight is
    missing or has the wrong shape (usually a checkpoint of another arch)."""
    ckpt = load_checkpoint(path, unsafe)
    try:
        state, dropped = _backbone_state(ckpt)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    own = model.state_dict()
    mismatched = []
    for k in list(state):
        if k in own and own[k].is_floating_point() and not state[k].is_floating_point():
            mismatched.append(f"{k}: checkpoint {state[k].dtype} for a weight of {own[k].dtype}")
        elif k in own and state[k].shape != own[k].shape:
            if k.startswith(_CLASSIFIER_PREFIX):  # finetuned on another label set: keep our classifier
                dropped.append(k)
                del state[k]
            else:
                mismatched.append(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    fatal = [k for k in missing if not k.startswith(_CLASSIFIER_PREFIX)]
    if fatal or mismatched:
        raise CheckpointError(f"{path} does not fit this backbone (another arch?): "
                         f"{len(fatal)} missing keys {fatal[:10]}, {len(mismatched)} shape or dtype mismatches "
                         f"{mismatched[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}")
    model.load_state_dict(state, strict=False)
    stored = ckpt.get("args")
    stored = vars(stored) if isinstance(stored, argparse.Namespace) else stored
    return {"missing": missing, "unexpected": unexpected, "dropped": dropped,
            "args": stored if isinstance(stored, dict) else None}


# ----------------------------------------------------------------------------------------------------------------
# MoCo (He et al. 2020) with the v2 MLP head (Chen et al. 2020) and the symmetric loss (paper A.1)
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
    as key ("we also swap the key/queue samples", A.1); `F.cross_entropy(logits, labels)` is the InfoNCE loss of
    Eq. (1) averaged over both directions. Both directions meet the queue as it was before the step. (The
    authors' moco/builder.py runs the second direction after the first has enqueued its keys, so that the second
    query finds the key of its own clip among its negatives; README, "Where we differ".)

    backbone_fn(num_classes=dim) builds an encoder; its classifier becomes the head's last layer, initialized as
    the backbone initializes its classifier (as the authors' builder does).
    """

    # Single process: the shuffled key batch goes through the key encoder in this many sub-batches, so its
    # BatchNorm statistics come from other samples than the query's (no shuffle-BN across GPUs to rely on).
    KEY_SPLITS = 2

    def __init__(self, backbone_fn, dim=128, K=65536, m=0.999, T=0.1):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q, self.encoder_k = backbone_fn(num_classes=dim), backbone_fn(num_classes=dim)
        D = self.encoder_q.feature_dim
        self.head_q = nn.Sequential(nn.Linear(D, D), nn.ReLU(inplace=True), self.encoder_q.fc)  # A.1: a 2-layer MLP
        self.head_k = nn.Sequential(nn.Linear(D, D), nn.ReLU(inplace=True), self.encoder_k.fc)
        # The encoders end at the pooled feature; their classifiers are the heads' last layers.
        self.encoder_q.fc = nn.Identity()
        self.encoder_k.fc = nn.Identity()
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
        # encoder(x), not encoder.forward_features(x): the pooled feature all the same (its fc is the identity), and
        # through the compiled code when the encoder was compiled in place (nn.Module.compile)
        return F.normalize(head(encoder(x)).float(), dim=1)  # (B, dim), unit length

    @torch.no_grad()
    def _embed_keys(self, x):
        """Keys for x (B, 3, T, H, W) with BatchNorm statistics drawn from a random other subset of the batch."""
        world = _world_size()
        if world == 1:
            perm = torch.randperm(x.shape[0], device=x.device)
            k = torch.cat([self._embed(self.encoder_k, self.head_k, part)
                           for part in x[perm].chunk(self.KEY_SPLITS)])  # (B, dim), shuffled order
            return k[torch.argsort(perm)]
        # Shuffle-BN: every process encodes a random shard of the global batch, then gets its own keys back. Under
        # autocast the clips are gathered in its dtype: the encoder's first convolution would cast them to it anyway.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
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
