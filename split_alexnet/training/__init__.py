"""Training the paper's way. One training step's path through these modules:

    command.py      split_alexnet.train: flags -> announce -> plan, or train -> result
    options.py      the command line and TOML files -> TrainConfig + Command (the switches)
    config.py       TrainConfig: the run's settings in sections, each field's rules in its
                    metadata, checked once when made
    recipes.py      the named recipes and presets, as data, and their one formatter
    trainer.py      Trainer: setup, fit (the epochs, evaluation and schedule, the ten-crop
                    test), save; StopReason and TrainResult in state.py
    setup.py        the parts built before the first step: data, network, optimizer
    distributed.py  this process's rank and devices; DDP's collectives (torchrun)
    state.py        Position, RunData, StopReason, TrainResult: the run's plain data
    runfolder.py    the run folder: its lock, fresh start or --overwrite, config.json, stale
                    temporaries, the settings a resume must share with its checkpoint
    loader.py       the epoch's batches (and the line naming a dead worker's files)
    loop.py         train_epoch: batch -> finish_batch -> model -> loss -> backward ->
                    optimizer step, the device read once per log interval; evaluate
    optim.py        the paper's SGD and learning-rate schedule
    finetune.py     --init-from, --reinit, --freeze-through, --lr-mult-new
    plan.py         --plan: a few real steps in a scratch folder, projected
    metrics.py      metrics.jsonl (writer and reader), curves.png, the watchdog
    checkpoint.py   the run's save and resume (the file format: utils/checkpoint_file.py)
"""
