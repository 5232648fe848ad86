"""Offline conversion: ProSparse fine-tuning, activation profiling, packing hybrid model dirs."""
