"""Training the paper's way. One training step's path through these modules:

    config.py       TrainConfig: every flag, validated (parse_config)
    trainer.py      main -> train(cfg): setup, then the epochs, then the ten-crop test
    distributed.py  this process's rank and devices; DDP's collectives (torchrun)
    state.py        Trainer: what one process holds, its Position, its stop (signals)
    runfolder.py    the run folder: its lock, fresh start or --overwrite, stale temporaries,
                    the settings a resume must share with its checkpoint
    loader.py       the epoch's batches (and the line naming a dead worker's files)
    loop.py         train_one_epoch: batch -> finish_batch -> model -> loss -> backward ->
                    optimizer step; evaluate
    optim.py        the paper's SGD and learning-rate schedule
    metrics.py      metrics.jsonl (writer and reader), curves.png, the watchdog
    checkpoint.py   save and resume, in files that survive anything
"""
