"""Public losses, one file per family: the function (validation, spatial matching, backend
choice, reduction) and its nn.Module drop-in side by side."""
