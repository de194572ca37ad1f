"""`rlhfkit` as the distributed tests launch it: `torchrun ... tests/distributed/launch.py [--kill-after N]
COMMAND ARGS...` runs the command line of `rlhfkit COMMAND ARGS...`; with --kill-after, rank 0 SIGKILLs
itself once step N is done (after its checkpoint, if one is due), as a crash would, and torchrun tears
the other processes down."""

from __future__ import annotations

import os
import signal
import sys

from rlhfkit.training.loop import TrainLoop


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--kill-after"]:
        kill_after, args = int(args[1]), args[2:]
        run = TrainLoop.run

        def run_then_die(loop: TrainLoop) -> dict[str, float]:
            def die(loop: TrainLoop, metrics: dict[str, float]) -> None:
                if loop.step == kill_after and loop.rank == 0:
                    os.kill(os.getpid(), signal.SIGKILL)

            loop.callbacks.append(die)
            return run(loop)

        TrainLoop.run = run_then_die  # type: ignore[method-assign]
    from rlhfkit.cli import app

    sys.argv = ["rlhfkit", *args]
    app()


if __name__ == "__main__":
    main()
