"""The `make run` demo job: every rank says hello; global rank 3 fails with a traceback.

It records its exception in torch's error-file format (what `@record` from
torch.distributed.elastic does), so the report shows the traceback from the file.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def record(fn):  # a 10-line stand-in for torch's @record, so the demo needs no torch
    def wrapper() -> None:
        try:
            fn()
        except Exception as err:
            data = {
                "message": {
                    "message": f"{type(err).__name__}: {err}",
                    "extraInfo": {
                        "py_callstack": traceback.format_exc(),
                        "timestamp": str(int(time.time())),
                    },
                }
            }
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump(data, f)
            raise

    return wrapper


def load_shard(rank: int) -> list[int]:
    if rank == 3:
        raise ValueError(f"shard {rank} is corrupt: checksum mismatch")
    return list(range(rank * 10, rank * 10 + 10))


@record
def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    print(
        f"hello from global rank {rank} of {world} (local rank {os.environ['LOCAL_RANK']}, "
        f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']})",
        flush=True,
    )
    time.sleep(0.5)
    shard = load_shard(rank)
    print(f"rank {rank} loaded {len(shard)} samples", flush=True)
    time.sleep(30)  # the others would train here; rankd stops them when rank 3 fails


if __name__ == "__main__":
    main()
    sys.exit(0)
