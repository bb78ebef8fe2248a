"""Recipes: one readable program per task (train, evaluate, merge)."""
