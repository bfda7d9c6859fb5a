"""Acquire files: the one downloader (https only, retried, verified) and the one checked unzip.

* ``download(url, dest, sha256=, md5=, cookies=)`` -> ``dest``, written under a hidden
  temporary name (``run_folders.staged_file``) and given its final name only when complete
  and matching its hash; an existing ``dest`` is never downloaded over
* ``reachable(url)``                 -> does the server answer at all (a quick probe)
* ``safe_extract_zip(zip, folder)``  -> all of a zip or nothing (the course's ``vgg.zip``)
* ``extract_missing(zip, folder)``   -> the entries not there yet (datasets spread over
  several zips into one folder, resumable)

VGG16 (``roadseg.vgg``) and Cityscapes (``roadseg.datasets``) both download through here.
The transfer is pooch's ``HTTPDownloader`` (requests, streaming, tqdm progress bar) and the
hashes are ``pooch.file_hash``.  The retry policy is ours, not ``Pooch.fetch``'s
``retry_if_failed``: pooch (1.9) retries every ``RequestException`` and every hash mismatch
-- measured with ``retry_if_failed=2`` against tests/local_server.py: a 404 was requested
3 times (3.1 s), a wrong hash downloaded the whole file 3 times (the course ``vgg.zip`` is
~500 MB), with waits of 1, 2, ... s it does not let us change.  Here only network failures
and 5xx are retried.

Zips are checked before anything is written: an absolute path, a drive letter, a ``..``
part or a symlink entry is refused with one line.  (pooch's ``Unzip`` processor uses
``zipfile``'s extraction, which silently rewrites ``../x`` to ``x`` instead of refusing.)
"""
import os
import shutil
import stat
import time
import urllib.parse
import zipfile
import zlib
from pathlib import PureWindowsPath

import pooch
import requests
import urllib3
from tqdm.auto import tqdm

from roadseg.errors import UserError, reason
from roadseg.log import logger
from roadseg.run_folders import make_dirs, refuse_existing, staged_dir, staged_file

RETRY_BACKOFF_S = 1.0     # wait before the 2nd download attempt; doubles after
CHUNK_BYTES = 1 << 20     # pooch's default (1 kB, flushed each time) costs a syscall per kB
USER_AGENT = "roadseg (pooch)"
# requests' errors worth asking again for: no connection, timeouts, a connection cut short
# (urllib3 checks Content-Length: a short body is a ChunkedEncodingError)
RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class DownloadError(UserError):
    """The network let a download down (no connection, timeout, HTTP error, cut short)."""


# ----------------------------------------------------------------------------- downloads

def check_url(url):
    """UserError unless url is https (also for every redirect a download follows)."""
    if urllib.parse.urlsplit(url).scheme != "https":
        raise UserError(f"refusing to download {url}: only https:// addresses are allowed; "
                        "use the https address")


def _check_response(response, *args, **kwargs):
    """A requests hook on every response: a redirect to http is refused before it is followed."""
    check_url(response.url)
    if response.is_redirect:
        check_url(urllib.parse.urljoin(response.url, response.headers["location"]))


def _reason(err):
    """The innermost cause of a requests error, in a few words ('Read timed out.',
    '[Errno 111] Connection refused', 'connection closed after 5 of 12 bytes'): the cause is
    found here, its words by ``errors.reason``."""
    while True:
        nested = [e for e in (getattr(err, "reason", None), *err.args)
                  if isinstance(e, BaseException) and e is not err]
        if not nested:
            break
        err = nested[0]
    if isinstance(err, urllib3.exceptions.IncompleteRead):   # expected: the bytes still missing
        return f"connection closed after {err.partial} of {err.partial + err.expected} bytes"
    return reason(err)


