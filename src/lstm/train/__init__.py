"""Training on real data: `lstm train|evaluate|predict|generate`.

One module per job:
  files.py       find data files inside installed (pinned) packages, check their SHA-256
  splits.py      fixed, seeded train / validation / test splits
  text.py        tokenizer, word and character vocabularies (built from train only)
  datasets/      one module per dataset family (sentiment, charlm, forecast, vowels, synthetic)
  models.py      the models of each task, built from `lstm.layers`
  tasks.py       each task: its data, model, loss, metrics, baseline, predict
  baselines.py   the simple baselines the command reports beside the model
  checkpoint.py  safetensors weights + JSON config/state, written atomically (temp, fsync, rename)
  report.py      metrics.json and the learning-curve PNG
  distributed.py torchrun / DistributedDataParallel helpers (gloo on CPU, NCCL on GPU)
  loop.py        the training loop
"""


class TrainError(ValueError):
    """A user-facing error: the `lstm` command prints its message and exits non-zero."""
