"""The parts of scripts/bench.py, which parses the command line and runs the scenarios in order.

    processes.py   start and stop a process group; ports; the CPU and RSS a group costs (Target)
    upstreams.py   the upstreams: the mock (one process or several on one port), the replay
    proxies.py     nginx, the naive relay and the gateway as the bench configures them; Redis
    targets.py     the four targets every scenario calls (Bench), started and warmed up
    clients.py     the load clients: scripts/loadtest.py and wrk, one run each
    rounds.py      rounds interleaved in turn, and medians over them
    scenarios/     one module per ``--only`` name
    table.py       the summary as one Markdown table

Imported with scripts/ on ``sys.path`` (scripts/bench.py puts it there), as scripts/loadtest.py
is, which stays a command of its own.
"""
