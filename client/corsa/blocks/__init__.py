"""The block-by-block data path of the CLI: compress, decompress, render and classify a product
block by block over the services' own windows."""
