"""Compression: policy rules -> per-layer specs, fake-quant + N:M layers, packing/export."""
