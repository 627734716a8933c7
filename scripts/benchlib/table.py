"""The summary as Markdown tables, for a README or an issue: a row per measure, a column per
target, then the gateway against nginx (or over direct) and the target the row is held to
(issue 13's, from the load scenario's ``GOALS``, or the published figures of "On the Bench"
beside the field's); the layers scenario in a table of its own. One function per scenario's
rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .scenarios.field import MAX_FAILING
from .scenarios.layers import LONG_EVENTS, LONG_GAP_S
from .scenarios.load import CLIENT_LAG_LIMIT_MS, GOALS

# The published figures of "On the Bench", printed beside this run's added latency p99.
BENCH_REFERENCE = ("On the Bench, added latency p99: agentgateway 186 us, Bifrost 939 us, "
                   "Portkey 3.3 ms, LiteLLM 8.0 ms")
NAMES = ("direct", "nginx", "naive", "gateway")
PROXIES = NAMES[1:]
Row = list[str]


def _ms(v: float | None, signed: bool = False) -> str:
    if v is None:
        return ""
    digits = 3 if abs(v) < 0.1 else 2 if abs(v) < 10 else 1
    return f"{v:+,.{digits}f} ms" if signed else f"{v:,.{digits}f} ms"


def _cpu(v: float | None) -> str:
    return "" if v is None else f"{v:.3f} ms"


def _us(v: float | None, signed: bool = False) -> str:
    return "" if v is None else f"{v:+,.0f} us" if signed else f"{v:,.0f} us"


def _met(load: dict[str, Any], goal: str) -> str:
    return "met" if GOALS[goal].met(load) else "missed"


def _over(part: dict[str, Any], key: str, fmt: Callable[..., str]) -> Row:
    """The direct value, then each proxy's over direct."""
    return [fmt(part["direct"][key])] + [fmt(part[n]["over_direct"][key], True) for n in PROXIES]


def table(s: dict[str, Any]) -> str:
    """The summary as Markdown: measure | direct | nginx | naive | gateway | gateway vs nginx
    or over direct | target; then the layers scenario's table, when it ran."""
    rows: list[Row] = []
    if "load" in s:
        rows += _heavy_rows(s["load"]) + _light_rows(s["load"]) + _load_cpu_rows(s["load"])
        rows.append(_client_row(s["load"]["heavy"]))
    if "field" in s:
        rows += _field_rows(s["field"])
    if "workers_chunks_per_s" in s:
        rows += _workers_rows(s)
    if "cpu" in s:
        rows += _cpu_rows(s["cpu"])
    if "ttfb_ms" in s:
        rows += _ttfb_rows(s["ttfb_ms"])
    if "burst_chunks_per_s" in s:
        rows.append(_burst_row(s["burst_chunks_per_s"]))
    if "many" in s:
        rows.append(_many_row(s["many"]))
    if "sockets" in s:
        rows += _sockets_rows(s["sockets"])
    head = ["measure", *NAMES, "gateway vs nginx / over direct", "target"]
    lines = [f"Machine: {s['machine']}; limiter: {s['limiter']}; medians of {s['rounds']} "
             "rounds"]
    if rows:
        lines += ["", *markdown(head, rows)]
    if "layers" in s:
        lines += ["", *_layers(s["layers"])]
    return "\n".join(lines)


def _heavy_rows(load: dict[str, Any]) -> list[Row]:
    """The paced streams' latencies, each held to the gateway's distance from nginx."""
    h = load["heavy"]
    what = (f"{h['streams']} concurrent paced streams ({h['chunks']} chunks, "
            f"{h['chunk_delay_ms']:g} ms apart)")
    rows = []
    for key, label, goal in (("ttfb_p50_ms", f"{what}: TTFB p50", "heavy_ttfb_p50"),
                             ("ttfb_p99_ms", "same, TTFB p99", "heavy_ttfb_p99"),
                             ("stream_p99_ms", "same, whole-stream p99", "heavy_stream_p99")):
        rows.append([label, *_over(h, key, _ms),
                     f"gateway {_ms(h['gateway_minus_nginx'][key], True)} vs nginx",
                     f"within {GOALS[goal].at_most:g} ms of nginx: {_met(load, goal)}"])
    return rows


