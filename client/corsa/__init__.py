"""corsa: learned compression of Sentinel-2 L2A for openEO, by layer (imports run downwards):
app -> blocks -> openeo -> formats -> codec -> core."""

import os

# GDAL caches the blocks of what it reads and writes, up to 5% of RAM by default (1.2 GB here):
# compressing a large scene grew by its input blocks, decompressing one by its output's, until
# that cap. Each block is read once or twice (the neighbours' overlap): a small cache costs no
# time (BENCHMARKS.md, scale). Set here, before any command's first GDAL call; a value the user set wins.
# A compress whose units read each block of its input several times raises it while it runs
# (``corsa.blocks.shared_ints.chunk_rows_cached``), unless the user set it.
GDAL_CACHE_MB = "128"
GDAL_CACHE_OURS = os.environ.setdefault("GDAL_CACHEMAX", GDAL_CACHE_MB) == GDAL_CACHE_MB
