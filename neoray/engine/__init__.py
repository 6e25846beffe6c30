"""The worker side: the training function every runner calls (Ray Train worker, Tune trial, plain process),
its state, steps, optimiser and schedule, EMA, guards, hooks, seeding, and the ``score`` every epoch is
ranked by."""
