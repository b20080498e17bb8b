"""Training: one config file, one recipe, from a CPU to a cluster (via accelerate)."""

from radgrounder.training.config import TrainConfig, load_config
from radgrounder.training.recipe import TrainResult, evaluate, train

__all__ = ["TrainConfig", "TrainResult", "evaluate", "load_config", "train"]
