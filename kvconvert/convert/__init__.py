"""Conversion stages: load a source, build the CLLA model, export it."""
