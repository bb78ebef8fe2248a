"""Training steps shared by the recipes: arguments, callbacks, checkpoints, distribution."""
