#!/usr/bin/env python3
"""Renders a bench/run results JSON file as Markdown (the table bench/run prints).

    python3 bench/report.py bench/results/<date>-<scale>.json
"""
import json
import statistics
import sys

CONTENDERS = {
    "pg_cron": "pg_cron, CONCURRENTLY every minute",
    "mvrefresh_seedlike": "mvrefresh concurrently, quiet 5s / max_wait 1h (seed settings)",
    "mvrefresh_tuned": "mvrefresh concurrently, quiet 1s / max_wait 10s",
    "mvrefresh_incremental": "mvrefresh incremental, quiet 250ms / max_wait 1s",
    "mvrefresh_partitioned": "mvrefresh partitioned (no function), quiet 250ms / max_wait 1s",
    "mvrefresh_partitioned-serial": "mvrefresh partitioned as above, concurrency 1 (no parallel chunks)",
    "mvrefresh_logical": "mvrefresh incremental, quiet 250ms / max_wait 1s, logical capture (no trigger)",
}


def label(contender):
    """A contender's description; a baseline contender (`<twin>-base`) is its twin's."""
    if contender.endswith("-base") and contender[:-5] in CONTENDERS:
        return CONTENDERS[contender[:-5]] + ", baseline build"
    return CONTENDERS.get(contender, contender)


SCENARIOS = {"burst": "bursts of 50 / 20 s", "steady2": "steady 2/s", "steady20": "steady 20/s"}


def s(v, nd=2):
    return "–" if v is None else f"{v:.{nd}f}"


