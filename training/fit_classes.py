"""Class tables for a shipped model: a new model id whose products code each block's channels with the
tables of their class (``corsa.codec.latent_coder``, "Channel map"), everything else the old model's.

    python -m training.fit_classes --model corsa3.9 --name corsa3.10

The encoder codes each channel of a product block with the class whose tables code it in the fewest
bits; the tables are fitted for that choice (a hard expectation-maximisation, as k-means): the train
split's latents, quantised as the model's encoder quantises them (its dead zone included), are cut into
product blocks; each block's channels start in the class of their share of nonzero integers
(``--edges``), the most used classes split at random into halves up to ``--classes``; then
``--iterations`` times every channel goes to the class that codes it in the fewest bits and each
class's tables are counted afresh on its channels. Rare contexts lean on the plain table of the same
context, counted on every channel of every block (``--smoothing`` pseudo-counts). The encoder, gains and decoder stay,
so a product decodes to the same integers and pixels as the old model's of the same input; only its
files are smaller. A new id, because the old model's products keep their tables.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from corsa.codec.latent_coder import (ALPHABET, CLASS_BITS, CONTEXTS, FILE_NAME as TABLES_FILE, M, LatentCoder,
                                      symbols, table_ids)
from corsa.codec.models import VariableRateCodec, model_dir
from corsa.core.machine import cpu_name
from corsa.formats import stream_format
from corsa.formats.datasets import load_split

from .export import _record_files
from .export_rate import derived_folder, output_options, write_card
from .train import SPLIT_FILE

# Shares of nonzero integers where the starting classes change (corsa3.8's 11 classes; on the test split
# with corsa3.6's networks 5 classes gave +0.18 dB at level 4, 7 +0.27, these +0.33, 15 no more while
# classes followed the share). Fitted for the encoder's choice, 15 classes save the most
# (validation split, corsa3.9's integers: latent bits -2.3 to -4.1% against 11 classes by share).
EDGES = (1 / 256, 1 / 64, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)
CLASSES = (1 << CLASS_BITS) - 1
ITERATIONS = 10
SMOOTHING = 32.0

Histograms = list[tuple[np.ndarray, np.ndarray]]     # per block: coded channels (n,), counts (n, CONTEXTS * ALPHABET)


def histograms(codec: VariableRateCodec, latents: list[np.ndarray], quality: int) -> tuple[Histograms, LatentCoder]:
    """Each product block's coded channels and their symbol counts by context, at ``quality``; and the
    plain tables counted on every channel of every block (a channel all zero in most blocks gets a
    table that codes its few nonzero blocks' zeros cheaply)."""
    out, plain, L = [], 0, codec.channels
    for y in latents:
        ints = codec.quantise(y, quality)
        for ys, xs in stream_format.block_slices(ints.shape[1:]):
            block = ints[:, ys, xs]
            sym = symbols(block).reshape(L, -1)
            bins = (np.arange(L)[:, None] * CONTEXTS + table_ids(block)) * ALPHABET + sym
            counts = np.bincount(bins.ravel(), minlength=L * CONTEXTS * ALPHABET).reshape(L, CONTEXTS * ALPHABET)
            plain = plain + counts
            chans = np.flatnonzero((sym != M).any(1))
            out.append((chans, counts[chans].astype(np.int32)))
    return out, LatentCoder.from_counts(plain.reshape(L, CONTEXTS, ALPHABET).transpose(1, 0, 2)[None])


def class_bits(hists: Histograms, coder: LatentCoder) -> list[np.ndarray]:
    """(n, K) bits each block's coded channels take with each class's tables (the encoder's integer code
    lengths, ``LatentCoder.best_classes``; the coder has one level)."""
    lengths = coder.code_lengths(0).reshape(coder.classes, CONTEXTS, coder.channels, ALPHABET)
    per_channel = lengths.transpose(2, 0, 1, 3).reshape(coder.channels, coder.classes, -1).astype(np.float64)
    return [np.einsum("nk,njk->nj", counts, per_channel[chans]) / (1 << 16) for chans, counts in hists]


def tables(hists: Histograms, plain: LatentCoder, members: list[np.ndarray], classes: int, smoothing: float) -> LatentCoder:
    """One level's class tables counted on each class's ``members`` (per block, the class index of each
    coded channel), rare contexts leaning on the ``plain`` table."""
    counts = np.zeros((classes, plain.channels, CONTEXTS * ALPHABET), np.int64)
    for (chans, c), k in zip(hists, members):
        np.add.at(counts, (k, chans), c)
    counts = counts.reshape(classes, plain.channels, CONTEXTS, ALPHABET).transpose(0, 2, 1, 3)
    return LatentCoder.classes_from_counts(counts[None], plain, smoothing)


def by_share(hists: Histograms, edges: np.ndarray) -> list[np.ndarray]:
    """Each block's coded channels' class (0-based) by their share of nonzero integers."""
    out = []
    for _, counts in hists:
        c = counts.reshape(len(counts), CONTEXTS, ALPHABET)
        share = 1 - c[:, :, M].sum(1) / np.maximum(c.sum((1, 2)), 1)
        out.append(np.searchsorted(edges, share, side="right"))
    return out


def fit_level(hists: Histograms, plain: LatentCoder, edges: np.ndarray, classes: int, iterations: int,
              smoothing: float, seed: int) -> tuple[LatentCoder, list[float]]:
    """One level's tables (module docstring) and the latent bits of ``hists``: each channel in its starting
    class, then after each iteration's choice of classes."""
    members = by_share(hists, edges)
    rng = np.random.default_rng(seed)
    start = len(edges) + 1
    used = np.bincount(np.concatenate(members), minlength=start)
    for j, k in enumerate(np.argsort(-used, kind="stable")[:classes - start]):
        for m in members:
            m[(m == k) & (rng.random(len(m)) < 0.5)] = start + j
    coder = tables(hists, plain, members, classes, smoothing)
    bits = class_bits(hists, coder)
    history = [round(sum(float(np.take_along_axis(b, m[:, None], 1).sum()) for b, m in zip(bits, members)))]
    for _ in range(iterations):
        members = [b.argmin(1) for b in bits]
        history.append(round(sum(float(b.min(1).sum()) for b in bits)))
        coder = tables(hists, plain, members, classes, smoothing)
        bits = class_bits(hists, coder)
    return coder, history


def level_bits(hists: Histograms, coder: LatentCoder, level: int) -> float:
    """Latent bits of the blocks with the encoder's choice of classes (escapes' values and maps aside)."""
    one = LatentCoder(coder.freq[level:level + 1], coder.classes)
    return sum(float(b.min(1).sum()) for b in class_bits(hists, one))


def fit(codec: VariableRateCodec, edges: np.ndarray, classes: int, iterations: int, smoothing: float
        ) -> tuple[LatentCoder, dict]:
    """Class tables of every level, and the validation split's latent bits with them against the model's own."""
    latents = {split: [codec.latent(s.data) for s in load_split(SPLIT_FILE, split)] for split in ("train", "val")}
    freq, about = [], {"train_bits_start_end": {}, "val_bits_change": {}}
    for q in codec.qualities:
        coder, history = fit_level(*histograms(codec, latents["train"], q), edges, classes, iterations, smoothing, seed=q)
        freq.append(coder.freq[0])
        val, _ = histograms(codec, latents["val"], q)
        old = level_bits(val, codec.coder, codec.level(q))
        about["train_bits_start_end"][q] = history[:1] + history[-1:]
        about["val_bits_change"][q] = round(level_bits(val, coder, 0) / old - 1, 4)
    return LatentCoder(np.stack(freq), classes), about


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the shipped model whose tables are refitted")
    p.add_argument("--name", required=True, help="the new model id")
    p.add_argument("--edges", type=float, nargs="+", default=list(EDGES),
                   help="shares of nonzero integers where a channel's starting class changes")
    p.add_argument("--classes", type=int, default=CLASSES, help=f"table classes (at most {CLASSES})")
    p.add_argument("--iterations", type=int, default=ITERATIONS, help="rounds of choosing classes and counting tables")
    p.add_argument("--smoothing", type=float, default=SMOOTHING, help="pseudo-counts of the plain table in a class's")
    output_options(p)
    args = p.parse_args(argv)
    edges = np.asarray(args.edges, np.float64)
    if not len(edges) < args.classes <= CLASSES or np.any(np.diff(edges) <= 0) or edges[0] <= 0 or edges[-1] >= 1:
        raise SystemExit(f"--edges must be increasing shares in (0, 1), fewer than --classes ({args.classes}, "
                         f"at most {CLASSES})")
    t0 = time.time()
    src = model_dir(args.model)
    codec = VariableRateCodec(src, kernels="fp32")
    coder, about = fit(codec, edges, args.classes, args.iterations, args.smoothing)
    out, card = derived_folder(src, args.name, args.out)
    with np.load(src / TABLES_FILE) as z:
        extra = {k: z[k] for k in z.files if k not in ("freq", "precision", "escape", "class_edges", "classes")}
    coder.save(out, **extra)
    card["format_version"] = max(card["format_version"], stream_format.CLASS_VERSION)   # series dates 6
    card["description"] = (f"{card['description']} {args.name}: {args.model}'s networks with class tables "
                           f"(training.fit_classes) fitted for the encoder's choice: the same integers and "
                           f"pixels, smaller files.")
    coder_text = card["latent"]["coder"].split("; per block,")[0]
    card["latent"]["coder"] = (f"{coder_text}; per block, each channel coded with the one of {coder.classes} "
                               f"table classes that codes it in the fewest bits (the encoder's choice, in the "
                               f"stream's channel map)")
    card["class_tables"] = {
        "command": f"python -m training.fit_classes --model {args.model} --name {args.name} "
                   f"--edges {' '.join(f'{e:g}' for e in edges)} --classes {args.classes} "
                   f"--iterations {args.iterations} --smoothing {args.smoothing:g}",
        "classes": coder.classes, "start_edges": edges.tolist(), "iterations": args.iterations,
        "smoothing": args.smoothing, "from": args.model, **about,
        "wall_time_s": round(time.time() - t0, 1), "cpu": cpu_name()}
    _record_files(card, out, {"latent_model": TABLES_FILE})
    return write_card(card, out, not args.no_figures)


if __name__ == "__main__":
    main()
