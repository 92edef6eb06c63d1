"""Decoded batches of an image folder's files, in file order, for the model.

Decoding reproduces the validation transform of the ImageNet reference scripts that training
uses — upright (EXIF) RGB, shorter side resized to ``resize_size``, centre crop ``input_size`` —
and stops at uint8 HWC: the exported graph normalises. A file that cannot be decoded
(decompression bomb, empty, truncated, not an image) becomes an error string for its row; the
collate keeps such rows aside so one bad file never stops a batch. Files on object storage are
fetched by several threads at once, each decoding its image as soon as it arrives, so a batch
waits for about one round trip rather than one per image.

Where the decoding runs: threads of this process (small folders, small hosts, ``workers=0``),
DataLoader worker processes (larger hosts), or the GPU (nvJPEG).
"""

from __future__ import annotations

import contextlib
import io
import queue
import struct
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from export.loader_workers import available_cores, worker_context
from export.pixels import Preprocessing, decode_batch_cuda, decode_for_model
from export.storage import adopt_environment, filesystem, is_url, storage_environment
from scoring.image_folder import ImageFile, describe_error

#: Threads fetching (and decoding) one batch from object storage.
_FETCHERS = 16
#: Below this many files, decoding threads: a decoding process's start (a forkserver that
#: imports torch, seconds once per process) costs more than the whole folder's decoding.
TINY_FOLDER = 128
#: Hosts with at most this many cores decode in threads of the scoring process, whatever the
#: folder's size. On 2 quiet cores two threads fed lite0 at 0.67 of the model-only rate on
#: ants/bees where one process managed 0.64, and at 0.43 against 0.25 on 12 MP copies
#: (docs/scoring.md): no IPC, no process start, and the JPEG decoders, Pillow's resize and ONNX
#: Runtime all release the GIL. 16-core hosts keep processes (8 fed the GPU best, see
#: MAX_DECODE_WORKERS); hosts in between are not measured.
THREADED_HOST_CORES = 4
#: Decoding processes at most. On a 16-core H200 host (benchmarks/gpu_check.py, one run) 8
#: processes fed resnet50 1,646 images/s and 15 only 1,354: past 8 the processes starve the
#: scoring process that collates their batches and feeds the GPU.
MAX_DECODE_WORKERS = 8
#: Batches the GPU decoding thread keeps ready ahead of the model.
GPU_BATCHES_AHEAD = 2
#: Batches decoding threads keep ready ahead of the model (``--workers 0``, small folders).
THREAD_BATCHES_AHEAD = 2
T = TypeVar("T")

