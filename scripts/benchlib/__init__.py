"""The parts of scripts/bench.py, which parses the command line and runs the scenarios in order,
and the harness scripts/bench_ab.py and scripts/bench_limiter.py share with it.

    processes.py   start and stop a process group; waiting for ports; the CPU and RSS a group
                   costs (Target)
    upstreams.py   the upstreams: the mock (one process or several on one port), the replay
    proxies.py     nginx, the relays and the gateway as the bench configures them; Redis
    relays/        the comparison relays (floor, naive, lean), programs of their own
    targets.py     the four targets every scenario calls (Bench), started and warmed up
    clients.py     the load clients: scripts/loadtest.py and wrk, one run each
    rounds.py      rounds interleaved in turn, and medians over them
    scenarios/     one module per ``--only`` name
    table.py       the summary as Markdown tables

No path edits: an entry point in scripts/ run as ``python3 scripts/NAME.py`` has scripts/ on
``sys.path`` already, so ``import benchlib`` and ``import loadtest`` (which stays a command of
its own) just work; the gateway is the installed package (``pip install -e .``), and a free
port comes from it (``gateway.mock.ports``), as the tests' do.
"""
