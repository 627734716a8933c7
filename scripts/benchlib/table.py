"""The summary as one Markdown table, for a README or an issue: a row per measure, a column per
target, then the gateway against nginx (or over direct) and the target the row is held to
(issue 13's, or the published figures of "On the Bench" beside the field's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

BENCH_REFERENCE = ("On the Bench, added latency p99: agentgateway 186 us, Bifrost 939 us, "
                   "Portkey 3.3 ms, LiteLLM 8.0 ms")


def _ms(v: float | None, signed: bool = False) -> str:
    if v is None:
        return ""
    digits = 3 if abs(v) < 0.1 else 2 if abs(v) < 10 else 1
    return f"{v:+,.{digits}f} ms" if signed else f"{v:,.{digits}f} ms"


def _cpu(v: float | None) -> str:
    return "" if v is None else f"{v:.3f} ms"


def _us(v: float | None, signed: bool = False) -> str:
    return "" if v is None else f"{v:+,.0f} us" if signed else f"{v:,.0f} us"


def _met(row: dict[str, Any]) -> str:
    return "met" if row["met"] else "missed"


def table(s: dict[str, Any]) -> str:
    """The summary as one Markdown table: measure | direct | nginx | naive | gateway |
    gateway vs nginx or over direct | target (issue 13, or the field's figures)."""
    names = ("direct", "nginx", "naive", "gateway")
    rows: list[list[str]] = []

    def over(part: dict[str, Any], key: str, fmt: Callable[..., str]) -> list[str]:
        return [fmt(part["direct"][key])] + [fmt(part[n]["over_direct"][key], True)
                                             for n in names[1:]]

    if "load" in s:
        h, li, o = s["load"]["heavy"], s["load"]["light"], s["load"]["one_read"]
        targets = {t["measure"]: t for t in s["load"]["targets"]}
        what = (f"{h['streams']} concurrent paced streams ({h['chunks']} chunks, "
                f"{h['chunk_delay_ms']:g} ms apart)")
        for key, label, limit, t in (
                ("ttfb_p50_ms", f"{what}: TTFB p50", 1, "heavy TTFB p50"),
                ("ttfb_p99_ms", "same, TTFB p99", 5, "heavy TTFB p99"),
                ("stream_p99_ms", "same, whole-stream p99", 10, "heavy whole-stream p99")):
            row = targets[f"{t}, gateway minus nginx (ms)"]
            rows.append([label, *over(h, key, _ms),
                         f"gateway {_ms(h['gateway_minus_nginx'][key], True)} vs nginx",
                         f"within {limit} ms of nginx: {_met(row)}"])
        for key, label, limit, t in (
                ("ttfb_p50_ms", f"light load ({li['streams']} streams): TTFB p50", 1,
                 "light TTFB p50"),
                ("ttfb_p99_ms", "light load, TTFB p99", 3, "light TTFB p99")):
            row = targets[f"{t}, gateway over direct (ms)"]
            rows.append([label, *over(li, key, _ms),
                         f"gateway {_ms(li['gateway']['over_direct'][key], True)} over direct",
                         f"at most +{limit} ms over direct: {_met(row)}"])
        rows.append(["CPU per paced stream", "", *(_cpu(h[n]["cpu_ms_per_stream"])
                                                   for n in names[1:]),
                     f"gateway {h['cpu_ratio_gateway_to_nginx']}x nginx",
                     "at most 1.4x nginx (goal 1.25x): "
                     + _met(targets["CPU per paced stream, gateway / nginx"])])
        rows.append([f"CPU per stream whose {o['chunks']} events arrive in one read", "",
                     *(_cpu(o[n]["cpu_ms_per_stream"]) for n in names[1:]),
                     f"gateway {o['cpu_ratio_gateway_to_nginx']}x nginx",
                     "at most 2.5x nginx: "
                     + _met(targets["CPU per stream in one read, gateway / nginx"])])
        rows.append(["Redis CPU per stream (paced / one read), beside the gateway's", "", "", "",
                     f"{_cpu(h['gateway']['redis_cpu_ms_per_stream'])} / "
                     f"{_cpu(o['gateway']['redis_cpu_ms_per_stream'])}", "", ""])
        rows.append([f"load client during the {h['streams']} streams ({h['client_processes']} "
                     "processes): cores / loop lag p99",
                     *(f"{h[n]['client_cores']} / {_ms(h[n]['client_loop_lag_p99_ms'])}"
                       for n in names), "",
                     "the client lagged: its delays are in every column"
                     if max(h[n]["client_loop_lag_p99_ms"] for n in names) > 2
                     else "not what limits the run (lag p99 under 2 ms)"])
    if "field" in s:
        f = s["field"]
        for part, label, fmt in (
                ("latency_c1_plain_us", "added latency, plain request, concurrency 1", _us),
                ("ttft_c1_us", "added time to first token, concurrency 1", _us),
                ("inter_frame_us", f"added inter-frame latency, "
                 f"{f['inter_frame_us']['streams']} streams paced at "
                 f"{f['inter_frame_us']['pacing_ms']:g} ms", _us)):
            for q in ("p50", "p99"):
                key = f"{q}_us"
                rows.append([f"{label}: {q}", *over(f[part], key, fmt),
                             f"gateway {fmt(f[part]['gateway_minus_nginx'][key], True)} "
                             "vs nginx",
                             BENCH_REFERENCE if part.startswith("latency") and q == "p99"
                             else ""])
        ss = f["streams_sustained"]
        rows.append([f"streams sustained (every frame, no gap over {ss['stall_ms']:g} ms, "
                     "under 0.1 % failing)",
                     *(str(ss[n]) if ss[n] is not None else "under " + str(ss["ladder"][0])
                       for n in names), f"ladder stopped by {ss['limited_by']}", ""])
        rp = f["requests_per_s_at_p99"]
        for bound in rp["bounds_ms"]:
            key = f"{bound:g}ms"
            rows.append([f"requests/s with p99 under {bound:g} ms ({rp['client']})",
                         *(f"{rp[n][key]:,}" if isinstance(rp[n][key], int) else rp[n][key]
                           for n in names), "", ""])
    if "workers_chunks_per_s" in s:
        w = s
        for label in w["workers_chunks_per_s"]:
            if label.startswith("ratio"):
                continue
            gc, nc = w["workers_cores_used"][label], w["workers_nginx_cores_used"][label]
            first = next(iter(w["workers_chunks_per_s"]))
            n = label.split()[0]
            ratio = w["workers_chunks_per_s"].get(f"ratio_{n}_to_{first.split()[0]}")
            rows.append([f"bursts, {label}: chunks/s", "",
                         f"{w['workers_nginx_chunks_per_s'][label]:,}", "",
                         f"{w['workers_chunks_per_s'][label]:,}",
                         f"gateway {w['workers_gateway_to_nginx'][label]}x nginx"
                         + (f"; {ratio}x {first}" if ratio else ""),
                         f"cores: gateway {gc['proxy']} (upstream {gc['upstream']}, client "
                         f"{gc['client']}); nginx {nc['proxy']} (upstream {nc['upstream']}, "
                         f"client {nc['client']})"])
    if "cpu" in s:
        c = s["cpu"]
        rows.append(["CPU per stream (scenario cpu)", "",
                     *(_cpu(c[n]["cpu_ms_per_stream"]) for n in names[1:]),
                     f"gateway {c['ratio_gateway_to_nginx']}x nginx", ""])
        rows.append(["peak RSS", "", *(f"{c[n]['peak_rss_mb']} MB" for n in names[1:]), "", ""])
    if "ttfb_ms" in s:
        t = s["ttfb_ms"]
        for q in ("p50", "p99"):
            rows.append([f"time to first byte, one stream at a time, {q}", _ms(t["direct"][q]),
                         *(_ms(t[f"added_{n}"][q], True) for n in names[1:]), "", ""])
    if "burst_chunks_per_s" in s:
        bc = s["burst_chunks_per_s"]
        rows.append(["chunks/s, bursts", *(f"{bc[n]:,}" for n in names),
                     f"gateway {bc['ratio_gateway_to_nginx']}x nginx", ""])
    if "many" in s:
        m = s["many"]
        rows.append([f"{m['streams']:,} concurrent slow streams, one process", "", "", "",
                     f"{m['ok']:,} ok, {m['errors']} failed, checksums "
                     f"{'identical' if m['identical_checksums'] else 'DIFFER'}, "
                     f"{m['kb_per_open_stream']} KB per open stream", "", ""])
    head = ["measure", *names, "gateway vs nginx / over direct", "target"]
    lines = [f"Machine: {s['machine']}; limiter: {s['limiter']}; medians of {s['rounds']} "
             "rounds"]
    if rows:
        lines += ["", *_markdown(head, rows)]
    if "layers" in s:
        lines += ["", *_layers(s["layers"])]
    return "\n".join(lines)


LAYERS = ("nginx", "floor", "naive", "lean", "gateway_memory", "gateway")


def _layers(la: dict[str, Any]) -> list[str]:
    """Scenario layers as a table of its own: CPU per stream, and each layer's ratio to nginx."""
    head = ["CPU per stream (ratio to nginx)", "nginx", "floor (bare Python relay)", "naive",
            "lean (the gateway's work, no aiohttp)", "gateway, in-process limiter",
            "gateway, Redis limiter"]
    rows = [[label, *(f"{_us(la[load][n]['cpu_us_per_stream'])} "
                      f"({la[load][n]['ratio_to_nginx']}x)" for n in LAYERS)]
            for load, label in (("one_event", "a stream of one event"),
                                ("one_read", "a stream of 100 events in one read"),
                                ("paced", "paced streams"),
                                ("long", "a long stream (500 events 2 ms apart)"))]
    rows.append(["same, per event", *(f"{la['long'][n]['cpu_us_per_event']:.2f} us"
                                      for n in LAYERS)])
    return _markdown(head, rows)


def _markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows)]
