"""Trainers of the per-layer neuron-activation predictors (the predictor model: hybrid_runtime/predictor.py), scikit-learn baselines, metrics, the sample store."""
