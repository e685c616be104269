"""Two-stage training (`train(config, stage)`), run folders and device strategy; TensorFlow loads on first use."""


def train(config, stage, init=None, callbacks=(), log=print):
    """See `cxrkeras.training.trainer.train` (imported lazily so `import cxrkeras.training` stays light)."""
    from cxrkeras.training.trainer import train as _train

    return _train(config, stage, init=init, callbacks=callbacks, log=log)


def best_model_path(run_dir):
    from cxrkeras.training.rundir import best_model_path as _best

    return _best(run_dir)
