"""The method as plain PyTorch functions: no Ray import here, so every stage runs and tests on one CPU process."""
