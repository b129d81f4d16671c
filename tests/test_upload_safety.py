"""Client files cannot be turned against the server (real server, PanTS root, 64x64x32 scans).

Every file a client sends (label saves, image uploads, infer uploads) is decoded header-first by
``lib.imaging.volume_decode``: detached NRRD headers, skips, oversize claims and decompression bombs are
refused with a 4xx naming the problem; the stored labels, the listing and the index stay as they
were; and a refused upload raises the server's peak RSS (``VmHWM``, reset before each request
through ``/proc/<pid>/clear_refs``) by at most 64 MB plus the size of a valid label.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from lib.datastore.pants import STATE_DIRNAME
from pants_tools.phantom import write_pants_tree
from server import Server

pytestmark = pytest.mark.server

IMAGE = "PanTS_00000001"
SHAPE = (64, 64, 32)
CANARY = b"server-secret-canary-0123456789\n"
BOMB_BYTES = 1_500_000_000  # what the bombs inflate to (1.5 GB of zeros, ~1.5 MB compressed)
RSS_SLACK = 64 << 20


def nrrd_file(header: dict[str, str], data: bytes = b"") -> bytes:
    lines = ["NRRD0004"] + [f"{k}: {v}" for k, v in header.items()]
    return ("\n".join(lines) + "\n\n").encode() + data


def attached_header(affine: np.ndarray, shape: tuple[int, ...] = SHAPE, **extra: str) -> dict[str, str]:
    """An NRRD header on the image's grid (LPS), as 3D Slicer writes one."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    dirs = " ".join("(" + ",".join(f"{v:.6f}" for v in lps[:3, i]) + ")" for i in range(3))
    header = {"type": "unsigned char", "dimension": "3", "space": "left-posterior-superior",
              "sizes": " ".join(map(str, shape)), "space directions": dirs,
              "space origin": "(" + ",".join(f"{v:.6f}" for v in lps[:3, 3]) + ")",
              "kinds": "domain domain domain", "encoding": "raw"}
    header.update(extra)
    return header


def gzip_zeros(n: int) -> bytes:
    """``n`` zero bytes as one gzip member, made in pieces (never ``n`` bytes at once)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(64 << 20)
    out = []
    left = n
    while left:
        take = min(left, len(chunk))
        out.append(comp.compress(chunk[:take]))
        left -= take
    out.append(comp.flush())
    return b"".join(out)


def nifti_claiming(shape: tuple[int, ...], affine: np.ndarray, dtype: type = np.uint8) -> bytes:
    """A NIfTI header claiming ``shape`` with no voxel data after it (372 bytes)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0" * 4 + b"\0" * 20


