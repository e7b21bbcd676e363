"""A real PACS for the tests: Debian's Orthanc started on loopback with a configuration of its own (free ports, its
own storage folder, DICOMweb on), asked through its REST API, and stopped. Skips, saying why, where Orthanc is not
installed (.ci/run installs it)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """One Orthanc on 127.0.0.1; ``start()`` and ``stop()`` may be called again (its storage is kept)."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC") -> None:
        binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
        if binary is None:
            pytest.skip("no Orthanc on this machine (.ci/run installs Debian's orthanc package)")
        self.binary, self.folder, self.ae_title = binary, folder, ae_title
        self.http_port, self.dicom_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "pneumotriage-test",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ae_title,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "UnknownSopClassAccepted": True,
            "ConcurrentJobs": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 60.0) -> Orthanc:
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen([self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.proc.poll() is not None:
                    log_text = (self.folder / "orthanc.log").read_text()[-2000:]
                    raise AssertionError(f"Orthanc exited: {log_text}") from None
                time.sleep(0.2)
        raise AssertionError(f"Orthanc did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as answer:
            return json.loads(answer.read())

    def raw(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as answer:
            data: bytes = answer.read()
            return data

    def instances(self, modality: str | None = None) -> list[dict[str, Any]]:
        """The instances stored, with their main tags (those of ``modality`` only, when given)."""
        found = []
        for uid in self.get("/instances"):
            tags = self.get(f"/instances/{uid}/simplified-tags")
            if modality is None or tags.get("Modality") == modality:
                found.append(tags)
        return found

    def wait_for(self, modality: str, count: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """The instances of ``modality`` once there are ``count`` of them (fails after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.instances(modality)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.3)
