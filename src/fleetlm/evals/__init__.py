"""Benchmarks behind `fleet eval`: HumanEval, GSM8K and the task suite, on our engine, llama.cpp or a URL."""
