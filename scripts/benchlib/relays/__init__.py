"""The relays ``layers`` (and the naive one, every scenario) measure the gateway against: not
proxies to deploy, measuring sticks, each a program of its own that benchlib.proxies starts by
its path, with nothing of benchlib imported.

    floor.py   the least a relay in Python can do: uvloop protocols, bytes passed on as read
    naive.py   the usual relay written on aiohttp: a task switch per chunk
    lean.py    the gateway's own hot-path work, with its modules, on raw protocols
"""
