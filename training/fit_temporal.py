"""Fit a variable-rate model's temporal tables (``corsa.codec.latent_coder``, ``corsa.formats.series``) on the
revisit series of the train split, and add them to the model's folder and card.

    python -m training.fit_temporal --model corsa3

Counted as the coder will see them: each date of a series (after its group's key date) with the
reference every sub-block chooses. The choice needs tables, so a first count takes the previous
date as every cell's reference; a second count takes the choices those tables make. Rare contexts
lean on the stand-alone table of the same context; "no reference" is that table exactly.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from corsa.formats import series
from corsa.codec.models import VariableRateCodec, model_dir
from corsa.formats.datasets import load_split, revisit_series
from corsa.codec.latent_coder import REF_BUCKETS, CONTEXTS, ALPHABET, TEMPORAL_FILE_NAME, LatentCoder, context_counts

from .export import _record_files
from .export_rate import card_markdown
from .train import SPLIT_FILE


def _counts(codec: VariableRateCodec, ints: list[list[np.ndarray]], level: int, tables: LatentCoder | None) -> np.ndarray:
    counts = np.zeros((REF_BUCKETS * CONTEXTS, codec.channels, ALPHABET), np.int64)
    for dates in ints:
        planned = series.plan([f"{i:04d}" for i in range(len(dates))], [0] * len(dates), [])
        for i, p in enumerate(planned):
            if not p.candidates:
                continue
            if tables is None:
                ref, has = dates[i - 1], np.ones(dates[i].shape[1:], bool)
            else:
                _, ref, has = series.choose(tables, level, dates[i], [dates[j] for j in p.candidates])
            counts += context_counts(dates[i], ref, has)
    return counts


def fit(codec: VariableRateCodec, scenes) -> tuple[LatentCoder, dict]:
    runs = revisit_series(scenes)
    latents = [[codec.latent(s.data) for s in run] for run in runs]
    freq = []
    for q in codec.qualities:
        level = codec.level(q)
        ints = [[codec.quantise(y, q) for y in run] for run in latents]
        first = LatentCoder.temporal_from_counts(_counts(codec, ints, level, None)[None],
                                                 LatentCoder(codec.coder.freq[level:level + 1]))
        second = _counts(codec, ints, 0, first)
        freq.append(LatentCoder.temporal_from_counts(second[None], LatentCoder(codec.coder.freq[level:level + 1])).freq[0])
    about = {"series": len(runs), "dates": sum(len(r) for r in runs),
             "groups": sorted({f"{r[0].group}" for r in runs})}
    return LatentCoder(np.stack(freq)), about


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    args = p.parse_args(argv)
    folder = model_dir(args.model)
    codec = VariableRateCodec(folder)
    t0 = time.time()
    coder, about = fit(codec, load_split(SPLIT_FILE, "train"))
    coder.save(folder, TEMPORAL_FILE_NAME)
    card_path = folder / "model_card.json"
    card = json.loads(card_path.read_text())
    _record_files(card, folder, {"temporal_model": TEMPORAL_FILE_NAME})
    card["temporal"] = {
        "coder": "corsa.formats.series: a key date every key_every dates coded alone; the others with references to earlier "
                 "dates of their group, chosen per sub-block of 32 x 32 latent cells; corsa.codec.latent_coder temporal tables",
        "key_every": series.KEY_EVERY, "fitted_on": f"train split revisit series: {about}",
        "fit_seconds": round(time.time() - t0, 1)}
    card_path.write_text(json.dumps(card, indent=1))
    if all("test" in q for q in card["qualities"]):
        (folder / "MODEL_CARD.md").write_text(card_markdown(card))
    print(f"{folder / TEMPORAL_FILE_NAME}: {about}, {time.time() - t0:.0f} s")
    return folder


if __name__ == "__main__":
    main()
