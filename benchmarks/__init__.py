"""Benchmarks (no PyTorch needed, except for the rows that time or check against export's PyTorch
reference): ``accuracy`` (metrics, dataset layouts, Tables 1 and 2), ``latency`` (ms per image per
stage and backend, Table 7), ``paper`` (the published figures), ``stream_throughput`` and
``serve_throughput`` (frames and requests a second end to end; ``serve_environment`` and
``serve_process`` build and start the server that the serve benchmark and the serving tests use)
and ``device_check`` (what a machine's GPU runs)."""
