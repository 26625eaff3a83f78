"""The data library: dataset layouts and split files, index building, image loading, sampler,
cache, checks and the demo dataset."""
