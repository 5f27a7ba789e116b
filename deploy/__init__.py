"""deploy: launching and the command line.

Owns: `pdserve` and its subcommands (cli.py, serve_cli.py, bench_cli.py, status_cli.py), the
local multi-process launcher (local_launcher.py: `ServeConfig`, the proxy in-process and one
process per worker) and the Ray launcher (ray_*.py). It parses flags into config dataclasses
and passes them on whole; it holds no serving logic of its own.
"""
