"""Engine-agnostic core: scorers, layer-budget allocators, profiles, calibration, HF reference path."""
