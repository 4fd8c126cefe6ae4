"""Top levels made of a base level and a residual layer: a new model id whose levels above ``--base`` store the
base's integers and refinement, and per block the residual (input - the base's decoding) coded by JPEG 2000
(``corsa.codec.residual_coder``; formats 12 and 13), each band at the target that costs it least by the level's
lambda (squared error in DN² against bits).

    python -m training.layer_levels --model corsa4.1 --name corsa4.2 --base 9 --lambdas 3000 2000 1500

Nothing is trained: the networks, tables and refinement stay (the same files), so levels up to the base are the
source model's, byte for byte. The decoder saturates near the top (BENCHMARKS.md, issue 28, seventeenth part):
a wavelet coder's residual keeps gaining about 6 dB a bit where a finer latent adds hundredths of a dB
(twenty-third part: corsa4.1's level 9 with lambda 3000 / 2000 / 1500 gave CF 14.5 / 11.5 / 10.3 at +4.10 /
+3.95 / +3.86 dB over JPEG 2000 / JPEG XL on the test split, where its own levels 10-12 gave +3.26 / +2.56 /
+1.67 at CF 15.0 / 12.4 / 10.5). A new id, because the source's products at those levels are its own.
"""
from __future__ import annotations

import argparse
import time

from corsa.codec import residual_coder
from corsa.codec.models import VariableRateCodec, model_dir
from corsa.core.machine import cpu_name
from corsa.formats import stream_format

from .export_rate import derived_folder, output_options, write_card


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the shipped, refined model whose levels to build on")
    p.add_argument("--name", required=True, help="the new model id")
    p.add_argument("--base", type=int, required=True, help="the level every layered level stores")
    p.add_argument("--lambdas", type=float, nargs="+", required=True,
                   help="DN² a bit of each level above the base, in order (falling: each level better)")
    output_options(p)
    args = p.parse_args(argv)
    t0 = time.time()
    codec = VariableRateCodec(args.model)
    if not codec.refines(args.base):
        raise SystemExit(f"{args.model}: a layer goes on a refined level (formats 10 and 11), not level {args.base}")
    above = [q for q in codec.qualities if q > args.base]
    if len(args.lambdas) != len(above) or sorted(args.lambdas, reverse=True) != args.lambdas:
        raise SystemExit(f"--lambdas: one a level above {args.base} ({above}), falling")
    out, card = derived_folder(model_dir(args.model), args.name, args.out)
    for entry in card["qualities"]:
        if entry["quality"] in above:
            entry["lambda"] = card["qualities"][codec.level(args.base)]["lambda"]    # the integers' (the base's)
            entry["layer"] = {"base": args.base, "lambda": args.lambdas[above.index(entry["quality"])]}
    if card.get("int8"):      # a layered level decodes its base with the base's decoder; its figures were the source's
        card["int8"]["levels"] = [q for q in card["int8"]["levels"] if q not in above]
        for q in above:
            card["int8"]["test"]["levels"].pop(str(q), None)
    card["format_version"] = stream_format.LAYERED[stream_format.WITH_REFINEMENT[stream_format.CLASS_VERSION]]
    card["description"] = (f"{card['description']} {args.name}: {args.model}'s levels up to {args.base}; levels "
                           f"{above[0]}-{above[-1]} its level {args.base} with a residual layer a block "
                           f"(training.layer_levels): each band's residual coded by JPEG 2000 at the target that "
                           f"costs it least by the level's lambda.")
    card["candidate"] = (f"{args.model} with levels {above[0]}-{above[-1]} made of its level {args.base} and a residual "
                         f"layer (issue 28), for archives at high quality (--model {args.name}), not the default; its "
                         f"levels up to {args.base} are {args.model}'s, byte for byte. Gains over JPEG 2000 / JPEG XL: "
                         f"benchmarks/results/rd_rate_{args.name}.md")
    card["layer"] = {
        "command": f"python -m training.layer_levels --model {args.model} --name {args.name} --base {args.base} "
                   f"--lambdas {' '.join(f'{v:g}' for v in args.lambdas)}",
        "coder": "JPEG 2000 (OpenJPEG's fixed-quality mode through imagecodecs to encode; GDAL's JP2OpenJPEG to "
                 "decode), one codestream a band and block, the 20 m bands on their 2 x 2 means or the 10 m grid",
        "target": "where each band's squared error falls by lambda a bit (corsa.codec.residual_coder.target_db: "
                  + ", ".join(f"{v:g}: {residual_coder.target_db(v):.1f} dB" for v in args.lambdas)
                  + " against the 16-bit peak on the 10 m grid, 6 dB more on the 2 x 2 means)", "base": args.base,
        "levels": {str(q): v for q, v in zip(above, args.lambdas)},
        "from": args.model, "wall_time_s": round(time.time() - t0, 1), "cpu": cpu_name()}
    return write_card(card, out, not args.no_figures)


if __name__ == "__main__":
    main()
