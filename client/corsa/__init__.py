"""corsa: learned compression of Sentinel-2 L2A for openEO, by layer (imports run downwards):
app -> blocks -> openeo -> formats -> codec -> core."""
