"""unmask: masked diffusion language models (MDLM) with an autoregressive baseline."""

from .config import RunConfig, load_config
from .diffusion import Autoregressive, MaskedDiffusion
from .model import DiT
from .schedules import make_schedule

__version__ = "0.1.0"
__all__ = ["RunConfig", "load_config", "MaskedDiffusion", "Autoregressive", "DiT", "make_schedule"]
