"""Shard pattern expansion and an offset-aware tar reader.

Why our own reader: exact resume must restart a shard in the middle without reading what came before, so a
raw sample remembers the byte offset of its first tar header (`__offset__`) and the reader can start at any
such offset. It parses the 512-byte headers that python's tarfile / webdataset's TarWriter / img2dataset write:
ustar (name + prefix), GNU longname ('L') and pax ('x', path/size). Members are grouped into samples the way
webdataset does (key = path up to the first dot of the basename, extension lower-cased).

URLs are local paths or `pipe:CMD` (CMD's stdout is read as the tar stream; a non-zero exit status is an
error naming the URL). A pipe cannot seek: starting it at an offset reads through the bytes before it.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from typing import Iterator

import braceexpand

BLOCK = 512
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_READ_CHUNK = 1 << 20
_BIG_READ = 64 << 20  # members larger than this are read in chunks: a garbled size never allocates up front


class TarError(Exception):
    """A shard that cannot be read on. `reason`: "truncated_tar" (the file ends inside a member), "corrupt_tar"
    (a garbled header, number field or pax record), "not_a_tar" (the file does not start with a tar header: an
    HTML/XML error page or random bytes saved under a .tar name) or "empty_shard" (a shard read from its start
    holds no sample, e.g. a zero-byte file)."""

    def __init__(self, reason: str, url: str, offset: int, detail: str):
        super().__init__(f"{reason} in {url} at byte {offset}: {detail}")
        self.reason, self.url, self.offset = reason, url, offset


class PipeError(RuntimeError):
    pass


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand `pattern` (several patterns may be joined with '::', as in open_clip); every local file
    must exist (`pipe:` URLs are not checked). Raises naming the pattern when nothing matches or files are missing."""
    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part.strip())]
    local = [u for u in urls if not is_pipe(u)]
    found = [u for u in local if os.path.isfile(u)]
    if local and not found:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no file (expanded to {len(urls)} names, "
                                f"e.g. {local[0]!r}); did you generate the data?")
    if len(found) != len(local):
        found_set = set(found)
        missing = [u for u in local if u not in found_set]
        raise FileNotFoundError(f"shard pattern {pattern!r}: {len(missing)} of {len(urls)} files are missing, "
                                f"e.g. {missing[0]!r}")
    return urls


class _PipeFile:
    """Read-only, forward-only file over a subprocess's stdout; `seek` forward reads through."""

    def __init__(self, url: str):
        self.url = url
        self._err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty stderr can never block the command
        self._proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=self._err)
        self._pos = 0

    def read(self, n: int) -> bytes:
        data = self._proc.stdout.read(n)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int) -> None:
        if offset < self._pos:
            raise OSError(f"{self.url}: cannot seek back in a pipe")
        while self._pos < offset:
            if not self.read(min(_READ_CHUNK, offset - self._pos)):
                break

    def check(self) -> None:
        """Drain stdout, wait, and raise if the command failed."""
        while self._proc.stdout.read(_READ_CHUNK):
            pass
        rc = self._proc.wait()
        if rc != 0:
            self._err.seek(0)
            tail = self._err.read()[-400:].decode("utf-8", "replace").strip()
            raise PipeError(f"shard command {self.url!r} exited with status {rc}" + (f": {tail}" if tail else ""))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.stdout.close()
        self._proc.wait()
        self._err.close()


@contextlib.contextmanager
def open_shard(url: str):
    f = _PipeFile(url) if is_pipe(url) else open(url, "rb")
    try:
        yield f
    finally:
        f.close()


def _seek(f, offset: int) -> None:
    if offset or not isinstance(f, _PipeFile):  # a fresh pipe is at 0 already
        f.seek(offset)


class _Garbled(Exception):
    """A header, number field or pax record that does not parse (turned into TarError with url and offset)."""


