"""What every layer shares: the canonical scene, quality measures, safe writing, progress, and where
block work runs (local threads or a dask cluster)."""
