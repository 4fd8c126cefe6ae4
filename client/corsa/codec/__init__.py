"""The codec: model cards and onnxruntime sessions, quantisation, and the entropy coders of
the latent integers (variable-rate models) and of codebook indices (corsa512)."""
