"""Training: what ``python -m ugd.train`` (``ugd/train.py``) is built from.

    args          the arguments (ModelArguments, DataArguments, UGDArguments), parse_args and their precedence
    build         the data and the model of a run: load_data, build_model, apply_lora
    trainer       UGDTrainer (transformers.Trainer for UGDModel), UGD checkpoints while training
    curves        training_curves.png at the end of training
    metrics       ACC, AUC, macro-F1, confusion matrix
    checks        argument checks made before anything is built (output folder, step counts, label gaps)
    signals       StopOnSignal: SIGTERM -> checkpoint, then exit 143
    run_lock      the lock of a run folder: one trainer at a time in an --output_dir
    child_process child processes that die with their parent (ugd.study's trainers)
    resume_check  which checkpoint to resume from, refused when it belongs to another model
    presets       named argument sets (demo.yaml, paper.yaml)
"""
