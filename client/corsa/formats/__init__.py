"""Formats and products: the bytes of each product format, time series coded with references,
STAC documents, scene sources (GeoTIFF, NetCDF, STAC, the shared data) and a back end's job files."""
