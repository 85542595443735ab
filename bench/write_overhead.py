#!/usr/bin/env python3
"""Helpers of bench/write-overhead (standard library only).

    write_overhead.py captures CONFIG          the [[capture]] tables of CONFIG, as TOML
    write_overhead.py channels CONFIG          their channels, one a line
    write_overhead.py pgbench-out FILE         pgbench's summary (stdout) as JSON
    write_overhead.py latency FILE...          per-transaction latencies of pgbench --log files, as JSON
    write_overhead.py waits PID URL DB OUT     sample the wait events of DB's active pgbench backends
                                               every 200 ms while process PID lives; counts to OUT
    write_overhead.py report JSON [--update]   the Markdown report of a results file (and, with
                                               --update, its "summary" written back into it)
"""
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time

try:
    import tomllib  # Python >= 3.11
except ImportError:  # pragma: no cover
    tomllib = None

UNSTABLE = 1.2  # max/min of a (workload, contender)'s rounds above this: flagged


# --- config ---------------------------------------------------------------------------------------
def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise ValueError(f"unsupported TOML value {v!r}")


def captures(path):
    if tomllib is None:  # copy the [[capture]] tables as they are written
        out, on = [], False
        for line in open(path):
            if re.match(r"^\s*\[", line):
                on = line.strip() == "[[capture]]"
            if on:
                out.append(line.rstrip("\n"))
        return "\n".join(out)
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    out = []
    for c in cfg.get("capture", []):
        out.append("[[capture]]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in c.items())
        out.append("")
    return "\n".join(out)


def channels(path):
    if tomllib is None:
        return "\n".join(dict.fromkeys(re.findall(r'^\s*channel\s*=\s*"([^"]+)"', captures(path), re.M)))
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    seen = []
    for c in cfg.get("capture", []):
        if c.get("channel") and c["channel"] not in seen:
            seen.append(c["channel"])
    return "\n".join(seen)


# --- pgbench --------------------------------------------------------------------------------------
def pgbench_out(path, err_path=None):
    text = open(path, errors="replace").read()
    err = open(err_path, errors="replace").read() if err_path and os.path.exists(err_path) else ""

    def num(pattern, cast=float):
        m = re.search(pattern, text, re.M)
        return cast(m.group(1)) if m else None

    return {
        "tps": num(r"^tps = ([0-9.]+)"),
        "transactions": num(r"^number of transactions actually processed: (\d+)", int),
        "failed": num(r"^number of failed transactions: (\d+)", int) or 0,
        "latency_avg_ms": num(r"^latency average = ([0-9.]+) ms"),
        "latency_stddev_ms": num(r"^latency stddev = ([0-9.]+) ms"),
        "schedule_lag_avg_ms": num(r"^rate limit schedule lag: avg ([0-9.]+)"),
        "aborted": len(re.findall(r"client \d+ aborted", err)),
    }


def pct(sorted_vals, p):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(-(-p * len(sorted_vals) // 100)) - 1))
    return sorted_vals[k]


WARMUP_S = 2.0  # latency "after warm-up" leaves out transactions scheduled in a run's first seconds


def latency(paths):
    rows, failed = [], 0
    for p in paths:
        for line in open(p):
            f = line.split()
            # client_id transaction_no time script_no time_epoch time_us [schedule_lag [retries]]
            if len(f) < 6:
                continue
            if not f[2].isdigit():  # "failed" / "skipped"
                failed += 1
                continue
            us = int(f[2])  # with --rate measured from the scheduled start
            end = int(f[4]) + int(f[5]) / 1e6
            lag = int(f[6]) / 1000.0 if len(f) >= 7 and f[6].isdigit() else None
            rows.append((end - us / 1e6, us / 1000.0, lag))
    t0 = min((r[0] for r in rows), default=0.0)
    lat = sorted(r[1] for r in rows)
    lag = sorted(r[2] for r in rows if r[2] is not None)
    steady = sorted(r[1] for r in rows if r[0] - t0 >= WARMUP_S)
    return {
        "transactions": len(lat),
        "failed": failed,
        "mean_ms": statistics.fmean(lat) if lat else None,
        "p50_ms": pct(lat, 50),
        "p90_ms": pct(lat, 90),
        "p99_ms": pct(lat, 99),
        "p999_ms": pct(lat, 99.9),
        "max_ms": lat[-1] if lat else None,
        "schedule_lag_p50_ms": pct(lag, 50),
        "schedule_lag_p99_ms": pct(lag, 99),
        "warmup_s": WARMUP_S,
        "steady_transactions": len(steady),
        "steady_p50_ms": pct(steady, 50),
        "steady_p99_ms": pct(steady, 99),
    }


# --- wait events ----------------------------------------------------------------------------------
def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def waits(pid, url, db, out, interval=0.2):
    q = ("SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity "
         "WHERE datname = '%s' AND application_name = 'pgbench' AND state = 'active' "
         "AND pid <> pg_backend_pid();\n\\echo __end__\n") % db.replace("'", "''")
    counts, samples, backends = collections.Counter(), 0, 0
    p = subprocess.Popen(["psql", url, "-X", "-A", "-t", "-q"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    try:
        while alive(pid):
            p.stdin.write(q)
            p.stdin.flush()
            for line in p.stdout:
                line = line.strip()
                if line == "__end__":
                    break
                if line:
                    counts[line] += 1
                    backends += 1
            samples += 1
            time.sleep(interval)
    except (BrokenPipeError, OSError):
        pass
    finally:
        try:
            p.stdin.close()
        except OSError:
            pass
        p.wait(timeout=10)
    with open(out, "w") as f:
        json.dump({"samples": samples, "backend_samples": backends, "events": dict(counts.most_common())}, f)


# --- report ---------------------------------------------------------------------------------------
def f(v, nd=0):
    return "–" if v is None else f"{v:,.{nd}f}"


def summarize(r):
    """Medians, ratios and flags per (condition, workload, contender) and per latency contender."""
    groups = collections.defaultdict(list)
    for x in r["runs"]:
        groups[(x["condition"], x["workload"], x["contender"])].append(x)
    rows = []
    for (cond, wl, c), xs in groups.items():
        tps = [x["tps"] for x in xs if x.get("tps")]
        waits = collections.Counter()
        backend_samples = 0
        for x in xs:
            w = x.get("waits") or {}
            waits.update(w.get("events", {}))
            backend_samples += w.get("backend_samples", 0)
        row = {
            "condition": cond, "workload": wl, "contender": c,
            "rounds_tps": [x.get("tps") for x in sorted(xs, key=lambda x: x["round"])],
            "median_tps": statistics.median(tps) if tps else None,
            "spread": (max(tps) / min(tps)) if len(tps) > 1 and min(tps) > 0 else None,
            "failed": sum(x.get("failed") or 0 for x in xs),
            "aborted": sum(x.get("aborted") or 0 for x in xs),
            "pgbench_errors": [f"round {x['round']}: pgbench exit {x['pgbench_exit']}: {(x.get('stderr') or '').strip()[:300]}"
                               for x in xs if x.get("pgbench_exit")],
            "waits_top": [[k, v / backend_samples] for k, v in waits.most_common(4)] if backend_samples else [],
            "wait_backend_samples": backend_samples,
        }
        row["unstable"] = row["spread"] is not None and row["spread"] > UNSTABLE
        if wl == "bulk":
            rws = [x.get("rows_per_statement") for x in xs if x.get("rows_per_statement")]
            row["rows_per_statement"] = rws[0] if rws else None
        refr = [x["daemon"]["refreshes"] for x in xs if x.get("daemon") and x["daemon"].get("refreshes") is not None]
        if refr:
            row["daemon_refreshes_median"] = statistics.median(refr)
            row["daemon_refreshes"] = refr
            row["daemon_failed_refreshes"] = sum(x["daemon"].get("failed_refreshes") or 0 for x in xs if x.get("daemon"))
            row["daemon_cpu_s"] = [x["daemon"].get("cpu_s") for x in xs if x.get("daemon")]
            dec = [x["daemon"].get("decoder_cpu_s") for x in xs if x.get("daemon") and x["daemon"].get("decoder_cpu_s") is not None]
            if dec:
                row["decoder_cpu_s"] = dec
                txns = [x["tps"] * r["settings"]["secs"] for x in xs if x.get("tps")]
                if txns and sum(txns):
                    row["decoder_us_per_txn"] = sum(dec) * 1e6 / sum(txns)
        wal = [(x["wal_bytes"], x["tps"] * r["settings"]["secs"]) for x in xs if x.get("wal_bytes") is not None and x.get("tps")]
        if wal and sum(t for _, t in wal):
            row["wal_bytes_per_txn"] = sum(b for b, _ in wal) / sum(t for _, t in wal)
        dirty = [(x["dirty_rows"], x["tps"] * r["settings"]["secs"]) for x in xs if x.get("dirty_rows") is not None and x.get("tps")]
        if dirty and sum(t for _, t in dirty):
            row["dirty_per_1000_txn"] = 1000 * sum(d for d, _ in dirty) / sum(t for _, t in dirty)
        rows.append(row)
    base = {(x["condition"], x["workload"]): x["median_tps"] for x in rows if x["contender"] == "none"}
    for x in rows:
        b = base.get((x["condition"], x["workload"]))
        x["ratio_to_none"] = x["median_tps"] / b if b and x["median_tps"] else None
        if x["workload"] == "bulk" and x.get("rows_per_statement") and x["median_tps"]:
            x["rows_per_s"] = x["median_tps"] * x["rows_per_statement"]
            x["us_per_row"] = 1e6 / x["rows_per_s"]
    for x in rows:
        if x["workload"] == "bulk" and x.get("us_per_row"):
            n = next((y for y in rows if y["condition"] == x["condition"] and y["workload"] == "bulk"
                      and y["contender"] == "none" and y.get("us_per_row")), None)
            x["extra_us_per_row"] = x["us_per_row"] - n["us_per_row"] if n else None

    lat = collections.defaultdict(list)
    for x in r.get("latency_runs", []):
        lat[x["contender"]].append(x)
    lrows = []
    for c, xs in lat.items():
        xs.sort(key=lambda x: x["round"])
        p50 = [x["latency"]["p50_ms"] for x in xs if x["latency"]["p50_ms"] is not None]
        p99 = [x["latency"]["p99_ms"] for x in xs if x["latency"]["p99_ms"] is not None]
        sp50 = [x["latency"]["steady_p50_ms"] for x in xs if x["latency"].get("steady_p50_ms") is not None]
        sp99 = [x["latency"]["steady_p99_ms"] for x in xs if x["latency"].get("steady_p99_ms") is not None]
        tps = [x["tps"] for x in xs if x.get("tps")]
        lrows.append({
            "contender": c,
            "rate": xs[0]["rate"],
            "median_tps": statistics.median(tps) if tps else None,
            "p50_ms": statistics.median(p50) if p50 else None,
            "p99_ms": statistics.median(p99) if p99 else None,
            "rounds_p50_ms": p50, "rounds_p99_ms": p99,
            "steady_p50_ms": statistics.median(sp50) if sp50 else None,
            "steady_p99_ms": statistics.median(sp99) if sp99 else None,
            "rounds_steady_p99_ms": sp99,
            "behind": any(x.get("tps") and x["tps"] < 0.97 * x["rate"] for x in xs),
        })
    n = next((x for x in lrows if x["contender"] == "none"), None)
    for x in lrows:
        x["p50_ratio"] = x["p50_ms"] / n["p50_ms"] if n and n["p50_ms"] and x["p50_ms"] else None
        x["p99_ratio"] = x["p99_ms"] / n["p99_ms"] if n and n["p99_ms"] and x["p99_ms"] else None
        for k in ("steady_p50", "steady_p99"):
            x[k + "_ratio"] = (x[k + "_ms"] / n[k + "_ms"]
                               if n and n.get(k + "_ms") and x.get(k + "_ms") else None)
    return {"rows": rows, "latency": lrows}


def report(path, update=False):
    r = json.load(open(path))
    summ = summarize(r)
    if update:
        r["summary"] = summ
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(r, fh, indent=1)
        os.replace(tmp, path)
    daemons = (["capture+daemon"] if r.get("daemon", {}).get("enabled") else []) \
        + (["capture+daemon-base"] if r.get("daemon", {}).get("baseline_bin") else []) \
        + (["native+daemon"] if "native+daemon" in r.get("setup", {}) else [])
    order_c = {c: i for i, c in enumerate(r["contenders"] + ["capture+daemon", "capture+daemon-base", "native+daemon"])}
    order_w = {w: i for i, w in enumerate(["rescore", "score", "judge", "skewed", "bulk"])}
    m, d, s = r["machine"], r["data"], r["settings"]
    out = []
    p = out.append
    p(f"### Write overhead: {d['submissions']:,} submissions, {d['challenges']} challenges, {d['agents']:,} agents")
    p("")
    p(f"`{r['command']}` — started {r['started']}, {r['wall_s'] / 60:.1f} min wall clock, mvrefresh "
      f"`{r['binary']['version']}` ({r['binary']['commit']}). Machine: {m['nproc']} vCPU ({m['cpu']}), "
      f"{m['memory_gib']} GiB, kernel {m['kernel']}, PostgreSQL {m['postgresql']}; load average at start "
      f"{m['loadavg_start']}, at the end {m['loadavg_end']}.")
    p("")
    p(f"Cluster: `wal_level = {s.get('wal_level', 'replica')}` for every contender.")
    p("")
    p(f"pgbench `-M prepared -c {s['clients']} -j {s['threads']} -T {s['secs']}`, {s['rounds']} rounds "
      f"interleaved per workload (each round: {', '.join(r['contenders'] + daemons)}); "
      f"median TPS, ratio to `none`. Each contender has a database of its own, cloned from one template "
      f"(operational tables + bundled analytics + sample data, no mvrefresh schema, no trigger): "
      + "; ".join(f"`{c}`: {r['setup'][c]['description']} (triggers on submissions: "
                  f"{', '.join(t['name'] for t in r['setup'][c]['triggers']) or 'none'}"
                  + (f"; subscriptions: {r['setup'][c]['subscriptions']}" if r['setup'][c].get('subscriptions') is not None else "")
                  + ")" for c in r["contenders"] + daemons)
      + ". Before every run the contender's capture state (the tables of schema mvrefresh other than "
      f"{', '.join(s['keep_tables'])}) is emptied, as a daemon keeps it short, and a CHECKPOINT is taken. "
      f"Rounds whose TPS differ by more than {round((UNSTABLE - 1) * 100)}% (max/min > {UNSTABLE}) are flagged UNSTABLE. "
      f"Wait events: active pgbench backends sampled every 200 ms, share of backend samples (CPU = not waiting). "
      f"Keys turned dirty: rows inserted into `mvrefresh.dirty` during the run (`pg_stat_user_tables`) per 1,000 "
      f"transactions, i.e. how often a writer found its key clean and wrote it (with a daemon running, keys turn "
      f"dirty again after every collect).")
    p("")
    ran = {x["workload"] for x in r["runs"]} | ({"rescore"} if r.get("latency_runs") else set())
    desc = {
        "rescore": "`rescore` one UPDATE of a scored submission",
        "score": "`score` back to pending then scored, one transaction",
        "judge": "`judge` INSERT of a ~2 KB judge output + UPDATE of the submission's scores and status, one transaction",
        "skewed": f"`skewed` rescore, 80% on the {d['hot_challenges']} hot challenges' {d['hot_ids']:,} submissions, "
                  f"20% uniform over {d['cold_ids']:,} others",
        "bulk": f"`bulk` one UPDATE of {d['bulk_rows']:,} submissions spread over all challenges "
                f"(TPS = statements/s; µs/row = the whole system's wall time per row, 1 / rows per second)",
    }
    p("Workloads: " + "; ".join(v for k, v in desc.items() if k in ran)
      + (f". rescore/score/judge draw from {d['ids']:,} scored submissions." if ran & {"rescore", "score", "judge"} else "."))
    p("")
    rows = sorted(summ["rows"], key=lambda x: (x["condition"] != "sync_off", order_w.get(x["workload"], 99),
                                               order_c.get(x["contender"], 99)))
    titles = {"sync_off": "synchronous_commit = off (the trigger's CPU cost is not hidden behind WAL flushes)",
              "sync_on": "synchronous_commit = on (what a default-configured writer sees)"}
    for cond in ("sync_off", "sync_on"):
        cr = [x for x in rows if x["condition"] == cond]
        if not cr:
            continue
        p(f"**{titles[cond]}**")
        p("")
        p("| workload | contender | median TPS | × none | overhead | rounds | max/min | top wait events | notes |")
        p("|---|---|--:|--:|--:|---|--:|---|---|")
        for x in cr:
            ratio = x["ratio_to_none"]
            spread = "–" if x["spread"] is None else f"{x['spread']:.2f}" + (" **UNSTABLE**" if x["unstable"] else "")
            waits = ", ".join(f"{k} {v * 100:.0f}%" for k, v in x["waits_top"]) or "–"
            notes = []
            if x["workload"] == "bulk" and x.get("us_per_row"):
                notes.append(f"{x['rows_per_statement']:,} rows/stmt, {f(x['rows_per_s'])} rows/s, "
                             f"{x['us_per_row']:.2f} µs/row"
                             + (f" (+{x['extra_us_per_row']:.2f})" if x.get("extra_us_per_row") and x["contender"] != "none" else ""))
            if "daemon_refreshes_median" in x:
                notes.append(f"daemon refreshes/run {', '.join(str(v) for v in x['daemon_refreshes'])}"
                             + (f" ({x['daemon_failed_refreshes']} failed)" if x["daemon_failed_refreshes"] else ""))
            if x.get("wal_bytes_per_txn"):
                notes.append(f"WAL {x['wal_bytes_per_txn']:,.0f} B/txn")
            if x.get("dirty_per_1000_txn") is not None:
                notes.append(f"keys turned dirty {x['dirty_per_1000_txn']:.1f} per 1,000 txn")
            if x.get("decoder_us_per_txn"):
                notes.append(f"decoder {x['decoder_us_per_txn']:.0f} µs/txn (CPU s/run {', '.join(f(v, 1) for v in x['decoder_cpu_s'])})")
            if x["failed"]:
                notes.append(f"{x['failed']} failed transactions")
            if x["aborted"]:
                notes.append(f"{x['aborted']} clients aborted")
            for e in x["pgbench_errors"]:
                notes.append("**" + " ".join(e.replace("|", "/").split()) + "**")
            p(f"| {x['workload']} | {x['contender']} | {f(x['median_tps'])} | {f(ratio, 3)} "
              f"| {f((1 - ratio) * 100 if ratio else None, 1)}% | {', '.join(f(t) for t in x['rounds_tps'])} "
              f"| {spread} | {waits} | {'; '.join(notes)} |")
        p("")
    dm = r.get("daemon", {})
    if dm.get("requested"):
        if dm.get("error"):
            p(f"**Daemon rows missing or incomplete:** `mvrefresh run` failed: {dm['error']}")
        else:
            p(f"`capture+daemon`: `mvrefresh run` against its own database during each of its runs "
              f"(started, settled, then measured), config: the shipped [[capture]] and one incremental view "
              f"({dm.get('view')}, quiet {dm.get('quiet')}, max_wait {dm.get('max_wait')}); refreshes = rows of "
              f"mvrefresh.refresh_history started during the run.")
        p("")
    lat = r.get("latency")
    if lat and lat.get("skipped"):
        p(f"**Writer latency at a fixed rate**: skipped ({lat['skipped']}).")
        p("")
    elif summ["latency"]:
        p(f"**Writer latency at a fixed rate** (synchronous_commit = off): pgbench rescore `-R {lat['rate']}` "
          f"({lat['rate_source']}), {s['secs']} s × {s['rounds']} rounds interleaved; per-transaction latency from "
          f"`--log`, measured from the scheduled start (includes queueing behind the schedule); median of the rounds' "
          f"percentiles. Whole run, and after warm-up: transactions scheduled in a run's first "
          f"{WARMUP_S:g} s left out (each run starts with the capture state emptied, so every session "
          f"finds every key clean once: that start-up, not the steady state, makes the whole run's p99). "
          f"`capture+daemon`: with the daemon running, as in the TPS table.")
        p("")
        p("| contender | rate | achieved TPS | p50 ms | p99 ms | p50 × none | p99 × none "
          "| after warm-up: p50 ms | p99 ms | p50 × none | p99 × none | rounds p99 ms (whole; after warm-up) | note |")
        p("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|")
        for x in sorted(summ["latency"], key=lambda x: order_c.get(x["contender"], 99)):
            p(f"| {x['contender']} | {x['rate']} | {f(x['median_tps'])} | {f(x['p50_ms'], 2)} | {f(x['p99_ms'], 2)} "
              f"| {f(x['p50_ratio'], 2)} | {f(x['p99_ratio'], 2)} "
              f"| {f(x['steady_p50_ms'], 2)} | {f(x['steady_p99_ms'], 2)} "
              f"| {f(x['steady_p50_ratio'], 2)} | {f(x['steady_p99_ratio'], 2)} "
              f"| {', '.join(f(v, 2) for v in x['rounds_p99_ms'])}; "
              f"{', '.join(f(v, 2) for v in x['rounds_steady_p99_ms'])} "
              f"| {'behind the schedule (cannot sustain the rate)' if x['behind'] else ''} |")
        p("")
    return "\n".join(out)


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd = argv[1]
    if cmd == "captures":
        print(captures(argv[2]))
    elif cmd == "channels":
        print(channels(argv[2]))
    elif cmd == "pgbench-out":
        print(json.dumps(pgbench_out(argv[2], argv[3] if len(argv) > 3 else None)))
    elif cmd == "latency":
        print(json.dumps(latency(argv[2:])))
    elif cmd == "waits":
        waits(int(argv[2]), argv[3], argv[4], argv[5])
    elif cmd == "report":
        print(report(argv[2], update="--update" in argv[3:]))
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