def _light_rows(load: dict[str, Any]) -> list[Row]:
    """The light load's latencies, each held to the gateway's distance from direct."""
    li = load["light"]
    rows = []
    for key, label, goal in (
            ("ttfb_p50_ms", f"light load ({li['streams']} streams): TTFB p50", "light_ttfb_p50"),
            ("ttfb_p99_ms", "light load, TTFB p99", "light_ttfb_p99")):
        rows.append([label, *_over(li, key, _ms),
                     f"gateway {_ms(li['gateway']['over_direct'][key], True)} over direct",
                     f"at most +{GOALS[goal].at_most:g} ms over direct: {_met(load, goal)}"])
    return rows


def _load_cpu_rows(load: dict[str, Any]) -> list[Row]:
    """CPU per stream of each proxy, paced and in one read, held to the gateway's ratio to
    nginx's; and Redis' CPU beside the gateway's."""
    h, o = load["heavy"], load["one_read"]
    paced, goal, one_read = GOALS["cpu_paced"], GOALS["cpu_paced_goal"], GOALS["cpu_one_read"]
    return [
        ["CPU per paced stream", "", *(_cpu(h[n]["cpu_ms_per_stream"]) for n in PROXIES),
         f"gateway {h['cpu_ratio_gateway_to_nginx']}x nginx",
         f"at most {paced.at_most:g}x nginx (goal {goal.at_most:g}x): "
         + _met(load, "cpu_paced")],
        [f"CPU per stream whose {o['chunks']} events arrive in one read", "",
         *(_cpu(o[n]["cpu_ms_per_stream"]) for n in PROXIES),
         f"gateway {o['cpu_ratio_gateway_to_nginx']}x nginx",
         f"at most {one_read.at_most:g}x nginx: " + _met(load, "cpu_one_read")],
        ["Redis CPU per stream (paced / one read), beside the gateway's", "", "", "",
         f"{_cpu(h['gateway']['redis_cpu_ms_per_stream'])} / "
         f"{_cpu(o['gateway']['redis_cpu_ms_per_stream'])}", "", ""],
    ]


def _client_row(h: dict[str, Any]) -> Row:
    """What the load client cost, and whether it lagged enough to be what limits the run."""
    lagged = max(h[n]["client_loop_lag_p99_ms"] for n in NAMES) > CLIENT_LAG_LIMIT_MS
    return [f"load client during the {h['streams']} streams ({h['client_processes']} "
            "processes): cores / loop lag p99",
            *(f"{h[n]['client_cores']} / {_ms(h[n]['client_loop_lag_p99_ms'])}" for n in NAMES),
            "", "the client lagged: its delays are in every column" if lagged
            else f"not what limits the run (lag p99 under {CLIENT_LAG_LIMIT_MS:g} ms)"]


def _field_rows(f: dict[str, Any]) -> list[Row]:
    """The figures of "On the Bench": added latencies, streams sustained, requests/s."""
    rows = []
    frames = f["inter_frame_us"]
    for part, label in (
            ("latency_c1_plain_us", "added latency, plain request, concurrency 1"),
            ("ttft_c1_us", "added time to first token, concurrency 1"),
            ("inter_frame_us", f"added inter-frame latency, {frames['streams']} streams paced "
                               f"at {frames['pacing_ms']:g} ms")):
        for q in ("p50", "p99"):
            key = f"{q}_us"
            rows.append([f"{label}: {q}", *_over(f[part], key, _us),
                         f"gateway {_us(f[part]['gateway_minus_nginx'][key], True)} vs nginx",
                         BENCH_REFERENCE if part.startswith("latency") and q == "p99" else ""])
    ss = f["streams_sustained"]
    rows.append([f"streams sustained (every frame, no gap over {ss['stall_ms']:g} ms, "
                 f"under {MAX_FAILING * 100:g} % failing)",
                 *(str(ss[n]) if ss[n] is not None else "under " + str(ss["ladder"][0])
                   for n in NAMES), f"ladder stopped by {ss['limited_by']}", ""])
    rp = f["requests_per_s_at_p99"]
    for bound in rp["bounds_ms"]:
        key = f"{bound:g}ms"
        rows.append([f"requests/s with p99 under {bound:g} ms ({rp['client']})",
                     *(f"{rp[n][key]:,}" if isinstance(rp[n][key], int) else rp[n][key]
                       for n in NAMES), "", ""])
    return rows


