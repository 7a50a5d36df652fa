"""Checked image/mask reading and the Canny boundary labels (OpenCV, no torch)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from edgeseg.errors import EdgesegError

log = logging.getLogger(__name__)
_ELLIPSE5 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


MAX_PIXELS = 1 << 27  # ~134 Mpx (11585 x 11585); colonoscopy frames are at most a few Mpx
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode(path: Path, flags: int) -> np.ndarray:
    """The one checked image reader: refuses an unreadable, empty, truncated or oversized file with one line.

    The header size is checked before anything is decoded (a 40000 x 40000 PNG header would make OpenCV
    assert, or allocate gigabytes under its own limit), and the container is checked by content, not suffix.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgesegError(f"cannot read {path}: {e.strerror or e}") from None
    if not data:
        raise EdgesegError(f"{path} is empty (0 bytes); replace or remove it")
    size = _header_size(data)
    if size is not None and (size[0] * size[1] > MAX_PIXELS or 0 in size):
        raise EdgesegError(f"{path} declares a {size[0]}x{size[1]} image, outside the {MAX_PIXELS >> 20} Mpx "
                           "that edgeseg decodes; resize or replace the file")
    is_jpeg = data[:2] == b"\xff\xd8"
    # libjpeg decodes a truncated file with only a warning: require the end-of-image marker here, and below
    # check that the entropy-coded data really holds every block when the image ends in libjpeg's grey fill.
    if is_jpeg and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise EdgesegError(f"{path} is a truncated or corrupt JPEG (no end-of-image marker); re-export the file")
    if data[:8] == _PNG_SIGNATURE and b"IEND" not in data[-12:]:
        raise EdgesegError(f"{path} is a truncated or corrupt PNG (no IEND chunk); re-export the file")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "cv2.error"
        raise EdgesegError(f"{path} cannot be decoded ({first[:120]}); replace or remove it") from None
    if img is None or img.size == 0:
        raise EdgesegError(f"{path} is not a readable image; replace or remove it")
    if is_jpeg and _ends_in_grey_fill(img) and jpeg_scans_complete(data) is not True:
        raise EdgesegError(f"{path} is a truncated or corrupt JPEG (its image data stops before the last block); "
                           "re-export the file")
    return img


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding; None for other formats (OpenCV's own
    limit then applies, and its error is caught)."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"\xff\xd8":
        for marker, seg in _jpeg_segments(data):
            if marker in _SOF and len(seg) >= 5:
                return int.from_bytes(seg[3:5], "big"), int.from_bytes(seg[1:3], "big")
    return None


# Start-of-frame markers (every JPEG coding process); 0xC4 (DHT), 0xC8 and 0xCC are not frames.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # the first marker that is not a restart marker
_RESTART = re.compile(rb"\xff[\xd0-\xd7]")


def _jpeg_segments(data: bytes, pos: int = 2) -> Iterator[tuple[int, bytes]]:
    """(marker, payload) of the marker segments from ``pos`` up to and including the next SOS; stops at EOI
    or malformed data (the decoder then reports it)."""
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            return
        yield marker, data[pos + 4:pos + 2 + length]
        pos += 2 + length
        if marker == 0xDA:
            return


def _ends_in_grey_fill(img: np.ndarray) -> bool:
    """libjpeg fills the blocks after a premature end of data with zero coefficients: flat 128 grey to the end
    of the image. A complete photo almost never ends in exactly that; the costly scan walk settles the rest."""
    return bool((img[-2:, -2:] == 128).all())


def jpeg_scans_complete(data: bytes) -> bool | None:
    """Whether every scan of a baseline (sequential, Huffman, 8-bit) JPEG holds all of its blocks, found by
    walking the Huffman codes without decoding pixels. None for other JPEG kinds (progressive, arithmetic,
    lossless, 12-bit), which this does not walk. A file cut short and given a new end-of-image marker decodes
    with only a libjpeg warning; this is how it is told apart from a complete one."""
    tables: dict[tuple[int, int], list] = {}
    frame, restart, covered, pos = None, 0, set(), 2
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:
            return frame is not None and covered == set(frame[2])
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        seg, pos = data[pos + 4:pos + 2 + length], pos + 2 + length
        if marker in _SOF:
            if marker not in (0xC0, 0xC1) or len(seg) < 6 or seg[0] != 8:
                return None
            comps = {seg[6 + 3 * i]: (seg[7 + 3 * i] >> 4, seg[7 + 3 * i] & 15) for i in range(seg[5])}
            frame = (int.from_bytes(seg[3:5], "big"), int.from_bytes(seg[1:3], "big"), comps)
        elif marker == 0xC4:
            if not _read_huffman_tables(seg, tables):
                return False
        elif marker == 0xDD and len(seg) >= 2:
            restart = int.from_bytes(seg[:2], "big")
        elif marker == 0xDA:
            m = _SCAN_END.search(data, pos)
            end = m.start() if m else len(data)
            if frame is None or not _walk_scan(data[pos:end], frame, seg, tables, restart):
                return False
            covered |= {seg[1 + 2 * i] for i in range(seg[0])}
            pos = end
    return False  # no end-of-image marker


