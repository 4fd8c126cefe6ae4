#!/usr/bin/env bash
# corsa4.1 from corsa4b in one command: its decoder trained on, then the tools that lifted corsa3.6 to
# corsa3.12 (a dead zone, class tables, each block's refinement and loop filter), then its int8 decoder
# and its figures. The steps between live under runs/corsa4.1-chain (not shipped); 62 min here (AMD EPYC, 2 cores).
#   bash scripts/train_corsa4.1.sh     (run again, it goes on from the decoder's last checkpoint in runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
export OPENBLAS_NUM_THREADS=1 PYTHONPATH=.:client:udf
py=.venv/bin/python
chain=runs/corsa4.1-chain
mkdir -p "$chain"

# 1. The decoder trained on (encoder, gains and integer tables frozen), the high levels drawn more often.
$py -m training.train_decoder --model corsa4b --name corsa4b-dec --steps 8000 --batch 16 --crop 64 --lr 0.0001 \
    --bright 0.25 --snow 0.1 --water 0.1 --tilt 2 --threads 1 --seed 0 --bf16
$py -m training.train_decoder --model corsa4b --name corsa4b-dec --export --out "$chain" --no-figures
# 2. The encoder's dead zone, chosen on the validation split.
$py -m benchmarks.deadzone --model "$chain/corsa4b-dec" --split val --card --out "$chain/deadzone_val.json"
# 3. 15 class tables fitted for the encoder's choice.
$py -m training.fit_classes --model "$chain/corsa4b-dec" --name corsa4b-cls --out "$chain" --classes 15 --no-figures
# 4. Each block's refinement (16 px cells; levels 10-12: 24, 16, 16 DN, within 0.01 dB of 16-32 / 16-24 / 12-24
#    on the validation split, measured before the decoder's training), then its loop filter across the bands,
#    weighed against its bits.
$py -m training.fit_refine --model "$chain/corsa4b-cls" --name corsa4b-ref --out "$chain" \
    --steps 96 96 96 96 64 48 48 32 32 24 16 16 --no-figures
$py -m training.fit_refine --model "$chain/corsa4b-ref" --name corsa4.1 --filter 2 --cross 1 --weigh \
    --filter-levels 2 3 4 5 6 7 8 9 10 11 12
# 5. Its int8 decoder (and the levels it decodes), its gains over JPEG 2000 / JPEG XL in its card.
$py -m training.train_int8 --model corsa4.1 --steps 2000 --lr 0.0001 --threads 2 --seed 0
$py -m benchmarks.rd_rate --model corsa4.1 --threads 1 --card --out benchmarks/results/rd_rate_corsa4.1.json
