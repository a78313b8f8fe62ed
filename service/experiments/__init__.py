"""Experiments: a grid of training runs over hyperparameters, evaluated and compared."""
