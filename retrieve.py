"""Nearest-neighbour video retrieval with a frozen backbone (paper Sec. 4.2, Table 6, Fig. 8).

Reproduces the paper's retrieval protocol (Table 6) on UCF101 split 1:

    torchrun --nproc_per_node=4 retrieve.py --dataset ucf101 --data PATH/ucf101 --split 1 \
        --pretrained runs/pretrain_k400_r2plus1d_18_beta0.5_seed0/checkpoint.pth \
        --clips 10 --visualize 8

No training. A video's feature is the mean over --clips uniformly spaced centre-cropped clips of the
L2-normalized pooled backbone feature (before any projection head; the paper: "we average ten uniformly
sampled clips"). Queries are the --test-split videos, the gallery the --train-split videos (a query that is a
gallery video, the same file under any name, is left out and counted, so no video finds itself). As in the authors'
main_retrieve.py, the clip features are L2-normalized before the average, each set's own mean feature is
subtracted, and the features are L2-normalized again and compared by cosine similarity; a query is a hit at
k if any of its k nearest gallery videos has its label. Reports R@1, 5, 10, 20, 50 (k larger than the gallery
is clipped to the gallery size).
`--visualize N` writes retrieval.png: N queries with their top-3 neighbours (middle frames, labels,
similarities; green = same label), like the paper's Fig. 8.

Without --data the synthetic benchmark is used with the CPU preset that --help lists, and both test and
test_swapped are used as queries (the background-bias gap):
    python retrieve.py --pretrained runs/pretrain_synthetic_cnn3d_beta0.5_seed0/checkpoint.pth --visualize 6
"""
import os

import torch
import torch.nn.functional as F

import augment
import data
import models
import utils

PRESETS = {"synthetic": dict(arch="cnn3d", frames=8, crop=32, batch_size=40)}
KS = (1, 5, 10, 20, 50)  # paper Table 6


def get_args_parser():
    parser = utils.Parser("Video retrieval with a frozen backbone: test queries, training gallery (paper Table 6).",
                          PRESETS)
    data.add_data_args(parser)
    utils.add_run_args(parser, batch_size=128)
    utils.add_eval_args(parser)
    parser.add_argument("--visualize", type=utils.NON_NEGATIVE_INT, default=0, metavar="N",
                        help="write <output-dir>/retrieval.png with N queries and their top-3 neighbours")
    return parser


def main(args):
    utils.check_eval_args(args)
    data.check_data_args(args)
    data.check_held_out(args)
    device = utils.init_distributed(args.dist_timeout)
    out = utils.eval_output_dir(args, "retrieve", data.dataset_tag(args))
    amp = utils.amp_dtype(args.amp, device)
    torch.manual_seed(args.seed)  # the same random backbone as the other scripts' when there is no --pretrained
    backbone = models.build_backbone(args.arch)
    utils.load_pretrained(backbone, args)
    backbone.to(device).eval()

    def features(clips):  # (n, 3, T, S, S) uint8 -> (n, D) pooled backbone features
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return backbone.forward_features(augment.normalize(clips)).float()

    sets = {args.train_split: data.build_dataset(args, args.train_split, "test")}  # every listing before any work
    sets.update({split: data.build_dataset(args, split, "test", held_out_from=args.train_split)
                 for split in utils.eval_splits(args)})  # queries: never a gallery video, under any name
    feats, ok = {}, {}
    for split, dataset in sets.items():
        clip_feats, ok[split] = utils.clip_outputs(features, data.build_test_loader(dataset, args), device)
        feats[split] = video_features(clip_feats)
    gallery, gallery_ok = sets[args.train_split], ok[args.train_split]
    if not bool(gallery_ok.any()):
        raise utils.DataError(f"none of the {len(gallery)} gallery videos ({args.train_split}) could be decoded")
    results, similarities = {}, {}
    for split in utils.eval_splits(args):
        q_ok = ok[split]
        if not bool(q_ok.any()):
            raise utils.DataError(f"none of the {len(q_ok)} query videos ({split}) could be decoded")
        sim = similarity(feats[split], feats[args.train_split])  # (Q, G); rows of undecoded queries go unused
        sim[:, ~gallery_ok] = float("-inf")  # a gallery video that failed to decode is never a neighbour
        similarities[split] = sim
        results[split] = evaluate(sim[q_ok], sets[split].labels[q_ok], gallery.labels)
        results[split].update(queries=int(q_ok.sum()), gallery=int(gallery_ok.sum()),
                              gallery_left_out=len(gallery.manifest["left_out"]) + int((~gallery_ok).sum()),
                              **utils.video_accounting(sets[split], q_ok))

    extra = {"gallery": {"split": args.train_split, "videos": int(gallery_ok.sum()),
                         **utils.video_accounting(gallery, gallery_ok)}}
    if args.visualize and utils.is_main_process():
        extra["visualized"] = visualize(os.path.join(out, "retrieval.png"), similarities[args.test_split],
                                        sets[args.test_split], gallery, args.visualize, ok[args.test_split])
    utils.write_results(args, results, **extra)
    utils.finish_distributed()


