"""The DALI loader (``data.loader=dali``): ``fn.readers.webdataset`` over the shard
directory, JPEG decoding fused with the random crop, on the GPU (``mixed``) when the
device is CUDA and on the CPU otherwise.

The epoch is the wds loader's (docs/data.md): rank r reads its slice (``shard_id=r``,
``stick_to_shard=True``) as an endless stream through DALI's shuffle buffer. The position
is (epoch, batches consumed) plus DALI's own checkpoint, so a rebuilt pipeline continues
bit-identically. DALI cannot skip an undecodable JPEG: the pipeline stops, and the loader
finds the culprit with PIL and raises a ShardError naming shard and key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from dist_ast.data.shardset import ShardError, ShardSet, SliceLoader, read_cyclic
from dist_ast.data.transforms import NORM, SMALL, STORED_SMALL_SIZE, decode_jpeg, mix_seed

log = logging.getLogger(__name__)

LABEL_BYTES = 8  # ``cls`` is decimal text: padded to 8 bytes in the pipeline, parsed in torch
SHUFFLE_FILL = 1024


def bytes_to_ints(data: bytes, prefix: str = "dali") -> dict[str, int]:
    """bytes -> {prefix_len: n, prefix_0000: word, ...}, 8-byte little-endian words."""
    out = {f"{prefix}_len": len(data)}
    for i in range(0, len(data), 8):
        out[f"{prefix}_{i // 8:04d}"] = int.from_bytes(data[i : i + 8], "little")
    return out


def ints_to_bytes(state: dict[str, Any], prefix: str = "dali") -> bytes:
    n = int(state.get(f"{prefix}_len", 0))
    words = [int(state[f"{prefix}_{i:04d}"]) for i in range(-(-n // 8))]
    return b"".join(w.to_bytes(8, "little") for w in words)[:n]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def parse_labels(raw: torch.Tensor) -> torch.Tensor:
    """(n, LABEL_BYTES) uint8 ASCII digits, zero-padded on the right -> int64 labels."""
    raw = raw.to(torch.int64)
    digit = (raw >= 48) & (raw <= 57)
    out = torch.zeros(raw.shape[0], dtype=torch.int64, device=raw.device)
    for j in range(raw.shape[1]):
        d = digit[:, j]
        out = torch.where(d, out * 10 + (raw[:, j] - 48), out)
    return out


def _pipeline(
    shards: ShardSet,
    *,
    dataset: str,
    train: bool,
    image_size: int,
    rrc_min: float,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    seed: int,
    shard_id: int,
    num_shards: int,
    checkpoint: bytes | None = None,
    fuse_crop: bool = True,
):
    """The pipeline for one rank. ``fuse_crop=False`` decodes whole images and crops
    afterwards (for the benchmark's comparison; the fused decoder only decodes the crop)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    dec, op = ("mixed", "gpu") if gpu else ("cpu", "cpu")
    mean, std = NORM.get(dataset, NORM["imagenet"])
    mean = [255 * v for v in mean]
    std = [255 * v for v in std]
    S = image_size

    @pipeline_def(enable_checkpointing=train)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=shards.tars,
            index_paths=shards.idxs,
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            shard_id=shard_id,
            num_shards=num_shards,
            stick_to_shard=True,  # every pass (and epoch) reads this rank's own slice
            random_shuffle=train,
            initial_fill=SHUFFLE_FILL,
            pad_last_batch=not train,
            name="Reader",
        )
        label = fn.pad(cls, fill_value=0, axes=[0], shape=[LABEL_BYTES])
        cmn = dict(dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
        if dataset in SMALL:
            small = SMALL[dataset]
            img = fn.decoders.image(jpg, device=dec, output_type=types.RGB)
            if S != STORED_SMALL_SIZE:
                img = fn.resize(img, device=op, resize_x=S, resize_y=S)
            if train:
                p = small["pad"]
                # pad p on every side (a centred, larger crop), then a random S-crop at an
                # integer offset in [0, 2p]: torchvision's RandomCrop(S, padding=p)
                img = fn.crop(
                    img, device=op, crop=(S + 2 * p, S + 2 * p), out_of_bounds_policy="pad"
                )
                pos = [i / (2 * p) for i in range(2 * p + 1)]
                cmn.update(
                    crop=(S, S),
                    crop_pos_x=fn.random.uniform(values=pos),
                    crop_pos_y=fn.random.uniform(values=pos),
                )
                if small["flip"]:
                    cmn["mirror"] = fn.random.coin_flip()
        elif train and not fuse_crop:
            img = fn.decoders.image(jpg, device=dec, output_type=types.RGB)
            img = fn.random_resized_crop(
                img,
                device=op,
                size=(S, S),
                random_area=[rrc_min, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=10,
            )
            cmn["mirror"] = fn.random.coin_flip()
        elif train:
            img = fn.decoders.image_random_crop(
                jpg,
                device=dec,
                output_type=types.RGB,
                random_area=[rrc_min, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=10,
            )
            img = fn.resize(img, device=op, resize_x=S, resize_y=S)
            cmn["mirror"] = fn.random.coin_flip()
        else:
            img = fn.decoders.image(jpg, device=dec, output_type=types.RGB)
            img = fn.resize(img, device=op, resize_shorter=round(S / 0.875))
            cmn["crop"] = (S, S)
        img = fn.crop_mirror_normalize(img, device=op, **cmn)
        return img, label

    kwargs: dict[str, Any] = {}
    if checkpoint is not None:
        kwargs["checkpoint"] = checkpoint
    p = pipe(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=2,
        **kwargs,
    )
    p.build()
    return p


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _find_bad_jpeg(shards: ShardSet, lo: int, hi: int, start: int, count: int) -> str | None:
    """Decode slice positions start..start+count (cyclic in [lo, hi)) with PIL; describe
    the first undecodable JPEG."""
    count = min(count, hi - lo)
    for run in read_cyclic(shards, lo, hi, start, start + count, chunk=256):
        for key, jpg, _label, tar in run:
            try:
                decode_jpeg(jpg)
            except Exception as e:  # noqa: BLE001
                return f"shard {tar} key {key} ({type(e).__name__}: {e})"
    return None


def _decode_error(
    err: Exception, shards: ShardSet, lo: int, hi: int, start: int, count: int
) -> ShardError:
    where = _find_bad_jpeg(shards, lo, hi, start, count)
    first = str(err).strip().splitlines()
    msg = next((ln for ln in first if "failure" in ln or "rror" in ln), first[0] if first else "")
    if where:
        return ShardError(
            f"DALI stopped on an undecodable JPEG: {where}. Remove or rewrite it "
            f"(python -m dist_ast.data.shards --verify {shards.root}); DALI said: {msg}"
        )
    return ShardError(
        f"the DALI pipeline over {shards.root} failed near sample {lo + start % (hi - lo)} "
        f"(python -m dist_ast.data.shards --verify {shards.root} checks every shard): {msg}"
    )


class DaliTrainLoader(SliceLoader):
    """Endless training batches (``SliceLoader``'s arguments, and ``fuse_crop``)."""

    endless = True

    def __init__(self, root: str, *, fuse_crop: bool = True, **common: Any) -> None:
        super().__init__(root, split="train", **common)
        self.fuse_crop = fuse_crop
        self.num_threads = max(1, self.num_workers)
        self.epoch = 0
        self.batches_consumed = 0
        self._checkpoint: bytes | None = None
        self._pipe = self._iter = None

    def _build(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self._pipe = _pipeline(
            self.shards,
            dataset=self.dataset,
            train=True,
            image_size=self.image_size,
            rrc_min=self.rrc_min,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=_device_id(self.device),
            seed=mix_seed(self.seed, self.rank) & 0x7FFFFFFF,
            shard_id=self.rank,
            num_shards=self.world_size,
            checkpoint=self._checkpoint,
            fuse_crop=self.fuse_crop,
        )
        self._iter = DALIGenericIterator([self._pipe], ["x", "y"], auto_reset=False)

    def _stream_pos(self) -> int:
        return (self.epoch * self.num_batches + self.batches_consumed) * self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._iter is None:
            try:
                self._build()
            except RuntimeError as e:
                raise self._error(e) from e
        while True:
            while self.batches_consumed < self.num_batches:
                try:
                    out = next(self._iter)[0]
                except StopIteration:  # not expected: the reader streams forever
                    raise ShardError(f"DALI reader over {self.shards.root} ran dry") from None
                except RuntimeError as e:
                    raise self._error(e) from e
                self.batches_consumed += 1
                x = out["x"].to(self.device, non_blocking=True)
                yield x, parse_labels(out["y"]).to(self.device, non_blocking=True)
            self.epoch += 1
            self.batches_consumed = 0

    def _error(self, e: Exception) -> ShardError:
        self._pipe = self._iter = None
        window = SHUFFLE_FILL + 4 * self.batch_size
        start = max(0, self._stream_pos() - self.batch_size)
        return _decode_error(e, self.shards, self.lo, self.hi, start, window)

    def state_dict(self) -> dict[str, int]:
        """Plain ints: epoch, batches_consumed, and DALI's checkpoint (about 400 bytes) as
        ``dali_len`` plus 8-byte little-endian words ``dali_0000``, ``dali_0001``, ... .
        The DALI part is rank-local (its length may differ by rank): save it per rank."""
        if self._iter is not None:
            cp = self._iter.checkpoints()[0]
        else:
            cp = self._checkpoint
        if isinstance(cp, str):
            cp = cp.encode("latin-1")
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            **bytes_to_ints(cp or b""),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
        cp = ints_to_bytes(state)
        if not cp and (self.epoch or self.batches_consumed):
            log.warning(
                "no DALI checkpoint in the loader state: the reader restarts at the beginning "
                "of its slice (epoch %d, batch %d)",
                self.epoch,
                self.batches_consumed,
            )
        self._checkpoint = cp or None
        self._pipe = self._iter = None  # rebuilt from the checkpoint on the next iter()


class DaliEvalLoader(SliceLoader):
    """One pass over the rank's contiguous share of the validation split, no padding."""

    def __init__(self, root: str, **common: Any) -> None:
        super().__init__(root, **common)
        self.num_threads = max(1, self.num_workers)
        self._iter = None
        self._clean = True

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_batches == 0:
            return
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        done = 0
        if not self._clean:  # the last pass was abandoned part-way: start afresh
            self._iter = None
        self._clean = False
        try:
            if self._iter is None:
                pipe = _pipeline(
                    self.shards,
                    dataset=self.dataset,
                    train=False,
                    image_size=self.image_size,
                    rrc_min=0.08,
                    batch_size=self.batch_size,
                    num_threads=self.num_threads,
                    device_id=_device_id(self.device),
                    seed=0,
                    shard_id=self.rank,
                    num_shards=self.world_size,
                )
                self._iter = DALIGenericIterator(
                    [pipe],
                    ["x", "y"],
                    reader_name="Reader",
                    last_batch_policy=LastBatchPolicy.PARTIAL,
                    auto_reset=True,
                )
            for batch in self._iter:
                out = batch[0]
                done += len(out["x"])
                x = out["x"].to(self.device, non_blocking=True)
                yield x, parse_labels(out["y"]).to(self.device, non_blocking=True)
            self._clean = True
        except RuntimeError as e:
            self._iter = None
            n = self.hi - self.lo
            raise _decode_error(e, self.shards, self.lo, self.hi, done, n) from e
