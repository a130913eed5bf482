"""Load client: workloads (random, ShareGPT), metrics, result files and plots."""
