"""Write and check WebDataset shards: pre-shuffled tars of ``jpg`` + ``cls`` samples.

    python -m dist_ast.data.shards --src /data/imagenet --out /data/imagenet-wds
    python -m dist_ast.data.shards --src digits --out runs/shards/digits
    python -m dist_ast.data.shards --verify /data/imagenet-wds

The source is an ImageFolder tree (``train/<class>/<image>`` and ``val/`` or ``test/``,
classes numbered as torchvision does) or ``digits`` (the bundled demo data). Each split is
shuffled once with ``--seed`` and cut into shards of ``--shard-size`` samples, each with a
DALI index; ``manifest.json`` lists classes, per-shard counts, sizes and sha256. A sample
is ``<key>.jpg`` (the source bytes unless it is not a baseline JPEG) and ``<key>.cls``;
undecodable sources are skipped and listed. Rerunning skips completed shards. This
module is the command line only (the writer is ``dist_ast.data.writer``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rich.logging import RichHandler

from dist_ast.data.shardset import ShardError
from dist_ast.data.writer import reindex, verify, write_shards

log = logging.getLogger("dist_ast.data.shards")  # not __name__: "__main__" under -m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dist_ast.data.shards",
        description="Write pre-shuffled WebDataset shards with DALI indices and a manifest.",
    )
    p.add_argument("--src", help="ImageFolder root (train/ and val/ or test/), or 'digits'")
    p.add_argument("--out", help="output directory")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--image-size", type=int, default=32, help="digits only: image side")
    p.add_argument("--no-check", action="store_true", help="skip the quick decode check")
    p.add_argument("--verify", metavar="DIR", help="deep-check an existing shard directory")
    p.add_argument("--reindex", metavar="DIR", help="rebuild the .idx files of a directory")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING if a.quiet else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False)],
    )
    try:
        if a.verify:
            log.info("verified %s: %s", a.verify, verify(a.verify))
        elif a.reindex:
            reindex(a.reindex)
        else:
            if not a.src or not a.out:
                p.error("--src and --out are required")
            write_shards(
                a.src,
                a.out,
                shard_size=a.shard_size,
                seed=a.seed,
                workers=a.workers,
                image_size=a.image_size,
                check_images=not a.no_check,
                progress=not a.quiet,
            )
    except (ShardError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
