"""Calibration passes over a model: per-weight importance for weighted k-means, the measured
damage of each (layer, bits) choice, and the bit allocation that meets a budget."""
