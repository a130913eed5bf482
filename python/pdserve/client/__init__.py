"""Load client: workloads (random, ShareGPT), metrics, result files and plots.

Programmatic entry points live in `pdserve.client.bench` (`BenchConfig`, `run_benchmark`,
`format_table`, `summary_line`, `write_result_json`, `load_result_json`); this package
imports nothing on its own so `import pdserve.client` stays cheap.
"""
