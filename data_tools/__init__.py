"""Preparation tools (the write side): ingest, synth, to-soma, inspect, validate."""
