"""Engine: the per-worker training function, optimisation, guards, checkpoints, COCO evaluation."""