def raw_multipart(parts: list[tuple[str, bytes, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart body written byte for byte (clients escape odd file names; attackers need not).

    ``parts``: (field name, raw filename or b"" for a plain field, content).
    """
    boundary = b"pantsboundary42"
    body = b""
    for name, filename, content in parts:
        disp = b'form-data; name="' + name.encode() + b'"'
        if filename:
            disp += b'; filename="' + filename + b'"'
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disp + b"\r\n\r\n" + content + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}


@dataclass
class Upload:
    id: str
    path: str  # request path and query
    method: str
    status: int
    message: str
    parts: list[tuple[str, bytes, bytes]]
    memory: bool = False  # measure the peak RSS around it


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, Path]]:
    base = tmp_path_factory.mktemp("upload_safety")
    root = base / "PanTS"
    write_pants_tree(root, 2, shape=SHAPE, spacing=(2.5, 2.5, 3.0), seed=3)
    (base / "canary.txt").write_bytes(CANARY)
    srv = Server(root, base / "server.log", conf={"model_dir": str(base / "model"), "preset": "fast"})
    try:
        # one stored label, which every refusal must leave as it is
        from monailabel.client import MONAILabelClient

        ref = nib.load(root / "ImageTr" / IMAGE / "ct.nii.gz")
        label = np.zeros(SHAPE, np.uint8)
        label[10:20, 10:20, 5:10] = 1
        nib.save(nib.Nifti1Image(label, ref.affine), base / "first.nii.gz")
        MONAILabelClient(srv.url, tmpdir=str(base)).save_label(IMAGE, str(base / "first.nii.gz"), tag="final")
        yield srv, root, base
    finally:
        srv.stop()


def _cases(root: Path, base: Path) -> list[Upload]:
    aff = nib.load(root / "ImageTr" / IMAGE / "ct.nii.gz").affine
    label = f"/datastore/label?image={IMAGE}&tag=final"
    params = ("params", b"", b"{}")
    good = np.zeros(SHAPE, np.uint8)
    good[1:3, 1:3, 1:3] = 1
    good_nrrd = nrrd_file(attached_header(aff), good.tobytes(order="F"))
    canary = str(base / "canary.txt")
    seg_nrrd = nrrd_file({**attached_header(aff), "Segment0_Name": "spleen", "Segment0_Layer": "0",
                          "Segment0_LabelValue": "0"}, good.tobytes(order="F"))
    big = (1300, 1300, 1300)
    nrrd_bomb_header = attached_header(aff, shape=(1300, 1300, 900), encoding="gzip")
    bomb = gzip_zeros(BOMB_BYTES)
    nii = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), aff)
    nii_gz_bomb = gzip.compress(nii.to_bytes()[:352], 1) + bomb  # header member + a second member of zeros

    def label_case(case_id: str, status: int, message: str, content: bytes, name: bytes = b"l.nrrd",
                   memory: bool = False) -> Upload:
        return Upload(case_id, label, "PUT", status, message, [params, ("label", name, content)], memory)

    return [
        # ---- server files read through a header
        label_case("nrrd-data-file-absolute", 422, "data file", nrrd_file({**attached_header(aff), "data file": canary})),
        label_case("nrrd-data-file-relative", 422, "data file",
                   nrrd_file({**attached_header(aff), "data file": "../../../canary.txt"})),
        label_case("nrrd-datafile-spelling", 422, "datafile", nrrd_file({**attached_header(aff), "datafile": canary})),
        label_case("nrrd-byte-skip-negative", 422, "byte skip",
                   nrrd_file({**attached_header(aff), "byte skip": "-1"}, good.tobytes(order="F"))),
        label_case("nrrd-byte-skip-huge", 422, "byte skip",
                   nrrd_file({**attached_header(aff), "byte skip": "100000000000"}, good.tobytes(order="F"))),
        label_case("nrrd-line-skip", 422, "line skip",
                   nrrd_file({**attached_header(aff), "line skip": "3"}, good.tobytes(order="F"))),
        label_case("nrrd-ascii-encoding", 415, "encoding", nrrd_file({**attached_header(aff), "encoding": "ascii"},
                                                                     b"0 " * good.size)),
        label_case("nrrd-gzipped-whole", 415, "gzip-compressed NRRD", gzip.compress(good_nrrd), b"l.nrrd.gz"),
        # ---- memory claimed before anything is refused
        label_case("nifti-claims-1300-cubed", 422, "shape", nifti_claiming(big, aff), b"l.nii", memory=True),
        label_case("nrrd-gzip-bomb-big-shape", 422, "shape", nrrd_file(nrrd_bomb_header, bomb), memory=True),
        label_case("nrrd-gzip-bomb-image-shape", 413, "more voxel data",
                   nrrd_file(attached_header(aff, encoding="gzip"), bomb), memory=True),
        label_case("nii-gz-bomb-image-shape", 413, "more voxel data", nii_gz_bomb, b"l.nii.gz", memory=True),
        label_case("nifti-short-data", 422, "needs", nifti_claiming(SHAPE, aff), b"l.nii", memory=True),
        # ---- accepted before, refused now
        Upload("label-info-object", label, "PUT", 400, "label_info must be a list",
               [("params", b"", json.dumps({"label_info": {}}).encode()), ("label", b"l.nrrd", good_nrrd)]),
        label_case("seg-nrrd-label-value-0", 422, "LabelValue 0", seg_nrrd, b"l.seg.nrrd"),
        Upload("tag-trailing-newline", f"/datastore/label?image={IMAGE}&tag=final%0A", "PUT", 400,
               "not a valid label tag", [params, ("label", b"l.nrrd", good_nrrd)]),
        Upload("image-id-trailing-newline", f"/datastore/label?image={IMAGE}%0A&tag=final", "PUT", 400,
               "not a valid image id", [params, ("label", b"l.nrrd", good_nrrd)]),
        Upload("two-label-parts", label, "PUT", 400, "more than once",
               [params, ("label", b"a.nrrd", good_nrrd), ("label", b"b.nrrd", good_nrrd)]),
        Upload("two-params-parts", label, "PUT", 400, "more than once",
               [params, params, ("label", b"a.nrrd", good_nrrd)]),
        # ---- file names that made MONAI Label answer 500
        label_case("filename-300-char-suffix", 400, "file name", good_nrrd, b"l." + b"x" * 300),
        label_case("filename-nul", 400, "control characters", good_nrrd, b"l\x00.nrrd"),
        label_case("filename-newline", 400, "control characters", good_nrrd, b"l\n.nrrd"),
        # ---- infer with an uploaded image
        Upload("infer-upload-detached-nrrd", "/infer/segmentation", "POST", 422, "data file",
               [params, ("file", b"i.nrrd", nrrd_file({**attached_header(aff, type="short"), "data file": canary}))]),
        Upload("infer-upload-claims-1300-cubed", "/infer/segmentation", "POST", 413, "too large",
               [params, ("file", b"i.nii", nifti_claiming(big, aff, np.int16))], memory=True),
        Upload("infer-upload-short-data", "/infer/segmentation", "POST", 422, "needs",
               [params, ("file", b"i.nii", nifti_claiming((300, 300, 300), aff, np.int16))], memory=True),
        Upload("infer-params-image-path", f"/infer/segmentation?image={IMAGE}", "POST", 400, "set by the server",
               [("params", b"", json.dumps({"image": canary}).encode())]),
        Upload("infer-label-part", f"/infer/segmentation?image={IMAGE}", "POST", 400, "takes no 'label'",
               [params, ("label", b"l.bin", b"\0" * 16)]),
        Upload("session-uncompress-archive", "/session/?uncompress=true", "PUT", 400, "archives are not unpacked",
               [("files", b"s.tar", b"\0" * 1024)]),
        # ---- image uploads
        Upload("image-upload-detached-nrrd", "/datastore/image?image=new1", "PUT", 422, "data file",
               [params, ("file", b"i.nrrd", nrrd_file({**attached_header(aff), "data file": canary}))]),
        Upload("image-upload-claims-1300-cubed", "/datastore/image?image=new2", "PUT", 413, "too large",
               [params, ("file", b"i.nii", nifti_claiming(big, aff, np.int16))], memory=True),
    ]


def _state(server: Server, root: Path) -> dict:
    """Everything a refused upload could have changed: listing, stored files, index rows."""
    state = root / STATE_DIRNAME
    with sqlite3.connect(state / "index.sqlite") as db:
        labels = db.execute("SELECT * FROM labels ORDER BY rowid").fetchall()
        images = db.execute("SELECT id, split, path, removed FROM images ORDER BY id").fetchall()
    files = {p.relative_to(state).as_posix(): p.stat().st_size for p in state.rglob("*")
             if p.is_file() and p.parts[-2] != "logs" and not p.name.startswith(("index.sqlite", "scoring"))}
    listing = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]
    return {"labels": labels, "images": images, "files": files, "listing": listing}


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) << 10
    return out


def test_refused_uploads_name_the_problem_change_nothing_and_bound_memory(served) -> None:
    server, root, base = served
    before = _state(server, root)
    label_bytes = int(np.prod(SHAPE))
    failures = []
    for case in _cases(root, base):
        body, headers = raw_multipart(case.parts)
        Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        rss = _status(server.proc.pid)["VmRSS"]
        r = requests.request(case.method, server.url + case.path, data=body, headers=headers, timeout=300)
        peak = _status(server.proc.pid)["VmHWM"] - rss
        detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else r.text
        if r.status_code != case.status or not isinstance(detail, str) or case.message not in detail:
            failures.append(f"{case.id}: {r.status_code} {str(detail)[:300]}")
        if isinstance(detail, str) and (CANARY.decode().strip() in detail or str(len(CANARY)) + " bytes" in detail):
            failures.append(f"{case.id}: the answer reveals the server file: {detail[:200]}")
        if case.memory and peak > RSS_SLACK + label_bytes:
            failures.append(f"{case.id}: peak RSS rose by {peak / 2**20:.0f} MiB")
        assert server.proc.poll() is None, f"{case.id}: the server exited"
    assert not failures, "\n".join(failures)
    assert _state(server, root) == before, "a refused upload changed the datastore"
    served_back = requests.get(f"{server.url}/datastore/label?label={IMAGE}&tag=final", timeout=30)
    assert served_back.status_code == 200 and CANARY not in served_back.content


def test_attached_nrrd_and_seg_nrrd_labels_are_still_accepted(served) -> None:
    """The same decoder takes what 3D Slicer sends: attached raw/gzip NRRD and .seg.nrrd layers."""
    server, root, _ = served
    aff = nib.load(root / "ImageTr" / IMAGE / "ct.nii.gz").affine
    label = np.zeros(SHAPE, np.uint8)
    label[5:15, 5:15, 5:10] = 2
    gz = nrrd_file(attached_header(aff, encoding="gzip"), gzip.compress(label.tobytes(order="F")))
    layers = np.zeros((2, *SHAPE), np.uint8)  # two overlapping segments on two layers
    layers[0, 5:15, 5:15, 5:10] = 1
    layers[1, 8:12, 8:12, 6:8] = 1
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    dirs = "none " + " ".join("(" + ",".join(f"{v:.6f}" for v in lps[:3, i]) + ")" for i in range(3))
    seg_header = {**attached_header(aff), "dimension": "4", "sizes": "2 " + " ".join(map(str, SHAPE)),
                  "space directions": dirs, "kinds": "list domain domain domain",
                  "Segment0_Name": "Pancreas", "Segment0_Layer": "0", "Segment0_LabelValue": "1",
                  "Segment1_Name": "pancreatic lesion", "Segment1_Layer": "1", "Segment1_LabelValue": "1"}
    seg = nrrd_file(seg_header, layers.tobytes(order="F"))
    for name, content, params in ((b"l.nrrd", gz, {"label_info": [{"name": "kidney_right", "idx": 2}]}),
                                  (b"l.seg.nrrd", seg, {})):
        body, headers = raw_multipart([("params", b"", json.dumps(params).encode()), ("label", name, content)])
        r = requests.put(f"{server.url}/datastore/label?image={IMAGE}&tag=final", data=body, headers=headers,
                         timeout=120)
        assert r.status_code == 200, r.text
    info = requests.get(f"{server.url}/datastore/label/info?label={IMAGE}&tag=final", timeout=30).json()
    assert set(info["counts"]) == {"pancreas", "pancreatic_lesion"}
    assert info["counts"]["pancreatic_lesion"] == 4 * 4 * 2


def test_decoder_never_inflates_past_the_header(tmp_path: Path) -> None:
    """Unit level: a bomb behind a small header is stopped after the header's size plus one byte."""
    from lib.core.errors import ClientError
    from lib.imaging.volume_decode import read_data, read_header

    path = tmp_path / "bomb.nrrd"
    path.write_bytes(nrrd_file(attached_header(np.eye(4), shape=(8, 8, 8), encoding="gzip"), gzip_zeros(10 << 20)))
    hdr = read_header(path)
    assert hdr.shape == (8, 8, 8) and hdr.nbytes == 512
    with pytest.raises(ClientError) as err:
        read_data(path, hdr)
    assert err.value.status_code == 413
    exact = tmp_path / "exact.nrrd"
    data = np.arange(512, dtype=np.uint16).reshape(8, 8, 8)
    exact.write_bytes(nrrd_file(attached_header(np.eye(4), shape=(8, 8, 8), encoding="gzip", type="ushort",
                                                endian="big"), gzip.compress(data.astype(">u2").tobytes(order="F"))))
    back = read_data(exact, read_header(exact))
    assert np.array_equal(back, data)
    # NIfTI: a header member and the data in a second gzip member decode like one stream
    img = nib.Nifti1Image(data.astype(np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))
    raw = img.to_bytes()
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(raw[:352]) + gzip.compress(raw[352:]))
    hdr = read_header(two)
    assert np.array_equal(read_data(two, hdr), data) and np.allclose(hdr.affine, img.affine)
    assert struct.unpack("<i", raw[:4])[0] == 348