class DecodedImages(Dataset):
    """Yields ``(index, image or None, error or None)`` for each file, decoded by ``spec``;
    with ``measure_inputs`` also the image's original pixel count (run health's megapixels),
    read from its header before the decode (the same file, in the page cache: ~1 % of a decode).
    """

    def __init__(self, files: Sequence[ImageFile], spec: Preprocessing, *,
                 measure_inputs: bool = False):
        self.files = files
        self.spec = spec
        self.measure_inputs = measure_inputs
        #: The planner's object-storage settings, for decoding processes that predate them.
        self.storage_env = storage_environment() if files and is_url(files[0].path) else {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple:
        try:
            return (i, decode_for_model(self.files[i].path, self.spec), None,
                    *self._pixels(self.files[i].path))
        except Exception as err:  # any decoder failure belongs to this row, not to the run
            return i, None, describe_error(err), *self._pixels(None)

    def _pixels(self, source) -> tuple[int, ...]:
        """``(pixels,)`` of the image at ``source`` when measuring inputs, else ``()``."""
        if not self.measure_inputs:
            return ()
        if source is None:
            return (0,)
        if hasattr(source, "seek"):
            pixels = header_pixels(source)
            source.seek(0)
            return (pixels,)
        with open(source, "rb") as f:
            return (header_pixels(f),)


    def __getitems__(self, indices: list[int]) -> list[tuple[int, np.ndarray | None, str | None]]:
        """A batch; files on object storage are fetched by several threads at once, each
        decoding its image while the others still wait on the network."""
        if not indices or not is_url(self.files[indices[0]].path):
            return [self[i] for i in indices]
        adopt_environment(self.storage_env)
        with ThreadPoolExecutor(min(_FETCHERS, len(indices))) as pool:
            return list(pool.map(self._fetch_and_decode, indices))

    def _fetch_and_decode(self, i: int) -> tuple:
        url = self.files[i].path
        buffer = None
        try:
            fs, path = filesystem(url)
            buffer = io.BytesIO(fs.cat_file(path))
            image = decode_for_model(buffer, self.spec)  # a decompression bomb stops here
            buffer.seek(0)
            return i, image, None, *self._pixels(buffer)
        except Exception as err:  # as above: this row's failure, named by its URL
            message = describe_error(err)
            message = message.replace(repr(buffer), repr(url)) if buffer else message
            return i, None, message, *self._pixels(None)


#: JPEG start-of-frame markers (baseline, extended, progressive, lossless; not DHT/JPG/DAC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                       0xCF})


def header_pixels(f) -> int:
    """Pixels of the image whose bytes ``f`` (a binary file at offset 0) holds, from its header:
    PNG's IHDR or JPEG's start-of-frame, walked segment by segment (~15 µs, a fifth of Pillow's
    ``Image.open``); anything else through Pillow."""
    head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 24:
        width, height = struct.unpack(">II", head[16:24])
        return width * height
    if head[:2] == b"\xff\xd8":
        f.seek(2)
        while (marker := f.read(4)) and len(marker) == 4 and marker[0] == 0xFF:
            if marker[1] == 0xFF:  # fill byte before a marker
                f.seek(-3, io.SEEK_CUR)
                continue
            if marker[1] in _JPEG_SOF:
                frame = f.read(5)
                if len(frame) == 5:
                    height, width = struct.unpack(">HH", frame[1:5])
                    return width * height
                break
            f.seek(struct.unpack(">H", marker[2:4])[0] - 2, io.SEEK_CUR)
    f.seek(0)
    with Image.open(f) as im:
        return im.width * im.height


@dataclass(frozen=True)
class DecodedBatch:
    """Decoded images of one batch, and the rows that failed, each by file index."""

    indices: np.ndarray  # int64 (n,)
    #: uint8 (n, H, W, 3); a tensor so workers pass it through shared memory (on the GPU when
    #: decoded there)
    images: torch.Tensor
    failed: tuple[tuple[int, str], ...]
    #: int64 (n,): each decoded image's original pixel count, when the inputs were measured
    pixels: np.ndarray | None = None


def collate_decoded(items: list[tuple]) -> DecodedBatch:
    """Stack the decoded images; keep failed rows aside with their error.

    items: ``(index, image, error)``, or ``(index, image, error, pixels)`` when measured.
    """
    good = [item for item in items if item[2] is None]
    failed = tuple((item[0], item[2]) for item in items if item[2] is not None)
    if good:
        images = torch.from_numpy(np.stack([item[1] for item in good]))
    else:
        images = torch.empty((0, 0, 0, 3), dtype=torch.uint8)
    measured = bool(items) and len(items[0]) > 3
    pixels = np.array([item[3] for item in good], dtype=np.int64) if measured else None
    return DecodedBatch(np.array([item[0] for item in good], dtype=np.int64), images, failed,
                        pixels)


def gpu_decoded_batches(files: list[ImageFile], spec: Preprocessing, batch_size: int,
                        device: str = "cuda", ahead: int = GPU_BATCHES_AHEAD,
                        ) -> Iterator[DecodedBatch]:
    """Batches of ``files`` decoded on the GPU (:func:`export.pixels.decode_batch_cuda`), in
    file order; the images stay on ``device`` for a runtime that reads them there.

    A background thread decodes up to ``ahead`` batches in advance on its own CUDA stream, so
    reading and decoding the next batch overlaps the model running this one (on an H200 decoding
    and the model took turns before: resnet50 end to end was 0.25 of the model-only rate).
    """
    return prefetched(_gpu_batches(files, spec, batch_size, device), ahead)


def _gpu_batches(files: list[ImageFile], spec: Preprocessing, batch_size: int,
                 device: str) -> Iterator[DecodedBatch]:
    on_cuda = torch.device(device).type == "cuda"
    stream = torch.cuda.Stream(device=device) if on_cuda else None
    for start in range(0, len(files), batch_size):
        part = files[start:start + batch_size]
        with torch.cuda.stream(stream) if on_cuda else contextlib.nullcontext():
            images, indices, failed = decode_batch_cuda([f.path for f in part], spec, device)
            order = np.argsort(indices, kind="stable")
            images = images[torch.as_tensor(order, device=images.device)]
        if stream is not None:
            stream.synchronize()  # the batch is whole before another stream reads it
        yield DecodedBatch(np.asarray(indices, dtype=np.int64)[order] + start, images,
                           tuple((i + start, error) for i, error in failed))


def prefetched(items: Iterator[T], ahead: int) -> Iterator[T]:
    """``items`` made by a background thread up to ``ahead`` items before they are asked for.

    Order is kept; an exception in the producer is raised in the consumer at the item where it
    happened; a consumer that stops early (an error, a ``break``) stops the thread.
    """
    if ahead <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def offer(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None, False)):
                    return
        except BaseException as err:  # handed to the consumer, raised there
            offer((None, err, True))
            return
        offer((None, None, True))

    thread = threading.Thread(target=produce, name="lensflow-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err, finished = slots.get()
            if err is not None:
                raise err
            if finished:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def default_workers(n_files: int) -> int:
    """Decoding processes: none (decoding threads instead) for a small folder or a small host,
    else one per spare core, at most :data:`MAX_DECODE_WORKERS`."""
    cores = available_cores()
    if n_files < TINY_FOLDER or cores <= THREADED_HOST_CORES:
        return 0
    return max(1, min(MAX_DECODE_WORKERS, cores - 1))


def decoded_batches(files: list[ImageFile], spec: Preprocessing, batch_size: int,
                    workers: int | None, threads: int | None = None, *,
                    measure_inputs: bool = False) -> Iterator[DecodedBatch]:
    """Batches of ``files`` decoded as ``spec`` says, in file order.

    workers: DataLoader decoding processes (None: :func:`default_workers`); 0: decoding threads
    of this process instead (``threads`` of them, default one per core), batches ahead.
    measure_inputs: give each batch its images' original pixel counts (run health).
    """
    if not files:
        return iter(())
    workers = default_workers(len(files)) if workers is None else workers
    if not workers:
        return threaded_batches(files, spec, batch_size, threads, measure_inputs=measure_inputs)
    return iter(DataLoader(DecodedImages(files, spec, measure_inputs=measure_inputs),
                           batch_size=batch_size,
                           num_workers=workers, collate_fn=collate_decoded,
                           prefetch_factor=4, multiprocessing_context=worker_context(
                               "scoring.image_batches")))


def threaded_batches(files: list[ImageFile], spec: Preprocessing, batch_size: int,
                     threads: int | None = None, ahead: int = THREAD_BATCHES_AHEAD, *,
                     measure_inputs: bool = False) -> Iterator[DecodedBatch]:
    """Batches decoded by threads of this process, ``ahead`` batches before they are asked for.

    The JPEG libraries and Pillow's resize release the GIL, so a decoding thread runs beside the
    model (whose runtime releases it too) at no start-up cost: no process to fork, no torch to
    import in one, no batch to pass through shared memory. What suits a small folder, a Dask
    worker (a daemon may not start processes) and ``--workers 0``.
    """
    images = DecodedImages(files, spec, measure_inputs=measure_inputs)
    # One per core, not per spare core: the threads stop once ``ahead`` batches wait, so they
    # take the model's cores only while it has nothing to run. On 2 cores (quiet, best of 3) two
    # threads fed lite0 12 MP copies at 47.9 images/s where one managed 33.6, and 0.2 MP at 84.0
    # against 80.7.
    threads = available_cores() if threads is None else max(1, threads)

    def batches() -> Iterator[DecodedBatch]:
        with ThreadPoolExecutor(threads, thread_name_prefix="lensflow-decode") as pool:
            for start in range(0, len(files), batch_size):
                indices = range(start, min(start + batch_size, len(files)))
                if is_url(files[start].path):
                    items = images.__getitems__(list(indices))
                else:
                    items = list(pool.map(images.__getitem__, indices))
                yield collate_decoded(items)

    return prefetched(batches(), ahead)
