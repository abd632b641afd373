"""The synthetic background-bias benchmark: short videos of one object moving over a textured scene, where the
scene family agrees with the motion class in most training videos and never in `test_swapped`.

Eight motion classes (up, down, sweep, circle, approach, recede, bounce, zigzag), eight scene families (a hue
family x a pattern) with a drifting distractor and camera jitter, and ground-truth object masks. Splits:
train / test (scene family = class for 90% of the videos), test_swapped (never), balanced_train / balanced_test
(every class-scene pair equally often). Written as H.264 mp4s with splits/<split>.txt ("path class scene") and
meta.json; stage scripts generate it on first use (--dataset synthetic), or:

    python synthetic.py --out DIR [--videos 800 --size 64 --length 48 --seed 0 --sprite video --backdrop pattern]
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import time

import av
import numpy as np

import utils

MOTIONS = ("up", "down", "sweep", "circle", "approach", "recede", "bounce", "zigzag")
SCENES = ("red-stripes", "orange-checker", "olive-waves", "green-dots",
          "teal-stripes", "blue-checker", "violet-waves", "pink-dots")
SPLITS = ("train", "test", "test_swapped", "balanced_train", "balanced_test")
VERSIONS = (1, 2, 3)  # 2 is the default; see render()
FPS = 25
MATCH = 0.9  # fraction of train/test videos whose scene family equals their class
OBJECT_AREA = (0.10, 0.16)  # object area / frame area (approach/recede sweep 0.55x..1.45x of this in side)
SPRITES = ("video", "shared")  # --synthetic-sprite
BACKDROPS = ("pattern", "flat")  # --synthetic-backdrop
FLAT_GREY = 110  # the flat backdrop's level, about the patterns' mean brightness
_SHARED_SPRITE = (("disc",), ((1.0, 1.0, 1.0),), (0.13, 0.13))  # shapes, colours, area range of "shared"
_SPRITE_COLORS = ((1.0, 0.15, 0.1), (1.0, 0.9, 0.1), (0.1, 0.95, 1.0), (1.0, 0.2, 0.95), (1.0, 1.0, 1.0),
                  (1.0, 0.55, 0.0))
_SHAPES = ("disc", "square", "diamond", "triangle", "cross")
V2_OBJECT_AREA = 0.13  # version 2: one look for every object (a white disc of 13% of the frame, fixed stripes)
# version 3: version 2's look at 25% of the frame, so that FAME's mask at beta 0.5 holds the object and little else
# (README, "Version 3 of the benchmark"); every motion's range still fits the frame at this size (tested)
V3_OBJECT_AREA = 0.25
OBJECT_AREAS = {1: OBJECT_AREA, 2: V2_OBJECT_AREA, 3: V3_OBJECT_AREA}
_SHAPE_FILL = {"disc": math.pi / 4, "square": 0.85 ** 2, "diamond": 1.15 ** 2 / 2, "triangle": 0.5 * 1.7 * 1.0 / 2,
               "cross": (2 * 2 * 0.7 - 0.7 ** 2) / 4}


def split_sizes(num_videos):
    return {s: num_videos if s.endswith("train") else max(len(MOTIONS), num_videos // 2) for s in SPLITS}


def specs(split, num_videos, seed=0):
    """[(class, scene, video_seed)] of a split. train/test: scene == class for exactly round(0.9 n) videos;
    test_swapped: scene never equals class; balanced_*: every (class, scene) pair equally often."""
    n, C = split_sizes(num_videos)[split], len(MOTIONS)
    sid = SPLITS.index(split)
    rng = np.random.default_rng([seed, sid, 7])
    cls = np.arange(n) % C
    if split.startswith("balanced"):
        scene = (np.arange(n) // C) % C
    else:
        other = (cls + 1 + rng.integers(0, C - 1, n)) % C
        match = np.zeros(n, bool)
        if split != "test_swapped":
            match[rng.permutation(n)[: round(MATCH * n)]] = True
        scene = np.where(match, cls, other)
    seeds = np.random.SeedSequence([seed, sid]).generate_state(n)
    return [(int(c), int(s), int(v)) for c, s, v in zip(cls, scene, seeds)]


def _hsv(h, s, v):
    h = (h % 1.0) * 6
    i, f = int(h), h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i % 6], np.float32)


def _shape_mask(shape, u, v):
    au, av_ = np.abs(u), np.abs(v)
    if shape == "disc":
        return u * u + v * v <= 1
    if shape == "square":
        return np.maximum(au, av_) <= 0.85
    if shape == "diamond":
        return au + av_ <= 1.15
    if shape == "triangle":
        return (v >= -0.8) & (v <= 0.9) & (au <= (0.9 - v) / 1.7)
    return ((au <= 0.35) & (av_ <= 1)) | ((av_ <= 0.35) & (au <= 1))


def _trajectory(motion, rng, S, L, R):
    """Object centre (x, y) and size factor per frame, in pixels; translations wrap around the frame."""
    t = np.arange(L, dtype=np.float32)
    k = S / 64
    x0, y0 = rng.uniform(0, S), rng.uniform(0, S)
    grow = np.ones(L, np.float32)
    if motion in ("up", "down"):
        v = rng.uniform(1.0, 1.8) * k * (-1 if motion == "up" else 1)
        x, y = np.full(L, x0), y0 + v * t
    elif motion == "sweep":
        v = rng.uniform(1.0, 1.8) * k * rng.choice((-1, 1))
        x, y = x0 + v * t, np.full(L, y0)
    elif motion == "circle":
        rho = rng.uniform(0.15, 0.2) * S
        m = R + rho + 1
        cx, cy = (rng.uniform(m, S - m) if S - m > m else S / 2 for _ in range(2))
        a = rng.uniform(0, 2 * np.pi) + rng.choice((-1, 1)) * 2 * np.pi * t / rng.uniform(20, 32)
        x, y = cx + rho * np.cos(a), cy + rho * np.sin(a)
    elif motion in ("approach", "recede"):
        lo, hi = rng.uniform(0.5, 0.6), rng.uniform(1.4, 1.5)
        grow = (lo + (hi - lo) * t / max(1, L - 1)).astype(np.float32)
        if motion == "recede":
            grow = grow[::-1].copy()
        m = R * hi + 1
        cx, cy = (rng.uniform(m, S - m) if S - m > m else S / 2 for _ in range(2))
        x, y = np.full(L, cx), np.full(L, cy)
    elif motion == "bounce":
        amp = rng.uniform(0.15, 0.22) * S
        m = R + amp + 1
        cy = rng.uniform(m, S - m) if S - m > m else S / 2
        x, y = np.full(L, x0), cy + amp * np.sin(2 * np.pi * t / rng.uniform(12, 20) + rng.uniform(0, 2 * np.pi))
    else:  # zigzag: horizontal drift with a triangle-wave vertical swing
        v = rng.uniform(0.8, 1.4) * k * rng.choice((-1, 1))
        amp, period = rng.uniform(0.12, 0.18) * S, rng.uniform(12, 20)
        phase = (t / period + rng.uniform(0, 1)) % 1
        x, y = x0 + v * t, y0 + amp * (4 * np.abs(phase - 0.5) - 1)
    return x.astype(np.float32), y.astype(np.float32), grow


def _trajectory_v2(motion, rng, S, L, R):
    """Version 2: object centre (x, y) and size factor per frame, in pixels. Each video draws its motion's
    parameters from continuous ranges, so that two clips of it share a motion signature; the centre stays within
    R / 2 of the frame (at least half of the object in view)."""
    t = np.arange(L, dtype=np.float32)
    k = S / 64
    lo, hi = R / 2, S - R / 2  # where a centre may be
    grow = np.ones(L, np.float32)

    def place(extent):  # a start coordinate for a path of this extent (pixels), uniformly where it fits
        return rng.uniform(lo, max(lo, hi - extent))

    if motion in ("up", "down", "sweep"):
        v = rng.uniform(0.45, 1.0) * k * (L - 1)  # travel over the video, up to the room there is
        v = min(v, hi - lo) / (L - 1)
        along = place(v * (L - 1)) + v * t
        across = np.full(L, rng.uniform(lo + R / 2, hi - R / 2), np.float32)
        if motion == "up":
            x, y = across, along[::-1].copy()
        elif motion == "down":
            x, y = across, along
        else:
            x, y = (along if rng.integers(2) else along[::-1].copy()), across
    elif motion == "circle":
        rho = rng.uniform(0.1, 0.22) * S
        cx, cy = (rng.uniform(lo + rho, hi - rho) for _ in range(2))
        a = rng.uniform(0, 2 * np.pi) + rng.choice((-1, 1)) * 2 * np.pi * t / rng.uniform(14, 36)
        x, y = cx + rho * np.cos(a), cy + rho * np.sin(a)
    elif motion in ("approach", "recede"):
        small, large = rng.uniform(0.5, 0.75), rng.uniform(1.25, 1.6)
        grow = (small + (large - small) * t / max(1, L - 1)).astype(np.float32)
        if motion == "recede":
            grow = grow[::-1].copy()
        m = R * large
        x, y = (np.full(L, rng.uniform(m, S - m), np.float32) for _ in range(2))
    elif motion == "bounce":
        amp = rng.uniform(0.1, 0.22) * S
        cy = rng.uniform(lo + amp, hi - amp)
        x = np.full(L, rng.uniform(lo + R / 2, hi - R / 2), np.float32)
        y = cy + amp * np.sin(2 * np.pi * t / rng.uniform(10, 26) + rng.uniform(0, 2 * np.pi))
    else:  # zigzag: a horizontal drift with a triangle-wave vertical swing
        v = min(rng.uniform(0.3, 0.8) * k * (L - 1), hi - lo) / (L - 1)
        amp, period = rng.uniform(0.08, 0.16) * S, rng.uniform(10, 22)
        x = place(v * (L - 1)) + v * t
        x = x if rng.integers(2) else x[::-1].copy()
        cy = rng.uniform(lo + amp, hi - amp)
        y = cy + amp * (4 * np.abs((t / period + rng.uniform(0, 1)) % 1 - 0.5) - 1)
    return x.astype(np.float32), y.astype(np.float32), grow


def _background(scene, rng, X, Y, S):
    """Scene family = hue family x pattern type; per-video palette, orientation, scale and phase.
    X, Y: float32 pixel coordinates (broadcastable); returns float32 RGB image and the lighter palette colour."""
    hue = scene / len(SCENES) + rng.uniform(-0.03, 0.03)
    c1 = _hsv(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.4, 0.6), rng.uniform(0.2, 0.35))
    c2 = _hsv(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.35, 0.55), rng.uniform(0.5, 0.7))
    a = rng.uniform(0, math.pi)
    f = 2 * math.pi / (rng.uniform(0.12, 0.2) * S)  # angular frequency of the pattern
    u, v = X * math.cos(a) + Y * math.sin(a), Y * math.cos(a) - X * math.sin(a)
    p0, p1 = rng.uniform(0, 2 * math.pi, 2).tolist()
    kind = scene % 4
    if kind == 0:  # stripes
        p = 0.5 + 0.5 * np.sin(f * u + p0)
    elif kind == 1:  # checker
        p = 0.5 + 0.5 * np.tanh(4 * np.sin(f * u + p0) * np.sin(f * v + p1))
    elif kind == 2:  # waves
        p = 0.5 + 0.25 * (np.sin(f / 1.7 * u + 2 * np.sin(f / 2.3 * v + p1)) + np.sin(f / 1.3 * v + p0))
    else:  # dots
        du, dv = (u * f / (2 * math.pi) + p0) % 1 - 0.5, (v * f / (2 * math.pi) + p1) % 1 - 0.5
        p = 1 / (1 + np.exp(40 * (du * du + dv * dv - 0.09)))
    return c1 + (c2 - c1) * p[..., None], c2


def render(motion, scene, video_seed, size=64, length=48, sprite="video", version=2, scene_only=False,
           backdrop="pattern"):
    """Frames (L, S, S, 3) uint8 and ground-truth object masks (L, S, S) bool of one synthetic video; with
    scene_only, the frames show the scene alone (the object is not drawn; the masks are those of the video).
    backdrop "flat": the scene is a flat grey frame with no distractor, and the object moves exactly as over the
    pattern (the scene-free twin of the video: every random draw is the same).

    The scene (a per-video palette, orientation, scale and phase of its family's pattern, camera jitter and a
    drifting distractor disc) is the same in both versions. Version 1: the object's shape, colour, texture and
    size are drawn per video (sprite "video"; "shared": one white disc, texture still per video), and its
    translations wrap around the frame. Version 2: every object looks the same (a white disc with fixed
    stripes), so that only its motion tells videos apart beyond their scene; each video draws its motion's
    parameters (speed, direction, radius, period, amplitude, phase, growth) from continuous ranges, and the
    object stays at least half inside the frame (no wrapping). Version 3: version 2 with the object at
    V3_OBJECT_AREA of the frame instead of V2_OBJECT_AREA (the same motions, scenes and random draws).
    """
    rng = np.random.default_rng(video_seed)
    S, L = size, length
    t = np.arange(L, dtype=np.float32)
    # camera jitter: whole-pixel offsets of a static scene canvas
    jit = max(1, round(S / 32))
    jx, jy = (np.rint(jit * np.sin(2 * math.pi * t / rng.uniform(10, 30) + rng.uniform(0, 2 * math.pi)))
              .astype(np.int64) for _ in range(2))
    n = S + 2 * jit
    g = np.arange(n, dtype=np.float32)
    canvas, light = _background(scene, rng, g[None, :], g[:, None], S)  # (n,n,3) float
    canvas = (canvas * 255 + 0.5).clip(0, 255).astype(np.uint8)
    if backdrop == "flat":
        canvas[:] = FLAT_GREY
    img = np.stack([canvas[jit + y: jit + y + S, jit + x: jit + x + S] for x, y in zip(jx, jy)])  # (L,S,S,3)
    # drifting distractor: a small disc in the scene's lighter colour, moving with the scene
    d0x, d0y = rng.uniform(0, S, 2).tolist()
    speed, heading = rng.uniform(0.3, 0.7) * S / 64, rng.uniform(0, 2 * math.pi)
    dx_, dy_ = d0x + speed * math.cos(heading) * t - jx, d0y + speed * math.sin(heading) * t - jy
    light = (np.minimum(light * 1.3, 1.0) * 255).astype(np.uint8)
    if version == 1:  # foreground sprite: shape, colour and texture independent of the class
        shapes, colors, area = (_SHAPES, _SPRITE_COLORS, OBJECT_AREA) if sprite == "video" else _SHARED_SPRITE
        shape = shapes[rng.integers(len(shapes))]
        color = np.array(colors[rng.integers(len(colors))], np.float32)
        R = math.sqrt(rng.uniform(*area) * S * S / (4 * _SHAPE_FILL[shape]))
        cx, cy, grow = _trajectory(motion, rng, S, L, R)
        ta, tf = rng.uniform(0, math.pi), math.pi * rng.uniform(2.0, 3.5)
        checker = bool(rng.integers(2))
    else:  # one look for every object; only the motion's parameters are drawn
        shape, color = "disc", np.ones(3, np.float32)
        R = math.sqrt(OBJECT_AREAS[version] * S * S / (4 * _SHAPE_FILL[shape]))
        cx, cy, grow = _trajectory_v2(motion, rng, S, L, R)
        ta, tf, checker = math.pi / 4, math.pi * 2.5, False
    shades = (np.stack([color, color * 0.35, np.full(3, 0.02, np.float32)]) * 255).astype(np.uint8)
    # every frame at once: per-frame centres and radii broadcast against (L,1,S) / (L,S,1) pixel offsets;
    # colours are then computed and written only at the covered pixels (flat indices into (L,S,S))
    pixels = _rgb_items(img).reshape(-1)  # (L*S*S,) view of img
    radius = 0.06 * S
    u, v = _offsets(dx_, dy_, radius + 1, S)
    if backdrop == "pattern":
        pixels[np.flatnonzero(u * u + v * v <= radius * radius)] = _rgb_items(light)  # the disc goes under the sprite
    r = R * grow  # (L,) float32
    u, v = _offsets(cx - jx, cy - jy, r * 1.5 + 2, S, wrap=version == 1)  # the camera moves the object too
    u, v = u / r[:, None, None], v / r[:, None, None]
    masks = _shape_mask(shape, u, v)  # (L,S,S)
    idx = np.flatnonzero(masks)
    k, x = idx // (S * S), idx % S
    u, v, r = u.reshape(-1)[k * S + x], v.reshape(-1)[idx // S], r[k]  # (N,) at the object's pixels
    core = _shape_mask(shape, u * (1 + 1.5 / r), v * (1 + 1.5 / r))  # 1.5-pixel dark outline
    su = np.sin(tf * (u * math.cos(ta) + v * math.sin(ta)))
    tex = (su * np.sin(tf * (v * math.cos(ta) - u * math.sin(ta))) if checker else su) > 0
    if not scene_only:
        pixels[idx] = _rgb_items(shades)[np.where(core, np.where(tex, 0, 1), 2)]
    return img, masks


def _rgb_items(a):
    """View of a uint8 (..., 3) array as (...) 3-byte items: fancy indexing then copies whole pixels at once."""
    return np.ascontiguousarray(a).view(np.dtype((np.void, 3)))[..., 0]


def _offsets(cx, cy, half, S, wrap=True):
    """Float32 offsets u (L,1,S) of the pixel columns and v (L,S,1) of the rows from the centres (cx, cy) (L,).
    wrap: on the wrapping frame, a pixel takes its position in the S-wide window starting at floor(c - half), so
    pixels within `half` of a centre get their offset across the seam; farther ones are outside any shape."""
    g = np.arange(S)

    def axis(c):
        if not wrap:
            return (g - c[:, None]).astype(np.float32)
        c0 = np.floor(c - half).astype(np.int64)[:, None]
        return (c0 + (g - c0) % S - c[:, None]).astype(np.float32)

    return axis(cx)[:, None, :], axis(cy)[:, :, None]


def _write_mp4(path, frames, fps=FPS, crf=18):
    """H.264 mp4 of (L,H,W,3) uint8 frames (H, W even). RGB -> BT.601
    limited-range yuv420p is done here for all frames at once (the decoder's default interpretation).
    x264's ultrafast preset: at 64x64 the slower presets' analysis costs more than rendering, and its output
    decodes closer to the rendered frames at the same crf (larger files, no B-frames, CAVLC)."""
    x = frames.astype(np.float32)
    y = 16 + x @ np.array([65.481, 128.553, 24.966], np.float32) / 255
    sub = (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4  # 2x2 chroma average
    cb = 128 + sub @ np.array([-37.797, -74.203, 112.0], np.float32) / 255
    cr = 128 + sub @ np.array([112.0, -93.786, -18.214], np.float32) / 255
    L, H, W = y.shape
    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "ultrafast", "threads": "1"})
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        # one frame refilled in place: x264 copies each input when it is sent, so reuse is safe and cheaper
        frame = av.VideoFrame(W, H, "yuv420p")
        planes = [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width] for p in frame.planes]
        for k in range(L):
            for plane, values in zip(planes, (y[k], cb[k], cr[k])):
                np.copyto(plane, values + 0.5, casting="unsafe")  # in [16, 240]: no clipping needed
            frame.pts = k
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _relpath(split, i, cls, scene):
    return f"{split}/{MOTIONS[cls]}/{split}_{i:05d}_{SCENES[scene]}.mp4"


def _write_chunk(job):
    root, size, length, sprite, version, backdrop, items = job
    t0 = time.process_time()
    for split, i, (cls, scene, vseed) in items:
        frames, _ = render(MOTIONS[cls], scene, vseed, size, length, sprite, version, backdrop=backdrop)
        _write_mp4(os.path.join(root, _relpath(split, i, cls, scene)), frames)
    return time.process_time() - t0


def make(root, num_videos=800, size=64, length=48, seed=0, workers=1, sprite="video", version=2, backdrop="pattern"):
    """Writes the benchmark (H.264 mp4s, splits/<split>.txt with "path class scene", meta.json) to root, unless
    a complete copy is there. It is written into root.inprogress-<pid> and renamed into place when complete, so
    an interrupted generation never leaves a half-written benchmark that would be reused."""
    if os.path.isfile(os.path.join(root, "meta.json")):
        return root
    with utils.file_lock(root + ".lock"):  # processes of one run wait for the first one's generation
        if os.path.isfile(os.path.join(root, "meta.json")):
            return root
        tmp = f"{root}.inprogress-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "splits"))
        items = []
        for split in SPLITS:
            split_specs = specs(split, num_videos, seed)
            with open(os.path.join(tmp, "splits", f"{split}.txt"), "w") as f:
                for i, (cls, scene, _) in enumerate(split_specs):
                    f.write(f"{_relpath(split, i, cls, scene)} {cls} {scene}\n")
            for m in MOTIONS:
                os.makedirs(os.path.join(tmp, split, m))
            items += [(split, i, spec) for i, spec in enumerate(split_specs)]
        chunks = [items[k::workers * 8] for k in range(workers * 8)]
        t0 = time.time()
        jobs = [(tmp, size, length, sprite, version, backdrop, c) for c in chunks if c]
        cpu = utils.parallel_map(_write_chunk, jobs, workers)
        meta = {"version": version, "num_videos": num_videos, "size": size, "length": length, "seed": seed,
                "sprite": sprite, "backdrop": backdrop, "fps": FPS, "motions": MOTIONS, "scenes": SCENES,
                "match": MATCH,
                "object_area": OBJECT_AREAS[version], "splits": split_sizes(num_videos),
                "seconds": round(time.time() - t0, 2),
                "cpu_seconds": round(sum(cpu), 2), "workers": workers}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.rename(tmp, root)
    return root


def ensure(base, num_videos=800, size=64, length=48, seed=0, sprite="video", workers=1, version=2,
           backdrop="pattern"):
    """The root of the benchmark with these parameters under `base`, generated there on first use (its folder
    name is a hash of the parameters, so benchmarks of other parameters live side by side)."""
    params = (version, num_videos, size, length, seed, sprite) + ((backdrop,) if backdrop != "pattern" else ())
    root = os.path.join(base, "synthetic_" + hashlib.sha1(repr(params).encode()).hexdigest()[:10])
    return make(root, num_videos, size, length, seed, workers, sprite, version, backdrop)


def clip(path, indices=None, scene_only=False):
    """Re-renders the video at `path` (a file of a benchmark folder): frames (L, S, S, 3) uint8 and ground-truth
    object masks (L, S, S) bool, optionally only at frame `indices` (e.g. a clip's); scene_only: see render()."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    split = os.path.basename(os.path.dirname(os.path.dirname(path)))
    i = int(os.path.basename(path)[len(split) + 1:].split("_")[0])
    cls, scene, vseed = specs(split, meta["num_videos"], meta["seed"])[i]
    frames, masks = render(MOTIONS[cls], scene, vseed, meta["size"], meta["length"], meta["sprite"], meta["version"],
                           scene_only, meta.get("backdrop", "pattern"))
    if indices is not None:
        frames, masks = frames[indices], masks[indices]
    return frames, masks


def get_args_parser():
    parser = argparse.ArgumentParser(description="Write the synthetic background-bias benchmark",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True,
                        help="folder to write the benchmark to: a new or empty one (or one this script wrote with the "
                             "same settings, which is kept)")
    parser.add_argument("--videos", type=utils.Number(int, 8), default=800,
                        help="videos per training split (test splits: half)")
    parser.add_argument("--size", type=utils.Number(int, 16, 1024, even=True), default=64,
                        help="frame size (square, even; the rendering holds several (size, size) arrays per frame)")
    parser.add_argument("--length", type=utils.Number(int, 2), default=48, help="frames per video")
    parser.add_argument("--seed", type=utils.SEED, default=0, help="generator seed")
    parser.add_argument("--version", type=int, default=2, choices=VERSIONS, help="benchmark version (see render())")
    parser.add_argument("--sprite", default="video", choices=SPRITES,
                        help="version 1's object look: drawn per video, or shared")
    parser.add_argument("--backdrop", default="pattern", choices=BACKDROPS,
                        help="the scene: its family's pattern, or a flat grey frame (the scene-free twin)")
    parser.add_argument("--workers", type=utils.NON_NEGATIVE_INT, default=os.cpu_count() or 1,
                        help="writer processes (0: this process)")
    return parser


def main(args):
    """Writes the benchmark to --out, or keeps the one there if it was written with the same settings; refuses an
    --out that holds anything else, before rendering."""
    args.out = os.path.normpath(args.out)  # "DIR/" would put the in-progress copy and its lock inside DIR
    settings = {"version": args.version, "num_videos": args.videos, "size": args.size, "length": args.length,
                "seed": args.seed, "sprite": args.sprite, "backdrop": args.backdrop}
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise utils.UsageError(f"--out {args.out} is a file; give a new or empty folder")
    meta_path = os.path.join(args.out, "meta.json")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = {"backdrop": "pattern", **json.load(f)}  # benchmarks older than --backdrop lack it
            differ = [f"--{'videos' if k == 'num_videos' else k} {meta.get(k)}" for k, v in settings.items()
                      if meta.get(k) != v]
        except (OSError, ValueError, TypeError):
            raise utils.UsageError(f"--out {args.out} holds a meta.json that this script did not write; give a new "
                                   f"or empty folder") from None
        if differ:
            raise utils.UsageError(f"--out {args.out} holds a benchmark written with other settings "
                                   f"({', '.join(differ)}); give another folder")
    elif os.path.isdir(args.out) and os.listdir(args.out):
        raise utils.UsageError(f"--out {args.out} is a folder that holds other files; give a new or empty folder")
    parent = os.path.dirname(os.path.abspath(args.out))
    utils.make_output_dir(parent, lock=False, flag="--out")
    root = make(args.out, args.videos, args.size, args.length, args.seed, max(1, args.workers), args.sprite,
                args.version, args.backdrop)
    with open(os.path.join(root, "meta.json")) as f:
        print(f"wrote {root}: " + json.dumps(json.load(f)["splits"]))


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
