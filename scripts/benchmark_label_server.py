#!/usr/bin/env python
"""Latency per request of a real MONAI Label server under 8 concurrent infer requests.

``monailabel start_server --app monai_sam/label`` (`monai_sam.label.server.running_server`) on
two CT phantoms (NIfTI, a folder datastore), random weights in the official checkpoint format
(speed does not depend on the values). After one warm-up click per image (its encoding), 8
requests are sent at once from 8 threads with MONAI Label's own client, as 3D Slicer sends them:
organ-centre clicks, ROI boxes in the plugin's order (`monai_sam.label.server.slicer_roi`) and one
malformed ROI, which must come back as HTTP 422. Per request: the client's wall time and the
server's own ``latencies.total``; after them: the server's resident memory and its feature
cache against its cap.

Writes ``docs/results_label_server.json`` and the table between the markers of the "MONAI Label
app" section of docs/results.md.

    python scripts/benchmark_label_server.py
    python scripts/benchmark_label_server.py --image-size 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark this checkout whatever copy of monai_sam is installed
logger = logging.getLogger("benchmark_label_server")

MARK_BEGIN = "<!-- BEGIN label-server-load (scripts/benchmark_label_server.py writes this table) -->"
MARK_END = "<!-- END label-server-load -->"
ORGANS = {"liver": 1, "spleen": 2}


def group_rss_mb(pid: int) -> float:
    """Resident memory of the server's process group (it runs in its own session), from /proc."""
    group = os.getpgid(pid)
    total_kb = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != group:
                continue
            status = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        rss = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")]
        total_kb += rss[0] if rss else 0
    return total_kb / 1024