def video_features(clip_feats):
    """A video's feature: the mean of its clips' L2-normalized features, as the authors' main_retrieve.py takes it
    (its backbone ends in an L2 normalization). (V, N, D) -> (V, D)"""
    return F.normalize(clip_feats, dim=2).mean(1)


def similarity(query, gallery):
    """Cosine similarity after subtracting each set's own mean feature (the authors' main_retrieve.py):
    (Q, D), (G, D) -> (Q, G)."""
    query = F.normalize(query - query.mean(0, keepdim=True), dim=1)
    gallery = F.normalize(gallery - gallery.mean(0, keepdim=True), dim=1)
    return query @ gallery.T


def evaluate(sim, query_labels, gallery_labels, ks=KS):
    """R@k (%): share of queries with at least one same-label video among their k most similar gallery videos
    (k clipped to the gallery size); an entry of sim at -inf (a gallery video that did not decode) is never a
    neighbour."""
    values, nearest = sim.topk(min(max(ks), sim.shape[1]), dim=1)  # (Q, kmax), most similar first
    hit = (gallery_labels[nearest] == query_labels[:, None]) & (values > float("-inf"))  # (Q, kmax)
    return {f"R@{k}": 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks}


def visualize(path, sim, query_set, gallery_set, n, query_ok, top=3, tile=112):
    """PNG grid: one row per query (spread over the decoded videos of the query set, mask query_ok), the query's
    middle frame then its top neighbours, each captioned with its class (and similarity); frame border green when
    the label matches."""
    from PIL import Image, ImageDraw  # Pillow comes with torchvision

    def frame(dataset, i):  # middle frame of the middle clip, upscaled: (tile, tile, 3) uint8
        clip = dataset[i]["clip"]  # (N, 3, T, S, S)
        img = clip[clip.shape[0] // 2, :, clip.shape[2] // 2].float()[None]  # (1, 3, S, S)
        img = F.interpolate(img, size=(tile, tile), mode="nearest")[0]
        return Image.fromarray(img.permute(1, 2, 0).byte().numpy())

    decoded = query_ok.nonzero()[:, 0]
    queries = decoded[torch.linspace(0, len(decoded) - 1, min(n, len(decoded))).round().long().unique()].tolist()
    pad, text_h = 6, 28
    canvas = Image.new("RGB", ((top + 1) * (tile + pad) + pad, len(queries) * (tile + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    shown = []
    for row, q in enumerate(queries):
        vals, idx = sim[q].topk(min(top, int(torch.isfinite(sim[q]).sum())))
        q_label = int(query_set.labels[q])
        y = pad + row * (tile + text_h + pad)
        cells = [(query_set, q, f"query: {query_set.classes[q_label]}", "black")]
        for v, g in zip(vals.tolist(), idx.tolist()):
            g_label = int(gallery_set.labels[g])
            cells.append((gallery_set, g, f"{gallery_set.classes[g_label]}\nsim {v:.3f}",
                          "green" if g_label == q_label else "red"))
        for col, (dataset, i, caption, colour) in enumerate(cells):
            x = pad + col * (tile + pad)
            canvas.paste(frame(dataset, i), (x, y))
            draw.rectangle([x - 2, y - 2, x + tile + 1, y + tile + 1], outline=colour, width=2)
            draw.multiline_text((x, y + tile + 2), caption, fill=colour, spacing=1)
        shown.append({"query": q, "query_path": str(query_set.paths[q]), "label": query_set.classes[q_label],
                      "neighbours": [{"index": g, "path": str(gallery_set.paths[g]),
                                      "label": gallery_set.classes[int(gallery_set.labels[g])], "sim": v}
                                     for v, g in zip(vals.tolist(), idx.tolist())]})
    canvas.save(path)
    print(f"wrote {path}")
    return shown


if __name__ == "__main__":
    utils.run_script(main, get_args_parser())