def _fetch(url, part, dest, retries, **get_kwargs):
    """Stream url into part (truncated at each attempt) with pooch's HTTPDownloader,
    ``retries`` attempts in all, waiting RETRY_BACKOFF_S, then twice as long, ..."""
    for attempt in range(1, retries + 1):
        # pooch sets total from Content-Length, and uses the bar only while bool(bar), which
        # for tqdm means total > 0: 1 until then
        bar = tqdm(desc=os.path.basename(dest), total=1, unit="B", unit_scale=True, unit_divisor=1024)
        try:
            pooch.HTTPDownloader(progressbar=bar, chunk_size=CHUNK_BYTES, **get_kwargs)(url, part, None)
            return
        except requests.HTTPError as err:
            status, why = err.response.status_code, err.response.reason
            problem = f"HTTP {status} {why}"
            if status < 500:                     # 4xx: asking again will not help
                raise DownloadError(f"could not download {url}: {problem}; check the address") from None
        except RETRYABLE as err:
            problem = _reason(err)
        except requests.RequestException as err:  # a bad address, too many redirects, ...
            raise DownloadError(f"could not download {url}: {_reason(err)}; check the address") from None
        finally:
            bar.close()
        if attempt < retries:
            wait = RETRY_BACKOFF_S * 2 ** (attempt - 1)
            logger.warning(f"download of {url} failed ({problem}); retrying in {wait:g} s")
            time.sleep(wait)
    raise DownloadError(f"could not download {url}: {problem} (tried {retries} times); check your "
                        f"internet connection and retry, or download it by hand to {dest}")


def _verify(url, part, expected_size, hashes):
    """UserError unless the downloaded file has the expected size and hashes."""
    size = os.path.getsize(part)
    if size == 0:
        raise DownloadError(f"{url} sent an empty file; check the address")
    if expected_size is not None and size != expected_size:
        raise UserError(f"{url} sent {size} bytes, expected {expected_size}: the file on the "
                        "server is not the expected one; check the address")
    for algorithm, wanted in hashes.items():
        got = pooch.file_hash(part, alg=algorithm) if wanted else None
        if got != (wanted and wanted.lower()):
            raise UserError(f"downloaded {url}, but its {algorithm} is {got}, expected {wanted}; "
                            "nothing was saved: retry, and if it persists check the address and hash")


def download(url, dest, sha256=None, timeout=30, retries=3, expected_size=None, *, md5=None,
             cookies=None):
    """Download url to dest with a progress bar; return dest.

    The data goes to a hidden temporary file next to dest, which gets the name dest only
    once it is complete (Content-Length), of ``expected_size`` and matches sha256 / md5
    when given.  Connection errors, timeouts, server errors (5xx) and short reads are
    tried ``retries`` times in all; 4xx and a wrong hash are not retried.  ``cookies``: a
    logged-in session's (Cityscapes).  Raises UserError (DownloadError for network
    failures); never overwrites dest, never leaves a partial file under its name.
    """
    check_url(url)
    refuse_existing(dest, f"move or delete it before downloading {url}")
    with staged_file(dest) as part:
        _fetch(url, part, dest, max(1, retries), timeout=timeout, cookies=cookies,
               headers={"User-Agent": USER_AGENT}, hooks={"response": [_check_response]})
        _verify(url, part, expected_size, {"sha256": sha256, "md5": md5})
    return dest


def reachable(url, timeout=3):
    """True when the server of ``url`` answers within ``timeout`` seconds (proxies honoured),
    so that a machine without network moves on in seconds instead of retrying downloads."""
    parts = urllib.parse.urlsplit(url)
    try:
        requests.head(f"{parts.scheme}://{parts.netloc}/", timeout=timeout).close()
    except (requests.RequestException, ValueError):
        return False
    return True   # any answer, an error status included


# ----------------------------------------------------------------------------- zips

def _open_zip(zip_path, fix):
    try:
        return zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise UserError(f"zip file {zip_path} does not exist") from None
    except zipfile.BadZipFile as err:
        raise UserError(f"{zip_path} is not a complete zip file ({err}); {fix}") from None