def _octal(field: bytes, what: str) -> int:
    """A tar number field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80) for large values."""
    if field and field[0] == 0x80:  # GNU base-256 for sizes >= 8 GiB (0xff would be a negative number)
        return int.from_bytes(field[1:], "big")
    s = field.split(b"\0", 1)[0].strip()
    if not s:
        return 0
    if not all(48 <= c <= 55 for c in s):  # digits 0-7 only (int() would also take '+', '_' and spaces)
        raise _Garbled(f"{what} field is not an octal number: {bytes(field)!r}")
    return int(s, 8)


def _cstr(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """Records "LEN KEY=VALUE\n" (LEN counts the whole record, itself included)."""
    out, i = {}, 0
    while i < len(data):
        if data[i] == 0 and data.count(b"\0", i) == len(data) - i:
            break  # NUL padding after the last record
        sp = data.find(b" ", i, i + 21)
        digits = data[i:sp] if sp > i else b""
        if not digits or not digits.isdigit():
            raise _Garbled(f"pax record at {i} has no length: {data[i:i + 40]!r}")
        n = int(digits)
        end = i + n
        if end > len(data) or n <= sp - i + 1 or data[end - 1:end] != b"\n":
            raise _Garbled(f"pax record at {i} has a wrong length {n}: {data[i:i + 40]!r}")
        key, eq, val = data[sp + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise _Garbled(f"pax record at {i} is not KEY=VALUE: {data[i:i + 40]!r}")
        out[key.decode("utf-8", "surrogateescape")] = val.decode("utf-8", "surrogateescape")
        i = end
    return out


def _read(f, n: int) -> bytes:
    """Up to n bytes (fewer only at EOF); a large n is read in chunks so memory grows only with real data."""
    if n <= _BIG_READ:
        return f.read(n)
    parts, left = [], n
    while left:
        part = f.read(min(left, _BIG_READ))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _members(f, url: str, start: int) -> Iterator[tuple[int, str, bytes]]:
    """(offset of the member's first header, name, data) for each regular file from byte `start` on.
    Raises TarError on a truncated or garbled archive (never ValueError: every number field and pax record is
    checked), "not_a_tar" when the file's very first header is not a tar header. Stops at the end-of-archive
    block or a clean EOF."""
    _seek(f, start)
    pos, first, longname, pax = start, None, None, {}
    while True:
        hdr = f.read(BLOCK)
        at = pos if first is None else first
        if not hdr and first is None:
            return  # clean EOF on a member boundary (archive without end blocks)
        if hdr == b"\0" * BLOCK:
            if first is not None:
                raise TarError("corrupt_tar", url, first, "end-of-archive block after an extended header")
            return
        if pos == 0 and (len(hdr) < BLOCK or not _header_ok(hdr)):
            raise TarError("not_a_tar", url, 0, f"the file does not start with a tar header; its first bytes are "
                                                f"{hdr[:48]!r} (an error page saved by a failed download?)")
        if len(hdr) < BLOCK:
            raise TarError("truncated_tar", url, at, "file ends inside a header")
        try:
            if not _header_ok(hdr):
                raise _Garbled("bad header checksum")
            if first is None:
                first = pos
            size, kind = _octal(hdr[124:136], "size"), hdr[156:157]
            if kind in (b"0", b"\0", b"7") and "size" in pax:
                if not pax["size"].isdigit():
                    raise _Garbled(f"pax size is not a number: {pax['size'][:40]!r}")
                size = int(pax["size"])
        except _Garbled as g:
            raise TarError("corrupt_tar", url, at, str(g)) from None
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = _read(f, size)
        if len(data) < size:
            raise TarError("truncated_tar", url, first, f"file ends inside member data ({len(data)} of {size} bytes)")
        if padded > size and len(f.read(padded - size)) < padded - size:
            raise TarError("truncated_tar", url, first, "file ends inside member padding")
        pos += BLOCK + padded
        if kind == b"L":
            longname = _cstr(data)
            continue
        if kind == b"x":
            try:
                pax = _pax(data)
            except _Garbled as g:
                raise TarError("corrupt_tar", url, first, str(g)) from None
            continue
        if kind in (b"0", b"\0", b"7"):
            if "path" in pax:
                name = pax["path"]
            elif longname is not None:
                name = longname
            else:
                name = _cstr(hdr[0:100])
                if hdr[257:263] == b"ustar\x00" and hdr[345] != 0:  # POSIX ustar: name = prefix/name
                    name = _cstr(hdr[345:500]) + "/" + name
            yield first, name, data
        # directories, links, global pax headers and the like carry no sample data
        first, longname, pax = None, None, {}


def _header_ok(hdr: bytes) -> bool:
    """The checksum field parses and matches (unsigned sum of the header with the field read as spaces)."""
    try:
        chk = _octal(hdr[148:156], "checksum")
    except _Garbled:
        return False
    return chk == sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])