def main(path):
    r = json.load(open(path))
    d = r["data"]
    m = r["machine"]
    out = []
    p = out.append
    p(f"### Results: {d['submissions']:,} submissions, {d['challenges']} challenges, {d['agents']:,} agents")
    p("")
    p(f"`{r['command']}` — started {r['started']}, {r['wall_s'] / 60:.0f} min wall clock. "
      f"Machine: {m['nproc']} vCPU ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}, kernel {m['kernel']}, "
      f"PostgreSQL {m['postgresql']}, {m['rustc']}. Shared with other builds: figures are noisy; "
      f"every figure below comes from this one run, contenders measured one after the other on the same data.")
    p("")
    fr = d["full_refresh_s"]
    p(f"Data generated in {d['generate_s']:.0f} s. One full `REFRESH MATERIALIZED VIEW CONCURRENTLY "
      f"mv_lane_score_distribution`: {fr['concurrently']:.2f} s (non-concurrent populate {fr['populate']:.2f} s); "
      f"`analytics_refresh_lane_score_distribution(NULL)` {fr['incremental_all']:.2f} s, one challenge "
      f"{fr['incremental_one_challenge'] * 1000:.0f} ms (psql round trip included).")
    p("")
    du = r["durations"]
    p(f"**Freshness lag**, commit → visible (s), each event a scored submission with its own lane key, "
      f"the relation polled every 50 ms. Scenario length: {du['pg_cron_scenario_s']} s for pg_cron, "
      f"{du['mvrefresh_scenario_s']} s for mvrefresh, then up to 75/90 s for the last events to appear. "
      f"Refreshes = refresh statements executed (`pg_stat_statements`, during the scenario and its drain). "
      f"Daemon CPU and peak RSS (VmHWM) from /proc.")
    p("")
    p("| contender | scenario | events | p50 | p95 | p99 | max | not visible | refreshes | mean refresh ms | daemon CPU s/min | daemon peak RSS MB |")
    p("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for row in r["lag"]:
        refreshes = row["refresh_statements"]
        if row["contender"] == "pg_cron" and not refreshes:
            refreshes = f"{row['cron_runs']} (cron runs)"
        cpu = row.get("daemon_cpu_s_per_min")
        hwm = row.get("daemon_vmhwm_kb")
        p(f"| {label(row['contender'])} | {SCENARIOS.get(row['scenario'], row['scenario'])} "
          f"| {row['committed']} | {s(row['lag_p50_s'])} | {s(row['lag_p95_s'])} | {s(row['lag_p99_s'])} "
          f"| {s(row['lag_max_s'])} | {row['not_visible']} | {refreshes} | {s(row['refresh_mean_ms'], 0)} "
          f"| {s(cpu)} | {s(hwm / 1024 if hwm else None, 1)} |")
    p("")

    if "pgbench" in r:  # results of earlier versions of this script
        p("Write overhead: see the JSON (measured by this script in earlier versions).")
        p("")
    else:
        p("What the capture costs writers is measured by `bench/write-overhead` (its own run).")
        p("")

    fl = r.get("flood") or {}
    if fl:
        p("**Notification ingest** (daemon in incremental mode, idle otherwise): 200,000 NOTIFYs on "
          f"`submission_scored`, {fl['first']['connections']} connections, {fl['first']['keys']:,} distinct keys, "
          "batches of 1,000 per transaction, twice; rate = notifications counted by "
          "`mvrefresh_notifications_received_total` / time from the first send to the last one counted.")
        p("")
        p("| flood | sent in s | sender rate /s | received | ingest rate /s | daemon RSS after, MB |")
        p("|---|--:|--:|--:|--:|--:|")
        for name, f, rss in (("first", fl["first"], fl["rss_after_first_kb"]), ("second", fl["second"], fl["rss_after_second_kb"])):
            p(f"| {name} | {f['send_s']:.2f} | {f['send_per_s']:,.0f} | {f['received']:,.0f} | {f['ingest_per_s']:,.0f} | {rss / 1024:.1f} |")
        p("")
        p(f"Daemon RSS before the floods {fl['rss_before_kb'] / 1024:.1f} MB, after the first "
          f"{fl['rss_after_first_kb'] / 1024:.1f} MB, after the second {fl['rss_after_second_kb'] / 1024:.1f} MB; "
          f"peak (VmHWM) {fl['vmhwm_kb'] / 1024:.1f} MB.")
        p("")

    # Goals: figures side by side, never asserted.
    lag = {(x["contender"], x["scenario"]): x for x in r["lag"]}
    p("**Goals** (figures from this run, compared, not asserted)")
    p("")
    p("| goal | scenario | target | measured | met |")
    p("|---|---|--:|--:|---|")

    def yn(ok):
        return "–" if ok is None else ("yes" if ok else "no")

    for sc in SCENARIOS:
        inc = lag.get(("mvrefresh_incremental", sc), {}).get("lag_p99_s")
        cron = lag.get(("pg_cron", sc), {}).get("lag_p99_s")
        if cron is not None:
            target = min(cron / 30, 2.0)
            p(f"| incremental p99 ≤ min(pg_cron p99 / 30, 2 s) | {SCENARIOS[sc]} | {target:.2f} s | {s(inc)} s "
              f"| {yn(None if inc is None else inc <= target)} |")
    for sc in SCENARIOS:
        pt = lag.get(("mvrefresh_partitioned", sc), {}).get("lag_p99_s")
        cron = lag.get(("pg_cron", sc), {}).get("lag_p99_s")
        if pt is not None and cron is not None:
            target = min(cron / 30, 1.0)
            p(f"| partitioned p99 ≤ min(pg_cron p99 / 30, 1 s) | {SCENARIOS[sc]} | {target:.2f} s | {s(pt)} s "
              f"| {yn(pt <= target)} |")
    for sc in SCENARIOS:
        inc = lag.get(("mvrefresh_incremental", sc), {}).get("lag_p99_s")
        lg = lag.get(("mvrefresh_logical", sc), {}).get("lag_p99_s")
        if lg is not None and inc is not None:
            p(f"| logical p99 ≤ trigger (incremental) p99 + 100 ms | {SCENARIOS[sc]} | {inc + 0.1:.2f} s "
              f"| {s(lg)} s | {yn(lg <= inc + 0.1)} |")
    for sc in SCENARIOS:
        t = lag.get(("mvrefresh_tuned", sc), {})
        target = 10 + 2 * fr["concurrently"]
        v = t.get("lag_p99_s")
        p(f"| tuned concurrently p99 ≤ max_wait + 2 full refreshes | {SCENARIOS[sc]} | {target:.1f} s | {s(v)} s "
          f"| {yn(None if v is None else v <= target and not t.get('not_visible'))} |")
    hwm = [x["daemon_vmhwm_kb"] for x in r["lag"] if x.get("daemon_vmhwm_kb")]
    if fl:
        hwm.append(fl["vmhwm_kb"])
    if hwm:
        p(f"| daemon peak RSS ≤ 30 MB | whole run | 30 MB | {max(hwm) / 1024:.1f} MB | {yn(max(hwm) / 1024 <= 30)} |")
    for sc in ("steady20",):
        cpus = [(x["contender"], x["daemon_cpu_s_per_min"]) for x in r["lag"] if x["scenario"] == sc and "daemon_cpu_s_per_min" in x]
        for c, v in cpus:
            p(f"| daemon CPU (figure only) | {SCENARIOS[sc]}, {c} | – | {v:.2f} s/min | – |")
    if fl:
        rate = min(fl["first"]["ingest_per_s"], fl["second"]["ingest_per_s"])
        p(f"| ingest ≥ 20,000 notifications/s | flood | 20,000/s | {rate:,.0f}/s | {yn(rate >= 20000)} |")
    p("")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
