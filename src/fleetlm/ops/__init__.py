"""Running the gateway beyond one process: throwaway local services for tests and benchmarks."""
