"""Extract Jane Austen's novels from the Debian package r-cran-janeaustenr into gzip text files.

The package's ``data/Rdata.rdb`` is R's lazy-load database: a sequence of records, each a 4-byte
big-endian uncompressed length followed by one zlib stream. Every record is an R serialization
(format ``X\\n``, version 3) of one character vector (one element per line of the novel):

    "X\\n" | version int | writer version int | min reader version int | len int + native encoding
    STRSXP flags int (type 16) | length int | length x (CHARSXP flags int (type 9) | nbytes int | bytes)

The novels are told apart by their first line (the title). Public-domain text.

Usage: python benchmarks/data/extract_austen.py [RDB] [OUT_DIR]
(defaults: /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb, sglang_depthkv/data)
"""

from __future__ import annotations

import gzip
import struct
import sys
import zlib
from pathlib import Path

DEFAULT_RDB = "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
# title line -> output slug; the novels we ship (haystacks: emma, persuasion, northanger;
# calibration text, kept apart from every haystack: pride).
WANTED = {
    "EMMA": "emma",
    "PERSUASION": "persuasion",
    "NORTHANGER ABBEY": "northanger",
    "PRIDE AND PREJUDICE": "pride",
}


def records(blob: bytes):
    """Yield the decompressed payload of every [length][zlib] record."""
    pos = 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise ValueError(f"truncated record header at byte {pos}")
        expected = struct.unpack(">I", blob[pos:pos + 4])[0]
        dec = zlib.decompressobj()
        payload = dec.decompress(blob[pos + 4:])
        if not dec.eof:
            raise ValueError(f"record at byte {pos}: zlib stream does not end")
        if len(payload) != expected:
            raise ValueError(f"record at byte {pos}: {len(payload)} bytes, header says {expected}")
        pos = len(blob) - len(dec.unused_data)
        yield payload


def parse_character_vector(payload: bytes) -> list[str]:
    """Parse an R serialization (XDR, version 3) of a plain character vector."""
    if payload[:2] != b"X\n":
        raise ValueError(f"not an XDR R serialization (starts with {payload[:2]!r})")
    pos = 2
    version, _writer, _reader = struct.unpack(">iii", payload[pos:pos + 12])
    pos += 12
    if version != 3:
        raise ValueError(f"R serialization version {version}, expected 3")
    (enc_len,) = struct.unpack(">i", payload[pos:pos + 4])
    pos += 4 + enc_len
    flags, length = struct.unpack(">ii", payload[pos:pos + 8])
    pos += 8
    if flags & 0xFF != 16:
        raise ValueError(f"top-level object has SEXP type {flags & 0xFF}, expected 16 (character vector)")
    out = []
    for i in range(length):
        cflags, nbytes = struct.unpack(">ii", payload[pos:pos + 8])
        pos += 8
        if cflags & 0xFF != 9:
            raise ValueError(f"element {i}: SEXP type {cflags & 0xFF}, expected 9 (CHARSXP)")
        if nbytes == -1:  # NA_character_
            out.append("")
            continue
        out.append(payload[pos:pos + nbytes].decode("utf-8"))
        pos += nbytes
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rdb = Path(argv[0] if argv else DEFAULT_RDB)
    out_dir = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[2] / "sglang_depthkv" / "data")
    if not rdb.is_file():
        raise SystemExit(f"{rdb} not found: apt-get install -y r-cran-janeaustenr")
    found = {}
    for payload in records(rdb.read_bytes()):
        lines = parse_character_vector(payload)
        title = next((ln.strip() for ln in lines if ln.strip()), "")
        slug = WANTED.get(title.upper())
        if slug is None:
            print(f"skip: {title!r} ({len(lines)} lines)")
            continue
        text = "\n".join(lines).strip() + "\n"
        path = out_dir / f"austen_{slug}.txt.gz"
        # mtime=0: byte-identical output on every run
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
            gz.write(text.encode("utf-8"))
        found[slug] = path
        print(f"{slug}: {len(lines)} lines, {len(text)} chars -> {path} ({path.stat().st_size} bytes)")
    missing = sorted(set(WANTED.values()) - set(found))
    if missing:
        raise SystemExit(f"novels not found in {rdb}: {missing}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
