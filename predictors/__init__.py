"""Per-layer neuron-activation predictors (MLP x -> r -> f) and their trainers."""
