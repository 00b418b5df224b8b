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
from importlib import import_module

__version__ = "0.1.0"

# Batch invariance on CPUs: Intel's MKL computes a small matrix product with other kernels than a large
# one, so a row's logits depended on how many rows shared the forward (by ~1e-8, enough to flip a tie and
# give a request other tokens alone than batched). MKL's strict reproducibility mode computes each row the
# same way whatever the number of rows (and threads). MKL reads it at its first call, so it is set when
# unmask is imported; a user's own MKL_CBWR is kept (MKL_CBWR=AUTO: MKL's fastest kernels, 1.5-3x faster
# single-row products on Intel CPUs, without the guarantee). Docs: "Guarantees" and the results page
# "BLAS mode" (docs/results/blas-mode.md).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# the public names and their modules, imported at the first use of any of them (PEP 562): `import unmask`
# loads nothing heavy, so that the command line (`unmask.__main__`) can set process-wide options before
# torch loads; the first use loads the whole API at once, with every registry that declares config choices
_API = {"FAMILIES": "families", "SAMPLERS": "samplers.registry", "Generation": "pipeline", "LoadedModel": "pipeline",
        "RunConfig": "config", "evaluate": "eval.runs", "from_pretrained": "pipeline", "generate": "pipeline",
        "load_config": "config", "rl_train": "train.rl", "train": "train.loop"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'unmask' has no attribute {name!r}")
    for public, module in _API.items():
        globals()[public] = getattr(import_module(f".{module}", __name__), public)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