def _parts(info):
    return info.filename.replace("\\", "/").split("/")


def _top_level_names(zip_path, archive):
    """First path component of every entry; UserError on any entry that could
    land outside the target folder (absolute, drive letter, '..', symlink)."""
    tops = set()
    for info in archive.infolist():
        parts = _parts(info)
        is_link = stat.S_ISLNK(info.external_attr >> 16)
        if is_link or parts[0] == "" or PureWindowsPath(info.filename).drive or ".." in parts:
            raise UserError(f"{zip_path} holds an unsafe entry {info.filename!r} (a symlink or a "
                            "path outside the target folder); nothing was extracted: delete "
                            "the file and download it from a trusted source")
        tops.add(parts[0])
    return sorted(tops)


def _copy_entry(archive, info, path):
    """Stream one entry to the new file path (zipfile checks its CRC while reading)."""
    with archive.open(info) as src, open(path, "xb") as dst:
        shutil.copyfileobj(src, dst, CHUNK_BYTES)


def _new_file(archive, info, path):
    """One entry to ``path``, which gets its name only when complete (run_folders.staged_file)."""
    if info.file_size == 0:   # nothing to half-write (and staged_file refuses empty files)
        make_dirs(os.path.dirname(path))
        open(path, "xb").close()
        return
    with staged_file(path) as tmp:
        _copy_entry(archive, info, tmp)


def _damaged(zip_path, err, fix):
    return UserError(f"{zip_path} is damaged ({err}); {fix}")


def safe_extract_zip(zip_path, target_dir):
    """Extract zip_path so its entries end up inside target_dir (created if needed).

    The archive is checked first (CRCs, and that no entry escapes target_dir); each
    top-level entry is then written under a hidden name (run_folders.staged_dir /
    staged_file) and renamed into place when complete.  Entries that already exist are
    refused, never overwritten.
    """
    fix = f"delete {zip_path} and download it again"
    with _open_zip(zip_path, fix) as archive:
        try:
            bad_entry = archive.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise _damaged(zip_path, err, fix) from None
        if bad_entry is not None:
            raise _damaged(zip_path, f"{bad_entry} fails its CRC check", fix)
        tops = _top_level_names(zip_path, archive)
        make_dirs(target_dir)
        for top in tops:
            refuse_existing(os.path.join(target_dir, top), f"move it away before extracting {zip_path}")
        for top in tops:
            members = [info for info in archive.infolist() if _parts(info)[0] == top]
            if len(members) == 1 and len(_parts(members[0])) == 1:   # a file at the top
                _new_file(archive, members[0], os.path.join(target_dir, top))
                continue
            with staged_dir(os.path.join(target_dir, top)) as tmp:
                for info in members:
                    path = os.path.join(tmp, *_parts(info)[1:])
                    if info.is_dir():
                        os.makedirs(path, exist_ok=True)
                    else:
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        _copy_entry(archive, info, path)


def extract_missing(zip_path, target_dir):
    """Extract the files of zip_path that target_dir does not hold yet; return target_dir.

    Files that exist are left alone, so several zips can share a folder (Cityscapes'
    packages each hold README and license.txt) and an interrupted extraction resumes.
    Every entry is checked before anything is written (no symlink, nothing outside
    target_dir); each file gets its name only when complete.
    """
    fix = f"delete {zip_path} and download it again"
    with _open_zip(zip_path, fix) as archive:
        _top_level_names(zip_path, archive)
        todo = [info for info in archive.infolist() if not info.is_dir() and
                not os.path.lexists(os.path.join(target_dir, *_parts(info)))]
        try:
            for info in tqdm(todo, desc=f"unzipping {os.path.basename(zip_path)}", unit="file"):
                _new_file(archive, info, os.path.join(target_dir, *_parts(info)))
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise _damaged(zip_path, err, fix) from None
    return target_dir