def _read_huffman_tables(seg: bytes, tables: dict) -> bool:
    """Parse a DHT segment into 16-bit lookup lists: peek 16 bits -> (code length, symbol) or None."""
    i = 0
    while i + 17 <= len(seg):
        cls_id, counts = seg[i], seg[i + 1:i + 17]
        symbols = seg[i + 17:i + 17 + sum(counts)]
        if len(symbols) != sum(counts):
            return False
        lut: list = [None] * 65536
        code, k = 0, 0
        for length, count in enumerate(counts, 1):
            for _ in range(count):
                lo, hi = code << (16 - length), (code + 1) << (16 - length)
                if hi > 65536:
                    return False
                lut[lo:hi] = [(length, symbols[k])] * (hi - lo)
                code, k = code + 1, k + 1
            code <<= 1
        tables[(cls_id >> 4, cls_id & 15)] = lut
        i += 17 + len(symbols)
    return i == len(seg)


def _walk_scan(scan: bytes, frame, sos: bytes, tables: dict, restart: int) -> bool:
    width, height, comps = frame
    hmax, vmax = max(h for h, _ in comps.values()), max(v for _, v in comps.values())
    ns = sos[0]
    blocks = []  # (dc table, ac table) of every block of one MCU, in order
    for i in range(ns):
        cid, tid = sos[1 + 2 * i], sos[2 + 2 * i]
        dc, ac = tables.get((0, tid >> 4)), tables.get((1, tid & 15))
        if cid not in comps or dc is None or ac is None:
            return False
        h, v = comps[cid] if ns > 1 else (1, 1)
        blocks += [(dc, ac)] * (h * v)
    if ns > 1:  # interleaved: MCUs of hmax x vmax blocks over the whole frame
        n_mcus = _ceil(width, 8 * hmax) * _ceil(height, 8 * vmax)
    else:  # one component: one block per MCU over that component's own (subsampled) size
        h, v = comps[sos[1]]
        n_mcus = _ceil(_ceil(width * h, hmax), 8) * _ceil(_ceil(height * v, vmax), 8)
    intervals = _RESTART.split(scan) if restart else [scan]
    per = restart or n_mcus
    if len(intervals) < _ceil(n_mcus, per):
        return False
    for i, chunk in enumerate(intervals[:_ceil(n_mcus, per)]):
        if not _walk_interval(chunk.replace(b"\xff\x00", b"\xff"), blocks, min(per, n_mcus - i * per)):
            return False
    return True


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _walk_interval(chunk: bytes, blocks, n_mcus: int) -> bool:
    """Decode the Huffman codes of ``n_mcus`` MCUs (values skipped); False if the data runs out first."""
    nbits = 8 * len(chunk)
    bits = bin(int.from_bytes(b"\x01" + chunk, "big"))[3:] + "1" * 32  # all-ones is never a valid code
    pos = 0
    for _ in range(n_mcus):
        for dc, ac in blocks:
            e = dc[int(bits[pos:pos + 16], 2)]
            if e is None:
                return False
            pos += e[0] + e[1]  # code, then as many value bits as the DC size category
            k = 1
            while k < 64:
                e = ac[int(bits[pos:pos + 16], 2)]
                if e is None:
                    return False
                run, size = e[1] >> 4, e[1] & 15
                pos += e[0] + size
                if size:
                    k += run + 1
                elif run == 15:
                    k += 16
                else:
                    break  # end of block
        if pos > nbits:
            return False
    return True


def read_rgb(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3)."""
    return cv2.cvtColor(_decode(Path(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def read_mask(path: Path, strict: bool = False) -> np.ndarray:
    """Binary mask as uint8 {0, 1} (H, W), read by value at its own bit depth: 8-bit masks are binary in
    {0, 255}, 16-bit ones in {0, 255} or {0, 65535}. Other values are thresholded at half the full value
    with a warning, or refused when ``strict``. A colour mask with equal channels is read as grey."""
    m = _decode(Path(path), cv2.IMREAD_UNCHANGED)
    if m.ndim == 3:
        colour = m[..., :3]  # drop an alpha channel
        same = (colour == colour[..., :1]).all()
        m = colour[..., 0] if same else cv2.cvtColor(np.ascontiguousarray(colour), cv2.COLOR_BGR2GRAY)
    if m.dtype not in (np.uint8, np.uint16):
        raise EdgesegError(f"{path}: mask has pixel type {m.dtype}; save it as an 8-bit (or 16-bit) PNG")
    full = 255 if m.dtype == np.uint8 or int(m.max()) <= 255 else 65535
    odd = np.count_nonzero((m != 0) & (m != full))
    if odd:
        msg = f"{path}: mask is not binary ({odd} pixels not 0/{full})"
        if strict:
            raise EdgesegError(f"{msg}; binarise it (threshold {full // 2}) or drop --strict")
        log.warning("%s; thresholding at %d", msg, full // 2)
    return (m > full // 2).astype(np.uint8)


def read_pair(image_file: Path, mask_file: Path, strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
    img, mask = read_rgb(image_file), read_mask(mask_file, strict)
    if img.shape[:2] != mask.shape:
        raise EdgesegError(f"mask {mask_file} is {mask.shape[1]}x{mask.shape[0]} but image {image_file} is "
                           f"{img.shape[1]}x{img.shape[0]}; they must have the same size")
    return img, mask


def boundary_map(mask01: np.ndarray) -> np.ndarray:
    """UltraSeg boundary label {0, 1}: Canny(30, 90) on the binarised mask, dilated by a 5x5 ellipse."""
    edges = cv2.Canny(mask01.astype(np.uint8) * 255, 30, 90)
    return (cv2.dilate(edges, _ELLIPSE5) > 0).astype(np.uint8)
