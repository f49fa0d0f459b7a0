"""Image files decoded once: each image read at the working resolution, all of them written into one
memory-mapped uint8 array under --cache-dir, named by the files' paths, sizes and times, with an index that
records the unreadable files and a checksum of the pixels. A cache that does not match is built again, never
read; a signal or a full disk while writing it leaves nothing behind."""

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from common import DataError, require_regular_file, write_atomic


def read_rgb(path, size):
    """An image file as a (size, size, 3) uint8 array: every mode becomes RGB, 16-bit and float images are
    stretched from their own min..max, and the image is resized to a square, as the paper resized HAM10000
    (§3)."""
    require_regular_file(path, OSError)  # a FIFO named .jpg would block the decoding for ever
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: let libjpeg decode at the smallest scale that is still >= size
        # the EXIF orientation of a photo taken with the camera turned (phones, dermatoscopes on phones): the
        # pixels as the photo is shown, as PIL's own exif_transpose turns them
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(img, dtype=np.float64)
            if not np.isfinite(a).all():  # a float image: NaN or inf would make the stretch meaningless
                raise ValueError(f"{int((~np.isfinite(a)).sum())} pixel value(s) are NaN or infinite")
            img = Image.fromarray(
                np.round((a - a.min()) / max(a.max() - a.min(), 1e-12) * 255).astype(np.uint8)
            )
        return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))


def decode_all(paths, size, cache_dir, skip_bad):
    """All `paths` decoded at `size` into a memory-mapped .npy, built once and reused while no file changes.
    Returns (images, {position: reason} of unreadable files). Unreadable files are an error unless
    skip_bad."""
    stamp = "\n".join(map(file_stamp, paths))
    # surrogateescape: a file name's bytes that are not UTF-8 (os.fsdecode keeps them as lone surrogates)
    key = hashlib.sha256(f"{size}\n{stamp}".encode("utf-8", "surrogateescape")).hexdigest()[:20]
    cache, index = cache_dir / "images" / f"{size}px-{key}.npy", cache_dir / "images" / f"{size}px-{key}.json"
    shape = (len(paths), size, size, 3)
    entry = cached(cache, index, shape)
    if entry is None:  # absent, or damaged since it was written
        check_free_space(cache_dir, cache, shape)
        broken, digest = {}, {}

        def decode_into(tmp):
            images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            preallocate(tmp)

            def decode(j):
                try:
                    images[j] = read_rgb(paths[j], size)
                except Exception as e:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError
                    return j, f"{type(e).__name__}: {e}"

            pool = ThreadPoolExecutor(os.cpu_count())  # PIL decodes with the GIL released
            try:
                broken.update(b for b in pool.map(decode, range(len(paths))) if b)
            finally:  # stopped (common.Stopped, a signal): the images not yet begun are not decoded
                pool.shutdown(cancel_futures=True)
            images.flush()
            digest["sha256"] = hashlib.sha256(images).hexdigest()

        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, decode_into)
            record = json.dumps({"size": size, "count": len(paths), "bad": broken, **digest}, indent=1)
            write_atomic(index, lambda tmp: tmp.write_text(record))  # last: the array is complete
        except OSError as e:
            raise DataError(f"--cache-dir {cache_dir}: cannot write the decoded images there ({e})") from None
        entry = cached(cache, index, shape)
    images, broken = entry
    if broken and not skip_bad:
        j, reason = next(iter(broken.items()))
        raise DataError(
            f"{paths[j]}: unreadable image ({reason}); {len(broken)} such file(s), "
            "--skip-bad-images skips them"
        )
    return images, broken


def check_free_space(cache_dir, cache, shape):
    """The cache's size against the free space of --cache-dir, before anything is written: filling the disk
    would fail, and take the space that every other writer (the error line itself, on a full disk) needs."""
    folder = next((p for p in (cache.parent, *cache.parents) if p.exists()), None)
    need = int(np.prod(shape, dtype=np.int64))
    try:
        free = shutil.disk_usage(folder).free if folder is not None else need
    except OSError:
        return  # not measurable here: the write itself will say what fails
    if need > free:
        raise DataError(
            f"--cache-dir {cache_dir}: the decoded images need {need} bytes ({need / 1e9:.1f} GB: "
            f"{shape[0]} images at {shape[1]} px) for {cache.name}, and only {free} bytes are free there "
            f"({free / 1e9:.1f} GB); choose a smaller --image-size or another --cache-dir"
        )


def file_stamp(path):
    """What changes when an image file does: its real path, size and modification time. A file that cannot be
    stat'ed (a broken symbolic link) is stamped as such; decoding it then fails, and says why."""
    try:
        stat = path.stat()
    except OSError:
        return f"{path} unreadable"
    return f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}"


def preallocate(path):
    """Reserve the blocks of a memory-mapped file before writing into it. A page of a sparse mapping that the
    full disk cannot back kills the process with SIGBUS; reserved first, the full disk is an OSError (ENOSPC)
    here."""
    with open(path, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def cached(cache, index, shape):
    """(images, {position: reason}) of a complete cache entry, or None where it is absent or damaged (a .npy
    truncated, overwritten or replaced after it was written, an unreadable index): such an entry is built
    again, never read. The SHA-256 of the pixels, recorded when the entry was written, is checked once here
    (measured: 0.26 - 0.6 s for 450 MB on a 2-core machine)."""
    try:
        for path in (index, cache):  # a FIFO planted there: rebuilt over, not waited on
            require_regular_file(path, OSError)
        record = json.loads(index.read_text())
        broken = {int(j): reason for j, reason in record["bad"].items()}
        images = np.load(cache, mmap_mode="r")  # numpy refuses a file shorter than its header says
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if images.shape != shape or images.dtype != np.uint8:
        return None
    return (images, broken) if hashlib.sha256(images).hexdigest() == record.get("sha256") else None
