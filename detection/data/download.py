"""Downloads of the public data the paper uses: PASCAL VOC 2007 / 2012 and R-CNN's published
selective-search boxes, each checked against its published MD5 before it is unpacked.

The transfer, the MD5 check and the unpacking are torchvision's
(``torchvision.datasets.utils.download_url`` / ``extract_archive``, the code behind
``torchvision.datasets.VOCDetection(download=True)``); this module holds the table of archives,
where each one lands (the layout of ``data/README.md``) and the error messages.

A rerun resumes: an archive already on disk with the right MD5 is not fetched again; a partial
or damaged one fails the check and is fetched again; unpacking an archive again overwrites the
same files.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import urllib.error
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse
from urllib.request import url2pathname

from torchvision.datasets.utils import calculate_md5, check_integrity, download_url, extract_archive

from ..errors import DatasetError

__all__ = ["Archive", "ARCHIVES", "fetch_archive", "fetch"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Archive:
    """One published archive: where it is, its MD5, and what unpacking it gives."""

    name: str
    url: str
    md5: str
    size: str           # as published, for the user's planning
    gives: str          # the folder it unpacks into, relative to the data folder

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_VOC = "http://host.robots.ox.ac.uk/pascal/VOC"
#: MD5s as published with the archives (the same as torchvision's VOCDetection and
#: fast-rcnn's data/scripts/fetch_selective_search_data.sh).
ARCHIVES: dict[str, Archive] = {a.name: a for a in (
    Archive("voc2007-trainval", f"{_VOC}/voc2007/VOCtrainval_06-Nov-2007.tar",
            "c52e279531787c972589f7e41ab4ae64", "439 MB", "VOCdevkit/VOC2007"),
    Archive("voc2007-test", f"{_VOC}/voc2007/VOCtest_06-Nov-2007.tar",
            "b6e924de25625d8de591ea690078ad9f", "431 MB", "VOCdevkit/VOC2007"),
    Archive("voc2012-trainval", f"{_VOC}/voc2012/VOCtrainval_11-May-2012.tar",
            "6cd6e144f989b92b3379bac3b3de84fd", "1.9 GB", "VOCdevkit/VOC2012"),
    # R-CNN's boxes as republished by Fast R-CNN: voc_{2007,2012}_{trainval,test}.mat.
    Archive("selective-search", "https://dl.dropboxusercontent.com/s/orrt7o6bp6ae0tc/selective_search_data.tgz",
            "7078c1db87a7851b31966b96774cd9b9", "460 MB", "selective_search_data"),
)}


def fetch_archive(archive: Archive, data_dir: str | Path, url: str | None = None) -> Path:
    """Download ``archive`` into ``data_dir/archives`` (skipped when a verified copy is there),
    check its MD5, and unpack it into ``data_dir``.

    Args:
        archive: an entry of :data:`ARCHIVES` (or any :class:`Archive`).
        data_dir: the data folder (``data/`` of the repository by default in the scripts).
        url: another location of the same file (a mirror, or a local copy as ``file://...``).
    Returns:
        ``data_dir / archive.gives``.
    Raises:
        DatasetError: the file cannot be fetched, or its MD5 is not the published one (the
            damaged copy is removed, so a rerun fetches it again).
    """
    data_dir = Path(data_dir)
    archives = data_dir / "archives"
    path = archives / archive.filename
    source = url or archive.url
    if not check_integrity(str(path), archive.md5):
        # Fetched under a temporary name and renamed once verified: an interrupted transfer
        # never leaves a file under the archive's name.
        part = path.with_name(path.name + ".part")
        log.info("%s (%s): %s -> %s", archive.name, archive.size, source, path)
        try:
            if source.startswith("file:"):
                # torchvision's transfer needs an HTTP response length; a local copy is copied.
                archives.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(url2pathname(urlparse(source).path), part)
                if not check_integrity(str(part), archive.md5):
                    raise RuntimeError("corrupted")
            else:
                download_url(source, str(archives), filename=part.name, md5=archive.md5)
        except RecursionError as e:
            raise DatasetError(f"cannot download {archive.name} from {source}: {e}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DatasetError(f"cannot download {archive.name} from {source}: {reason}") from None
        except RuntimeError:   # torchvision's "File not found or corrupted." after the transfer
            got = calculate_md5(str(part)) if part.is_file() else "no file"
            part.unlink(missing_ok=True)
            raise DatasetError(f"{source}: MD5 {got} is not the published {archive.md5} of {archive.name} "
                               "(a partial or altered file; nothing was kept, rerun to fetch it again)") from None
        part.replace(path)
    log.info("%s: MD5 verified; unpacking into %s", archive.name, data_dir)
    extract_archive(str(path), str(data_dir))
    target = data_dir / archive.gives
    if not target.is_dir():
        raise DatasetError(f"{path} unpacked without {archive.gives}/ in {data_dir}: not the expected archive")
    return target


def fetch(names: Iterable[str], data_dir: str | Path, base_url: str | None = None) -> list[Path]:
    """Fetch archives of :data:`ARCHIVES` by name; ``base_url`` replaces everything before the
    file name of each URL (a mirror holding the same files)."""
    out = []
    for name in names:
        if name not in ARCHIVES:
            raise DatasetError(f"unknown archive {name!r}; known: {', '.join(ARCHIVES)}")
        archive = ARCHIVES[name]
        url = base_url.rstrip("/") + "/" + archive.filename if base_url else None
        out.append(fetch_archive(archive, data_dir, url))
    return out
