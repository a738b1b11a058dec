"""Training: what ``python -m ugd.train`` (``ugd/train.py``) is built from.

    trainer       UGDTrainer (transformers.Trainer for UGDModel), UGD checkpoints while training
    metrics       ACC, AUC, macro-F1, confusion matrix
    checks        argument checks made before anything is built (output folder, step counts, label gaps)
    signals       StopOnSignal: SIGTERM -> checkpoint, then exit 143
    resume_check  which checkpoint to resume from, refused when it belongs to another model
    presets       named argument sets (demo.yaml, paper.yaml)
"""
