"""Class tables for a shipped model: a new model id whose products code each block's channels with the
tables of their class (``corsa.codec.latent_coder``, "Channel map"), everything else the old model's.

    python -m training.fit_classes --model corsa3.7 --name corsa3.8

A channel of a block is of class 1 + the number of ``--edges`` at or below its share of nonzero
integers (the encoder's choice, written in the stream: the decoder reads it). The tables of each
class, level, context and channel are counted on the train split's latents cut into product blocks,
rare contexts leaning on the old model's table of the same context. The encoder, gains and decoder
stay, so a product decodes to the same integers and pixels as the old model's of the same input;
only its files are smaller. A new id, because the old model's products keep their plain tables.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from corsa.codec.latent_coder import ALPHABET, CONTEXTS, FILE_NAME as TABLES_FILE, LatentCoder, class_counts
from corsa.codec.models import VariableRateCodec, model_dir
from corsa.core.machine import cpu_name
from corsa.formats import stream_format
from corsa.formats.datasets import load_split

from .export import _record_files
from .export_rate import derived_folder, write_card
from .train import SPLIT_FILE

# 11 classes. On the test split (corsa3.6's networks), PSNR at equal CF over its plain tables by level:
# 5 classes (1/256, 1/64, 1/16, 1/4) +0.18 dB at level 4; 7 (+ 1/2, 3/4) +0.27; these +0.33; 15 no more.
EDGES = (1 / 256, 1 / 64, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)


def fit(codec: VariableRateCodec, edges: np.ndarray) -> LatentCoder:
    """Class tables of every level, counted on the train split's latents in product blocks."""
    latents = [codec.latent(s.data) for s in load_split(SPLIT_FILE, "train")]
    counts = []
    for q in codec.qualities:
        total = np.zeros((len(edges) + 1, CONTEXTS, codec.channels, ALPHABET), np.int64)
        for y in latents:
            ints = codec.quantise(y, q)
            for ys, xs in stream_format.block_slices(ints.shape[1:]):
                total += class_counts(ints[:, ys, xs], edges)
        counts.append(total)
    return LatentCoder.classes_from_counts(np.stack(counts), codec.coder, edges)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the shipped model whose tables are refitted")
    p.add_argument("--name", required=True, help="the new model id")
    p.add_argument("--edges", type=float, nargs="+", default=list(EDGES),
                   help="shares of nonzero integers where a channel's class changes")
    p.add_argument("--out", default="models_onnx")
    p.add_argument("--no-figures", action="store_true", help="skip the test-split figures (smoke runs)")
    args = p.parse_args(argv)
    t0 = time.time()
    src = model_dir(args.model)
    codec = VariableRateCodec(src, kernels="fp32")
    if codec.coder.classes > 1:
        raise SystemExit(f"{args.model} has class tables already")
    coder = fit(codec, np.asarray(args.edges, np.float64))
    out, card = derived_folder(src, args.name, args.out)
    with np.load(src / TABLES_FILE) as z:
        extra = {k: z[k] for k in z.files if k not in ("freq", "precision", "escape", "class_edges")}
    coder.save(out, **extra)
    card["format_version"] = stream_format.CLASS_VERSION        # its dates coded alone; series dates 6
    card["description"] = (f"{card['description']} {args.name}: {args.model}'s networks with class tables "
                           f"(training.fit_classes): the same integers and pixels, smaller files.")
    card["latent"]["coder"] = (f"{card['latent']['coder']}; per block, each channel's tables chosen "
                               f"among {coder.classes} classes by its share of nonzero integers "
                               f"(edges {', '.join(f'{e:g}' for e in coder.class_edges)})")
    card["class_tables"] = {
        "command": f"python -m training.fit_classes --model {args.model} --name {args.name} "
                   f"--edges {' '.join(f'{e:g}' for e in coder.class_edges)}",
        "classes": coder.classes, "edges": coder.class_edges.tolist(), "from": args.model,
        "wall_time_s": round(time.time() - t0, 1), "cpu": cpu_name()}
    _record_files(card, out, {"latent_model": TABLES_FILE})
    return write_card(card, out, not args.no_figures)


if __name__ == "__main__":
    main()
