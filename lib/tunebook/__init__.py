"""tunebook: numbered notebooks + this small library for supervised fine-tuning of a small LLM for one task.

One folder per stage: dataset (01), training (02), quantizing (03), evaluation (04), analysis (05); the shared parts:
params (the schema), run (the run folder and its manifest), models, teacher, checks, scale (sweeps, rounds), sharing,
colab; and metrics, errors and cli here. README's code map names every module.
"""

import logging

from tunebook.errors import TunebookError

# Noise, not news, on every import of torchao (03's int8 copies, 04 scoring them): a warning per GPU kernel library
# it cannot load (all of them on a CPU), and torch's deprecation notes on torchao's enums (torch.utils._pytree).
for noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(noisy).setLevel(logging.ERROR)

__all__ = ["TunebookError"]
__version__ = "0.1.0"
