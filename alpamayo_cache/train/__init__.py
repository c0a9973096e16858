"""Stage 2: training. ``run(cfg)`` is the entry point (``loop``); ``setup`` resolves weights, scope and
optimizer, ``validation`` the held-out loss, ``checkpoints`` the run folder's lifecycle, ``plan`` the
memory and disk budget."""

from alpamayo_cache.configs import TrainConfig
from alpamayo_cache.train.loop import TrainResult, run
from alpamayo_cache.train.validation import validation_loss

__all__ = ["TrainConfig", "TrainResult", "run", "validation_loss"]
