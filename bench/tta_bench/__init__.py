"""Benchmarks and their tools: `tta-bench accuracy | throughput | soak | ops | stream`.

The top layer of the repository: it may use the core (`adapters`), the test data (`tta_data`), the server
(`tta_server`) and the client SDK (`tta_client`); none of them imports it.
"""
