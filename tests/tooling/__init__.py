"""The tools around the package: CLI, demo, examples, packaging, first use, the benchmark harness."""
