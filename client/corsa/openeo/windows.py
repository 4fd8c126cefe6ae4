"""The windows the services hand their UDF (apply_neighborhood's chunks and overlaps): facts the
process graphs (``corsa.openeo.processes``) and the block path that reproduces them
(``corsa.blocks``) share, importable without the openEO client.
"""
from __future__ import annotations

from corsa_udf import reach_overlap, refine_grid

# apply_neighborhood chunks: 512 px plus, on each side, the context that one mode's network
# reaches (receptive_radius_px in the shipped model cards: encoder 54, decoder 44, the variable-rate
# models' class heads 12, corsa512's classifier 2),
# rounded up to whole level-1 cells; a test checks them against the cards. Decompress needs only the
# decoder's reach, compress the encoder's (``compress_reach``: a refined model's UDF decodes the
# block too, 64 px for corsa3.9): the sum of the farthest (the cards' tile.overlap, 100 px) would
# nearly double the pixels each chunk runs through the network. Inside a chunk the UDF works in one
# piece.
CHUNK, UDF_TILE = 512, 1024
# render: the space head's reach (its card's reach_px, 11, plus one) in stored pixels, at up to
# RENDER_EXACT_SCALE output pixels per stored one.
RENDER_EXACT_SCALE = 8
OVERLAP = {"compress": 64, "decompress": 44, "classify": 12, "render": 96}


def compress_reach(card: dict) -> int:
    """How far a compress chunk reaches beyond its block: the encoder's reach; for a refined model
    (its card's "refine"), the decoder's on top, as the UDF decodes the block as the decoder will,
    rounded up to whole refinement cells, so that the chunk's cells are its block's."""
    reach, side = reach_overlap(card, "encoder"), refine_grid(card)
    if side is None:
        return reach
    return -(-(reach + reach_overlap(card, "decoder")) // side) * side