def organ_centre(label: np.ndarray, organ: int) -> list[int]:
    k = int(np.argmax((label == organ).sum(axis=(0, 1))))
    ii, jj = np.nonzero(label[..., k] == organ)
    c = int(np.argmin((ii - ii.mean()) ** 2 + (jj - jj.mean()) ** 2))
    return [int(ii[c]), int(jj[c]), k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="sam2.1_hiera_t")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 32], metavar=("X", "Y", "Z"))
    p.add_argument("--threads", type=int, default=1, help="the server's intra-op threads")
    p.add_argument("--cache-gb", type=float, default=1.0, help="the server's feature cache cap")
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "results_label_server.json")
    p.add_argument("--results-md", type=Path, default=ROOT / "docs" / "results.md")
    opts = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import nibabel as nib
    import requests
    import torch
    from monailabel.client import MONAILabelClient

    from monai_sam.data.phantom import ensure_phantom_dataset
    from monai_sam.label.server import running_server, slicer_roi
    from monai_sam.networks import build_sam2_model
    from monai_sam.utils import replace_marked_block, write_text_atomic

    command = "python scripts/benchmark_label_server.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="benchmark_label_server_") as tmp_:
        tmp = Path(tmp_)
        data = ensure_phantom_dataset(
            tmp / "data", "ct", num_cases=2, seed=1000, shape=tuple(opts.shape)
        ).parent
        studies = data / "imagesTr"  # images only: nothing labeled yet
        images = sorted(f.name.split(".")[0] for f in studies.glob("*.nii.gz"))
        labels = {n: np.asarray(nib.load(str(data / "labelsTr" / f"{n}.nii.gz")).dataobj) for n in images}
        affines = {n: nib.load(str(studies / f"{n}.nii.gz")).affine for n in images}
        torch.manual_seed(1234)
        checkpoint = tmp / "sam2.1_random.pt"
        torch.save(
            {"model": build_sam2_model(opts.size, image_size=opts.image_size).state_dict()}, checkpoint
        )
        conf = {
            "bundle": "none",
            "checkpoint": str(checkpoint),
            "model_size": opts.size,
            "image_size": str(opts.image_size),
            "labels": ",".join(ORGANS),
            "window": "abdomen",
            "feature_cache_gb": str(opts.cache_gb),
        }
        with running_server(studies, conf, tmp / "server", threads=opts.threads) as (url, proc):
            client = MONAILabelClient(url, tmpdir=str(tmp / "client"))
            warm = {}
            for n in images:  # the first click per image: its encoding
                t0 = time.perf_counter()
                client.infer(
                    "monai_sam_interactive", n, {"foreground": [organ_centre(labels[n], 1)], "label": "liver"}
                )
                warm[n] = time.perf_counter() - t0

            def box(n: str, organ: int) -> list[int]:
                k = organ_centre(labels[n], organ)[2]
                ii, jj = np.nonzero(labels[n][..., k] == organ)
                return slicer_roi(affines[n], [ii.min(), jj.min(), k], [ii.max(), jj.max(), k])

            jobs = []
            for i in range(8):
                n, organ = images[i % 2], ("liver", "spleen")[(i // 2) % 2]
                kind = "malformed roi" if i == 5 else "roi" if i in (2, 7) else "click"
                jobs.append((n, organ, kind))

            def one(job):
                n, organ, kind = job
                if kind == "malformed roi":
                    params = {"roi": [3, 4, 5, 6, 7], "label": organ}
                elif kind == "roi":
                    params = {"roi": box(n, ORGANS[organ]), "label": organ}
                else:
                    params = {"foreground": [organ_centre(labels[n], ORGANS[organ])], "label": organ}
                t0 = time.perf_counter()
                r = requests.post(
                    f"{url}/infer/monai_sam_interactive?image={n}&output=json",
                    data={"params": json.dumps(params)},
                    timeout=600,
                )
                seconds = time.perf_counter() - t0
                body = r.json()
                server_s = body.get("latencies", {}).get("total") if r.status_code == 200 else None
                return {
                    "image": n,
                    "organ": organ,
                    "request": kind,
                    "status": r.status_code,
                    "client_s": seconds,
                    "server_s": server_s,
                    "detail": body.get("detail") if r.status_code != 200 else None,
                    "thread": threading.get_ident(),
                }

            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                rows = list(pool.map(one, jobs))
            wall = time.perf_counter() - t0
            up = requests.get(f"{url}/info/", timeout=30).status_code == 200
            cache = requests.get(f"{url}/info/", timeout=30).json()["models"]["monai_sam_interactive"][
                "feature_cache"
            ]
            rss = group_rss_mb(proc.pid)
    for r in rows:
        r.pop("thread")
    good = [r for r in rows if r["request"] != "malformed roi"]
    run = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.machine()}, {opts.threads} server thread(s))",
        "model_size": opts.size,
        "image_size": opts.image_size,
        "volume": list(opts.shape),
        "first_click_s": warm,
        "requests": rows,
        "wall_s_for_8": wall,
        "all_good_answered": all(r["status"] == 200 for r in good),
        "malformed_status": next(r["status"] for r in rows if r["request"] == "malformed roi"),
        "server_up_after": up,
        "server_rss_mb": rss,
        "feature_cache_mb": cache["bytes"] / 2**20,
        "feature_cache_cap_mb": cache["max_bytes"] / 2**20,
        "command": command.strip(),
    }
    write_text_atomic(opts.output, json.dumps(run, indent=2))
    table = [
        f"8 concurrent requests on {len(images)} images ({'x'.join(map(str, opts.shape))}, {opts.size} at "
        f"{opts.image_size} px, {run['device']}), after one first click per image "
        f"({', '.join(f'{v:.1f} s' for v in warm.values())}): all 8 in {wall:.1f} s; server "
        f"{'up' if up else 'DOWN'} after; RSS {rss:.0f} MB; kept features {run['feature_cache_mb']:.0f} MB "
        f"of a {run['feature_cache_cap_mb']:.0f} MB cap. `{run['command']}`",
        "",
        "| request | image | organ | HTTP status | client s | server s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        server_s = "-" if r["server_s"] is None else f"{r['server_s']:.2f}"
        problem = str(r["detail"]).split(": ", 1)[-1] if r["detail"] else ""  # after the file's name
        status = f"{r['status']}" + (f" ({problem[:70]})" if problem else "")
        table.append(
            f"| {r['request']} | {r['image']} | {r['organ']} | {status} | {r['client_s']:.2f} | {server_s} |"
        )
    replace_marked_block(
        opts.results_md,
        MARK_BEGIN,
        MARK_END,
        "\n".join(table),
        "### MONAI Label server under load\n\nA real `monailabel start_server` process, requests as 3D "
        "Slicer sends them (`scripts/benchmark_label_server.py`). Requests run one at a time on the "
        "model (a lock), so the last to be served waits for the others.",
    )
    logger.info("wrote %s and the table in %s", opts.output, opts.results_md)


if __name__ == "__main__":
    main()
