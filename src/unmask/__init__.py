"""unmask: masked diffusion language models (MDLM) with an autoregressive baseline."""

__version__ = "0.1.0"
