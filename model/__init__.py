"""The model library: open_clip backbone, modality-aware model, its loss, optimiser groups,
checkpoint format and the authors' checkpoint converter."""