def _workers_rows(w: dict[str, Any]) -> list[Row]:
    """Burst throughput by worker count, the gateway's and nginx's, and the cores each used."""
    rows = []
    first = next(iter(w["workers_chunks_per_s"]))
    for label in w["workers_chunks_per_s"]:
        if label.startswith("ratio"):
            continue
        gc, nc = w["workers_cores_used"][label], w["workers_nginx_cores_used"][label]
        ratio = w["workers_chunks_per_s"].get(f"ratio_{label.split()[0]}_to_{first.split()[0]}")
        rows.append([f"bursts, {label}: chunks/s", "",
                     f"{w['workers_nginx_chunks_per_s'][label]:,}", "",
                     f"{w['workers_chunks_per_s'][label]:,}",
                     f"gateway {w['workers_gateway_to_nginx'][label]}x nginx"
                     + (f"; {ratio}x {first}" if ratio else ""),
                     f"cores: gateway {gc['proxy']} (upstream {gc['upstream']}, client "
                     f"{gc['client']}); nginx {nc['proxy']} (upstream {nc['upstream']}, "
                     f"client {nc['client']})"])
    return rows


def _cpu_rows(c: dict[str, Any]) -> list[Row]:
    return [["CPU per stream (scenario cpu)", "",
             *(_cpu(c[n]["cpu_ms_per_stream"]) for n in PROXIES),
             f"gateway {c['ratio_gateway_to_nginx']}x nginx", ""],
            ["peak RSS", "", *(f"{c[n]['peak_rss_mb']} MB" for n in PROXIES), "", ""]]


def _ttfb_rows(t: dict[str, Any]) -> list[Row]:
    return [[f"time to first byte, one stream at a time, {q}", _ms(t["direct"][q]),
             *(_ms(t[f"added_{n}"][q], True) for n in PROXIES), "", ""]
            for q in ("p50", "p99")]


def _burst_row(bc: dict[str, Any]) -> Row:
    return ["chunks/s, bursts", *(f"{bc[n]:,}" for n in NAMES),
            f"gateway {bc['ratio_gateway_to_nginx']}x nginx", ""]


def _many_row(m: dict[str, Any]) -> Row:
    return [f"{m['streams']:,} concurrent slow streams, one process", "", "", "",
            f"{m['ok']:,} ok, {m['errors']} failed, checksums "
            f"{'identical' if m['identical_checksums'] else 'DIFFER'}, "
            f"{m['kb_per_open_stream']} KB per open stream", "", ""]


def _sockets_rows(so: dict[str, Any]) -> list[Row]:
    """WebSocket mode: the gateway's CPU per socket turn beside per POST responses stream."""
    return [[f"CPU per Responses socket turn ({so['chunks']} deltas)", "", "", "",
             _cpu(so["cpu_ms_per_socket_turn"]),
             f"{so['ratio_socket_turn_to_stream']}x a POST responses stream", ""],
            [f"CPU per POST responses stream ({so['chunks']} deltas)", "", "", "",
             _cpu(so["cpu_ms_per_responses_stream"]), "", ""]]


LAYERS = ("nginx", "floor", "naive", "lean", "gateway_memory", "gateway")


def _layers(la: dict[str, Any]) -> list[str]:
    """Scenario layers as a table of its own: CPU per stream, and each layer's ratio to nginx."""
    head = ["CPU per stream (ratio to nginx)", "nginx", "floor (bare Python relay)", "naive",
            "lean (the gateway's work, no aiohttp)", "gateway, in-process limiter",
            "gateway, Redis limiter"]
    long = f"a long stream ({LONG_EVENTS - 2} events {LONG_GAP_S * 1000:g} ms apart)"
    rows = [[label, *(f"{_us(la[load][n]['cpu_us_per_stream'])} "
                      f"({la[load][n]['ratio_to_nginx']}x)" for n in LAYERS)]
            for load, label in (("one_event", "a stream of one event"),
                                ("one_read", "a stream of 100 events in one read"),
                                ("paced", "paced streams"),
                                ("long", long))]
    rows.append(["same, per event", *(f"{la['long'][n]['cpu_us_per_event']:.2f} us"
                                      for n in LAYERS)])
    return markdown(head, rows)


def markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: the head, the rule, a line per row."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows)]
