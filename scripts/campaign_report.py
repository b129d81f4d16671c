#!/usr/bin/env python
"""Write a review campaign's report as CSV and PNG: progress, agreement, QA flags, throughput.

Reads the running server's GET /review/report (--url; through the nginx front add --user, with
the password in the environment variable PANTS_LABEL_PASSWORD) or the datastore itself
(--studies, as served; the server may keep running). Writes into --out:

    progress.csv     per center and contrast phase: scans, labelled, reviewed, double_read, flagged, resolved
    agreement.csv    per class: n, median and IQR of the DSC between first and second readings
    qa.csv           per QA check and severity: scans whose latest checked label fails it
    throughput.csv   per reader and UTC day: labels, scans, seconds spent (total, median)
    report.json      all of the above as the endpoint answers it
    campaign.png     the four tables as charts

Examples
  pants-label campaign-report --url http://127.0.0.1:8000 --out out/campaign
  PANTS_LABEL_PASSWORD=... pants-label campaign-report --url https://label.example.org --user alice --out out/campaign
  pants-label campaign-report --studies /data/PanTS --out out/campaign
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

TABLES = ("progress", "agreement", "qa", "throughput")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="campaign_report.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="the server (or its nginx front), e.g. http://127.0.0.1:8000")
    src.add_argument("--studies", type=Path, help="the folder the server serves (read directly)")
    p.add_argument("--datastore-dir", type=Path, help="with --studies: the server's --conf datastore_dir, if set")
    p.add_argument("--user", help="with --url behind the front: account name (password in $PANTS_LABEL_PASSWORD)")
    p.add_argument("--insecure", action="store_true", help="with --url: accept a self-signed certificate")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    return p


def fetch(url: str, user: str | None, insecure: bool) -> dict[str, Any]:
    import requests

    auth = None
    if user:
        password = os.environ.get("PANTS_LABEL_PASSWORD")
        if password is None:
            raise SystemExit("campaign_report.py: --user needs the password in $PANTS_LABEL_PASSWORD")
        auth = (user, password)
    r = requests.get(url.rstrip("/") + "/review/report", auth=auth, verify=not insecure, timeout=300)
    if r.status_code != 200:
        raise SystemExit(f"campaign_report.py: {url} answered {r.status_code}: {r.text[:300]}")
    return r.json()


def read_local(studies: Path, datastore_dir: Path | None) -> dict[str, Any]:
    from lib.datastore.campaign import campaign_report
    from lib.datastore.pants import PanTSDatastore

    ds = PanTSDatastore(studies, state_dir=datastore_dir)
    try:
        return campaign_report(ds)
    finally:
        ds.close()


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    prog = report["progress"]
    stages = ("labelled", "reviewed", "double_read", "flagged", "resolved")
    names = [f"{r['center']}\n{r['contrast_phase']}" for r in prog]
    for k, stage in enumerate(stages):
        ax[0, 0].bar([i + k * 0.16 for i in range(len(prog))], [r[stage] for r in prog], width=0.16, label=stage)
    ax[0, 0].set_xticks([i + 0.32 for i in range(len(prog))], names, fontsize=7)
    ax[0, 0].set_title("Progress by center and contrast phase (scans)")
    ax[0, 0].legend(fontsize=7)
    ag = report["agreement"]
    ax[0, 1].barh([r["class"] for r in ag], [r["median_dsc"] for r in ag],
                  xerr=[[r["iqr_dsc"] / 2 for r in ag], [r["iqr_dsc"] / 2 for r in ag]])
    ax[0, 1].set_xlim(0, 1.05)
    ax[0, 1].set_title("Inter-reader DSC per class (median, bar = IQR)")
    ax[0, 1].tick_params(labelsize=7)
    qa = report["qa"]
    ax[1, 0].barh([f"{r['check']} ({r['severity']})" for r in qa], [r["scans"] for r in qa],
                  color=["tab:red" if r["severity"] == "error" else "tab:orange" for r in qa])
    ax[1, 0].set_title("QA flags by check (scans)")
    ax[1, 0].tick_params(labelsize=7)
    tp = report["throughput"]
    ax[1, 1].bar([f"{r['reader']}\n{r['day']}" for r in tp], [r["labels"] for r in tp])
    ax[1, 1].set_title("Labels saved per reader per day")
    ax[1, 1].tick_params(labelsize=7)
    for a in ax.flat:
        if not a.has_data():
            a.text(0.5, 0.5, "nothing yet", ha="center", va="center", transform=a.transAxes)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.url:
        report = fetch(args.url, args.user, args.insecure)
    else:
        from lib.core.config_errors import ConfigError

        try:
            report = read_local(args.studies, args.datastore_dir)
        except ConfigError as err:
            print(f"campaign_report.py: {err}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for table in TABLES:
        write_csv(report[table], args.out / f"{table}.csv")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "campaign.png")
    prog = report["progress"]
    totals = {k: sum(r[k] for r in prog) for k in ("scans", "labelled", "reviewed", "double_read", "flagged", "resolved")}
    print(f"campaign '{report['campaign']}': " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    print(f"wrote {', '.join(t + '.csv' for t in TABLES)}, report.json and campaign.png into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
