"""Training a LoRA style adapter: the recipe (``recipe.py``), the phases it calls (``phases.py``), where their
batches and latents come from (``sources.py``), the maths of a step (``steps.py``), its options (``config.py``) and
resumable checkpoints (``checkpoints.py``).

    difflora train --config samples/style.yaml
    python -m difflora.train --data samples/pixel-sunsets --steps 200 --output outputs/pixsun
    accelerate launch -m difflora.train --config cfg.yaml           # any number of processes / GPUs
    torchrun --nproc_per_node 2 -m difflora.train --config cfg.yaml  # CPU data parallel (gloo)
"""

from .config import TrainConfig, config_from_args, make_config
from .recipe import TrainingDiverged, TrainingResult, main, train

__all__ = ["TrainConfig", "TrainingDiverged", "TrainingResult", "config_from_args", "main", "make_config", "train"]
