"""Expert data: loading and tokenising datasets, noise augmentation, buffer rows, and the arithmetic task."""
