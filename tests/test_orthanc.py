"""A real PACS round trip: Orthanc -> the MONAI Deploy app -> Orthanc.

A private Orthanc (``/usr/sbin/Orthanc``, Debian package ``orthanc``) is started on 127.0.0.1
with its own configuration in a temporary folder (storage and index there, free HTTP and DICOM
ports, no remote access, no authentication, no plugins). Two phantom mammograms (one right MLO
MONOCHROME1) are sent with a pynetdicom C-STORE, fetched back over REST, processed by the app
(the bundle's two-stage pipeline, shipped weights), and its SEG, probability SEG and virtual
normal image are posted back. The SEGs are then found by a query, read with highdicom and
compared with the bundle's own refined mask (pixel for pixel) and refined probability (within
the FRACTIONAL quantisation) for the same fetched file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

ROOT = Path(__file__).resolve().parents[1]
ORTHANC = "/usr/sbin/Orthanc"
SHAPE = (512, 416)

pytest.importorskip("monai.deploy.core", reason="monai-deploy-app-sdk is not installed (pip install -e '.[deploy]')")
pytest.importorskip("pynetdicom", reason="pynetdicom is not installed (pip install -e '.[test]')")


def _ensure_orthanc() -> str | None:
    """Install Orthanc with apt-get when missing; the reason it is unavailable, or None."""
    if os.access(ORTHANC, os.X_OK):
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return f"{ORTHANC} is missing and cannot be installed here (needs apt-get as root)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600, env=env)
        p = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "orthanc"],
                           capture_output=True, text=True, timeout=900, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get install orthanc failed: {e}"
    if p.returncode != 0 or not os.access(ORTHANC, os.X_OK):
        return f"apt-get install orthanc failed ({p.returncode}): {p.stderr[-500:]}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """A private Orthanc server and a tiny REST client for it.

    Args:
        folder: where its configuration, storage, index and log go.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.http_port = _free_port()
        self.dicom_port = _free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = _free_port()
        self.aet = "MCREFPACS"
        config = {
            "Name": "mcref-test-pacs",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "HttpThreadsCount": 4,
            "StableAge": 1,
        }
        self.config_file = folder / "orthanc.json"
        self.config_file.write_text(json.dumps(config, indent=2))
        self.log = open(folder / "orthanc.log", "w")
        self.proc = subprocess.Popen([ORTHANC, str(self.config_file)], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=folder)
        self.url = f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout: float = 60.0) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}): {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                return self.get_json("/system")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise TimeoutError(f"Orthanc did not answer GET /system within {timeout} s")

    def _request(self, path: str, data: bytes | None = None, content_type: str = "application/json") -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        if data is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def get_json(self, path: str) -> object:
        return json.loads(self._request(path))

    def post_json(self, path: str, body: object) -> object:
        return json.loads(self._request(path, json.dumps(body).encode()))

    def upload(self, path: Path) -> dict:
        return json.loads(self._request("/instances", path.read_bytes(), "application/dicom"))

    def file(self, instance_id: str) -> bytes:
        return self._request(f"/instances/{instance_id}/file")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.log.close()


@pytest.fixture()
def orthanc(tmp_path, request) -> Orthanc:
    reason = _ensure_orthanc()
    if reason:
        pytest.skip(reason)
    (tmp_path / "orthanc").mkdir(exist_ok=True)
    server = Orthanc(tmp_path / "orthanc")
    request.addfinalizer(server.stop)
    server.wait_ready()
    return server


def c_store(files: list[Path], port: int, called_aet: str) -> list[int]:
    """Send files with a pynetdicom C-STORE; returns the status of each."""
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation

    ae = AE(ae_title="MCREFTEST")
    ae.add_requested_context(DigitalMammographyXRayImageStorageForPresentation, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    assert assoc.is_established, "association with Orthanc rejected"
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def make_bundle_folder(folder: Path) -> Path:
    """A bundle folder for the app: configs, the bundle package and the shipped SegAI and
    inpainter weights (``models/model.pt``, ``models/inpainter.pt``)."""
    shutil.copytree(ROOT / "configs", folder / "configs")
    shutil.copytree(ROOT / "bundle", folder / "bundle", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (folder / "models").mkdir(parents=True)
    for name in ("model.pt", "inpainter.pt"):
        shutil.copyfile(ROOT / "models" / name, folder / "models" / name)
    return folder


def run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


@pytest.mark.slow
def test_pacs_round_trip_seg_equals_the_bundle_refined_mask(orthanc, tmp_path):
    import highdicom as hd
    import nibabel as nib

    from bundle.dicom import FRACTIONAL_MAX
    from bundle.phantom import make_phantom, write_mg_dicom

    assert "Version" in orthanc.get_json("/system")
    # two phantom mammograms of one patient, the right MLO stored MONOCHROME1
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for lat, view, phot in (("R", "MLO", "MONOCHROME1"), ("L", "CC", "MONOCHROME2")):
        ph = make_phantom(shape=SHAPE, view=view, laterality=lat, seed=21)
        f = src / f"{lat}_{view}.dcm"
        write_mg_dicom(f, ph["image"].astype(np.uint16), spacing=0.07, laterality=lat, view=view, seed=21,
                       photometric=phot, patient_id="RT1", use_imager_spacing=True)
        files.append(f)
    assert c_store(files, orthanc.dicom_port, orthanc.aet) == [0, 0]
    ids = orthanc.get_json("/instances")
    assert len(ids) == 2

    # fetch back from the PACS
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    by_sop = {}
    for iid in ids:
        data = orthanc.file(iid)
        sop = orthanc.get_json(f"/instances/{iid}/simplified-tags")["SOPInstanceUID"]
        (fetched / f"{sop}.dcm").write_bytes(data)
        by_sop[sop] = fetched / f"{sop}.dcm"
    right = next(p for p in by_sop.values() if pydicom.dcmread(p).ImageLaterality == "R")
    assert pydicom.dcmread(right).PhotometricInterpretation == "MONOCHROME1"

    # the app on what the PACS gave back, with a bundle folder holding the shipped weights
    bundle_dir = make_bundle_folder(tmp_path / "bundle")
    out = tmp_path / "out"
    run([sys.executable, "-m", "deploy.mcref_app", "-i", str(fetched), "-o", str(out), "--bundle", str(bundle_dir)])
    results = sorted(out.rglob("*_seg.dcm")) + sorted(out.rglob("*_prob.dcm")) + sorted(out.rglob("*_virtual_normal.dcm"))
    assert len(results) == 6
    for f in results:  # post the results back
        assert orthanc.upload(f)["Status"] in ("Success", "AlreadyStored")

    # the bundle's own outputs for the same fetched files
    ref = tmp_path / "ref"
    run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--dataset_dir", str(fetched), "--output_dir", str(ref)])

    def nii(stem: str, key: str) -> np.ndarray:
        return np.squeeze(np.asarray(nib.load(str(ref / stem / f"{stem}_{key}.nii.gz")).dataobj))

    # query the PACS for the SEGs and compare frame by frame
    seg_ids = orthanc.post_json("/tools/find", {"Level": "Instance", "Query": {"Modality": "SEG"}})
    assert len(seg_ids) == 4  # per image: the refined mask (BINARY) and the refined probability (FRACTIONAL)
    study_uid = pydicom.dcmread(right).StudyInstanceUID
    kinds = []
    for sid in seg_ids:
        seg = hd.seg.segread(_as_file(orthanc.file(sid), tmp_path / f"seg_{sid}.dcm"))
        assert seg.StudyInstanceUID == study_uid
        source_sop = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        frame = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source_sop], segment_numbers=[1])[0, ..., 0]
        stem = by_sop[source_sop].stem
        assert frame.shape == pydicom.dcmread(by_sop[source_sop]).pixel_array.shape
        kinds.append(seg.SegmentationType)
        if seg.SegmentationType == "BINARY":
            mask = nii(stem, "refined_mask")
            assert np.array_equal(frame.astype(np.uint8), mask.astype(np.uint8)), f"SEG of {source_sop} differs"
        else:
            prob = nii(stem, "refined_prob")
            assert np.abs(frame.astype(np.float64) - prob).max() <= 0.5 / FRACTIONAL_MAX + 1e-6
    assert sorted(kinds) == ["BINARY", "BINARY", "FRACTIONAL", "FRACTIONAL"]
    sc_ids = orthanc.post_json("/tools/find", {"Level": "Instance", "Query": {"Modality": "OT"}})
    assert len(sc_ids) == 2  # the virtual normal images (Secondary Capture, modality OT)


def _as_file(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path