def _samples_from(f, url: str, start: int, shard: int | None) -> Iterator[tuple[dict, int]]:
    """(sample, offset of the next unread sample) from byte `start`; a sample is a run of members sharing a key.
    On TarError the sample assembled so far is yielded, then the error propagates (from the same offset again
    when restarted there)."""
    cur = None
    try:
        for off, name, data in _members(f, url, start):
            m = _KEY.match(name)
            if m is None:
                continue  # no extension: not part of any sample (webdataset skips these too)
            key, ext = m.group(1), m.group(2).lower()
            if cur is not None and (key != cur["__key__"] or ext in cur):
                yield cur, off
                cur = None
            if cur is None:
                cur = {"__key__": key, "__url__": url, "__shard__": shard, "__offset__": off}
            cur[ext] = data
    except TarError as e:
        if cur is not None:  # its members were read whole; if one is missing, the decoder will say so
            yield cur, e.offset
        raise
    if cur is not None:
        yield cur, f.tell()
    if isinstance(f, _PipeFile):
        f.check()


def iter_samples(url: str, start: int = 0, shard: int | None = None) -> Iterator[tuple[dict, int]]:
    """Open `url` and yield (sample, next_offset) from byte `start` (a sample boundary) to the end. A shard
    read from its start that holds no sample at all raises TarError "empty_shard" at the end."""
    with open_shard(url) as f:
        n = 0
        try:
            for item in _samples_from(f, url, start, shard):
                n += 1
                yield item
        except TarError:
            if isinstance(f, _PipeFile):
                f.check()  # a failed command explains the truncation better than "truncated tar"
            raise
        if n == 0 and start == 0:
            what = "the command printed nothing" if isinstance(f, _PipeFile) else (
                "the file is empty (0 bytes)" if f.tell() == 0 else "the tar holds no sample")
            raise TarError("empty_shard", url, 0, what)


def read_samples_at(url: str, offsets: list[int], shard: int | None = None) -> dict[int, dict]:
    """{offset: sample} for samples starting at the given byte offsets (local: one seek each; pipe: one pass)."""
    want, out = sorted(set(offsets)), {}
    if not want:
        return out
    with open_shard(url) as f:
        if isinstance(f, _PipeFile):
            for smp, _ in _samples_from(f, url, want[0], shard):
                if smp["__offset__"] in want:
                    out[smp["__offset__"]] = smp
                if smp["__offset__"] >= want[-1]:
                    break
        else:
            for off in want:
                it = _samples_from(f, url, off, shard)
                out[off] = next(it)[0]
                it.close()
    missing = [o for o in want if o not in out]
    if missing:
        raise ValueError(f"{url}: no sample starts at byte {missing[0]}; did the shard change since the checkpoint?")
    return out


def raw_samples(urls: list[str]) -> Iterator[dict]:
    """{'__key__', '__url__', '__shard__', '__offset__', ext: bytes, ...} per sample, in tar order, nothing
    decoded. A broken tar raises TarError (the loaders skip the rest of that shard and count it instead)."""
    for i, url in enumerate(urls):
        for smp, _ in iter_samples(url, 0, i):
            yield smp
