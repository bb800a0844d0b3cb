"""Compression: policy rules -> per-layer specs, fake-quant + N:M layers, packing, the
per-layer export codec and the export's on-disk format."""
