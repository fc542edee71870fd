"""tunebook: numbered notebooks + this small library for supervised fine-tuning of a small LLM for one task.

One module per stage: data (01), train (02), quantize (03), generate/evaluate/metrics (04), analysis/report/browser (05);
config (the params schema), runs (the run folder and its manifest), models (base model loading), cli.
"""

import logging

from tunebook.errors import TunebookError

# Noise, not news, on every import of torchao (03's int8 copies, 04 scoring them): a warning per GPU kernel library
# it cannot load (all of them on a CPU), and torch's deprecation notes on torchao's enums (torch.utils._pytree).
for noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(noisy).setLevel(logging.ERROR)

__all__ = ["TunebookError"]
__version__ = "0.1.0"
