"""Train a LoRA style adapter (the same recipe as ``difflora train`` and ``python -m difflora.train``).

    accelerate launch train/train_lora.py --config samples/style.yaml
    torchrun --nproc_per_node 2 train/train_lora.py --config samples/style.yaml

The recipe reads top to bottom in ``difflora/train/recipe.py`` (its phases are in ``phases.py`` and
``sources.py``, its options in ``config.py``); this file only makes it launchable as a script.
"""

import sys

from difflora.train import main

if __name__ == "__main__":
    sys.exit(main())
