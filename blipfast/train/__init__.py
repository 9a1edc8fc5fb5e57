"""BLIP pre-training under DeepSpeed ZeRO: `deepspeed [--num_gpus N] train.py --config configs/X.yaml`.

config.py (run YAML -> RunConfig, DeepSpeed JSON filled in), schedule.py (the original's lr and
alpha schedules, AdamW groups), momentum.py (fp32 EMA encoders and queues outside the engine),
trainer.py (the loop), checkpoint.py (atomic save / resume), export.py (plain weights),
evaluate.py (held-out recall, captions), logging.py (metrics, TensorBoard, throughput, MFU).
Submodules import deepspeed lazily: `import blipfast.train` does not need it.
"""
