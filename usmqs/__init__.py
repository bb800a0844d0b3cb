"""usmqs: quantization- and N:M-sparsity-aware fine-tuning of Conformer speech recognizers."""

__version__ = "0.1.0"
