"""detection.data.download and data/scripts: real transfers from a local HTTP server (and a
file:// URL) of small archives built here, with their MD5s checked."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from detection.data.download import ARCHIVES, Archive, fetch, fetch_archive
from detection.errors import DatasetError

SCRIPTS = Path(__file__).resolve().parents[1] / "data" / "scripts"


def _voc_tar(path: Path, ids=("000001", "000002")) -> str:
    """A tar laid out like the VOC archives (VOCdevkit/VOC2007/...); returns its MD5."""
    with tarfile.open(path, "w") as tar:
        for name, text in {"VOCdevkit/VOC2007/ImageSets/Main/test.txt": "\n".join(ids) + "\n",
                           "VOCdevkit/VOC2007/Annotations/000001.xml": "<annotation/>"}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):   # keep the test output clean
        pass


@contextlib.contextmanager
def _serve(folder: Path):
    """A local HTTP server on 127.0.0.1 (a free port) serving ``folder``; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _archive(md5: str) -> Archive:
    return Archive("voc2007-test", "http://example.invalid/VOCtest_06-Nov-2007.tar", md5, "1 kB", "VOCdevkit/VOC2007")


def test_fetch_over_http_verifies_unpacks_and_skips_a_verified_archive(tmp_path):
    served = tmp_path / "mirror"
    served.mkdir()
    md5 = _voc_tar(served / "VOCtest_06-Nov-2007.tar")
    archive = _archive(md5)
    data = tmp_path / "data"
    with _serve(served) as base:
        folder = fetch_archive(archive, data, f"{base}/VOCtest_06-Nov-2007.tar")
    assert folder == data / "VOCdevkit/VOC2007"
    assert (folder / "ImageSets/Main/test.txt").read_text() == "000001\n000002\n"
    assert (data / "archives/VOCtest_06-Nov-2007.tar").is_file()
    assert not list((data / "archives").glob("*.part"))
    # The server is gone: a rerun uses the verified archive and unpacks it again.
    (folder / "ImageSets/Main/test.txt").unlink()
    assert fetch_archive(archive, data, "http://127.0.0.1:9/unreachable.tar") == folder
    assert (folder / "ImageSets/Main/test.txt").is_file()


def test_a_wrong_md5_keeps_nothing_and_names_both_sums(tmp_path):
    served = tmp_path / "mirror"
    served.mkdir()
    md5 = _voc_tar(served / "VOCtest_06-Nov-2007.tar")
    wrong = "0" * 32
    data = tmp_path / "data"
    with _serve(served) as base:
        with pytest.raises(DatasetError, match=rf"MD5 {md5} is not the published {wrong} of voc2007-test"):
            fetch_archive(_archive(wrong), data, f"{base}/VOCtest_06-Nov-2007.tar")
    assert list((data / "archives").iterdir()) == [] and not (data / "VOCdevkit").exists()


def test_a_local_copy_by_file_url_and_an_unreachable_source(tmp_path):
    served = tmp_path / "copy"
    served.mkdir()
    md5 = _voc_tar(served / "VOCtest_06-Nov-2007.tar")
    folder = fetch_archive(_archive(md5), tmp_path / "data", (served / "VOCtest_06-Nov-2007.tar").as_uri())
    assert (folder / "Annotations/000001.xml").is_file()
    with pytest.raises(DatasetError, match="cannot download voc2007-test from http://127.0.0.1:9/x.tar"):
        fetch_archive(_archive("1" * 32), tmp_path / "other", "http://127.0.0.1:9/x.tar")
    with pytest.raises(DatasetError, match="unknown archive 'voc2009'"):
        fetch(["voc2009"], tmp_path / "data")


def test_the_table_holds_the_published_archives():
    assert {a.filename for a in ARCHIVES.values()} == {
        "VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar", "VOCtrainval_11-May-2012.tar",
        "selective_search_data.tgz"}
    assert all(len(a.md5) == 32 and int(a.md5, 16) >= 0 for a in ARCHIVES.values())


@pytest.mark.slow
def test_fetch_voc_script_against_a_mirror_with_other_files(tmp_path):
    # The script with the real MD5 table, against a mirror whose files are not the published ones:
    # one line naming the file and the sums, exit 2, nothing kept.
    served = tmp_path / "mirror"
    served.mkdir()
    for name in ("VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar"):
        _voc_tar(served / name)
    data = tmp_path / "data"
    with _serve(served) as base:
        proc = subprocess.run([sys.executable, str(SCRIPTS / "fetch_voc.py"), "--data", str(data), "--base-url", base,
                               "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    # (torchvision's transfer draws its own progress bar on stderr; the message is one line.)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.lstrip().startswith(("0%", "100%"))]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ") and "VOCtrainval_06-Nov-2007.tar: MD5 " in lines[0]
    assert "c52e279531787c972589f7e41ab4ae64" in lines[0]
    assert not list((data / "archives").iterdir())
