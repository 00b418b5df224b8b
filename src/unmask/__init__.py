"""unmask: masked diffusion language models, with autoregressive and insertion baselines.

The Python API (the same operations as the ``unmask`` command)::

    import unmask

    cfg = unmask.load_config("quickstart", ["train.steps=200"])   # a packaged config or a YAML file
    checkpoint = unmask.train(cfg)                                 # the final checkpoint folder
    print(unmask.evaluate(checkpoint, max_sequences=64))           # eval.* settings as keywords
    lm = unmask.from_pretrained(checkpoint)                        # any model source
    print(unmask.generate(lm, ["ROMEO:"], num_samples=2).texts)    # sample.* settings as keywords
    lm.save_pretrained("exported")

``FAMILIES`` and ``SAMPLERS`` are the registries of model families and samplers.
"""

import os
import sys

# OpenMP threads that wait for work spin by default. On a machine where another process is busy, two
# spinning torch threads made a training step 2-3x slower than one thread; sleeping waits
# (PASSIVE) cost 5-30 % on an idle machine (benchmarks/threads.py, BENCHMARKS.md "Threads"). unmask
# picks the safe side: PASSIVE, unless the user chose a policy or spin count. OpenMP reads these once,
# when torch loads, so this takes effect only when unmask is imported first (always, for the CLI).
if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from .config import RunConfig, load_config
from .eval.runs import evaluate
from .families import FAMILIES
from .pipeline import Generation, LoadedModel, from_pretrained, generate
from .samplers.registry import SAMPLERS
from .train.loop import train
from .train.rl import rl_train

__version__ = "0.1.0"
__all__ = ["FAMILIES", "SAMPLERS", "Generation", "LoadedModel", "RunConfig", "evaluate", "from_pretrained",
           "generate", "load_config", "rl_train", "train"]
