"""The training workflow behind `lorakit train`: config -> data -> loop -> checkpoints, metrics, plot.

    from lorakit.train import load_config, train
    result = train(load_config("examples/tiny_llama_instruction.yaml"))
"""

from lorakit.train.config import TrainConfig, load_config
from lorakit.train.records import DataError


def __getattr__(name: str):
    # the loop pulls in transformers; import it only when asked for
    if name in ("train", "Trainer", "RunResult", "TrainingDivergedError", "Reporter"):
        from lorakit.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'lorakit.train' has no attribute {name!r}")


__all__ = ["DataError", "Reporter", "RunResult", "TrainConfig", "Trainer", "TrainingDivergedError",
           "load_config", "train"]
