"""Sweeps: Ray Tune + OptunaSearch + ASHA over the engine's training function."""
