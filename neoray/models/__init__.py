"""Detectors behind one interface; see build_model in neoray.models.registry."""
