__version__ = "0.1.0"

def __getattr__(name):
    "`nbtrain.train` and `nbtrain.Trainer`, imported on first use: `import nbtrain` stays light (no Lightning, no datasets)."
    if name in ('train', 'Trainer'):
        from nbtrain import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'nbtrain' has no attribute {name!r}")
