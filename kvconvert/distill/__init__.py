"""Distillation (uptraining): the CLLA student learns from its source, the teacher (KL on logits)."""
