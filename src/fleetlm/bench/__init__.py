"""Benchmarks: decode speed of our engine against transformers and llama.cpp, and memory bandwidth."""
