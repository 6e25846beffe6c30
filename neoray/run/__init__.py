"""The driver side of a training run: what is settled before Ray starts (setup), the TorchTrainer that
runs the engine's training function (trainer), and the run directory it leaves behind (rundir)."""
