"""Run this app in a real ``monailabel start_server`` process (tests, benchmarks, a quick try).

`running_server` starts the server on a loopback port, waits until ``/info`` answers and stops
the whole process group afterwards; the server's output goes to a log file whose tail is in
every error. `slicer_roi` builds a box request the way 3D Slicer's MONAI Label plugin does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["APP_DIR", "free_port", "running_server", "slicer_roi"]

APP_DIR = Path(__file__).resolve().parent
_REPO = APP_DIR.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _monailabel() -> list[str]:
    exe = Path(sys.executable).with_name("monailabel")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("monailabel")
    return [found] if found else [sys.executable, "-m", "monailabel.main"]


@contextmanager
def running_server(
    studies: str | os.PathLike,
    conf: Mapping[str, str],
    workdir: str | os.PathLike,
    threads: int = 1,
    timeout_s: float = 120.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``(url, process)`` of ``monailabel start_server --app monai_sam/label`` with ``--conf`` pairs.

    ``threads``: OpenMP / intra-op threads of the server (1 keeps a shared CPU honest).
    Raises RuntimeError (with the log's tail) if the server exits or does not answer in time.
    """
    import requests

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [*_monailabel(), "start_server", "--app", str(APP_DIR), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", str(key), str(value)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(threads),
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
        "MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"),
    }
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
                    )
                try:
                    if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"server did not answer /info in {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}"
                    )
                time.sleep(1)
            yield url, proc
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


def slicer_roi(affine: Sequence[Sequence[float]], lo: Sequence[float], hi: Sequence[float]) -> list[int]:
    """The ``roi`` 3D Slicer's MONAI Label plugin (0.8.5, ``getROIPointsXYZ``) sends for an ROI
    drawn around the stored voxels ``lo..hi`` of an image with voxel-to-RAS ``affine``: the ROI
    node's RAS bounds (centre -/+ size / 2), its min and max corners through ``RASToIJK``,
    rounded, zipped per axis: ``[i_a, i_b, j_a, j_b, k_a, k_b]``."""
    import numpy as np

    affine = np.asarray(affine, np.float64)
    bounds = list(zip(lo, hi, strict=True))
    corners = np.array([[x, y, z, 1.0] for x in bounds[0] for y in bounds[1] for z in bounds[2]])
    ras = (affine @ corners.T).T[:, :3]
    centre, size = (ras.min(0) + ras.max(0)) / 2, ras.max(0) - ras.min(0)
    roi_points_ras = [v for x, s in zip(centre, size, strict=True) for v in (x - s / 2, x + s / 2)]
    min_points_ras = [roi_points_ras[0], roi_points_ras[2], roi_points_ras[4], 1.0]
    max_points_ras = [roi_points_ras[1], roi_points_ras[3], roi_points_ras[5], 1.0]
    ras_to_ijk = np.linalg.inv(affine)
    min_ijk = [round(float(v)) for v in ras_to_ijk @ min_points_ras]
    max_ijk = [round(float(v)) for v in ras_to_ijk @ max_points_ras]
    return [v for pair in zip(min_ijk[:3], max_ijk[:3], strict=True) for v in pair]
