"""The campaign report: progress, inter-reader agreement, QA flags and reader throughput.

One function, :func:`campaign_report`, reads the index (images and metadata, the ``review``
and ``provenance`` tables, image info ``qa``) and returns plain JSON tables; the server serves it
as ``GET /review/report`` and ``scripts/campaign_report.py`` writes it as CSV and PNG.

Tables (lists of flat rows):
    progress     per center and contrast phase: scans, labelled, reviewed, double_read
                 (second reading done), flagged (ever flagged), resolved (senior label saved)
    agreement    per class: n, median and IQR of the DSC between first and second readings
                 (PanTS's inter-annotator study reported median 86.1%, IQR 19.6%)
    qa           per check and severity: scans whose latest checked label fails it
    throughput   per reader and UTC day: labels saved, scans, total and median seconds spent
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from lib.datastore import provenance
from lib.datastore.protocol import IMPORTED_TAG
from lib.datastore.review import BEST_ORDER

if TYPE_CHECKING:
    from lib.datastore.pants import PanTSDatastore

TABLES = ("progress", "agreement", "qa", "throughput")


def _progress(ds: "PanTSDatastore") -> list[dict[str, Any]]:
    meta = ds.metadata_table()
    labelled = set(ds.index.labeled_ids(ds.served_splits, BEST_ORDER, IMPORTED_TAG, ds.hide_imported, True))
    reviews = ds.review.rows()
    groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for image_id, m in meta.items():
        key = (str(m.get("center") or "unknown"), str(m.get("contrast_phase") or "unknown"))
        c = groups[key]
        c["scans"] += 1
        c["labelled"] += image_id in labelled
        r = reviews.get(image_id)
        if r is None:
            continue
        c["reviewed"] += 1
        c["double_read"] += r.second_reader is not None
        c["flagged"] += r.phase in ("flagged", "resolved")
        c["resolved"] += r.phase == "resolved"
    cols = ("scans", "labelled", "reviewed", "double_read", "flagged", "resolved")
    return [{"center": k[0], "contrast_phase": k[1], **{c: int(groups[k][c]) for c in cols}} for k in sorted(groups)]


def _agreement(ds: "PanTSDatastore") -> list[dict[str, Any]]:
    per_class: dict[str, list[float]] = defaultdict(list)
    for r in ds.review.rows().values():
        for name, dsc in (json.loads(r.agreement) if r.agreement else {}).items():
            per_class[name].append(float(dsc))
    out = []
    for name in ds.lm.names:
        v = per_class.get(name)
        if not v:
            continue
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        out.append({"class": name, "n": len(v), "median_dsc": round(float(med), 4), "iqr_dsc": round(float(q3 - q1), 4),
                    "min_dsc": round(min(v), 4)})
    return out


def _qa(ds: "PanTSDatastore") -> list[dict[str, Any]]:
    counts: Counter = Counter()
    for qa in ds.image_info_values("qa").values():
        if not isinstance(qa, dict):
            continue
        for check, severity in {(f["check"], f["severity"]) for f in qa.get("findings", [])}:
            counts[(check, severity)] += 1
    return [{"check": c, "severity": s, "scans": n} for (c, s), n in sorted(counts.items())]


def _throughput(ds: "PanTSDatastore") -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in provenance.rows(ds.index.conn()):
        if row.get("source") != "reader":
            continue
        day = time.strftime("%Y-%m-%d", time.gmtime(row["ts"]))
        groups[(row.get("reader") or "anonymous", day)].append(row)
    out = []
    for (reader, day), rows in sorted(groups.items()):
        secs = [r["seconds"] for r in rows if "seconds" in r]
        out.append({
            "reader": reader, "day": day, "labels": len(rows), "scans": len({r["image_id"] for r in rows}),
            "seconds_total": round(sum(secs), 1) if secs else None,
            "seconds_median": round(float(np.median(secs)), 1) if secs else None,
        })
    return out


def campaign_report(ds: "PanTSDatastore") -> dict[str, Any]:
    """All four tables, the campaign kind and when the report was made."""
    return {
        "campaign": ds.review.campaign,
        "generated_ts": int(time.time()),
        "progress": _progress(ds),
        "agreement": _agreement(ds),
        "qa": _qa(ds),
        "throughput": _throughput(ds),
    }


__all__ = ["TABLES", "campaign_report"]
