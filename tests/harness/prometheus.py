"""A real Prometheus (and promtool) for tests: Debian's package, unpacked into a cache folder.

``apt-get download prometheus`` + ``dpkg -x`` gives ``usr/bin/{prometheus,promtool}`` (static
Go binaries) without installing the package, running its maintainer scripts or starting a
system service (``../shared/anchors/observability/REPORT.md`` §1.1). The binaries are cached
under ``$MLA_TEST_CACHE`` (default ``~/.cache/mla-train``) so later sessions skip the download.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

CACHE = Path(os.environ.get("MLA_TEST_CACHE", Path.home() / ".cache" / "mla-train"))


def prometheus_bin_dir(cache: Path = CACHE) -> Path:
    """Folder holding ``prometheus`` and ``promtool``, fetched on first use.

    Raises:
        RuntimeError: the package cannot be had (no apt-get/dpkg, or Debian unreachable); the
            message says which step failed.
    """
    target = cache / "prometheus" / "usr" / "bin"
    if (target / "prometheus").is_file() and (target / "promtool").is_file():
        return target
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise RuntimeError("apt-get and dpkg are needed to fetch Debian's prometheus package")
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(
            ["apt-get", "download", "prometheus"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=180,
        )
        debs = list(Path(tmp).glob("prometheus_*.deb"))
        if got.returncode != 0 or not debs:
            raise RuntimeError(f"`apt-get download prometheus` failed: {got.stderr.strip()[-500:]}")
        staging = Path(tmp) / "root"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(staging)], check=True, timeout=120)
        (cache / "prometheus").parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cache / "prometheus", ignore_errors=True)
        shutil.move(str(staging), str(cache / "prometheus"))
    return target


@dataclass
class PrometheusServer:
    """A Prometheus process on 127.0.0.1 scraping static loopback targets; stop it by PID."""

    process: subprocess.Popen
    url: str

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        """``/api/v1/query_range`` results (``[{"metric": ..., "values": [[t, "v"], ...]}]``).

        Raises:
            RuntimeError: Prometheus rejected the query (the message has its error).
        """
        params = {"query": expr, "start": start, "end": end, "step": step}
        return self._get("query_range", params)["result"]

    def query(self, expr: str, at: float) -> list[dict]:
        """``/api/v1/query`` instant results at time ``at``."""
        return self._get("query", {"query": expr, "time": at})["result"]

    def _get(self, api: str, params: dict) -> dict:
        url = f"{self.url}/api/v1/{api}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{api} {params['query']!r}: {exc.read().decode()[:500]}") from None
        return body["data"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def start_prometheus(
    bin_dir: Path, folder: Path, targets: list[str], port: int, interval: str = "1s"
) -> PrometheusServer:
    """Start ``prometheus`` with ``scrape_interval`` ``interval`` on ``127.0.0.1:port``, its
    data under ``folder``; returns once ``/-/ready`` answers.

    Raises:
        RuntimeError: it exited or was not ready within 30 s (with its log tail).
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": "mla-train", "static_configs": [{"targets": targets}]}],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(folder / "prometheus.log", "w")
    process = subprocess.Popen(
        [
            str(bin_dir / "prometheus"),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={folder / 'data'}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = PrometheusServer(process, f"http://127.0.0.1:{port}")
    deadline = time.time() + 30
    while time.time() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(
        f"prometheus did not start: {(folder / 'prometheus.log').read_text()[-2000:]}"
    )
