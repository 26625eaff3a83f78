"""The pipelines under the entry points: train (the training loop and best.pth selection), infer
and evaluate."""
